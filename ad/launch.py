"""Command line: ``python -m ad.launch [overrides]`` composes the config with Hydra and runs it.

Exit codes: 0 success, 1 a run failed once started (one ``error:`` line on stderr), 2 the input
was rejected before anything ran or was tracked (an unknown key or option, a value of the wrong
type or range, a dataset or checkpoint that does not fit, a tracking store that cannot be used),
130 interrupted by Ctrl-C, 143 stopped by SIGTERM (128 + the signal's number; a trained method saves
a checkpoint first).
A sweep (``-m``) runs every job even when some fail, then lists the failed ones and exits 1.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import os
import re
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ad.errors import ADError, ConfigError, one_line
from ad.runtime import applied
from ad.signals import Stopped, stop_signals
from ad.sweep import clear_failure, current_sweep_dir, in_multirun, record_failure, summarize

log = logging.getLogger("ad")

#: (process id, ``time.perf_counter()`` at the process's start) while ``main`` runs the command: the
#: first job it runs counts its total_s from there, so the start-up is in it.
_command_started: tuple[int, float] | None = None


def find_conf_dir() -> Path:
    """``conf/`` beside the package in a checkout, or shipped inside it in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no conf/config.yaml found beside {here}")


CONF_DIR = find_conf_dir()


def _keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config, to suggest the one a typo meant."""
    out = []
    for key, value in node.items():
        out.append(prefix + str(key))
        if isinstance(value, dict):
            out.extend(_keys(value, f"{prefix}{key}."))
    return out


def explain_override_error(exc: Exception, overrides: list[str]) -> str:
    """Turn Hydra's multi-line composition error into one line naming the key and the fix."""
    text = str(exc)
    if match := re.search(r"Could not override '([^']+)'", text):
        key = match.group(1)
        base = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(key)]
        try:  # inside check_overrides' Hydra context
            known = _keys(OmegaConf.to_container(hydra.compose("config", overrides=base)))
        except Exception:  # noqa: BLE001 - the suggestion is best effort
            known = []
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"add it with +{key}=... if it is really new"
        return f"config key '{key}' does not exist; {hint}"
    if match := re.search(r"Could not find '([^']+)/([^']+)'", text):
        group, option = match.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={option}: no such option; available: {', '.join(options)}{hint}"
    if "LexerNoViableAltException" in text:
        return unparsable_override(text, overrides)
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"bad override: {first}"


def unparsable_override(text: str, overrides: list[str]) -> str:
    """Hydra's lexer stops at a non-ASCII letter or a special character in an unquoted value: say to quote it."""
    bad = next((o for o in overrides if o in text), text.rsplit(": ", 1)[-1].strip())
    key, _, value = bad.partition("=")
    quoted = value.replace("'", "\\'")
    return (f"{bad}: Hydra cannot read this unquoted value (non-ASCII letters and some punctuation need "
            f"quotes); quote it inside the shell's quotes: \"{key}='{quoted}'\"")


def validate(cfg: DictConfig) -> None:
    """Check a composed config's values before anything starts; exit 2 with one line when one is wrong."""
    from ad.tracking import check_tracking
    from ad.validate import check_config

    try:
        check_config(cfg, cfg.hydra.runtime.choices.get("model"))
        check_tracking(cfg.get("tracking"))  # in a second or so, before the imports and the work
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_overrides(overrides: list[str]) -> None:
    """Compose once up front so a typo exits with one clear line instead of Hydra's traceback block."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfg = hydra.compose("config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            print(f"error: {explain_override_error(exc, overrides)}", file=sys.stderr)
            sys.exit(2)
    validate(cfg)


MULTIRUN_FLAGS = ("-m", "--multirun")
ALL_CATEGORIES = "dataset.category=all"


def parse_overrides(overrides: list[str]) -> list:
    """Hydra's own parse of the overrides (sweeps included), inside a Hydra context."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(overrides)


def sweep_combinations(overrides: list[str]) -> list[list[str]]:
    """The jobs worth composing to check a sweep: every combination of swept groups (``model=a,b``).

    A swept plain key (``dataset.category=a,b``) takes only its first value: values don't change
    which keys exist, so checking all of them would only multiply the (0.1 s) compositions.
    """
    fixed, groups = [], []
    for override in parse_overrides(overrides):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        key = override.get_key_element()
        if override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        else:  # interval(): Optuna's search space; its lower end stands for it
            values = [str(override.value().start)]
        lines = [f"{key}={value}" for value in values]
        is_group = "/" in key or "." not in key  # model=, hydra/launcher=, seed=
        (groups.append(lines) if is_group else fixed.append(lines[0]))
    return [fixed + list(combo) for combo in itertools.product(*groups)]


