"""One self-contained HTML page per experiment: the tables, sweep plots, and per run its curves, scores and misses.

Everything is inline (figures as SVG data URIs, overlays as JPEG data URIs, styles in the head) and
the page's content security policy forbids any other source, so it opens offline, mailed or archived,
and a reference to anything outside shows as a console error (which the browser test looks for).
"""

from __future__ import annotations

import base64
import io
import mimetypes
import tempfile
from html import escape
from pathlib import Path

from ad.report.artifacts import RunArtifacts, fetch, quiet_downloads
from ad.report.plots import run_figure, sweep_figure
from ad.report.tables import Grid, Row, Table, cell, grids, when

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: Worst misses shown per kind and run.
MISSES = 4
#: Width overlays are shrunk to, and their JPEG quality: a page of many runs stays a few MB at most.
OVERLAY_WIDTH, JPEG_QUALITY = 560, 82
#: Operating-point metrics shown when a run logged them: name -> label.
OPERATING = {"image_threshold": "image threshold", "pixel_threshold": "pixel threshold",
             "image_precision": "image precision", "image_recall": "image recall",
             "image_false_reject_rate": "false reject rate", "image_false_accept_rate": "false accept rate",
             "image_threshold_frr_bound": "false reject rate, 95% bound",
             "fit_s": "fit s", "test_s": "test s", "total_s": "whole command s"}
