"""Tables of an experiment's runs: one per (dataset, model, backbone), a row per category and setting.

A plain benchmark has a row per category holding its latest finished run. When runs of the same
category differ in some params (a sweep over ``model.n_features``), those params become columns
and each category gets a row per setting, its best value per metric marked, with an average per
setting below. A metric a run did not produce stays blank (never 0); failed runs are noted.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone

from omegaconf import OmegaConf

#: Table columns: heading -> metric name as ``ad.run`` logs it.
COLUMNS = {"Image AUROC": "image_AUROC", "Image F1": "image_F1", "Pixel AUROC": "pixel_AUROC",
           "Pixel AUPRO": "pixel_AUPRO"}
#: Extra column of comparison tables: what a setting costs.
TIME_COLUMN = "Fit+test s"
DECIMALS = 3


@dataclass
class Row:
    """One (category, setting) of a table: the metrics of its latest finished run, blanks when there is none."""

    category: str
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""
    finished_runs: int = 0
    setting: tuple[str, ...] = ()  # values of the table's varied params, in their order
    run: object = None  # the MLflow run shown, for the HTML report

    @property
    def seconds(self) -> float | None:
        """Fit plus test time of the run shown."""
        if "fit_s" in self.metrics and "test_s" in self.metrics:
            return self.metrics["fit_s"] + self.metrics["test_s"]
        return None


@dataclass
class Table:
    """The results of one (dataset, model, backbone) in one experiment."""

    dataset: str
    model: str
    backbone: str
    weights: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repeated runs, failures, runs still going
    varied: list[str] = field(default_factory=list)  # params that differ between runs of one category

    @property
    def title(self) -> str:
        weights = f" (weights: {', '.join(self.weights)})" if self.weights else ""
        return f"{self.dataset} · {self.model} · {self.backbone}{weights}"

    def average(self, rows: list[Row] | None = None) -> tuple[dict[str, float], dict[str, int]]:
        """Mean of each metric over the rows (all by default) that have it, and how many have it."""
        rows = self.rows if rows is None else rows
        means, counts = {}, {}
        for key in COLUMNS.values():
            values = [row.metrics[key] for row in rows if key in row.metrics]
            if values:
                means[key], counts[key] = sum(values) / len(values), len(values)
        return means, counts

    def label(self, setting: tuple[str, ...], sep: str = ", ") -> str:
        """A setting as ``name=value`` pairs."""
        return sep.join(f"{k}={v}" for k, v in zip(self.varied, setting, strict=True))

    def settings(self) -> list[tuple[str, ...]]:
        """The distinct settings of the rows, numbers in numeric order."""
        return sorted({row.setting for row in self.rows if row.setting}, key=lambda s: tuple(map(order_key, s)))

    def per_setting(self) -> list[tuple[tuple[str, ...], dict[str, float], dict[str, int]]]:
        """For each setting, the mean of each metric over its categories and how many categories have it."""
        return [(s, *self.average([r for r in self.rows if r.setting == s])) for s in self.settings()]

    def best(self) -> set[tuple[int, str]]:
        """(row index, metric) of the highest value of each metric within each category, where its rows differ."""
        marked = set()
        by_category: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(self.rows):
            by_category[row.category].append(i)
        for indices in by_category.values():
            for key in COLUMNS.values():
                have = [i for i in indices if key in self.rows[i].metrics]
                values = [self.rows[i].metrics[key] for i in have]
                if len(set(values)) > 1:
                    marked |= {(i, key) for i, value in zip(have, values, strict=True) if value == max(values)}
        return marked


def order_key(value: str) -> tuple:
    """Sort key putting numbers in numeric order, before other values in text order."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


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


