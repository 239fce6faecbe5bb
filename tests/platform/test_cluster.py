"""The operating side: `wsss cluster up/status/down` (a head and 2 worker nodes, each its own
`ray start` on loopback), labeling, training and sweep jobs submitted to it with `wsss submit`, the
platform's Prometheus metrics scraped from every node (and through a real Prometheus server when the
OS has one), and the Grafana dashboards' queries checked against what was scraped."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port
from wsss_platform.cli import main
from wsss_platform.datasets.demo import write_demo_dataset

from .test_label import TINY
from .test_sweep import sweep_file
from .test_train import TINY_TRAIN

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "dashboards"


class Scraper:
    """Every node's metrics endpoint, read once a second while jobs run: a series seen at any
    time is kept (a gauge of a training worker is gone once the worker exits)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self.samples, self.raw = urls, {}, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.scrape()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.scrape()

    def scrape(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        for url in self.urls:
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                continue
            self.raw = text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("WorkerId",))))
                    self.samples[key] = max(self.samples.get(key, float("-inf")), s.value)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def total(self, name: str, **labels: str) -> float:
        """Sum over the series of ``name`` whose labels include ``labels`` (each node and worker its own)."""
        return sum(v for (n, lab), v in self.samples.items()
                   if n == name and all((k, val) in lab for k, val in labels.items()))

    def values(self, name: str) -> dict[tuple, float]:
        return {lab: v for (n, lab), v in self.samples.items() if n == name}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`wsss cluster up --workers 2`, and the jobs run on it; torn down by the last test (or here)."""
    from wsss_platform import cluster as launcher

    state = tmp_path_factory.mktemp("cluster")
    # metrics reach the node's agent every second rather than every 10
    env = {"RAY_metrics_report_interval_ms": "1000", "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow.db'}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert main(["cluster", "up", "--workers", "2", "--cpus-per-node", "2", "--state-dir", str(state)]) == 0
        c = launcher.LocalCluster.load(state)
        yield {"state": state, "cluster": c}
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if launcher.LocalCluster.load(state) is not None:
            launcher.down(state)


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """A labeling job, a 2-iteration training and a 2-trial sweep, submitted one after the other."""
    work = tmp_path_factory.mktemp("jobs")
    write_demo_dataset(str(work / "voc"), "voc", 6, seed=41)
    dash = cluster["cluster"].dashboard
    runs = {
        "label": ["submit", "label", "--address", dash, "--dataset", str(work / "voc"), "--output", str(work / "out"),
                  *TINY],
        "train": ["submit", "train", "--address", dash, "--dataset", str(work / "voc"), "--pseudo-masks", "none",
                  "--output", str(work / "seg"), *TINY_TRAIN, "compute.num_workers=1", "train.iterations=3"],
        "sweep": ["submit", "sweep", "--address", dash, "--config", str(sweep_file(work, work / "voc")),
                  "--num-trials", "2", "tune.max_concurrent_trials=1"],
    }
    out: dict = {"work": work, "rc": {}}
    with Scraper(cluster["cluster"].metrics_urls) as scraper:
        for kind, argv in runs.items():
            out["rc"][kind] = main([*argv, "--follow"])
        time.sleep(3)  # the last report interval
    out["scraper"] = scraper
    return out


@pytest.mark.slow
def test_cluster_status_shows_three_nodes_and_their_resources(cluster, capsys):
    assert main(["cluster", "status", "--state-dir", str(cluster["state"])]) == 0
    printed = capsys.readouterr().out
    assert "3 of 3 nodes alive" in printed
    assert printed.count(" ALIVE ") == 3 and printed.count(" head ") == 1 and printed.count(" worker ") == 2
    # the nodes share one machine's memory: no total that adds it up three times
    assert re.search(r"total \(alive\): CPU 6; memory: the nodes share this machine's [\d.]+ GiB", printed)
    assert re.search(r"total \(alive\): CPU 6\b", printed)
    c = cluster["cluster"]
    assert c.dashboard.startswith("http://127.0.0.1:") and c.address.startswith("127.0.0.1:")
    assert len(c.metrics_urls) == 3
    # a second `up` on the same state refuses rather than starting a second cluster over it
    assert main(["cluster", "up", "--workers", "1", "--state-dir", str(cluster["state"])]) == 1
    assert "already up" in capsys.readouterr().err


@pytest.mark.slow
def test_submitted_jobs_succeed_and_export_every_platform_metric(jobs, capsys):
    assert jobs["rc"] == {"label": 0, "train": 0, "sweep": 0}
    s = jobs["scraper"]
    # labeling: 5 train images, each counted once, each stage timed once per image
    assert s.total("ray_wsss_label_images_total", status="done", source="clip_es") == 5
    assert s.total("ray_wsss_label_images_total", status="failed") == 0
    for stage in ("load", "infer", "write"):
        assert s.total("ray_wsss_label_stage_seconds_count", stage=stage) == 5
        assert 0 < s.total("ray_wsss_label_stage_seconds_sum", stage=stage) < 5 * 120
    for share in ("foreground", "ignore"):
        n, total = (s.total(f"ray_wsss_label_{share}_share_{k}") for k in ("count", "sum"))
        assert n == 5 and 0 <= total <= 5
        assert s.total(f"ray_wsss_label_{share}_share_bucket", le="+Inf") == 5
    # training: 3 steps of the segmenter, its loss and throughput
    assert s.total("ray_wsss_train_iterations_total", recipe="segmenter") == 3
    losses = s.values("ray_wsss_train_loss")
    assert any(("term", "loss") in lab for lab in losses) and all(v > 0 for v in losses.values())
    assert all(v > 0 for v in s.values("ray_wsss_train_images_per_second").values())
    assert all(0 <= v <= 1 for v in s.values("ray_wsss_train_val_miou").values()) and s.values("ray_wsss_train_val_miou")
    # the sweep: 2 trials finished, a best objective
    assert s.total("ray_wsss_sweep_trials_total") == 2
    assert s.values("ray_wsss_sweep_best_objective")
    # Ray's own node series come from the same endpoints
    assert "ray_node_cpu_utilization" in s.names()


def exposition_names() -> set[str]:
    """The platform's metrics as Prometheus sees them (``metrics.METRICS`` through Ray's naming)."""
    from wsss_platform.metrics import METRICS

    out = set()
    for m in METRICS.values():
        base = f"ray_{m.name}"
        out |= ({f"{base}_total"} if m.kind == "counter" else {base} if m.kind == "gauge"
                else {f"{base}_{k}" for k in ("bucket", "sum", "count")})
    return out


@pytest.mark.slow
def test_every_documented_metric_was_exported(jobs):
    assert exposition_names() <= jobs["scraper"].names(), exposition_names() - jobs["scraper"].names()
    readme = (DASHBOARDS / "README.md").read_text()
    for name in exposition_names():
        assert re.sub(r"_(bucket|sum|count)$", "", name) in readme, name


def ray_documented_metrics() -> set[str]:
    """Every ``ray_*`` series Ray's own Grafana dashboards (shipped with the ray package) query."""
    import ray.dashboard.modules.metrics.dashboards as shipped

    names = set()
    for path in Path(shipped.__file__).parent.glob("*_panels.py"):
        names |= set(re.findall(r"\bray_[a-z0-9_]+", path.read_text()))
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels or durations."""
    expr = re.sub(r'"[^"]*"', "", expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)        # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)       # range durations
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"(?<![A-Za-z0-9_:])\d[\d.]*(e[+-]?\d+)?", "", expr)  # numbers, 1e-9 too
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = m.group(0), expr[m.end():].lstrip()
        if word in PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            out += [(f"{path.name}: {panel['title']}", t["expr"]) for t in panel["targets"]]
    return out


def test_promql_metric_extraction():
    assert promql_metrics('sum by (le, stage) (rate(ray_a_bucket{x="y"}[5m])) / clamp_min(sum(ray_b), 1e-9)') == {
        "ray_a_bucket", "ray_b"}
    assert promql_metrics("histogram_quantile(0.95, sum by (le) (rate(ray_c_bucket[5m])))") == {"ray_c_bucket"}


def test_dashboards_are_what_build_py_writes_and_import_as_they_are():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_dashboards", DASHBOARDS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rendered = build.render()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARDS.glob("*.json")) == ["labeling.json", "sweeps.json",
                                                                                      "training.json"]
    for name, text in rendered.items():
        assert (DASHBOARDS / name).read_text() == text, f"dashboards/{name} is stale: python dashboards/build.py"
        doc = json.loads(text)
        assert doc["uid"] and doc["title"] and doc["panels"]
        assert [v["name"] for v in doc["templating"]["list"]] == ["datasource"]
        for p in doc["panels"]:
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"]


@pytest.mark.slow
def test_every_dashboard_query_names_only_scraped_or_ray_documented_metrics(jobs):
    known = jobs["scraper"].names() | ray_documented_metrics()
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    for where, expr in exprs:
        unknown = promql_metrics(expr) - known
        assert not unknown, f"{where}: {expr} names {unknown}"
    def base(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)

    platform = {base(n) for _, e in exprs for n in promql_metrics(e) if n.startswith("ray_wsss_")}
    assert platform == {base(n) for n in exposition_names()}, "a platform metric without a panel"


@pytest.mark.slow
def test_a_real_prometheus_scrapes_the_cluster_and_answers_the_dashboards(cluster, jobs, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary (Debian: apt-get install prometheus)")
    c = cluster["cluster"]
    config = c.prometheus_config.read_text().replace("5s", "1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'db'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)

        def query(expr: str) -> list:
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(query("up == 1")) < 3:
            time.sleep(1)
        assert len(query("up == 1")) == 3  # every node, through the config `wsss cluster up` wrote
        while time.monotonic() < deadline and not query('sum(ray_wsss_label_images_total{status="done"})'):
            time.sleep(1)
        assert float(query('sum(ray_wsss_label_images_total{status="done"})')[0]["value"][1]) == 5
        for _, expr in dashboard_exprs():
            query(expr)  # every panel's PromQL parses and evaluates
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.slow
def test_cluster_down_stops_every_process_it_started_and_nothing_else(cluster, jobs, ray_local, capsys):
    import psutil

    from wsss_platform import cluster as launcher

    c = cluster["cluster"]
    ours = launcher.processes(c.id)
    assert len(ours) >= 3 * 3  # at least GCS/raylet/agent per node
    # each raylet's dashboard and runtime-env agents (started without the cluster's marker) are counted too
    raylets = [p for p in ours if "raylet" in p.name()]
    agents = [q for r in raylets for q in r.children(recursive=True) if "Agent" in " ".join(q.cmdline())]
    assert len(raylets) == 3 and len(agents) >= 2 * 3 and {q.pid for q in agents} <= {p.pid for p in ours}
    assert main(["cluster", "down", "--state-dir", str(cluster["state"])]) == 0
    assert re.search(r"stopped \d+ process\(es\)", capsys.readouterr().out)
    assert launcher.processes(c.id) == []
    # gone when `down` returns, not a minute later
    assert not [p for p in [*ours, *agents] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    # the test session's own Ray (another local Ray on this machine) is untouched
    assert ray_local.is_initialized() and ray_local.cluster_resources().get("CPU") == 2
    assert main(["cluster", "status", "--state-dir", str(cluster["state"])]) == 1
    assert "no cluster" in capsys.readouterr().err
