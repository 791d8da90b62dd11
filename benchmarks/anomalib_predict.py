"""Fit anomalib 2.x's PaDiM once, or score a folder of images with it, for ``bench_predict.py``.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_predict.py fit --root DIR --category bottle \
        --weights resnet18.pth --ckpt padim.ckpt
    /tmp/anomalib-venv/bin/python benchmarks/anomalib_predict.py predict --ckpt padim.ckpt --images DIR \
        --out predictions.csv [--batch-size 32]

``fit`` builds ``Padim(resnet18, layer1-3, pre_trained=False)``, loads the local timm state dict
given by ``--weights`` into its backbone (strict), fits it on the category's training images with
the ``MVTecAD`` datamodule and ``Engine(accelerator="cpu", devices=1, logger=False)`` (its
validation pass on the test images sets anomalib's thresholds and normalisation statistics) and
saves a Lightning checkpoint. ``predict`` is what a user of anomalib runs to score new images:
imports, the same model built again, ``Engine.predict(model, ckpt_path=..., ...)`` over every image
under ``--images``, and a CSV of path, score and label per image (as ``ad.predict`` writes). Without
``--batch-size`` the images go through ``data_path=`` (anomalib's own route: batch 1, no workers); with
it, through a ``PredictDataset`` DataLoader of that batch size. The visualizer is off unless
``--visualizer``: ``ad.predict`` writes no images by default either. Seconds (imports, predict, the
whole process) go to ``<out>.json``.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub

import torch  # noqa: E402
from anomalib.data import MVTecAD, PredictDataset  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Padim  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

IMPORT_S = time.perf_counter() - START
BACKBONE = {"backbone": "resnet18", "layers": ["layer1", "layer2", "layer3"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    steps = parser.add_subparsers(dest="step", required=True)
    fit = steps.add_parser("fit", help="fit PaDiM on a category's training images and save a checkpoint")
    fit.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    fit.add_argument("--category", default="bottle")
    fit.add_argument("--weights", required=True, help="local timm resnet18 state dict")
    fit.add_argument("--ckpt", required=True, help="checkpoint file to write")
    predict = steps.add_parser("predict", help="score every image under a folder with a saved checkpoint")
    predict.add_argument("--ckpt", required=True, help="checkpoint written by the fit step")
    predict.add_argument("--images", required=True, help="image file or folder (searched recursively)")
    predict.add_argument("--out", required=True, help="CSV of path, score, label; timings go to <out>.json")
    predict.add_argument("--batch-size", type=int, help="DataLoader batch size (default: anomalib's data_path route)")
    predict.add_argument("--visualizer", action="store_true", help="let anomalib write an image per prediction")
    return parser.parse_args()


def build(visualizer: bool) -> Padim:
    """The model both steps use: anomalib's PaDiM defaults, no pretrained download."""
    return Padim(**BACKBONE, pre_trained=False, visualizer=visualizer)


def load_backbone_weights(model: Padim, path: str) -> None:
    """Copy a full timm state dict into anomalib's truncated timm feature extractor (strict)."""
    extractor = model.model.feature_extractor.feature_extractor
    wanted = extractor.state_dict().keys()
    state = torch.load(path, map_location="cpu")
    extractor.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)


def fit(args: argparse.Namespace) -> None:
    model = build(visualizer=False)
    load_backbone_weights(model, args.weights)
    datamodule = MVTecAD(root=args.root, category=args.category)
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(Path(args.ckpt).parent))
    engine.fit(model=model, datamodule=datamodule)
    engine.trainer.save_checkpoint(args.ckpt)


def predict(args: argparse.Namespace) -> None:
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir=str(Path(args.out).parent))
    model = build(visualizer=args.visualizer)
    start = time.perf_counter()
    if args.batch_size is None:
        batches = engine.predict(model=model, ckpt_path=args.ckpt, data_path=args.images)
    else:
        dataset = PredictDataset(args.images)
        loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=dataset.collate_fn)
        batches = engine.predict(model=model, ckpt_path=args.ckpt, dataloaders=loader)
    predict_s = time.perf_counter() - start
    rows = [(path, float(score), int(label)) for batch in batches
            for path, score, label in zip(batch.image_path, batch.pred_score.reshape(-1).tolist(),
                                          batch.pred_label.reshape(-1).tolist(), strict=True)]
    with open(args.out, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "score", "label"])
        writer.writerows(rows)
    timings = {"import_s": IMPORT_S, "predict_s": predict_s, "images": len(rows),
               "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "total_in_process_s": time.perf_counter() - START}
    Path(args.out).with_suffix(".json").write_text(json.dumps(timings, indent=2) + "\n")


if __name__ == "__main__":
    arguments = parse_args()
    fit(arguments) if arguments.step == "fit" else predict(arguments)
