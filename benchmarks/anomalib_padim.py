"""Time anomalib 2.x's PaDiM for ``bench_padim.py``: ``anomalib_run.py --model padim`` with its default evaluator.

    /tmp/anomalib-venv/bin/python benchmarks/anomalib_padim.py --root DIR --category bottle --out r.json

Same arguments and JSON as ``anomalib_run.py`` (see there): anomalib's PaDiM (resnet18, layer1-3,
``pre_trained=False``, ``--weights FILE`` for a local resnet18 state dict) with every other setting
at anomalib's default, visualizer included and no AUPRO, as the PaDiM benchmark has always timed it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.argv[1:1] = ["--model", "padim", "--no-aupro"]

import anomalib_run  # noqa: E402  (its import time is what it reports as import_s)

if __name__ == "__main__":
    anomalib_run.main()
