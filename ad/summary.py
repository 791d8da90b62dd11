"""The summary a run prints when it ends: its metrics, its operating threshold, and where its results are."""

from __future__ import annotations

#: Metric columns of the published tables, in display order.
METRIC_KEYS = ("image_AUROC", "image_F1", "pixel_AUROC", "pixel_AUPRO")


def format_table(results: dict) -> str:
    """The small human-readable summary printed at the end of a run."""
    title = (f"{results['model']} · {results['backbone']} (weights: {results['weights']}) · "
             f"{results['dataset']}/{results['category']}")
    rows = [f"  {key:<12} {results[key]:.4f}" if key in results else f"  {key:<12} —" for key in METRIC_KEYS]
    timing = f"  fit {results['fit_s']:.2f} s · test {results['test_s']:.2f} s · {results['device']}"
    ending = footer(results) if "run_dir" in results else []
    return "\n".join([title, *rows, *operating_point(results), timing, *ending])


def footer(results: dict) -> list[str]:
    """The summary's closing lines: the run folder, then the MLflow run and how to open it."""
    lines = [f"  results      {results['run_dir']}  (metrics.json, predictions.csv, model/)"]
    if results.get("mlflow_run_id"):
        start = f"{results['mlflow_open']}, then " if results.get("mlflow_open") else ""
        lines.append(f"  MLflow run   {results['mlflow_run_id']}: {start}{results['mlflow_url']}")
    return lines


def operating_point(results: dict) -> list[str]:
    """The summary's line on the image threshold: its value, its bound, and what it does on the test split."""
    if "image_threshold" not in results:
        return []
    line = f"  threshold    {results['image_threshold']:.4g}"
    if "image_threshold_frr_bound" in results:
        line += f" (false rejects <= {results['image_threshold_frr_bound']:.0%} at 95%, {results['n_val_good']} good)"
    rates = [f"{name} {results[key]:.0%}" for name, key in (("rejects", "image_false_reject_rate"),
                                                             ("recall", "image_recall")) if key in results]
    return [line + (": test " + ", ".join(rates) if rates else "")]
