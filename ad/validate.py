"""Checks of a composed config before a run starts, so bad input is one line and nothing is tracked.

One table (:data:`SCHEMA`) declares the type and range of every numeric or enumerated setting;
``model.*`` settings it does not list take the type of their default in ``conf/model/<name>.yaml``.
:func:`check_config` applies it and reports unset mandatory values (``???``); ``ad.launch`` calls
it right after composing (exit 2, before any process or run starts) and ``ad.run.run`` calls it
again, with :func:`check_dataset` once the dataset is listed, before the tracker opens a run.
Every problem is a :class:`~ad.errors.ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ad.errors import ConfigError, did_you_mean
from ad.thresholds import METHODS as THRESHOLD_METHODS

#: The words each expected type is called by in messages.
TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a text value",
              list: "a list"}


@dataclass(frozen=True)
class Rule:
    """What one setting accepts: its type, bounds (``open_*``: the bound itself is excluded), choices, null."""

    kind: type
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    nullable: bool = False


def at_least(kind: type, low: float, nullable: bool = False) -> Rule:
    """A number no smaller than ``low``."""
    return Rule(kind, low=low, nullable=nullable)


POSITIVE = Rule(float, low=0, open_low=True)
FRACTION = Rule(float, low=0, high=1, open_low=True)  # (0, 1]

#: Every checked setting by its dotted key; a key absent from the composed config is skipped.
SCHEMA: dict[str, Rule] = {
    "seed": at_least(int, 0),
    "trainer.device": Rule(str),  # auto | cpu | cuda | cuda:N, checked when the run resolves it
    "trainer.batch_size": at_least(int, 1),
    "trainer.num_workers": at_least(int, 0),
    "trainer.precision": Rule(str, choices=("auto", "fp32", "bf16", "fp16")),
    "trainer.channels_last": Rule(bool),
    "trainer.max_epochs": at_least(int, 1, nullable=True),
    "trainer.eval_every": at_least(int, 0, nullable=True),
    "trainer.checkpoint_every": at_least(int, 1),
    "runtime.keep_freed_memory": Rule(bool),
    "runtime.threads": at_least(int, 1, nullable=True),
    "runtime.freeze_gc_at_exit": Rule(bool),
    "runtime.feature_cache": Rule(bool),
    "runtime.prefetch": Rule(bool),
    "runtime.prefetch_niceness": Rule(int, low=0, high=19),
    "runtime.cache_dir": Rule(str, nullable=True),
    "runtime.cache_max_gb": POSITIVE,
    "dataset.image_size": at_least(int, 1),
    "dataset.test_split_ratio": Rule(float, low=0, high=1, open_high=True),
    "dataset.n_train": at_least(int, 1),
    "dataset.n_test_good": at_least(int, 0),
    "dataset.n_test_defect": at_least(int, 0),
    "dataset.download": Rule(bool),
    "backbone.name": Rule(str),
    "backbone.weights": Rule(str),
    "tracking.num_images": at_least(int, 0),
    # tracking.log_model (true, false or auto) is checked by the MLflow tracker as it is built
    "dataset.val_ratio": Rule(float, low=0, high=1, open_high=True),
    "threshold.method": Rule(str, choices=THRESHOLD_METHODS),
    "threshold.false_reject_rate": Rule(float, low=0, high=1, open_low=True, open_high=True),
    "threshold.pixel_false_reject_rate": Rule(float, low=0, high=1, open_low=True, open_high=True, nullable=True),
    "threshold.value": Rule(float, nullable=True),
    "threshold.pixel_value": Rule(float, nullable=True),
    "model.n_features": at_least(int, 1, nullable=True),
    "model.blur_sigma": at_least(float, 0),
    "model.lr": POSITIVE,
    "model.coreset_ratio": FRACTION,
    "model.num_neighbors": at_least(int, 1),
    "model.projection_dim": at_least(int, 1, nullable=True),
    "model.pca_level": FRACTION,
    "model.pooling_kernel_size": at_least(int, 1),
    "model.n_pca_components": at_least(int, 1),
    "model.max_training_points": at_least(int, 1),
    "model.fiber_batch_size": at_least(int, 1),
    "model.condition_vector": at_least(int, 4),
    "model.coupling_blocks": at_least(int, 1),
    "model.clamp_alpha": POSITIVE,
    "model.latent_vec_size": at_least(int, 1),
    "model.extra_layers": at_least(int, 0),
    "model.reinit_discriminator_below": at_least(float, 0, nullable=True),
}


def check_config(cfg: DictConfig, model_name: str | None = None) -> None:
    """Raise a ConfigError for the first unset mandatory value or setting outside its :data:`SCHEMA` rule."""
    check_mandatory(cfg)
    rules = {**model_rules(model_name), **SCHEMA}
    for key, rule in rules.items():
        found, value = lookup(cfg, key)
        if found:
            check_value(key, value, rule)
    check_threshold(cfg)


def check_threshold(cfg: DictConfig) -> None:
    """The threshold settings that need one another: a manual threshold needs its value, a calibrated one images."""
    found, method = lookup(cfg, "threshold.method")
    if not found:
        return
    if method == "manual" and lookup(cfg, "threshold.value")[1] is None:
        raise ConfigError("threshold.value: threshold.method=manual needs it; set threshold.value=<score>")
    has_ratio, ratio = lookup(cfg, "dataset.val_ratio")
    if method in ("false_reject_rate", "f1") and has_ratio and ratio == 0 \
            and lookup(cfg, "dataset.abnormal_val_dir")[1] is None:
        raise ConfigError(f"dataset.val_ratio: 0 leaves no validation images for threshold.method={method}; "
                          "set dataset.val_ratio>0, or threshold.method=manual threshold.value=..., or none")


def check_mandatory(cfg: DictConfig) -> None:
    """A ConfigError naming the first ``???`` value the config group needs and the command left unset."""
    for key in missing_keys(cfg):
        group = key.split(".", 1)[0]
        raise ConfigError(f"{key}: must be set for this {group} (it is ??? in its config); add {key}=... "
                          f"to the command")


def missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted keys of every mandatory value (``???``) still unset, outside Hydra's own node."""
    keys = range(len(node)) if isinstance(node, ListConfig) else [k for k in node.keys() if prefix or k != "hydra"]
    found = []
    for key in keys:
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_interpolation():
            found.extend(missing_keys(child, f"{prefix}{key}."))
    return found