def check_sweep(overrides: list[str]) -> None:
    """Compose each combination of a multirun up front: a typo exits with one line naming the key."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            combinations = sweep_combinations(overrides)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            print(f"error: {explain_override_error(exc, overrides)}", file=sys.stderr)
            sys.exit(2)
        failed: dict[str, list[str]] = {}  # what is wrong -> the swept values of the jobs it concerns
        messages: dict[str, str] = {}  # what is wrong -> the first full message (with its hint)
        for combo in combinations:
            try:
                cfg = hydra.compose("config", overrides=combo, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, ValueError) as exc:
                message = explain_override_error(exc, combo)
                problem = message.split(";")[0]
                messages.setdefault(problem, message)
                failed.setdefault(problem, []).append(" ".join(o for o in combo if o not in overrides))
                continue
            validate(cfg)
            ranges = [o for o in overrides if "interval(" in o]
            if ranges and cfg.hydra.sweeper._target_.endswith("BasicSweeper"):
                print(f"error: {ranges[0]}: interval() is a search space for the Optuna sweeper; "
                      "add hydra/sweeper=optuna, or list the values (a,b,c)", file=sys.stderr)
                sys.exit(2)
        if failed:
            problem, jobs = next(iter(failed.items()))
            where = f" (in the jobs with {'; '.join(jobs)})" if len(jobs) < len(combinations) else ""
            print(f"error: {messages[problem]}{where}", file=sys.stderr)
            sys.exit(2)


def quote(value: str) -> str:
    """A category name as a Hydra override value: quoted unless it is a plain name (BTAD's 01 stays a string)."""
    return value if re.fullmatch(r"[A-Za-z_][\w-]*", value) else "'" + value.replace("'", "\\'") + "'"


def expand_all_categories(args: list[str]) -> list[str]:
    """Rewrite ``dataset.category=all`` into a sweep over the dataset's ``categories`` list."""
    if ALL_CATEGORIES not in args:
        return args
    if not any(arg in MULTIRUN_FLAGS for arg in args):
        raise ADError(f"{ALL_CATEGORIES} runs one job per category: add -m (multirun)")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # overrides only: not flags, nor the values of flags such as --config-dir DIR
    others = [arg for arg in args if ("=" in arg or arg.startswith("~")) and not arg.startswith("-")
              and arg != ALL_CATEGORIES]
    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            parsed = parse_overrides(others)
            fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
            cfg = hydra.compose("config", overrides=fixed, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            raise ADError(explain_override_error(exc, others)) from None
    if any(o.key_or_group == "dataset" and o.is_sweep_override() for o in parsed):
        raise ADError(f"{ALL_CATEGORIES}: the sweep has several datasets, whose categories differ; "
                      "run one sweep per dataset")
    categories = cfg.dataset.get("categories")
    name = cfg.hydra.runtime.choices.dataset
    if not categories:
        raise ADError(f"{ALL_CATEGORIES}: dataset={name} has no dataset.categories list; "
                      "name the categories instead: dataset.category=a,b,c")
    sweep = "dataset.category=" + ",".join(quote(str(c)) for c in categories)
    return [sweep if arg == ALL_CATEGORIES else arg for arg in args]


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    with applied(cfg):  # the runtime group's process tuning: only the command line's own processes get it
        return run_job(cfg)


def process_started() -> float:
    """``time.perf_counter()`` when this process started (from Linux's /proc), else now.

    The interpreter's start-up and the imports before ``main`` then count in total_s.
    """
    now = time.perf_counter()
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, IndexError, OSError, ValueError):  # not Linux
        return now
    return now - age if age >= 0 else now


def claim_command_start() -> float | None:
    """When the command began, for the first job run in ``main``'s own process; None for the others,
    which count total_s from their own start (later jobs, jobs in a launcher's worker processes)."""
    global _command_started
    started, _command_started = _command_started, None
    return started[1] if started is not None and started[0] == os.getpid() else None


def run_job(cfg: DictConfig) -> float | None:
    """One run (a sweep job, or the whole command): its result for a sweeper, or None if it failed."""
    from ad.run import RESULT_KEYS, run  # torch only once the config is known to be valid
    from ad.summary import format_table

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    metric = str(cfg.get("optimized_metric", "image_AUROC"))
    try:
        if metric not in RESULT_KEYS:  # a typo would otherwise fail every sweep trial, silently
            raise ADError(f"optimized_metric: '{metric}' is not a result; use one of {', '.join(RESULT_KEYS)}")
        with stop_signals():  # SIGTERM and SLURM preemption end the run as Ctrl-C does
            results = run(cfg, output_dir, started=claim_command_start())
    except Exception as exc:
        if not in_multirun():
            if not isinstance(exc, ADError):
                raise
            log.debug("run failed", exc_info=True)
            print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)  # 2: rejected before the run started
        # In a sweep, a raising job would stop the launcher: record the failure and let the others run.
        if isinstance(exc, ADError):
            message = one_line(exc)
            log.debug("job failed", exc_info=True)
        else:
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            log.exception("job failed")  # the traceback goes to the job's log file too
        print(f"error: {message}", file=sys.stderr, flush=True)
        record_failure(output_dir, message)
        return None  # Optuna counts a None as a failed trial and goes on
    clear_failure(output_dir)
    print(format_table(results), flush=True)
    return results.get(metric)  # None where the method has no such result (pixel metrics without maps)


