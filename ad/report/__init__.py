"""Compare the runs of an MLflow experiment in markdown tables, a CSV and a self-contained HTML page.

``python -m ad.report [--experiment NAME] [--sweep ID] [--html [FILE]]`` prints one markdown table
per (dataset, model, backbone) and writes it with a CSV to ``DIR/<experiment>.md`` and ``.csv``: a
row per category (its latest finished run), or, when runs of a category differ in some settings (a
sweep), a row per category and setting with an average per setting. ``--html`` adds one
self-contained page with plots, curves and the worst misses.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ad.errors import ADError
from ad.report.runs import default_experiment, fetch_runs, open_client
from ad.report.tables import Table, csv_text, known_categories, markdown, tables_of

__all__ = ["Table", "default_experiment", "known_categories", "main", "report", "tables_of"]


def write_atomic(path: Path, content: str) -> None:
    """Write ``content`` to ``path`` through a temporary file, so a failure leaves nothing half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def safe_stem(name: str) -> str:
    """An experiment name usable as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def report(experiment: str | None = None, uri: str | None = None, out: Path | None = None,
           sweep: str | None = None, html: Path | None = None) -> str:
    """Build the tables of ``experiment`` (the config's default when None); write ``.md`` and ``.csv`` to
    ``out`` and the page to ``html`` when given; return the markdown."""
    from ad.tracking import resolve_tracking_uri

    experiment = experiment or default_experiment()
    client = open_client(uri)
    tables = tables_of(fetch_runs(client, experiment, sweep))
    if not tables:
        raise ADError(f"--experiment {experiment}: no ad runs{' in sweep ' + sweep if sweep else ''} to report")
    text = "\n\n".join(markdown(t) for t in tables) + "\n"
    page = None
    if html is not None:  # built before anything is written: a failure leaves no files
        from ad.report.html import page as html_page

        page = html_page(experiment, tables, client, resolve_tracking_uri(uri), sweep)
    if out is not None:
        stem = safe_stem(experiment)
        write_atomic(out / f"{stem}.md", text)
        write_atomic(out / f"{stem}.csv", csv_text(tables))
    if page is not None:
        write_atomic(html, page)
    return text


def main(argv: list[str] | None = None) -> None:
    """Command line: print the tables, write them (markdown and CSV) under ``--out``, and the page with ``--html``."""
    parser = argparse.ArgumentParser(prog="python -m ad.report", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (tracking.experiment); default: the config's, "
                             "conf/tracking/mlflow.yaml")
    parser.add_argument("--tracking-uri", default=None,
                        help="sqlite:///path/mlflow.db or http://host:port; default as in training")
    parser.add_argument("--out", type=Path, default=Path("outputs/reports"), help="folder for <experiment>.md/.csv")
    parser.add_argument("--sweep", default=None, help="only the runs of this sweep (the ad.sweep tag: its folder name)")
    parser.add_argument("--html", nargs="?", type=Path, const=True, default=None, metavar="FILE",
                        help="also write a self-contained HTML report (default FILE: <out>/<experiment>.html)")
    args = parser.parse_args(argv)
    try:
        experiment = args.experiment or default_experiment()
        html = args.out / f"{safe_stem(experiment)}.html" if args.html is True else args.html
        if html is not None and html.is_dir():
            raise ADError(f"--html {html}: is a folder; give a file name (report.html) or no name for {args.out}/")
        text = report(experiment, args.tracking_uri, args.out, args.sweep, html)
    except ADError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(text, end="")
    print(f"(written to {args.out}/{f'; HTML report: {html}' if html else ''})", file=sys.stderr)
