"""Sweeps that survive failures: each job records its own outcome, the launching process sums them up.

A Hydra launcher (basic, joblib, submitit) stops a sweep as soon as one job raises, so in a multirun
``ad.launch`` catches a job's error, writes it to ``failure.json`` in the job's folder and returns
normally; :class:`SweepCallback` remembers the sweep folder, and :func:`summarize` reads every job's
outcome from it at the end. Files, not return values, because joblib and SLURM jobs run elsewhere
and a job killed by the OS returns nothing at all; the sweep folder is shared by every launcher.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

#: MLflow tag holding the sweep id (the sweep folder's name): group or filter by it in the UI.
SWEEP_TAG = "ad.sweep"
FAILURE_FILE = "failure.json"
RESULT_FILE = "metrics.json"

#: Sweep folder of the multirun started in this process, set by :class:`SweepCallback`.
_current_sweep_dir: Path | None = None


def in_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (``-m`` or ``hydra.mode=MULTIRUN``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_tags() -> dict[str, str]:
    """Tags tying a job's MLflow run to its sweep (id, folder, job number); empty for a single run."""
    if not in_multirun():
        return {}
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
    return {SWEEP_TAG: sweep_dir.name, "ad.sweep_dir": str(sweep_dir), "ad.job": str(hydra_cfg.job.num)}


def swept_keys(hydra_cfg: DictConfig) -> set[str] | None:
    """The settings a multirun varies: its sweeper's ``params`` and the sweep overrides Hydra saved in the
    sweep folder's ``multirun.yaml``; None when that file is absent (a sweeper that writes none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if not saved.is_file():
        return None
    sweep = OmegaConf.load(saved).hydra
    arguments = [str(o) for o in sweep.overrides.task]
    arguments += [f"{key}={value}" for key, value in (sweep.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides(arguments)
    return {override.key_or_group for override in parsed if override.is_sweep_override()}


def run_name(base: str, named: tuple[str, ...] = ("model", "dataset", "dataset.category")) -> str:
    """``base`` (``padim-synthetic-brick``) followed, in a sweep job, by the settings the sweep varies
    (``padim-synthetic-brick n_features=50``), so that the sweep's runs tell apart in MLflow.

    Settings already in ``base`` (``named``) are left out; a setting is named by its last key
    (``model.n_features`` -> ``n_features``) unless two share it. Outside a sweep, ``base`` as it is.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not in_multirun():
        return base
    hydra_cfg = HydraConfig.get()
    job = OverridesParser.create().parse_overrides([str(o) for o in hydra_cfg.overrides.task])
    varied = swept_keys(hydra_cfg)
    chosen = [o for o in job if o.key_or_group not in named and (varied is None or o.key_or_group in varied)]
    short = [o.key_or_group.rsplit(".", 1)[-1] for o in chosen]
    settings = [f"{name if short.count(name) == 1 else o.key_or_group}={o.get_value_element_as_str()}"
                for name, o in zip(short, chosen, strict=True)]
    return " ".join([base, *settings])


def record_failure(job_dir: Path, error: str) -> None:
    """Write a failed job's error beside its config, atomically, for :func:`summarize` to find."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f"{FAILURE_FILE}.tmp"
    tmp.write_text(json.dumps({"error": error}) + "\n")
    os.replace(tmp, job_dir / FAILURE_FILE)


def clear_failure(job_dir: Path) -> None:
    """Forget a failure recorded in ``job_dir`` by an earlier sweep into the same folder: this job finished."""
    (job_dir / FAILURE_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class JobOutcome:
    """How one job of a sweep ended, read back from its folder."""

    num: int
    overrides: tuple[str, ...]
    status: str  # FINISHED, FAILED, or NO RESULT (killed, or still running)
    error: str = ""

    def line(self, shared: frozenset[str] = frozenset()) -> str:
        """One line for the end-of-sweep summary, naming the job by the overrides not ``shared`` by all jobs."""
        own = " ".join(o for o in self.overrides if o not in shared)
        detail = f": {self.error}" if self.error else ""
        return f"  job {self.num} [{own}] {self.status}{detail}"


def job_outcome(job_dir: Path) -> JobOutcome:
    """The outcome of the job whose Hydra output folder is ``job_dir``."""
    hydra_cfg = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra
    overrides = tuple(str(o) for o in hydra_cfg.overrides.task)
    num = int(hydra_cfg.job.get("num", -1))
    if (job_dir / FAILURE_FILE).is_file():
        error = json.loads((job_dir / FAILURE_FILE).read_text())["error"]
        return JobOutcome(num, overrides, "FAILED", error)
    if (job_dir / RESULT_FILE).is_file():
        return JobOutcome(num, overrides, "FINISHED")
    return JobOutcome(num, overrides, "NO RESULT", "the job ended without results (killed by the OS or the scheduler?)")


def collect(sweep_dir: Path) -> list[JobOutcome]:
    """Every job of a sweep, in job order, found by the ``.hydra`` folder Hydra writes for each."""
    jobs = [job_outcome(hydra_dir.parent) for hydra_dir in Path(sweep_dir).rglob(".hydra")
            if (hydra_dir / "hydra.yaml").is_file()]
    return sorted(jobs, key=lambda job: job.num)


def summarize(sweep_dir: Path) -> tuple[str, int]:
    """The end-of-sweep report (a count, then one line per failed job) and the number of failures."""
    jobs = collect(sweep_dir)
    failed = [job for job in jobs if job.status != "FINISHED"]
    head = f"sweep {Path(sweep_dir).name}: {len(jobs) - len(failed)} of {len(jobs)} jobs finished"
    if not failed:
        return f"{head} ({sweep_dir})", 0
    shared = frozenset.intersection(*(frozenset(job.overrides) for job in jobs)) if len(jobs) > 1 else frozenset()
    lines = [f"{head}, {len(failed)} failed ({sweep_dir}):", *(job.line(shared) for job in failed)]
    return "\n".join(lines), len(failed)


def current_sweep_dir() -> Path | None:
    """The folder of the multirun this process launched, once :class:`SweepCallback` has seen it start."""
    return _current_sweep_dir


class SweepCallback(Callback):
    """Hydra callback (``hydra.callbacks.sweep`` in ``conf/config.yaml``) noting where a multirun writes."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Runs in the launching process before any job: remember the sweep folder for the summary."""
        global _current_sweep_dir
        _current_sweep_dir = Path(config.hydra.sweep.dir).resolve()
