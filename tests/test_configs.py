"""Every option of every config group composes, and every model builds: new YAML files are covered."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ad.launch import CONF_DIR
from ad.models import AnomalyModel
from ad.run import make_model


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_root_defaults_are_the_documented_ones():
    cfg = compose_with()
    assert cfg.seed == 42 and cfg.backbone.name == "resnet18" and cfg.model._target_.endswith("Padim")
    assert cfg.dataset._target_.endswith("Synthetic") and cfg.dataset.image_size == 256
    assert cfg.tracking._target_.endswith("MLflowTracker")


@pytest.mark.parametrize("group", ["backbone", "dataset", "trainer", "runtime", "tracking"])
def test_every_option_composes(group):
    for option in options(group):
        cfg = compose_with(f"{group}={option}")
        assert OmegaConf.select(cfg, group) is not None


@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds_from_its_yaml(model):
    cfg = compose_with(f"model={model}", "backbone.weights=random")
    built = make_model(cfg, torch.device("cpu"), "fp32")
    assert isinstance(built, AnomalyModel)
    assert built.weights_source in ("random", "none")
