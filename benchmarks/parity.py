"""Step-by-step parity of ad's trained methods with anomalib 2.x on identical inputs and parameters.

Runs under anomalib's own Python with ``ad`` installed into it (``pip install -e .`` there):

    /tmp/anomalib-venv/bin/python benchmarks/parity.py --model reverse_distillation --backbone resnet18
    /tmp/anomalib-venv/bin/python benchmarks/parity.py --model stfpm --steps 8 --out stfpm.json
    /tmp/anomalib-venv/bin/python benchmarks/parity.py --summarise stfpm.json stfpm-bf16.json

For one method it builds anomalib's Lightning module and ad's model, copies anomalib's initial
parameters into ad's (the frozen backbone from one random timm checkpoint into both), feeds both the
same normalised batches of ad's generated data in the same order, and after each optimiser step
compares the loss and every trained parameter. At the end both score the same test images; maps,
scores and the metrics computed from each (with ad's metrics, on raw scores) are compared. The
report names the first step and the first tensor where the two part beyond float tolerance.
``--free`` runs over categories and seeds give each metric's mean on both sides and the paired
difference run by run; ``--summarise`` merges such reports into one table.

Everything that ad does on purpose differently is off here: fp32 throughout (no bf16 autocast), no
feature cache, and no channels-last layout, so that what is left to differ is the method itself.
Anomalib's pre-processor is bypassed: both get the same tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from ad.data import Synthetic, collate  # noqa: E402
from ad.metrics import compute_metrics  # noqa: E402

#: Relative differences (‖a − b‖ / ‖b‖) beyond which the two sides are said to part. Gradients are
#: judged as a whole (all parameters' gradients as one vector) and per tensor with more room: at
#: initialisation a batch-norm bias's gradient is a near-cancelling sum, whose float rounding alone
#: differs by a few 1e-2 between two correct implementations while the whole agrees to 1e-6.
TOLERANCE = {"loss": 1e-5, "grad": 1e-4, "grad_tensor": 1e-1, "output": 1e-4}


@dataclass
class Pair:
    """ad's model, anomalib's Lightning module, and how their trained tensors correspond."""

    ours: torch.nn.Module
    theirs: torch.nn.Module
    names: dict[str, str]  # ours' state-dict key -> anomalib's
    #: ours' key -> function of anomalib's tensor giving ours (where the two store it differently)
    convert: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    #: ours' key -> function of (ad's tensor, anomalib's tensor) giving anomalib's, the inverse of ``convert``
    convert_back: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    losses: dict[str, str] = field(default_factory=lambda: {"loss": "loss"})  # ours' loss name -> anomalib's
    #: compare the test outputs (False where ad differs on purpose, e.g. CFlow's normalisation)
    outputs_comparable: bool = True
    #: where ``outputs_comparable`` is False: (scores, maps) of ad's trained model through anomalib's
    #: post-processing, so that the metrics of the two trainings can be compared on equal terms
    ours_as_anomalib: Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor], tuple] | None = None
    #: score the whole test set in one batch (where anomalib's maps depend on the batch they are in)
    test_in_one_batch: bool = False


def random_backbone(name: str, seed: int, folder: Path) -> Path:
    """A full timm state dict of randomly initialised ``name``, written once so both libraries load it."""
    torch.manual_seed(seed)
    path = folder / f"{name}-random-{seed}.pth"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    return path


def load_frozen(extractor: torch.nn.Module, path: Path) -> None:
    """Copy the checkpoint into anomalib's truncated timm extractor (strict over the keys it has)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    wanted = extractor.state_dict().keys()
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


#: ad's side of the comparison: fp32 and NCHW unless ``--precision bf16`` / ``--channels-last`` ask for
#: what ad runs with by default on a CPU with native bf16.
SETTINGS = {"channels_last": False, "precision": "fp32"}


