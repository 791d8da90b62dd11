"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

from hydra import compose, initialize_config_dir

from ad.launch import CONF_DIR

#: Overrides that keep a whole run to a few seconds on 2 CPU cores.
TINY = ["dataset.image_size=64", "trainer.batch_size=8", "backbone.weights=random"]


def compose_config(*overrides: str):
    """The root config composed exactly as the command line would, with the given overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


#: A whole run of any method in seconds: the ``fitted`` fixture's settings.
FIT_TINY = [*TINY, "tracking=none", "dataset.n_train=10", "dataset.n_test_good=4", "dataset.n_test_defect=4",
            "trainer.max_epochs=1", "dataset.val_ratio=0.2"]
#: Per-method settings that keep such a run to seconds.
QUICK = {"ganomaly": ["model.n_features=8"], "dfkde": ["model.n_pca_components=4"], "patchcore": [], "cflow": [],
         "dfm": [], "padim": [], "stfpm": [], "reverse_distillation": []}

SPIN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy(seconds: float) -> Iterator[None]:
    """Cores + 1 CPU-bound processes at normal priority in this session for the block (at most ``seconds``)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()
