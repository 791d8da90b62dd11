"""Command line: ``python -m ad.launch [overrides]`` composes the config with Hydra and runs it.

Exit codes: 0 success, 1 a run failed (bad data, bad settings: one ``error:`` line on stderr),
2 the overrides themselves are wrong (unknown key or option, caught before anything runs).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ad.errors import ADError

log = logging.getLogger("ad")


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
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"bad override: {first}"


def check_overrides(overrides: list[str]) -> None:
    """Compose once up front so a typo exits with one clear line instead of Hydra's traceback block."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with hydra.initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            hydra.compose("config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException, ValueError) as exc:
            print(f"error: {explain_override_error(exc, overrides)}", file=sys.stderr)
            sys.exit(2)


def one_line(exc: ADError) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in its traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(exc):
        return lines[-1].split("ADError: ", 1)[-1]
    return " ".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from ad.run import run  # heavy imports (torch, mlflow) only once the config is known to be valid

    try:
        results = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ADError as exc:
        log.debug("run failed", exc_info=True)
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        sys.exit(1)
    return results.get(cfg.get("optimized_metric", "image_AUROC"))


def main() -> None:
    """Entry point for ``python -m ad.launch`` and the ``ad`` console script."""
    args = sys.argv[1:]
    if not any(arg.startswith("-") for arg in args):  # plain single runs; flags (-m, --cfg...) go straight to Hydra
        check_overrides(args)
    _hydra_main()


if __name__ == "__main__":
    main()
