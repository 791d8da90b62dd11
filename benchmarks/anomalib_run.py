"""Time anomalib 2.x's PaDiM, PatchCore, DFM or DFKDE on one MVTec-layout category, under anomalib's own Python.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_run.py --model patchcore --root DIR --category bottle \
        --weights wide_resnet50_2.pth --out r.json
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_run.py --model padim --root 'data/seed{seed}' \
        --category brick,grass --seed 0,1 --weights 'resnet18-{seed}.pth' --raw-only --out 'r-{category}-{seed}.json'

Settings are anomalib's defaults except where noted. The model is built with its anomalib default
backbone and layers (``MODELS`` below: padim resnet18 layer1-3, patchcore wide_resnet50_2 layer2+3,
dfm resnet50 layer3, dfkde resnet18 layer4; ``--backbone`` swaps the backbone and keeps the layers)
and ``pre_trained=False`` (no download; ``--weights FILE`` then loads a local timm state dict of
that backbone into it, strictly); default pre-processor (resize to ``--image-size``, ImageNet
normalisation; PatchCore without centre crop, as anomalib's default), post-processor and visualizer
(``--no-visualizer`` turns it off); default evaluator, plus anomalib's own ``AUPRO`` for models with
anomaly maps (``--no-aupro`` leaves it out; the seconds it takes are reported as ``aupro_s`` so
callers can leave them out of the timing); ``MVTecAD`` datamodule with its default batch sizes (32),
workers (8 unless ``--workers``) and ``val_split_mode=same_as_test`` (so ``fit`` also runs a
validation pass over the test images); ``Engine(accelerator="cpu", devices=1)`` with its default
callbacks and no logger; ``--seed S`` calls Lightning's ``seed_everything(S)`` before the model is
built. Writes import, fit and test seconds, the test metrics and the versions as JSON, and the raw
test outputs (scores, labels, maps, masks as the model produced them, before anomalib's
post-processor normalises and clamps them) to ``<out>.raw.pt``, so callers can compute metrics on
raw scores as ``ad`` does. ``--raw-only`` builds the model without post-processor, evaluator and
visualizer (no metrics of anomalib's own then: only the raw outputs).

``--category`` and ``--seed`` take comma-separated lists: one process then runs every (seed,
category) in turn, paying anomalib's import once, with ``{seed}`` and ``{category}`` in ``--root``,
``--weights`` and ``--out`` filled in for each.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub

import torch  # noqa: E402
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.metrics import AUPRO, Evaluator  # noqa: E402
from anomalib.models import Dfkde, Dfm, Padim, Patchcore  # noqa: E402
from lightning.pytorch import seed_everything  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

IMPORT_S = time.perf_counter() - START

#: Each model's class and anomalib's default backbone and layer arguments (checked against 2.7.0's signatures).
MODELS = {
    "padim": (Padim, {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"]}),
    "patchcore": (Patchcore, {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"]}),
    "dfm": (Dfm, {"backbone": "resnet50", "layer": "layer3"}),
    "dfkde": (Dfkde, {"backbone": "resnet18", "layers": ["layer4"]}),
}
#: Models whose anomalib evaluator has pixel metrics (DFKDE is image-level only).
WITH_MAPS = ("padim", "patchcore", "dfm")


class TimedAUPRO(AUPRO):
    """anomalib's AUPRO, counting the seconds its update and compute take (not part of the default evaluator)."""

    seconds = 0.0

    def update(self, *args, **kwargs) -> None:
        start = time.perf_counter()
        super().update(*args, **kwargs)
        TimedAUPRO.seconds += time.perf_counter() - start

    def compute(self) -> torch.Tensor:
        start = time.perf_counter()
        value = super().compute()
        TimedAUPRO.seconds += time.perf_counter() - start
        return value