def varied_params(runs: list) -> list[str]:
    """Params that differ between runs of the same category, among those every run logged.

    A param only some runs have (a setting added to the config since) is not a setting the runs
    compare; of params equal run by run (``seed`` and ``dataset.seed``) the shortest name is kept.
    """
    logged = [run for run in runs if run.data.params]
    if not logged:
        return []
    keys = set.intersection(*(set(run.data.params) for run in logged))
    by_category: dict[str, list] = defaultdict(list)
    for run in logged:
        by_category[run.data.tags.get("ad.category", "?")].append(run)
    varied = [key for key in keys if any(len({run.data.params[key] for run in group}) > 1
                                         for group in by_category.values())]
    kept, seen = [], set()
    for key in sorted(varied, key=lambda k: (len(k), k)):
        values = tuple(run.data.params[key] for run in logged)
        if values not in seen:
            seen.add(values)
            kept.append(key)
    return sorted(kept)


def build_table(key: tuple[str, str, str], runs: list) -> Table:
    """Pick the latest finished run per category and setting, noting repeats and failures (``runs`` newest first)."""
    dataset, model, backbone = key
    table = Table(dataset, model, backbone, varied=varied_params(runs))
    groups: dict[tuple[str, tuple[str, ...]], list] = defaultdict(list)
    for run in runs:
        setting = tuple(run.data.params.get(name, "?") for name in table.varied)
        groups[(run.data.tags.get("ad.category", "?"), setting)].append(run)
    ran = {category for category, _ in groups}
    order = [] if table.varied else known_categories(dataset)  # a sweep shows what it ran
    categories = order + sorted(ran - set(order))  # known ones first, even if never run
    settings = sorted({s for _, s in groups}, key=lambda s: tuple(map(order_key, s)))
    weights = set()
    for category in categories:
        for setting in [s for s in settings if (category, s) in groups] or [()]:
            group_runs = groups.get((category, setting), [])
            label = ", ".join(filter(None, (category, table.label(setting))))
            finished = [r for r in group_runs if r.info.status == "FINISHED"]
            row = Row(category, finished_runs=len(finished), setting=setting)
            if finished:
                latest = row.run = finished[0]
                row.run_id = latest.info.run_id
                row.metrics = {k: v for k, v in latest.data.metrics.items() if not math.isnan(v)}
                weights.add(latest.data.tags.get("ad.weights", ""))
                if len(finished) > 1:
                    table.notes.append(f"{label}: {len(finished)} finished runs; the latest "
                                       f"({when(latest.info.start_time)}, run {latest.info.run_id[:8]}) is shown")
            newest_finish = finished[0].info.start_time if finished else -1
            for run in group_runs:  # failures not superseded by a later finished run
                if run.info.status != "FINISHED" and run.info.start_time > newest_finish:
                    error = run.data.tags.get("error", "").splitlines()[0:1]
                    detail = f": {error[0]}" if error else ""
                    table.notes.append(f"{label}: {run.info.status} ({when(run.info.start_time)}, "
                                       f"run {run.info.run_id[:8]}){detail}")
            table.rows.append(row)
    table.weights = sorted(w for w in weights if w)
    return table


def tables_of(runs: list) -> list[Table]:
    """Group runs by (dataset, model, backbone) tags and build one table each, in name order."""
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    for run in runs:
        tags = run.data.tags
        if "ad.model" in tags:  # runs not made by ad (a parent run, a notebook) have no place in the tables
            groups[(tags.get("ad.dataset", "?"), tags["ad.model"], tags.get("ad.backbone", "?"))].append(run)
    return [build_table(key, groups[key]) for key in sorted(groups)]


@dataclass
class Grid:
    """A table ready to print in markdown or HTML: a caption, headings, rows of (text, bold) cells."""

    caption: str
    head: list[str]
    numeric_from: int  # columns from this one on hold numbers (right-aligned)
    rows: list[list[tuple[str, bool]]] = field(default_factory=list)


def metric_cells(metrics: dict[str, float], bold: set[str] = frozenset()) -> list[tuple[str, bool]]:
    """The four metric cells of a row, the ``bold`` ones marked."""
    return [(cell(metrics.get(k)), k in bold) for k in COLUMNS.values()]