def report_sweep() -> int:
    """Print how the sweep this process launched ended (one line per failed job); return the failure count."""
    sweep_dir = current_sweep_dir()
    if sweep_dir is None or not sweep_dir.is_dir():
        return 0
    summary, failures = summarize(sweep_dir)
    print(summary, file=sys.stderr if failures else sys.stdout, flush=True)
    return failures


def main() -> None:
    """Entry point for ``python -m ad.launch`` and the ``ad`` console script."""
    global _command_started
    _command_started = (os.getpid(), process_started())
    try:
        launch()
    finally:
        _command_started = None


HELP = """\
ad: visual anomaly detection. Fits a method on good images, scores the test split, sets an
operating threshold on held-out good images, and records everything (run folder, MLflow).

usage: ad [KEY=VALUE ...]          one run, composed by Hydra from conf/ (python -m ad.launch: the same)
       ad -m KEY=A,B ...           a sweep: one run per combination
       ad --cfg job [KEY=VALUE]    print the composed config without running
       ad --version | --hydra-help

common runs:
  ad                                                     PaDiM on the built-in textures (no download)
  ad model=patchcore dataset=mvtec dataset.root=/data/MVTecAD dataset.category=bottle
  ad dataset=folder dataset.normal_dir=/data/good        good images only: fit, threshold, false-reject rate
  ad model=stfpm trainer.max_epochs=20 trainer.device=cuda
  ad -m model=padim,patchcore dataset.category=all       a benchmark sweep over every category

then:
  python -m ad.predict RUN_FOLDER IMAGES...              flag new images with a run's model bundle
  python -m ad.report [--html]                           compare runs and sweeps
  mlflow ui                                              browse the runs (open the link a run prints)

groups: model (padim patchcore dfm dfkde stfpm reverse_distillation cflow ganomaly), dataset (synthetic
mvtec btad visa folder), backbone, trainer, threshold, tracking, runtime. README.md lists every setting.
"""


def version_text() -> str:
    """``ad``'s version and those of the libraries that compute its numbers (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in ("ad", "torch", "timm", "hydra-core", "mlflow"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return " · ".join(parts)


def launch() -> None:
    """Check the overrides, run the job or sweep, report, and exit with the documented code."""
    if sys.argv[1:] in (["--help"], ["-h"]):
        print(HELP, end="")
        return
    if sys.argv[1:] in (["--version"], ["-V"]):
        print(version_text())
        return
    try:
        args = expand_all_categories(sys.argv[1:])
    except ADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    flags = [arg for arg in args if arg.startswith("-")]
    if not flags:  # plain single runs; other flags (--cfg, -cd...) go straight to Hydra
        check_overrides(args)
    elif all(flag in MULTIRUN_FLAGS for flag in flags):
        check_sweep([arg for arg in args if arg not in MULTIRUN_FLAGS])
    sys.argv[1:] = args
    code = 0
    try:
        _hydra_main()
    except SystemExit as exc:  # e.g. Hydra reporting a launcher that gave up
        code = exc.code
    except Stopped as exc:  # SIGTERM or preemption: saved like Ctrl-C; 128 + the signal's number
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # the run has already saved what it could and said where
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    failures = report_sweep()
    if code or failures:
        sys.exit(code or 1)


if __name__ == "__main__":
    main()