#: Run facts from metrics.json, in the order shown.
INFO = ("weights", "weights_tag", "precision", "device", "image_size", "n_train", "n_test", "seed", "epochs",
        "threshold_method", "ad_version")
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;padding:0 16px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee}
th{background:#f5f5f5;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;background:#e8f5e9}.muted{color:#777}img{max-width:100%}
details{border:1px solid #e3e3e3;border-radius:6px;margin:10px 0;padding:6px 12px}
summary{cursor:pointer;font-weight:600}
.facts{display:grid;grid-template-columns:repeat(3,max-content minmax(0,1fr));gap:2px 12px;margin:8px 0}
.facts dt{color:#777}.facts dd{margin:0;overflow-wrap:anywhere}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.gallery figure{margin:0;width:272px}.gallery img{width:100%}
.gallery figcaption{font-size:12px}.card{border:1px dashed #ccc;padding:8px;font-size:12px;width:256px}
"""


def grid_html(grid: Grid) -> str:
    """A grid as an HTML table, numbers right-aligned and best values highlighted."""
    head = "".join(f"<th>{escape(h)}</th>" for h in grid.head)
    rows = []
    for row in grid.rows:
        cells = []
        for i, (text, bold) in enumerate(row):
            kind = " ".join(k for k, on in (("n", i >= grid.numeric_from), ("best", bold and text)) if on)
            cells.append(f'<td class="{kind}">{escape(text)}</td>' if kind else f"<td>{escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<p>{escape(grid.caption.replace('`', ''))}</p>" if grid.caption else ""
    return f"{caption}<table><tr>{head}</tr>{''.join(rows)}</table>"


def table_section(table: Table) -> str:
    """A table's heading, grids, sweep plot and notes."""
    shown, notes = grids(table)
    parts = [f"<h2>{escape(table.title)}</h2>", *map(grid_html, shown)]
    if table.varied and (figure := sweep_figure(table)):
        parts.append(f'<p><img alt="metrics against the settings compared" src="{figure}"></p>')
    if notes:
        parts.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def image_uri(path: Path) -> str:
    """A logged image as a data URI: raster images shrunk to ``OVERLAY_WIDTH`` and re-encoded as JPEG."""
    if path.suffix.lower() == ".svg":
        return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode()
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > OVERLAY_WIDTH:
            image = image.resize((OVERLAY_WIDTH, round(image.height * OVERLAY_WIDTH / image.width)), Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return f"data:{mimetypes.types_map['.jpg']};base64," + base64.b64encode(out.getvalue()).decode()


def facts(row: Row, found: RunArtifacts) -> str:
    """The run's metadata: where it is, what it ran with, its operating point."""
    run = row.run
    items = [("run", f"{run.info.run_name or ''} ({run.info.run_id})"), ("started", when(run.info.start_time))]
    items += [(key, str(found.info[key])) for key in INFO if found.info.get(key) not in (None, "")]
    items += [(label, cell(row.metrics[key])) for key, label in OPERATING.items() if key in row.metrics]
    items += sorted((k, v) for k, v in run.data.tags.items() if k.startswith("ad.") and k != "ad.model")
    return '<dl class="facts">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"


def gallery(found: RunArtifacts, threshold: float | None) -> str:
    """The worst false accepts and false rejects, each with its overlay panel where the run logged one."""
    pred = found.predictions
    flagged = pred.flagged(threshold)
    if flagged is None:
        return '<p class="muted">No image threshold in this run: no misses to show.</p>'
    parts = []
    explain = {"false accept": "defective images passed as good, lowest score first",
               "false reject": "good images flagged, highest score first"}
    for kind, found_misses in pred.misses(flagged).items():
        parts.append(f"<h4>{kind.capitalize()}s: {len(found_misses)} ({explain[kind]})</h4>")
        if not len(found_misses):
            parts.append('<p class="muted">none</p>')
            continue
        cards = []
        for i in found_misses[:MISSES]:
            caption = f"{pred.defect[i]} · score {pred.score[i]:.4g} · {Path(pred.path[i]).name}"
            overlay = found.overlay(pred.defect[i], pred.path[i])
            if overlay is not None:
                cards.append(f'<figure><img alt="{escape(caption)}" src="{image_uri(overlay)}">'
                             f"<figcaption>{escape(caption)}</figcaption></figure>")
            else:
                cards.append(f'<div class="card">{escape(caption)}<br><span class="muted">{escape(pred.path[i])}'
                             "<br>no overlay logged for this image</span></div>")
        parts.append('<div class="gallery">' + "".join(cards) + "</div>")
    return "\n".join(parts)


def run_section(table: Table, row: Row, found: RunArtifacts, open_: bool) -> str:
    """One run: its facts, curves and score histogram, and its worst misses."""
    summary = " · ".join(x for x in (table.model, table.backbone, row.category, table.label(row.setting)) if x)
    headline = ", ".join(f"{k} {cell(row.metrics[k])}" for k in ("image_AUROC", "pixel_AUPRO") if k in row.metrics)
    parts = [f"<details{' open' if open_ else ''}><summary>{escape(summary)} "
             f'<span class="muted">{escape(headline)}</span></summary>', facts(row, found)]
    operating = "image_threshold" in row.metrics
    threshold = row.metrics.get("image_threshold", row.metrics.get("image_F1_threshold"))
    if found.predictions is not None:
        figure = run_figure(found.predictions, threshold, "threshold" if operating else "F1-best threshold (test)")
        parts.append(f'<p><img alt="ROC, precision-recall and scores" src="{figure}"></p>')
    else:
        parts.append('<p class="muted">No per-image predictions (predictions.csv) in this run: it was logged '
                     "before they were, so there are no curves, score histogram or misses to show.</p>")
    if found.curves:
        parts.append("<p>" + "".join(f'<img alt="{escape(p.name)}" src="{image_uri(p)}">' for p in found.curves)
                     + "</p>")
    elif "pixel_AUPRO" in row.metrics:
        parts.append('<p class="muted">PRO curve: the run stores no per-pixel maps to draw it from (only its '
                     f"area, AUPRO {cell(row.metrics['pixel_AUPRO'])}).</p>")
    if found.predictions is not None:
        parts.append(gallery(found, threshold))
    return "\n".join(parts) + "</details>"


def page(experiment: str, tables: list[Table], client, where: str, sweep: str | None) -> str:
    """The whole page for the tables of one experiment (their runs' artifacts fetched from ``client``)."""
    shown = [(table, row) for table in tables for row in table.rows if row.run is not None]
    with tempfile.TemporaryDirectory(prefix="ad-report-") as scratch, quiet_downloads():
        runs = [run_section(table, row, fetch(client, row.run_id, Path(scratch)), open_=i == 0)
                for i, (table, row) in enumerate(shown)]
    scope = f"sweep {sweep}" if sweep else "all runs"
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>ad report · {escape(experiment)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Experiment {escape(experiment)}</h1>",
        f'<p class="muted">{escape(scope)} · {len(shown)} runs shown · store {escape(where)}</p>',
        *map(table_section, tables), "<h2>Runs</h2>", *runs, "</body></html>", ""])