def plain(*texts: str) -> list[tuple[str, bool]]:
    """Cells that are not marked."""
    return [(text, False) for text in texts]


def grids(table: Table) -> tuple[list[Grid], list[str]]:
    """The grids showing ``table`` and the notes to list under them."""
    return comparison_grids(table) if table.varied else benchmark_grids(table)


def benchmark_grids(table: Table) -> tuple[list[Grid], list[str]]:
    """A row per category and the Average over them."""
    grid = Grid("", ["Category", *COLUMNS], 1)
    grid.rows = [plain(row.category) + metric_cells(row.metrics) for row in table.rows]
    means, counts = table.average()
    partial = any(0 < counts.get(k, 0) < len(table.rows) for k in COLUMNS.values())
    grid.rows.append([("Average*" if partial else "Average", True), *metric_cells(means, set(means))])
    notes = list(table.notes)
    if partial:
        notes.insert(0, "*Average over the categories that have the metric: "
                     + ", ".join(f"{name} {counts.get(k, 0)}/{len(table.rows)}" for name, k in COLUMNS.items()))
    return [grid], notes


def comparison_grids(table: Table) -> tuple[list[Grid], list[str]]:
    """A row per category and setting (best per category in bold), then the average per setting."""
    varied = " · ".join(f"`{name}`" for name in table.varied)
    rows = Grid(f"Settings compared: {varied}; the best value of each category in bold.",
                ["Category", *table.varied, *COLUMNS, TIME_COLUMN], 1 + len(table.varied))
    best = table.best()
    for i, row in enumerate(table.rows):
        bold = {key for (j, key) in best if j == i}
        rows.rows.append(plain(row.category, *row.setting) + metric_cells(row.metrics, bold) + plain(cell(row.seconds)))
    per_setting = table.per_setting()
    averages = Grid("Average per setting (over the categories that have the metric):",
                    [*table.varied, "Categories", *COLUMNS], len(table.varied))
    for setting, means, counts in per_setting:
        bold = {k for k in means if len({m[k] for _, m, _ in per_setting if k in m}) > 1
                and means[k] == max(m[k] for _, m, _ in per_setting if k in m)}
        averages.rows.append(plain(*setting, str(max(counts.values(), default=0))) + metric_cells(means, bold))
    return [rows, averages], list(table.notes)


def markdown(table: Table) -> str:
    """The table as the README and the seeds show it, with its notes as a list below."""
    shown, notes = grids(table)
    lines = [f"### {table.title}"]
    for grid in shown:
        lines += ["", grid.caption, ""] if grid.caption else [""]
        lines += ["| " + " | ".join(grid.head) + " |",
                  "|" + "---|" * grid.numeric_from + "---:|" * (len(grid.head) - grid.numeric_from)]
        lines += ["| " + " | ".join(f"**{text}**" if bold and text else text for text, bold in row) + " |"
                  for row in grid.rows]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)


def csv_text(tables: list[Table]) -> str:
    """Every row of every table (Average rows included) with its setting and run, blanks for missing metrics."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "model", "backbone", "weights", "category", "setting", *COLUMNS.values(),
                     "fit_s", "test_s", "run_id", "finished_runs"])
    for table in tables:
        head = [table.dataset, table.model, table.backbone, ";".join(table.weights)]
        for row in table.rows:
            writer.writerow([*head, row.category, table.label(row.setting, ";"),
                             *(row.metrics.get(k, "") for k in (*COLUMNS.values(), "fit_s", "test_s")),
                             row.run_id, row.finished_runs])
        for setting, means, _ in table.per_setting() or [((), *table.average())]:
            writer.writerow([*head, "Average", table.label(setting, ";"),
                             *(means.get(k, "") for k in COLUMNS.values()), "", "", "", ""])
    return out.getvalue()
