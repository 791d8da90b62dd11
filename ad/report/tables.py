"""Benchmark tables from MLflow: ``python -m ad.report --experiment NAME [--tracking-uri URI] [--out DIR]``.

One markdown table per (dataset, model, backbone) — a row per category, an Average row, the four
published metrics — printed and written to ``DIR/<experiment>.md``, with every row in
``DIR/<experiment>.csv``. A metric a run did not produce stays blank (never 0); failed runs are
listed under their table; when a category ran several times, the latest finished run counts.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from ad.errors import ADError

#: Table columns: heading -> metric name as ``ad.run`` logs it.
COLUMNS = {"Image AUROC": "image_AUROC", "Image F1": "image_F1", "Pixel AUROC": "pixel_AUROC",
           "Pixel AUPRO": "pixel_AUPRO"}
DECIMALS = 3


@dataclass
class Row:
    """One category of a table: the metrics of its latest finished run, blanks when there is none."""

    category: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    finished_runs: int = 0


@dataclass
class Table:
    """The results of one (dataset, model, backbone) in one experiment."""

    dataset: str
    model: str
    backbone: str
    weights: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repeated runs, failures, runs still going

    @property
    def title(self) -> str:
        weights = f" (weights: {', '.join(self.weights)})" if self.weights else ""
        return f"{self.dataset} · {self.model} · {self.backbone}{weights}"

    def average(self) -> tuple[dict[str, float], dict[str, int]]:
        """Mean of each metric over the categories that have it, and how many have it."""
        means, counts = {}, {}
        for key in COLUMNS.values():
            values = [row.metrics[key] for row in self.rows if key in row.metrics]
            if values:
                means[key], counts[key] = sum(values) / len(values), len(values)
        return means, counts


def cell(value: float | None) -> str:
    """A metric as the tables show it: three decimals, blank when missing or not a number."""
    return "" if value is None or math.isnan(value) else f"{value:.{DECIMALS}f}"


def when(millis: int | None) -> str:
    """A run's start time, in UTC to the minute."""
    return datetime.fromtimestamp((millis or 0) / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def known_categories(dataset: str) -> list[str]:
    """The category list of ``conf/dataset/<dataset>.yaml``, so categories never run show as blank rows."""
    from ad.launch import CONF_DIR

    path = CONF_DIR / "dataset" / f"{dataset}.yaml"
    if not path.is_file():
        return []
    return [str(c) for c in OmegaConf.load(path).get("categories") or []]


def build_table(key: tuple[str, str, str], runs: list) -> Table:
    """Pick the latest finished run per category and note repeats and failures (``runs`` newest first)."""
    dataset, model, backbone = key
    table = Table(dataset, model, backbone)
    by_category: dict[str, list] = defaultdict(list)
    for run in runs:
        by_category[run.data.tags.get("ad.category", "?")].append(run)
    order = known_categories(dataset)
    categories = order + sorted(set(by_category) - set(order))  # known ones first, even if never run
    weights = set()
    for category in categories:
        category_runs = by_category.get(category, [])
        finished = [r for r in category_runs if r.info.status == "FINISHED"]
        row = Row(category, finished_runs=len(finished))
        if finished:
            latest = finished[0]
            row.run_id = latest.info.run_id
            row.metrics = {k: v for k, v in latest.data.metrics.items() if k in COLUMNS.values() and not math.isnan(v)}
            weights.add(latest.data.tags.get("ad.weights", ""))
            if len(finished) > 1:
                table.notes.append(f"{category}: {len(finished)} finished runs; the latest "
                                   f"({when(latest.info.start_time)}, run {latest.info.run_id[:8]}) is shown")
        newest_finish = finished[0].info.start_time if finished else -1
        for run in category_runs:  # failures not superseded by a later finished run
            if run.info.status != "FINISHED" and run.info.start_time > newest_finish:
                error = run.data.tags.get("error", "").splitlines()[0:1]
                detail = f": {error[0]}" if error else ""
                table.notes.append(f"{category}: {run.info.status} ({when(run.info.start_time)}, "
                                   f"run {run.info.run_id[:8]}){detail}")
        table.rows.append(row)
    table.weights = sorted(w for w in weights if w)
    return table


def markdown(table: Table) -> str:
    """The table as the README and the seeds show it, with its notes as a list below."""
    lines = [f"### {table.title}", "", "| Category | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for row in table.rows:
        lines.append(f"| {row.category} | " + " | ".join(cell(row.metrics.get(k)) for k in COLUMNS.values()) + " |")
    means, counts = table.average()
    partial = any(0 < counts.get(k, 0) < len(table.rows) for k in COLUMNS.values())
    label = "**Average***" if partial else "**Average**"
    lines.append(f"| {label} | " + " | ".join(f"**{cell(means[k])}**" if k in means else "" for k in COLUMNS.values())
                 + " |")
    notes = list(table.notes)
    if partial:
        notes.insert(0, "*Average over the categories that have the metric: "
                     + ", ".join(f"{name} {counts.get(k, 0)}/{len(table.rows)}" for name, k in COLUMNS.items()))
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def csv_text(tables: list[Table]) -> str:
    """Every row of every table (Average rows included) with its run, blanks for missing metrics."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "model", "backbone", "weights", "category", *COLUMNS.values(), "run_id",
                     "finished_runs"])
    for table in tables:
        head = [table.dataset, table.model, table.backbone, "+".join(table.weights)]
        for row in table.rows:
            writer.writerow([*head, row.category, *(row.metrics.get(k, "") for k in COLUMNS.values()), row.run_id,
                             row.finished_runs])
        means, _ = table.average()
        writer.writerow([*head, "Average", *(means.get(k, "") for k in COLUMNS.values()), "", ""])
    return out.getvalue()


def open_client(uri: str | None):
    """An MLflow client on ``uri`` (training's default when None); a missing SQLite file is an error."""
    from mlflow import MlflowClient

    from ad.tracking import quiet_mlflow_logs, resolve_tracking_uri, sqlite_path

    quiet_mlflow_logs()
    resolved = resolve_tracking_uri(uri)
    db = sqlite_path(resolved)
    if db is not None and not db.is_file():
        raise ADError(f"--tracking-uri: no MLflow store at {db}; pass the sqlite:/// or http:// URI the runs used")
    return MlflowClient(resolved)


def fetch_runs(client, experiment: str, sweep: str | None) -> list:
    """Every run of the experiment (optionally of one sweep), newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments()))
        raise ADError(f"--experiment: no experiment named {experiment!r}; available: {names or 'none'}")
    query = f"tags.`ad.sweep` = '{sweep}'" if sweep else ""
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def tables_of(runs: list) -> list[Table]:
    """Group runs by (dataset, model, backbone) tags and build one table each, in name order."""
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for run in runs:
        tags = run.data.tags
        if "ad.model" in tags:  # runs not made by ad (a parent run, a notebook) have no place in the tables
            groups[(tags.get("ad.dataset", "?"), tags["ad.model"], tags.get("ad.backbone", "?"))].append(run)
    return [build_table(key, groups[key]) for key in sorted(groups)]


def report(experiment: str, uri: str | None = None, out: Path | None = None, sweep: str | None = None) -> str:
    """Build the tables of ``experiment``, write ``.md`` and ``.csv`` to ``out`` when given; return the markdown."""
    tables = tables_of(fetch_runs(open_client(uri), experiment, sweep))
    if not tables:
        raise ADError(f"--experiment {experiment}: no ad runs{' in sweep ' + sweep if sweep else ''} to report")
    text = "\n\n".join(markdown(t) for t in tables) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        for suffix, content in ((".md", text), (".csv", csv_text(tables))):
            tmp = out / f"{stem}{suffix}.tmp"
            tmp.write_text(content)
            os.replace(tmp, out / f"{stem}{suffix}")
    return text


def main(argv: list[str] | None = None) -> None:
    """Command line: print the tables and write them (markdown and CSV) under ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m ad.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    parser.add_argument("--tracking-uri", default=None,
                        help="sqlite:///path/mlflow.db or http://host:port; default as in training")
    parser.add_argument("--out", type=Path, default=Path("outputs/reports"), help="folder for <experiment>.md/.csv")
    parser.add_argument("--sweep", default=None, help="only the runs of this sweep (the ad.sweep tag)")
    args = parser.parse_args(argv)
    try:
        text = report(args.experiment, args.tracking_uri, args.out, args.sweep)
    except ADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(text, end="")
    print(f"(written to {args.out}/)", file=sys.stderr)


if __name__ == "__main__":
    main()
