"""Time anomalib 2.x's PaDiM on one MVTec-layout category: run under anomalib's own Python.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_padim.py --root DIR --category bottle --out r.json

Settings, all anomalib defaults except where noted: ``Padim(backbone="resnet18", layers=layer1-3,
pre_trained=False)`` (no download; ``--weights FILE`` then loads a local resnet18 state dict into
the backbone), default pre-processor (resize to 256, ImageNet normalisation), post-processor,
evaluator (image/pixel AUROC and F1) and visualizer (writes an image per test sample);
``MVTecAD`` datamodule with its default batch sizes (32), workers (8 unless ``--workers``) and
``val_split_mode=same_as_test`` (so ``fit`` also runs a validation pass over the test images);
``Engine(accelerator="cpu", devices=1)`` with its default callbacks and no logger. Writes
import, fit and test seconds, the test metrics and the versions as JSON.
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
from anomalib.models import Padim  # noqa: E402

IMPORT_S = time.perf_counter() - START


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--image-size", type=int, default=256, help="PaDiM input side (anomalib default 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="train and eval batch size (default 32)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (anomalib default 8)")
    parser.add_argument("--weights", help="local resnet18 state dict for the backbone; default: random init")
    parser.add_argument("--out", required=True, help="JSON file for the timings and metrics")
    return parser.parse_args()


def load_backbone_weights(model: Padim, path: str) -> None:
    """Copy a full resnet18 state dict into anomalib's truncated timm feature extractor (strict)."""
    extractor = model.model.feature_extractor.feature_extractor
    wanted = extractor.state_dict().keys()
    state = torch.load(path, map_location="cpu")
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("anomalib", "torch", "torchvision", "lightning", "timm")}


def main() -> None:
    args = parse_args()
    size = (args.image_size, args.image_size)
    model = Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False,
                  pre_processor=Padim.configure_pre_processor(size))
    if args.weights:
        load_backbone_weights(model, args.weights)
    data_kwargs = {"num_workers": args.workers} if args.workers is not None else {}
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, **data_kwargs)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir="results")

    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)
    test_s = time.perf_counter() - start

    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    out = {"import_s": IMPORT_S, "fit_s": fit_s, "test_s": test_s, **metrics,
           "threads": torch.get_num_threads(), "versions": versions(),
           "workers": datamodule.num_workers, "total_in_process_s": time.perf_counter() - START}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