def lookup(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(True, value)`` for a key the config has (interpolations resolved), else ``(False, None)``."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_value(key: str, value: Any, rule: Rule) -> None:
    """A ConfigError naming ``key`` when ``value`` has the wrong type or lies outside ``rule``'s range."""
    if value is None:
        if not rule.nullable:
            raise ConfigError(f"{key}: must be {describe(rule)}, got null; set {key}=<value>")
        return
    if not is_kind(value, rule.kind):
        raise ConfigError(f"{key}: must be {describe(rule)}, got {value!r}")
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(rule.choices)}; "
                          f"{did_you_mean(value, rule.choices)}set {key}=<one of them>")
    if not within(float(value) if rule.kind in (int, float) else 0.0, rule):
        raise ConfigError(f"{key}: must be {describe(rule)}, got {value!r}")


def is_kind(value: Any, kind: type) -> bool:
    """Whether ``value`` is of ``kind`` (an int counts as a float, a bool as neither, a finite number only)."""
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is list:
        return isinstance(value, (list, tuple, ListConfig))
    return isinstance(value, kind)


def within(value: float, rule: Rule) -> bool:
    """Whether ``value`` satisfies the rule's bounds."""
    if rule.low is not None and (value < rule.low or (rule.open_low and value == rule.low)):
        return False
    return rule.high is None or not (value > rule.high or (rule.open_high and value == rule.high))


def describe(rule: Rule) -> str:
    """The rule in words: ``a whole number ≥ 1 (or null)``."""
    words = TYPE_WORDS.get(rule.kind, rule.kind.__name__)
    if rule.low is not None and rule.high is not None:
        words += f" in {'(' if rule.open_low else '['}{rule.low:g}, {rule.high:g}{')' if rule.open_high else ']'}"
    elif rule.low is not None:
        words += f" {'>' if rule.open_low else '≥'} {rule.low:g}"
    return words + (" (or null)" if rule.nullable else "")


def model_rules(model_name: str | None) -> dict[str, Rule]:
    """Type rules for ``model.*`` from the defaults in ``conf/model/<name>.yaml`` (null and ``${...}`` skipped)."""
    if not model_name:
        return {}
    from ad.launch import CONF_DIR  # the one place that knows where conf/ is

    path = Path(CONF_DIR) / "model" / f"{model_name}.yaml"
    if not path.is_file():
        return {}
    defaults = OmegaConf.load(path)
    rules = {}
    for key in defaults.keys():
        if str(key).startswith("_") or key == "defaults" or OmegaConf.is_interpolation(defaults, key):
            continue
        value = defaults[key]
        kind = list if isinstance(value, ListConfig) else float if type(value) is int else type(value)
        if value is not None and kind in TYPE_WORDS:  # an int default (a loss weight: 50) may take 0.5
            rules[f"model.{key}"] = Rule(kind)
    return rules


def check_dataset(dataset, threshold: DictConfig | None = None) -> None:
    """A ConfigError when the listed dataset cannot give a run: no training images, or an empty test split.

    Good images alone are a valid test split: the run sets its thresholds and measures the false-reject
    rate; image AUROC and F1 need defective images too and are then left out.
    """
    where = f"{dataset.name}/{dataset.category}"
    if not dataset.train:
        raise ConfigError(f"dataset: {where} has no training images; point the dataset at a folder of good images")
    found, method = lookup(threshold, "method") if threshold is not None else (False, None)
    if found and method == "f1" and not any(sample.label == 1 for sample in dataset.val):
        raise ConfigError(f"threshold.method=f1: the validation split of {where} has no defective images; "
                          f"set dataset.abnormal_val_dir (dataset=folder), or threshold.method=false_reject_rate")
    if not dataset.test:
        raise ConfigError(f"dataset: the test split of {where} is empty; add test images (dataset=folder: "
                          f"dataset.test_split_ratio>0, dataset.normal_test_dir= or dataset.abnormal_dir=)")