class RawOutputs(Callback):
    """Test outputs before post-processing: a trainer callback runs before the model's own PostProcessor."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {"scores": [], "labels": [], "maps": [], "masks": []}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        n = len(outputs.pred_score)
        self.parts["scores"].append(outputs.pred_score.detach().float().cpu().reshape(n))
        self.parts["labels"].append(outputs.gt_label.detach().cpu().reshape(n))
        maps, masks = outputs.anomaly_map, outputs.gt_mask
        if maps is not None and masks is not None:
            self.parts["maps"].append(maps.detach().float().cpu().reshape(n, *maps.shape[-2:]))
            self.parts["masks"].append(masks.detach().cpu().bool().reshape(n, *masks.shape[-2:]))

    def save(self, path: Path) -> None:
        torch.save({k: torch.cat(v) if v else None for k, v in self.parts.items()}, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="padim")
    parser.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256, help="input side (anomalib default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="train and eval batch size (default 32)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (anomalib default 8)")
    parser.add_argument("--backbone", help="timm backbone instead of the model's default (its layers kept)")
    parser.add_argument("--weights", help="local timm state dict of the model's backbone; default: random init")
    parser.add_argument("--seed", help="seed_everything(SEED) before the model is built (default: none)")
    parser.add_argument("--raw-only", action="store_true", help="no post-processor, evaluator or visualizer")
    parser.add_argument("--no-aupro", action="store_true", help="keep the default evaluator (no AUPRO)")
    parser.add_argument("--no-visualizer", action="store_true", help="do not write an image per test sample")
    parser.add_argument("--out", required=True, help="JSON file for the timings and metrics")
    return parser.parse_args()


def expand_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per (seed, category) of comma-separated ``--seed``/``--category``, placeholders filled in."""
    seeds = [int(s) for s in args.seed.split(",")] if args.seed is not None else [None]
    runs = []
    for seed in seeds:
        for category in args.category.split(","):
            fill = {"seed": seed, "category": category}
            paths = {key: getattr(args, key).format(**fill) for key in ("root", "weights", "out") if getattr(args, key)}
            runs.append(argparse.Namespace(**{**vars(args), **fill, **paths}))
    return runs


def load_backbone_weights(model: torch.nn.Module, path: str) -> None:
    """Copy a full timm state dict into anomalib's truncated timm feature extractor (strict)."""
    extractor = model.model.feature_extractor.feature_extractor
    wanted = extractor.state_dict().keys()
    state = torch.load(path, map_location="cpu")
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def evaluator_with_aupro(model_cls: type) -> Evaluator:
    """The model's default evaluator plus anomalib's pixel AUPRO (FPR limit 0.3) on the same post-processed maps."""
    metrics = list(model_cls.configure_evaluator().test_metrics)
    aupro = TimedAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
    aupro.name = "pixel_AUPRO"  # logged under anomalib's own name, not the subclass's
    return Evaluator(test_metrics=[*metrics, aupro])


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("anomalib", "torch", "torchvision", "lightning", "timm")}


def main() -> None:
    for args in expand_runs(parse_args()):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Fit and test one model on one category; write the JSON and the raw outputs."""
    TimedAUPRO.seconds = 0.0
    model_cls, backbone = MODELS[args.model]
    if args.backbone:
        backbone = {**backbone, "backbone": args.backbone}
    if args.seed is not None:
        seed_everything(args.seed)  # PaDiM's channel draw, PatchCore's projection and coreset start
    size = (args.image_size, args.image_size)
    extra = {"visualizer": False} if args.no_visualizer else {}
    if args.raw_only:
        extra = {"post_processor": False, "evaluator": False, "visualizer": False}
    aupro = args.model in WITH_MAPS and not args.no_aupro and not args.raw_only
    if aupro:
        extra["evaluator"] = evaluator_with_aupro(model_cls)
    model = model_cls(**backbone, pre_trained=False, pre_processor=model_cls.configure_pre_processor(size), **extra)
    if args.weights:
        load_backbone_weights(model, args.weights)
    data_kwargs = {"num_workers": args.workers} if args.workers is not None else {}
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, **data_kwargs)
    raw = RawOutputs()
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir="results", callbacks=[raw])

    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_s = time.perf_counter() - start

    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    out = {"model": args.model, **backbone, "seed": args.seed, "import_s": IMPORT_S, "fit_s": fit_s, "test_s": test_s,
           **({"aupro_s": TimedAUPRO.seconds} if aupro else {}), **metrics,
           "threads": torch.get_num_threads(), "versions": versions(), "workers": datamodule.num_workers,
           "visualizer": not (args.no_visualizer or args.raw_only), "total_in_process_s": time.perf_counter() - START}
    raw.save(Path(args.out).with_suffix(".raw.pt"))
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