def backbone_spec(name: str, weights: Path) -> dict:
    """ad's backbone settings for the comparison: the shared checkpoint, and ``SETTINGS``."""
    return {"name": name, "weights": str(weights), "tag": None, **SETTINGS}


def our_precision() -> contextlib.AbstractContextManager:
    """The autocast ad's trainer runs a training step under with ``SETTINGS['precision']``."""
    bf16 = SETTINGS["precision"] == "bf16"
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# -- the methods ----------------------------------------------------------------------------------

RD_BOTTLENECK = {"layer1_down.0.0": "conv1", "layer1_down.0.1": "bn1", "layer1_down.1.0": "conv2",
                 "layer1_down.1.1": "bn2", "layer2_down.0": "conv3", "layer2_down.1": "bn3", "stage": "bn_layer"}


# Each builder makes ad's model first, so that under a given seed its initial parameters are the ones
# ``ad`` itself draws (``--record`` copies them into anomalib's model).


def rd_pair(backbone: str, weights: Path, size: int) -> Pair:
    """Reverse Distillation: anomalib's OCBE names its layers conv1-3/bn1-3/bn_layer (its conv4/bn4 are unused)."""
    from anomalib.models import ReverseDistillation as Theirs

    from ad.models.reverse_distillation import ReverseDistillation

    ours = ReverseDistillation(backbone_spec(backbone, weights))
    theirs = Theirs(backbone=backbone, pre_trained=False, anomaly_map_mode="add")
    theirs.model.anomaly_map_generator.image_size = (size, size)
    load_frozen(theirs.model.encoder.feature_extractor, weights)
    names = {}
    for key in ours.state_dict():
        if key.startswith("decoder."):
            names[key] = key
        elif key.startswith("bottleneck."):
            rest = key.removeprefix("bottleneck.")
            prefix = next(p for p in RD_BOTTLENECK if rest.startswith(p + "."))
            names[key] = f"bottleneck.{RD_BOTTLENECK[prefix]}{rest[len(prefix):]}"
    return Pair(ours, theirs, names)


def stfpm_pair(backbone: str, weights: Path, size: int) -> Pair:
    """STFPM: the student is a timm features-only model on both sides, with the same keys."""
    from anomalib.models import Stfpm as Theirs

    from ad.models.stfpm import Stfpm

    ours = Stfpm(backbone_spec(backbone, weights))
    create = timm.create_model
    timm.create_model = lambda *a, **k: create(*a, **{**k, "pretrained": False})  # its teacher asks for a download
    try:
        theirs = Theirs(backbone=backbone)
    finally:
        timm.create_model = create
    load_frozen(theirs.model.teacher_model.feature_extractor, weights)
    names = {key: f"student_model.feature_extractor.{key.removeprefix('student.')}"
             for key in ours.state_dict() if key.startswith("student.")}
    return Pair(ours, theirs, names)


