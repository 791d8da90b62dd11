"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from hydra import compose, initialize_config_dir

from ad.launch import CONF_DIR

#: Overrides that keep a whole run to a few seconds on 2 CPU cores.
TINY = ["dataset.image_size=64", "trainer.batch_size=8", "backbone.weights=random"]


def compose_config(*overrides: str):
    """The root config composed exactly as the command line would, with the given overrides."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))
