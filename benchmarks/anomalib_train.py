"""Time anomalib 2.x's training epochs (STFPM, Reverse Distillation, CFlow, GANomaly) on one MVTec-layout category.

Runs under anomalib's own Python:

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_train.py --model stfpm --root DIR --category bottle \
        --weights resnet18.pth --epochs 3 --out r.json
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_train.py --model cflow --root DIR --category bottle \
        --backbone resnet18 --image-size 128 --epochs 3 --out r.json
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_train.py --model reverse_distillation --root DIR \
        --category brick --backbone resnet18 --weights resnet18.pth --seed 1 --test --out r.json

Comma-separated ``--category`` and ``--seed`` run each (seed, category) in turn in one process, with
``{seed}`` and ``{category}`` filled into ``--root``, ``--weights`` and ``--out`` (as ``anomalib_run.py``).

Settings are anomalib's defaults except where noted, each model with its default pre-processor
resizing to ``--image-size``:

- ``Stfpm(backbone=--backbone)`` (layers 1-3, SGD lr 0.4); its teacher is built with
  ``pre_trained=True`` hard-coded, so timm's download is turned off here and ``--weights`` (a full
  timm state dict) is copied in instead;
- ``ReverseDistillation(backbone=--backbone, pre_trained=False)`` (layers 1-3, add maps, Adam lr
  0.005), its encoder loading ``--weights``;
- ``Cflow(backbone=--backbone, pre_trained=False)`` (layers 2-4, 8 coupling blocks, condition 128,
  fiber batches of 64), its encoder loading ``--weights``;
- ``Ganomaly(batch_size=--batch-size)`` (64 features, latent 100).

``MVTecAD`` datamodule with its default workers (8 unless ``--workers``) and ``--batch-size``;
``Engine(accelerator="cpu", devices=1, max_epochs=--epochs)`` without a logger, with its default
checkpointing and with validation off (``limit_val_batches=0``), so an epoch is training only. A
Lightning callback records when each training epoch starts and ends. The JSON written holds
``epoch_s`` (start to end of each epoch's training: what ad's ``train/epoch_s`` measures) and
``epoch_wall_s`` (start to the next epoch's start, so checkpoint writing included).

``--seed S`` calls Lightning's ``seed_everything(S)`` before the model is built (default 42), so the
initial parameters and the shuffling follow it. ``--test`` builds the model without post-processor,
evaluator and visualizer, tests it on the test split after training, and writes the raw test outputs
(scores, labels, maps, masks as the model produced them) to ``<out>.raw.pt``, as ``anomalib_run.py``
does, so callers compute the metrics with ``ad``'s functions.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub

import timm  # noqa: E402
import torch  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Cflow, Ganomaly, ReverseDistillation, Stfpm  # noqa: E402
from anomalib_run import RawOutputs, expand_runs  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

IMPORT_S = time.perf_counter() - START
#: The frozen pretrained network each model can load ``--weights`` into, and its default backbone.
DEFAULT_BACKBONES = {"stfpm": "resnet18", "reverse_distillation": "wide_resnet50_2", "cflow": "wide_resnet50_2"}


class EpochClock(Callback):
    """perf_counter() at the start and end of every training epoch."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ends.append(time.perf_counter())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("stfpm", "reverse_distillation", "cflow", "ganomaly"), required=True)
    parser.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default=None,
                        help="default: resnet18 (STFPM), wide_resnet50_2 (RD, CFlow); GANomaly has none")
    parser.add_argument("--weights", help="full timm state dict for STFPM's teacher, RD's or CFlow's encoder; "
                        "default: random")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (anomalib default 8)")
    parser.add_argument("--seed", default="42", help="seed_everything(SEED) before the model is built")
    parser.add_argument("--test", action="store_true", help="test after training; raw outputs to <out>.raw.pt")
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    args = parser.parse_args()
    if args.weights and args.model == "ganomaly":
        parser.error("--weights: GANomaly has no pretrained network to load a weights file into")
    return args


def without_download(create_model):
    """timm.create_model with pretrained forced off: STFPM's teacher asks for a download we cannot make."""

    def create(*args, **kwargs):
        kwargs["pretrained"] = False
        return create_model(*args, **kwargs)

    return create


def load_weights(extractor: torch.nn.Module, path: str) -> None:
    """Copy a full timm state dict into anomalib's truncated feature extractor (strict)."""
    wanted = extractor.state_dict().keys()
    state = torch.load(path, map_location="cpu")
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def build(args: argparse.Namespace):
    size = (args.image_size, args.image_size)
    backbone = args.backbone or DEFAULT_BACKBONES.get(args.model)
    # Testing keeps the raw outputs: no post-processor (its normalisation needs the validation pass
    # that is off here), no evaluator or visualizer.
    extra = {"post_processor": False, "evaluator": False, "visualizer": False} if args.test else {}
    if args.model == "ganomaly":
        return Ganomaly(batch_size=args.batch_size, pre_processor=Ganomaly.configure_pre_processor(size), **extra)
    if args.model == "cflow":
        model = Cflow(backbone=backbone, pre_trained=False, pre_processor=Cflow.configure_pre_processor(size),
                      **extra)
        frozen = model.model.encoder.feature_extractor
    elif args.model == "stfpm":
        model = Stfpm(backbone=backbone, pre_processor=Stfpm.configure_pre_processor(size), **extra)
        frozen = model.model.teacher_model.feature_extractor
    else:
        model = ReverseDistillation(backbone=backbone, pre_trained=False,
                                    pre_processor=ReverseDistillation.configure_pre_processor(size), **extra)
        frozen = model.model.encoder.feature_extractor
    if args.weights:
        load_weights(frozen, args.weights)
    return model


def main() -> None:
    timm.create_model = without_download(timm.create_model)  # STFPM's teacher asks for a download
    for args in expand_runs(parse_args()):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Train one model on one category (and test it with ``--test``); write the JSON."""
    seed_everything(args.seed)
    model = build(args)
    data_kwargs = {"num_workers": args.workers} if args.workers is not None else {}
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, **data_kwargs)
    clock, raw = EpochClock(), RawOutputs()
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir="results", max_epochs=args.epochs,
                    limit_val_batches=0, callbacks=[clock, raw])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start
    if args.test:
        start = time.perf_counter()
        engine.test(model=model, datamodule=datamodule, verbose=False)
        test = {"test_s": time.perf_counter() - start}
        raw.save(Path(args.out).with_suffix(".raw.pt"))
    else:
        test = {}
    # Epoch k's wall time runs to the next epoch's start; the last one ends at its on_train_epoch_end.
    bounds = [*clock.starts[1:], clock.ends[-1]]
    out = {"model": args.model, "seed": args.seed, "import_s": IMPORT_S, "fit_s": fit_s, **test,
           "epoch_s": [end - begin for begin, end in zip(clock.starts, clock.ends, strict=True)],
           "epoch_wall_s": [end - begin for begin, end in zip(clock.starts, bounds, strict=True)],
           "threads": torch.get_num_threads(), "workers": datamodule.num_workers,
           "anomalib": __import__("anomalib").__version__, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
