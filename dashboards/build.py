"""Writes the Grafana dashboards in this folder (``python dashboards/build.py``); the JSON files are
what Grafana imports, and a test checks they match this script.

Each panel is a title, a unit and PromQL over the platform's metrics (``ray_wsss_*``, see README.md)
and Ray's own node series (``ray_node_*``). The data source is a dashboard variable, so a file
imports as it is into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = "5m"


def mean(metric: str, by: str) -> str:
    """A histogram's mean over the window: rate of its sum over rate of its count."""
    return (f"sum by ({by}) (rate({metric}_sum[{RATE}])) / "
            f"clamp_min(sum by ({by}) (rate({metric}_count[{RATE}])), 1e-9)")


NODES = [
    ("CPU utilisation per node", "percent", [("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}")]),
    ("GPU utilisation per node", "percent", [("sum by (instance) (ray_node_gpus_utilization)", "{{instance}}")]),
    ("GPU memory used per node", "decmbytes", [("sum by (instance) (ray_node_gram_used)", "{{instance}}")]),
    ("Object store memory", "bytes", [("sum by (Location) (ray_object_store_memory)", "{{Location}}")]),
]

DASHBOARDS = {
    "labeling": ("wsss · labeling", [
        ("Images labeled per second", "ops", [
            (f"sum by (status) (rate(ray_wsss_label_images_total[{RATE}]))", "{{status}}")]),
        ("Images labeled (since the cluster started)", "short", [
            ("sum by (source, status) (ray_wsss_label_images_total)", "{{source}} {{status}}")]),
        ("Failed share", "percentunit", [
            (f'sum(rate(ray_wsss_label_images_total{{status="failed"}}[{RATE}])) / '
             f"clamp_min(sum(rate(ray_wsss_label_images_total[{RATE}])), 1e-9)", "failed")]),
        ("Seconds per image and stage (mean)", "s", [(mean("ray_wsss_label_stage_seconds", "stage"), "{{stage}}")]),
        ("Seconds per image and stage (p95)", "s", [
            (f"histogram_quantile(0.95, sum by (le, stage) (rate(ray_wsss_label_stage_seconds_bucket[{RATE}])))",
             "{{stage}}")]),
        ("Pseudo masks: foreground and ignored share (mean)", "percentunit", [
            (mean("ray_wsss_label_foreground_share", "source"), "foreground {{source}}"),
            (mean("ray_wsss_label_ignore_share", "source"), "ignored {{source}}")]),
        *NODES]),
    "training": ("wsss · training", [
        ("Loss, each term", "short", [("max by (recipe, term) (ray_wsss_train_loss)", "{{recipe}} {{term}}")]),
        ("Throughput (all workers)", "short", [
            ("max by (recipe) (ray_wsss_train_images_per_second)", "{{recipe}} images/s")]),
        ("Iterations per second", "short", [
            (f"sum by (recipe) (rate(ray_wsss_train_iterations_total[{RATE}]))", "{{recipe}}")]),
        ("Validation mIoU", "percentunit", [
            ("max by (recipe, metric) (ray_wsss_train_val_miou)", "{{recipe}} {{metric}}")]),
        *NODES]),
    "sweeps": ("wsss · sweeps", [
        ("Trials finished", "short", [("sum by (status) (ray_wsss_sweep_trials_total)", "{{status}}")]),
        ("Trials finished per 10 minutes", "short", [
            ("sum by (status) (increase(ray_wsss_sweep_trials_total[10m]))", "{{status}}")]),
        ("Best objective so far", "short", [("max by (objective) (ray_wsss_sweep_best_objective)", "{{objective}}")]),
        ("Ray actors by state (trials are actors)", "short", [("sum by (State) (ray_actors)", "{{State}}")]),
        *NODES]),
}


def panel(i: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for k, (expr, legend) in enumerate(queries)],
    }


def dashboard(key: str, title: str, panels: list) -> dict:
    return {
        "uid": f"wsss-{key}", "title": title, "tags": ["wsss", "ray"], "editable": True,
        "schemaVersion": 39, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def render() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {f"{key}.json": json.dumps(dashboard(key, title, panels), indent=2) + "\n"
            for key, (title, panels) in DASHBOARDS.items()}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote dashboards/{name}")
