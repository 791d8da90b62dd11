"""The training loop of gradient-trained methods: epochs, mixed precision, checkpoints, resumption.

Plain PyTorch (no Lightning). The trainer owns what every method shares; a method only says how to
compute its losses (:class:`ad.models.base.TrainableModel`). Training is repeatable: the data order
of epoch ``e`` is a permutation seeded by ``(seed, e)``, and a checkpoint holds every random state, so
a run killed and resumed ends with the same weights as one never interrupted (on CPU, bit for bit).

Checkpoints live in ``<run dir>/checkpoints/``: ``last.pt`` after every epoch (and when Ctrl-C stops
the run mid-epoch, at the last completed step) and ``best.pt`` when the monitored value improves.
They hold the trainable weights (the frozen backbone is rebuilt from the config and checked by its
hash), optimiser, gradient-scaler and random states, the position in training and the MLflow run id.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from ad.checkpoints import (
    CHECKPOINT_FORMAT,
    backbone_settings,
    check_checkpoint,
    frozen_prefixes,
    link_atomic,
    load_checkpoint,
    rng_states,
    save_atomic,
    set_rng_states,
    trainable_state,
)
from ad.data import collate
from ad.errors import ADError
from ad.models.base import TrainableModel
from ad.signals import interruption, restore, stop_signal_numbers
from ad.tracking import Tracker

log = logging.getLogger(__name__)

#: Metrics where larger is better when chosen as ``trainer.monitor``; losses are minimised.
MAXIMISED = ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO")


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch seeded by (seed, epoch), so a resumed run sees the same order.

    ``start`` skips the images of batches already done in that epoch (resuming mid-epoch).
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, self.size - self.start)


@dataclass
class Position:
    """Where training stands: completed epochs, steps done in the current one, and its loss sums so far."""

    epoch: int = 0
    step: int = 0
    loss_sums: dict[str, float] = field(default_factory=dict)
    best_value: float | None = None
    best_epoch: int | None = None


# -- Ctrl-C and stop signals ----------------------------------------------------------------------

class Interrupt:
    """Which interrupting signal arrived (None until one does); calling it says whether one did."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    def exception(self) -> KeyboardInterrupt:
        """What stops the run: KeyboardInterrupt for Ctrl-C, ``Stopped`` for SIGTERM and preemption."""
        return interruption(self.signum)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Interrupt]:
    """Turn the first Ctrl-C or stop signal (SIGTERM, preemption) into a flag checked between steps.

    The step finishes, so the checkpoint is consistent. A second one interrupts at once. Off the
    main thread signals cannot be caught: no-op there.
    """
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield interrupt
        return

    def handler(signum, frame):
        if interrupt():
            raise interruption(signum)
        interrupt.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("Interrupted: finishing this step and saving a checkpoint (%s again to stop now)", again)

    signums = (signal.SIGINT, *stop_signal_numbers())
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield interrupt
    finally:
        restore(previous)


# -- the trainer ----------------------------------------------------------------------------------