def in_order(ours: torch.nn.Module, theirs: torch.nn.Module, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Pair the two state dicts key by key in registration order (the architectures match, the names not)."""
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    mine = [key for key in ours_state if key not in skip]
    if len(mine) != len(theirs_state):
        raise SystemExit(f"{len(mine)} tensors in ad's model against {len(theirs_state)} in anomalib's")
    for key, other in zip(mine, theirs_state, strict=True):
        if ours_state[key].shape != theirs_state[other].shape:
            raise SystemExit(f"{key} {tuple(ours_state[key].shape)} != {other} {tuple(theirs_state[other].shape)}")
    return dict(zip(mine, theirs_state, strict=True))


def ganomaly_pair(backbone: str, weights: Path, size: int) -> Pair:
    """GANomaly: the same layers in the same order under other names; ad's discriminator re-initialisation off."""
    from anomalib.models import Ganomaly as Theirs

    from ad.models.ganomaly import Ganomaly

    ours = Ganomaly(image_size=size, reinit_discriminator_below=None, channels_last=SETTINGS["channels_last"])
    theirs = Theirs(pre_processor=Theirs.configure_pre_processor((size, size)))
    names = in_order(ours, theirs.model, skip=("mean", "std", "discriminator_resets"))
    return Pair(ours, theirs, names, losses={"loss": "generator_loss", "discriminator": "discriminator_loss"})


@torch.no_grad()
def cflow_as_anomalib(ours: torch.nn.Module, theirs: torch.nn.Module, images: torch.Tensor) -> tuple:
    """ad's CFlow likelihoods turned into maps by anomalib's generator: per layer ``exp(log p − max over
    the batch)``, upsampled, summed, and subtracted from the sum's maximum over the batch."""
    log_p = ours.log_likelihoods(images)  # per layer (B, H, W), as anomalib's distribution in (b h w) order
    maps = theirs.anomaly_map_generator(distribution=[layer.reshape(-1) for layer in log_p],
                                        height=[layer.shape[1] for layer in log_p],
                                        width=[layer.shape[2] for layer in log_p], image_size=images.shape[-2:])
    maps = maps.reshape(len(images), *images.shape[-2:])
    return maps.flatten(1).amax(1), maps


def cflow_pair(backbone: str, weights: Path, size: int) -> Pair:
    """CFlow: ad's coupling blocks hold FrEIA's AllInOneBlock parameters (the permutation as indices).

    The test outputs are not compared: ad normalises each layer's likelihood by its maximum over the
    training images, anomalib by the maximum over the test batch it is scoring (an intended difference).
    The two give each layer a different weight in the summed map, so neither is a monotone function
    of the other and their metrics differ even for identical flows; ad's trained flows are therefore
    also scored through anomalib's map generator (``ours_anomalib_norm``), with the whole test set in
    one batch so that anomalib's normalisation is one transform shared by all test images.
    """
    from anomalib.models import Cflow as Theirs

    from ad.models.cflow import Cflow

    ours = Cflow(backbone_spec(backbone, weights))
    theirs = Theirs(backbone=backbone, pre_trained=False)
    load_frozen(theirs.model.encoder.feature_extractor, weights)
    names, convert, back = {}, {}, {}
    for key in ours.state_dict():
        if not key.startswith("decoders."):
            continue
        _, layer, _, block, rest = key.split(".", 4)
        prefix = f"decoders.{layer}.module_list.{block}."
        if rest == "permutation":
            names[key], convert[key] = prefix + "w_perm", lambda w: w.reshape(w.shape[0], -1).argmax(1)
            back[key] = lambda order, w: torch.eye(len(order), dtype=w.dtype)[order].reshape(w.shape)
        else:
            names[key] = prefix + rest
            if rest.startswith("global_"):
                convert[key], back[key] = (lambda t: t.flatten()), (lambda t, like: t.reshape(like.shape))
    # anomalib's logged loss sums -logsigmoid over every fiber of every layer, ad's averages it per layer:
    # different reductions of the same terms, so the gradients are what is compared.
    return Pair(ours, theirs, names, convert, back, losses={}, outputs_comparable=False,
                ours_as_anomalib=cflow_as_anomalib, test_in_one_batch=True)


PAIRS = {"reverse_distillation": (rd_pair, "wide_resnet50_2"), "stfpm": (stfpm_pair, "resnet18"),
         "ganomaly": (ganomaly_pair, None), "cflow": (cflow_pair, "wide_resnet50_2")}


# -- the comparison -------------------------------------------------------------------------------

def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale else float((a - b).norm().item() > 0)


def theirs_as_ours(pair: Pair, key: str) -> torch.Tensor:
    """anomalib's tensor for ours' ``key``, converted to how ad stores it."""
    value = pair.theirs.model.state_dict()[pair.names[key]]
    return pair.convert[key](value) if key in pair.convert else value


def copy_initial(pair: Pair) -> None:
    """anomalib's current trainable parameters and buffers into ad's model."""
    ours = pair.ours.state_dict()
    with torch.no_grad():
        for key in pair.names:
            ours[key].copy_(theirs_as_ours(pair, key))


def copy_to_theirs(pair: Pair) -> None:
    """ad's current trainable parameters and buffers into anomalib's model (the other direction)."""
    ours, theirs = pair.ours.state_dict(), pair.theirs.model.state_dict()
    with torch.no_grad():
        for key, their_key in pair.names.items():
            value = ours[key]
            if key in pair.convert_back:
                value = pair.convert_back[key](value, theirs[their_key])
            theirs[their_key].copy_(value)


def their_optimizers(module) -> list[torch.optim.Optimizer]:
    """The optimisers anomalib's ``configure_optimizers`` returns (bare, in a list, or in a dict)."""
    config = module.configure_optimizers()
    if isinstance(config, dict):
        config = config["optimizer"]
    return list(config) if isinstance(config, (list, tuple)) else [config]


def parted(pair: Pair) -> list[tuple[str, float]]:
    """Every mapped floating-point tensor with its relative difference, largest first."""
    ours = pair.ours.state_dict()
    diffs = [(key, relative(ours[key], theirs_as_ours(pair, key))) for key in pair.names
             if ours[key].is_floating_point()]
    return sorted(diffs, key=lambda item: -item[1])


class GradientLog:
    """Every gradient the optimisers are about to apply, per parameter name and in order (step pre-hooks)."""

    def __init__(self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
        self.names = {id(param): name for name, param in module.named_parameters()}
        self.grads: dict[str, list[torch.Tensor]] = defaultdict(list)
        for optimizer in optimizers:
            optimizer.register_step_pre_hook(self.record)

    def record(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.grads[self.names[id(param)]].append(param.grad.detach().clone())


def gradient_differences(pair: Pair, ours: GradientLog, theirs: GradientLog) -> tuple[float, list[tuple[str, float]]]:
    """The relative difference of all gradients as one vector, and each mapped parameter's largest
    relative gradient difference over the step's updates, largest first."""
    diffs, squared_diff, squared_norm = [], 0.0, 0.0
    for key, mine in ours.grads.items():
        other = theirs.grads.get(pair.names.get(key, ""), [])
        if len(mine) != len(other):
            diffs.append((key, float("inf")))  # updated a different number of times
            continue
        convert = pair.convert.get(key, lambda g: g)
        pairs = [(a.double(), convert(b).double()) for a, b in zip(mine, other, strict=True)]
        squared_diff += sum((a - b).square().sum().item() for a, b in pairs)
        squared_norm += sum(b.square().sum().item() for _, b in pairs)
        diffs.append((key, max(relative(a, b) for a, b in pairs)))
    missing = set(pair.names.values()) & set(theirs.grads) - {pair.names[k] for k in ours.grads if k in pair.names}
    diffs += [(f"(anomalib) {name}", float("inf")) for name in sorted(missing)]  # trained on their side only
    whole = (squared_diff / squared_norm) ** 0.5 if squared_norm else float(squared_diff > 0)
    return whole, sorted(diffs, key=lambda item: -item[1])


def their_step(module, optimizers: list[torch.optim.Optimizer], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One anomalib training step as Lightning runs it, without a Trainer attached."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    batch = SimpleNamespace(image=images)
    if module.automatic_optimization:
        out = module.training_step(batch, 0)
        (optimizer,) = optimizers
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return out
    module.optimizers = lambda *args, **kwargs: optimizers if len(optimizers) > 1 else optimizers[0]
    module.manual_backward = lambda loss, *args, **kwargs: loss.backward(*args, **kwargs)
    return module.training_step(batch, 0)


def our_update(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """ad's trainer's update in fp32: zero, backward, step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def train_side_by_side(pair: Pair, batches: list[torch.Tensor], resync: bool, seed: int) -> list[dict]:
    """One training step per batch on both sides; losses, gradients and parameters compared after each.

    With ``resync`` every step starts from anomalib's parameters copied into ad's, so each row shows
    what one step does from identical states: Adam turns float noise in a near-zero gradient into a
    full-size step of the other sign, and without resyncing such noise compounds over steps. Both
    sides draw their random numbers (CFlow's fiber shuffles) from the same seed at each step.
    """
    ours_opts = pair.ours.configure_optimizers()
    theirs_opts = their_optimizers(pair.theirs)
    pair.ours.train()
    pair.theirs.model.train()
    steps = []
    for index, images in enumerate(batches, start=1):
        ours_grads, theirs_grads = GradientLog(pair.ours, ours_opts), GradientLog(pair.theirs.model, theirs_opts)
        torch.manual_seed(seed + index)
        with our_precision():
            ours_losses = pair.ours.optimization_step({"image": images}, ours_opts, our_update)
        torch.manual_seed(seed + index)
        theirs_losses = their_step(pair.theirs, theirs_opts, images)
        for optimizer in (*ours_opts, *theirs_opts):
            optimizer._optimizer_step_pre_hooks.clear()
        row = {"step": index}
        for ours_name, their_name in pair.losses.items():
            mine, other = float(ours_losses[ours_name]), float(theirs_losses[their_name])
            row[f"{ours_name}_ours"], row[f"{ours_name}_anomalib"] = mine, other
            row[f"{ours_name}_rel"] = abs(mine - other) / abs(other) if other else float(mine != other)
        row["loss_rel"] = max((row[f"{name}_rel"] for name in pair.losses), default=0.0)
        row["grad_rel"], per_tensor = gradient_differences(pair, ours_grads, theirs_grads)
        row["grad_tensor"], row["grad_tensor_rel"] = per_tensor[0]
        row["param_tensor"], row["param_rel"] = parted(pair)[0]
        steps.append(row)
        shown = ", ".join(f"{name} {row[f'{name}_ours']:.6g} / {row[f'{name}_anomalib']:.6g}" for name in pair.losses)
        print(f"step {index}: {shown or 'loss not compared'} (rel {row['loss_rel']:.1e}); gradients "
              f"{row['grad_rel']:.1e}, largest per tensor {row['grad_tensor_rel']:.1e} ({row['grad_tensor']}); "
              f"parameters {row['param_rel']:.1e} ({row['param_tensor']})", flush=True)
        if resync:
            copy_initial(pair)
    return steps


@torch.no_grad()
def score_both(pair: Pair, train: torch.Tensor, test: torch.Tensor, batch: int) -> dict[str, torch.Tensor | None]:
    """Scores and (where the method has them) maps of the test images from both models in eval mode."""
    pair.ours.eval()
    pair.theirs.model.eval()
    pair.ours.on_train_end([{"image": chunk} for chunk in train.split(batch)], torch.device("cpu"))
    out = defaultdict(list)
    for chunk in test.split(len(test) if pair.test_in_one_batch else batch):
        ours, theirs = pair.ours(chunk), pair.theirs.model(chunk)
        out["scores_ours"].append(ours.scores)
        out["scores_anomalib"].append(theirs.pred_score.reshape(-1))
        if ours.maps is not None:
            out["maps_ours"].append(ours.maps)
            out["maps_anomalib"].append(theirs.anomaly_map.reshape(ours.maps.shape))
        if pair.ours_as_anomalib is not None:
            scores, maps = pair.ours_as_anomalib(pair.ours, pair.theirs.model, chunk)
            out["scores_ours_anomalib_norm"].append(scores)
            out["maps_ours_anomalib_norm"].append(maps)
    merged = {key: torch.cat(value) for key, value in out.items()}
    return {"maps_ours": None, "maps_anomalib": None, **merged}


def load_split(dataset, split: str) -> dict:
    """One batch holding the whole split (normalised images, masks, labels)."""
    items = getattr(dataset, f"{split}_set")(None)
    return collate([items[i] for i in range(len(items))])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PAIRS), required="--summarise" not in sys.argv)
    parser.add_argument("--backbone", default=None, help="default: the method's anomalib default")
    parser.add_argument("--categories", default="brick", help="comma-separated generated textures")
    parser.add_argument("--seeds", default="0", help="comma-separated: data, backbone and initial parameters")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="training steps compared one by one")
    parser.add_argument("--free", action="store_true",
                        help="let both train on without copying anomalib's parameters into ad's after each step")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="ad's side: bf16 autocast as ad's trainer.precision=auto picks on CPUs with native bf16")
    parser.add_argument("--channels-last", action="store_true", help="ad in its default NHWC layout")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep batch norm apart in ad's frozen backbone, as anomalib does (ad folds it in)")
    parser.add_argument("--out", help="JSON file for the report")
    parser.add_argument("--record", help="instead: record anomalib's metrics in the tiny setting of "
                                         "tests/test_map_direction.py into this JSON file")
    parser.add_argument("--summarise", nargs="+", metavar="JSON",
                        help="instead: merge the runs of these --out files and print the table per model and "
                             "precision, with ad's bf16 − fp32 run by run where both were run")
    return parser.parse_args()


def compare(args: argparse.Namespace, category: str, seed: int) -> dict:
    """One side-by-side training and scoring on one generated category from one seed."""
    build, default_backbone = PAIRS[args.model]
    backbone = args.backbone or default_backbone
    work = Path(tempfile.mkdtemp(prefix="ad-parity-"))
    dataset = Synthetic(category=category, image_size=args.image_size, n_train=args.n_train, n_test_good=10,
                        n_test_defect=10, seed=seed, root=str(work / "data"))
    train, test = load_split(dataset, "train"), load_split(dataset, "test")
    order = torch.randperm(len(train["image"]), generator=torch.Generator().manual_seed(seed))
    batches = [train["image"][order[(i * args.batch_size) % len(order):][:args.batch_size]]
               for i in range(args.steps)]

    weights = random_backbone(backbone, seed, work) if backbone else None
    torch.manual_seed(seed)
    pair = build(backbone, weights, args.image_size)
    copy_initial(pair)
    print(f"{args.model} · {backbone} · {category} · seed {seed} · {args.image_size} px · batches of "
          f"{args.batch_size} · ad in {args.precision}; after copying, largest difference {parted(pair)[0][1]:.1e}",
          flush=True)
    steps = train_side_by_side(pair, batches, resync=not args.free, seed=seed)
    first = next((row for row in steps if row["loss_rel"] > TOLERANCE["loss"] or row["grad_rel"] > TOLERANCE["grad"]
                  or row["grad_tensor_rel"] > TOLERANCE["grad_tensor"]), None)

    scored = score_both(pair, train["image"], test["image"], args.batch_size)
    masks, labels = test["mask"].bool(), test["label"]
    maps = scored["maps_ours"] is not None
    # what is held against anomalib's outputs: ad's own, or (where those differ on purpose) ad's through anomalib's
    # post-processing
    mine = "ours" if pair.outputs_comparable else "ours_anomalib_norm" if pair.ours_as_anomalib else None
    sides = [key.removeprefix("scores_") for key in scored if key.startswith("scores_")]
    metrics = {side: compute_metrics(scored[f"scores_{side}"], labels, scored[f"maps_{side}"], masks)
               for side in sides}
    report = {
        "model": args.model, "backbone": backbone, "category": category, "seed": seed,
        "image_size": args.image_size, "precision": args.precision, "steps": steps,
        "first_parting_step": first["step"] if first else None,
        "first_parting_tensor": first["grad_tensor"] if first else None, "resynced": not args.free,
        "outputs_compared": mine,
        "scores_rel": relative(scored[f"scores_{mine}"], scored["scores_anomalib"]) if mine else None,
        "maps_rel": relative(scored[f"maps_{mine}"], scored["maps_anomalib"]) if mine and maps else 0.0,
        "metrics": metrics,
    }
    if mine:
        print(f"{mine} against anomalib: maps rel {report['maps_rel']:.1e}, scores rel {report['scores_rel']:.1e}")
    for side, values in metrics.items():
        print(f"{side:>18}: " + "  ".join(f"{k} {v:.4f}" for k, v in values.items() if "threshold" not in k))
    outputs_agree = mine is None or args.free or max(report["maps_rel"], report["scores_rel"]) <= TOLERANCE["output"]
    if args.free:  # float noise compounds over steps: only the metrics are comparable
        report["agree"] = None
        print(f"free run: the gradients drift apart from step {first['step']}" if first else
              "free run: the gradients stay within tolerance", flush=True)
    else:
        report["agree"] = first is None and outputs_agree
        print("agree within tolerance" if report["agree"] else
              f"first parting: step {first['step']}, {report['first_parting_tensor']}" if first else
              "training agrees, the test outputs part", flush=True)
    return report


def metric_values(reports: list[dict], side: str) -> dict[str, torch.Tensor]:
    """Every metric of one side over the runs (thresholds left out)."""
    keys = [k for k in reports[0]["metrics"][side] if "threshold" not in k]
    return {k: torch.tensor([r["metrics"][side][k] for r in reports], dtype=torch.float64) for k in keys}


def spread(values: torch.Tensor) -> float:
    """Standard deviation over the runs (0 for one run)."""
    return values.std().item() if len(values) > 1 else 0.0


def summary(reports: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and standard deviation of every metric over the runs, per side."""
    return {side: {k: (v.mean().item(), spread(v)) for k, v in metric_values(reports, side).items()}
            for side in reports[0]["metrics"]}


def paired(reports: list[dict], base: str = "anomalib") -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per side other than ``base``: each metric's run-by-run difference side − base as (mean, std,
    largest in size); both sides of a run start from the same parameters, so this is sharper than
    comparing the two means against the seed spread."""
    reference = metric_values(reports, base)
    out = {}
    for side in reports[0]["metrics"]:
        if side != base:
            out[side] = {}
            for k, v in metric_values(reports, side).items():
                delta = v - reference[k]
                out[side][k] = (delta.mean().item(), spread(delta), delta.abs().max().item())
    return out


def print_table(reports: list[dict]) -> None:
    """The mean ± std of every side and the paired differences from anomalib, over the runs."""
    print(f"over {len(reports)} runs (mean ± std):")
    for side, values in summary(reports).items():
        print(f"{side:>18}: " + "  ".join(f"{k} {m:.3f} ± {s:.3f}" for k, (m, s) in values.items()))
    for side, values in paired(reports).items():
        print(f"{side + ' − anomalib':>29}: " + "  ".join(f"{k} {m:+.3f} ± {s:.3f} (max {x:.3f})"
                                                      for k, (m, s, x) in values.items()))


def summarise(paths: list[str]) -> None:
    """Merge the runs of report files and print the table per model and precision; where a model was run
    in both precisions on the same categories and seeds, also ad's bf16 − fp32 run by run."""
    groups = defaultdict(dict)
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            groups[run["model"], run["precision"]][run["category"], run["seed"]] = run
    for (model, precision), runs in sorted(groups.items()):
        print(f"\n{model}, ad in {precision}, {len(runs)} runs")
        print_table(list(runs.values()))
    for (model, precision), runs in sorted(groups.items()):
        fp32 = groups.get((model, "fp32"), {})
        common = sorted(set(runs) & set(fp32))
        if precision == "bf16" and common:
            bf16_runs = [{"metrics": {"ours": runs[key]["metrics"]["ours"], "fp32": fp32[key]["metrics"]["ours"]}}
                         for key in common]
            print(f"\n{model}: ad's bf16 − ad's fp32 over {len(common)} runs (fp32's spread: ± above)")
            for k, (m, s, x) in paired(bf16_runs, base="fp32")["ours"].items():
                print(f"  {k} {m:+.3f} ± {s:.3f} (max {x:.3f})")


#: The tiny setting of tests/test_map_direction.py: generated texture, resnet18 backbone drawn from the
#: seed, ad's initial parameters from the same seed, the training images in order, cycled.
#: CFlow needs a 128 px image for 64 layer4 fibers. GANomaly has no map, and in such short trainings
#: its image AUROC stays near chance in both libraries (anomalib 0.625 after 32 steps here, on 16
#: test images), so it has no direction test; the step-by-step comparison covers it.
DIRECTION_SETUP = {"category": "brick", "image_size": 64, "n_train": 16, "n_test_good": 8, "n_test_defect": 8,
                   "seed": 0, "batch_size": 8, "steps": 8, "backbone": "resnet18"}
DIRECTION_OVERRIDES = {"cflow": {"image_size": 128}}


def record_direction(model: str, path: Path) -> None:
    """What anomalib's model reaches from ad's initial parameters in the tiny setting; merged into ``path``.

    tests/test_map_direction.py trains ad's model the same way and holds it to these figures, so its
    bound comes from anomalib, not from ad.
    """
    setup = {**DIRECTION_SETUP, **DIRECTION_OVERRIDES.get(model, {})}
    work = Path(tempfile.mkdtemp(prefix="ad-direction-"))
    dataset = Synthetic(category=setup["category"], image_size=setup["image_size"], n_train=setup["n_train"],
                        n_test_good=setup["n_test_good"], n_test_defect=setup["n_test_defect"], seed=setup["seed"],
                        root=str(work / "data"))
    train, test = load_split(dataset, "train"), load_split(dataset, "test")
    images, size = train["image"], setup["batch_size"]
    batches = [images[(i * size) % len(images):][:size] for i in range(setup["steps"])]
    backbone = setup["backbone"] if PAIRS[model][1] else None
    weights = random_backbone(backbone, setup["seed"], work) if backbone else None
    torch.manual_seed(setup["seed"])
    pair = PAIRS[model][0](backbone, weights, setup["image_size"])
    copy_to_theirs(pair)
    train_side_by_side(pair, batches, resync=False, seed=setup["seed"])
    scored = score_both(pair, images, test["image"], size)
    masks, labels = test["mask"].bool(), test["label"]
    metrics = {side: compute_metrics(scored[f"scores_{side}"], labels, scored[f"maps_{side}"], masks)
               for side in ("anomalib", "ours")}
    print(json.dumps(metrics, indent=1))
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded["setup"], recorded["overrides"] = DIRECTION_SETUP, DIRECTION_OVERRIDES
    recorded.setdefault("anomalib", {})[model] = {k: v for k, v in metrics["anomalib"].items() if "threshold" not in k}
    recorded["versions"] = {"anomalib": __import__("anomalib").__version__, "torch": torch.__version__}
    path.write_text(json.dumps(recorded, indent=2) + "\n")


def main() -> None:
    args = parse_args()
    SETTINGS.update(channels_last=args.channels_last, precision=args.precision)
    if args.no_fuse:
        import ad.backbone

        ad.backbone.fuse_batchnorm = lambda model: model
    if args.record:
        record_direction(args.model, Path(args.record))
        return
    if args.summarise:
        summarise(args.summarise)
        return
    reports = []
    for category in args.categories.split(","):
        for seed in args.seeds.split(","):
            reports.append(compare(args, category, int(seed)))
            if args.out:  # after every run, so that a long series interrupted keeps what it finished
                result = {"runs": reports, "summary": summary(reports), "paired": paired(reports),
                          "tolerance": TOLERANCE, "agree": all(r["agree"] is not False for r in reports),
                          "anomalib": __import__("anomalib").__version__, "torch": torch.__version__}
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if len(reports) > 1:
        print_table(reports)


if __name__ == "__main__":
    main()
