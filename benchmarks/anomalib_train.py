"""Time anomalib 2.x's CFlow or GANomaly training epochs on one MVTec-layout category, under anomalib's own Python.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_train.py --model cflow --root DIR --category bottle \
        --backbone resnet18 --image-size 128 --epochs 3 --out r.json

Settings are anomalib's defaults except where noted: ``Cflow(backbone=--backbone, pre_trained=False)``
(layers 2-4, 8 coupling blocks, condition 128, fiber batches of 64) or ``Ganomaly(batch_size=...)``
(64 features, latent 100), each with the default pre-processor resizing to ``--image-size``;
``MVTecAD`` datamodule with its default workers (8 unless ``--workers``) and ``--batch-size`` for
training; ``Engine(accelerator="cpu", devices=1, max_epochs=--epochs)`` without a logger and with
validation turned off (``limit_val_batches=0``), so an epoch is training only, as ad's
``train/epoch_s``. A Lightning callback records each training epoch's wall seconds; written as JSON.
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
from anomalib.models import Cflow, Ganomaly  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

IMPORT_S = time.perf_counter() - START


class EpochTimer(Callback):
    """Wall seconds of every training epoch (validation is off, so this is the whole epoch)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("cflow", "ganomaly"), required=True)
    parser.add_argument("--root", required=True, help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="wide_resnet50_2", help="CFlow encoder (anomalib default)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (anomalib default 8)")
    parser.add_argument("--out", required=True, help="JSON file for the timings")
    return parser.parse_args()


def build(args: argparse.Namespace):
    size = (args.image_size, args.image_size)
    if args.model == "cflow":
        return Cflow(backbone=args.backbone, pre_trained=False, pre_processor=Cflow.configure_pre_processor(size))
    return Ganomaly(batch_size=args.batch_size, pre_processor=Ganomaly.configure_pre_processor(size))


def main() -> None:
    args = parse_args()
    torch.manual_seed(42)
    model = build(args)
    data_kwargs = {"num_workers": args.workers} if args.workers is not None else {}
    datamodule = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                         eval_batch_size=args.batch_size, **data_kwargs)
    timer = EpochTimer()
    engine = Engine(accelerator="cpu", devices=1, logger=False, default_root_dir="results", max_epochs=args.epochs,
                    limit_val_batches=0, callbacks=[timer])
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    out = {"import_s": IMPORT_S, "fit_s": time.perf_counter() - start, "epoch_s": timer.seconds,
           "threads": torch.get_num_threads(), "workers": datamodule.num_workers,
           "anomalib": __import__("anomalib").__version__, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