class Trainer:
    """Runs a :class:`TrainableModel`'s epochs (see module docstring).

    Args:
        run_dir: the run folder; checkpoints go to ``run_dir/checkpoints``.
        device: where to train.
        precision: autocast dtype of the training steps (None = fp32), on GPU and CPU alike: ``auto``
            resolves to bf16 only where the hardware runs it faster than fp32 (see ``resolve_precision``).
        tracker: receives per-epoch metrics (step = epoch number).
        max_epochs: epochs to train; None = the checkpoint's count when resuming, else the model's default.
        batch_size, num_workers: of the shuffled training loader.
        seed: seeds the data order of every epoch.
        eval_every: evaluate every N epochs (None/0 = never) with the ``evaluate`` callable given to fit.
        monitor: what ``best.pt`` maximises/minimises: a loss name (``loss``) or an evaluation metric;
            None = ``image_AUROC`` when evaluating, else ``loss``.
        checkpoint_every: write ``last.pt`` every N epochs (it is always written at the end).
        resume_from: a checkpoint to continue from (see :func:`find_checkpoint`).
    """

    def __init__(
        self,
        run_dir: Path,
        device: torch.device,
        precision: torch.dtype | None,
        tracker: Tracker,
        max_epochs: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        eval_every: int | None = None,
        monitor: str | None = None,
        checkpoint_every: int = 1,
        resume_from: Path | None = None,
    ) -> None:
        for key, value in (("max_epochs", max_epochs), ("eval_every", eval_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ADError(f"trainer.{key}: {value!r} must be a whole number ≥ 0 (or null)")
        if max_epochs == 0:
            raise ADError("trainer.max_epochs: 0 epochs trains nothing; give ≥ 1 or null for the method's default")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ADError(f"trainer.checkpoint_every: {checkpoint_every!r} must be a whole number ≥ 1")
        self.eval_every = eval_every or 0
        self.monitor = monitor or ("image_AUROC" if self.eval_every else "loss")
        if self.monitor in MAXIMISED and not self.eval_every:
            raise ADError(f"trainer.monitor: '{self.monitor}' is an evaluation metric but evaluation is off; "
                          f"set trainer.eval_every=N or trainer.monitor=loss")
        self.run_dir, self.device, self.tracker = Path(run_dir), device, tracker
        self.amp_dtype = precision
        self.max_epochs, self.batch_size, self.num_workers = max_epochs, batch_size, num_workers
        self.seed, self.checkpoint_every, self.resume_from = seed, checkpoint_every, resume_from
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.epochs = 0  # the total epoch count of this fit, known once it starts

    # -- public ----------------------------------------------------------------------------------

    def fit(self, model: TrainableModel, train_set: Dataset, evaluate: Callable[[], dict] | None = None) -> None:
        """Train ``model`` on ``train_set`` until ``max_epochs``; ``evaluate()`` returns test metrics."""
        if len(train_set) == 0:
            raise ADError("dataset: no training images")
        if self.eval_every and evaluate is None:
            raise ADError("trainer.eval_every: evaluation needs a test split")
        optimizers = model.configure_optimizers()
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        position = Position()
        if self.resume_from is not None:
            position = self.restore(model, optimizers, scaler)
        self.epochs = self.max_epochs or self.epochs or model.default_epochs
        self.statistics_loader = DataLoader(train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                            pin_memory=self.device.type == "cuda", collate_fn=collate)
        if position.epoch >= self.epochs:
            log.info("Checkpoint is at epoch %d of %d: nothing left to train", position.epoch, self.epochs)
        else:
            self.train_epochs(model, train_set, optimizers, scaler, position, evaluate)
        model.eval()
        model.on_train_end(self.statistics_loader, self.device)

    def train_epochs(self, model, train_set, optimizers, scaler, position: Position, evaluate) -> None:
        """The epochs from ``position`` to ``self.epochs``, each ending with its log and checkpoint."""
        sampler = EpochSampler(len(train_set), self.seed)
        # Its own generator: creating an epoch's iterator then never draws from the global RNG.
        loader = DataLoader(train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", collate_fn=collate,
                            generator=torch.Generator().manual_seed(self.seed))
        steps = math.ceil(len(train_set) / self.batch_size)
        with deferred_interrupt() as interrupted:
            while position.epoch < self.epochs:
                sampler.set_epoch(position.epoch, position.step * self.batch_size)
                model.train()
                start = time.perf_counter()
                self.run_epoch(model, loader, optimizers, scaler, position, steps, interrupted)
                seconds = time.perf_counter() - start
                position.epoch, position.step = position.epoch + 1, 0
                sums, position.loss_sums = position.loss_sums, {}
                losses = {name: value / steps for name, value in sums.items()}
                self.end_of_epoch(model, optimizers, scaler, position, losses, seconds, evaluate)
                if interrupted():  # during the epoch's last step or its end: last.pt may be epochs old
                    self.stop(self.save(model, optimizers, scaler, position), position, steps, interrupted)

    # -- one epoch -------------------------------------------------------------------------------

    def run_epoch(self, model, loader, optimizers, scaler, position: Position, steps: int, interrupted) -> None:
        """Steps over the (rest of the) epoch; on Ctrl-C saves the state after the last whole step."""
        epoch = position.epoch + 1
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.epochs}", total=steps, initial=position.step, unit="batch",
                   leave=False, disable=None, dynamic_ncols=True)
        update = self.update_function(optimizers, scaler, position, steps)
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
               else contextlib.nullcontext())
        try:
            for batch in bar:
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in batch.items()}
                with amp:
                    losses = model.optimization_step(batch, optimizers, update)
                for name, value in losses.items():
                    position.loss_sums[name] = position.loss_sums.get(name, 0.0) + value
                position.step += 1
                bar.set_postfix(loss=f"{position.loss_sums.get('loss', 0.0) / position.step:.4g}")
                if interrupted():
                    break
        except Exception:
            if not interrupted():  # a DataLoader worker killed by the same Ctrl-C: stop as interrupted
                raise
        finally:
            bar.close()
        if interrupted() and position.step < steps:
            self.stop(self.save(model, optimizers, scaler, position), position, steps, interrupted)

    def stop(self, path: Path, position: Position, steps: int, interrupted: Interrupt) -> None:
        """End an interrupted run after its checkpoint is written, saying how to continue it."""
        where = (f"epoch {position.epoch + 1}, step {position.step}/{steps}" if position.step
                 else f"the end of epoch {position.epoch}")
        log.warning("Stopped at %s of %d; saved %s. Resume with trainer.resume=%s", where, self.epochs, path, path)
        raise interrupted.exception()

    def update_function(self, optimizers, scaler, position: Position, steps: int):
        """The ``step(loss, optimizer)`` given to the model: finite check, backward, optimiser step."""

        def step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
            value = float(loss.detach())
            if not math.isfinite(value):
                self.diverged(value, position, steps, optimizer)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=False):  # backward outside autocast, as torch advises
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        return step

    def diverged(self, value: float, position: Position, steps: int, optimizer) -> None:
        """Stop with what happened, where, and what to try; the last good checkpoint stays as it was."""
        last = self.checkpoint_dir / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        lr = optimizer.param_groups[0]["lr"]
        precision = ", or train in full precision (trainer.precision=fp32)" if self.amp_dtype else ""
        raise ADError(f"training diverged: the loss is {value} at epoch {position.epoch + 1}/{self.epochs}, "
                      f"step {position.step + 1}/{steps}; lower the learning rate (model.lr, now {lr:g}){precision}; "
                      f"{kept}")

    # -- end of epoch ----------------------------------------------------------------------------

    def end_of_epoch(self, model, optimizers, scaler, position: Position, losses: dict, seconds: float,
                     evaluate) -> None:
        """Log the epoch's losses (and evaluation), update best.pt and last.pt."""
        epoch = position.epoch
        metrics = {f"train/{name}": value for name, value in losses.items()}
        metrics["train/epoch_s"] = seconds
        metrics["train/lr"] = optimizers[0].param_groups[0]["lr"]
        evaluated = {}
        if self.eval_every and epoch % self.eval_every == 0:
            model.eval()
            model.on_train_end(self.statistics_loader, self.device)  # statistics scoring needs, as after training
            evaluated = evaluate()
            model.train()
            metrics.update({f"eval/{name}": value for name, value in evaluated.items()})
        self.tracker.log_metrics(metrics, step=epoch)
        shown = " ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in metrics.items() if k != "train/lr")
        log.info("epoch %d/%d: %s", epoch, self.epochs, shown)

        improved = False
        value = losses.get(self.monitor, evaluated.get(self.monitor))
        if value is None and (evaluated or not self.eval_every):
            raise ADError(f"trainer.monitor: '{self.monitor}' is not among {sorted({*losses, *evaluated})}")
        if value is not None:
            maximise = self.monitor not in losses
            best = position.best_value
            improved = best is None or (value > best if maximise else value < best)
            if improved:
                position.best_value, position.best_epoch = float(value), epoch
        last = None
        if improved or epoch % self.checkpoint_every == 0 or epoch == self.epochs:
            last = self.save(model, optimizers, scaler, position)
        if improved:
            link_atomic(last, self.checkpoint_dir / "best.pt")

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, model, optimizers, scaler, position: Position) -> Path:
        """Write ``last.pt`` atomically and return its path."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model": trainable_state(model),
            "frozen": {prefix: module.identity() for prefix, module in frozen_prefixes(model).items()},
            "backbones": backbone_settings(model),
            "optimizers": [optimizer.state_dict() for optimizer in optimizers],
            "scaler": scaler.state_dict(),
            "rng": rng_states(),
            "epoch": position.epoch, "step": position.step, "loss_sums": dict(position.loss_sums),
            "best_value": position.best_value, "best_epoch": position.best_epoch, "monitor": self.monitor,
            "max_epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
            "run_id": self.tracker.run_id,
        }
        path = self.checkpoint_dir / "last.pt"
        save_atomic(payload, path)
        return path

    def restore(self, model, optimizers, scaler) -> Position:
        """Load ``resume_from`` into model, optimisers and scaler; restore random states; return the position."""
        path = self.resume_from
        state = load_checkpoint(path)
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        check_checkpoint(path, model, state)
        for key, value in (("batch_size", self.batch_size), ("seed", self.seed)):
            if state[key] != value:
                log.warning("Resuming with trainer.%s=%s where the checkpoint used %s: the run will not repeat "
                            "an uninterrupted one exactly", key, value, state[key])
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith(tuple(frozen_prefixes(model)))]
        if missing or unexpected:
            raise ADError(f"trainer.resume: {path} does not fit this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); resume with the run's model settings")
        try:
            for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as exc:
            raise ADError(f"trainer.resume: optimiser state in {path} does not fit ({exc})") from None
        if scaler.is_enabled() and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        self.epochs = state["max_epochs"]
        log.info("Resuming %s from %s: epoch %d, step %d", name.rsplit(".", 1)[-1], path, state["epoch"],
                 state["step"])
        return Position(epoch=state["epoch"], step=state["step"], loss_sums=dict(state["loss_sums"]),
                        best_value=state["best_value"], best_epoch=state["best_epoch"])
