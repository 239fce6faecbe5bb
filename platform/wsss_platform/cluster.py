"""A multi-node Ray cluster on this machine, on loopback: ``wsss cluster up | status | down``.

Each node is its own ``ray start`` (a head and N workers), as on a real cluster, so jobs are
scheduled across raylets and object stores and submitted through the head's Job Submission API.
Every port is the node's own (a second local Ray, e.g. a test session's, keeps its defaults), and
every process the nodes start carries ``WSSS_CLUSTER_ID`` in its environment: ``down`` stops those
processes and no other. The cluster's state (ports, Ray's temp dir) is a JSON file in ``state_dir``.

Ray's token auth is off (``RAY_AUTH_MODE=disabled``): every address is bound to 127.0.0.1, so only
this machine's users reach it. A cluster that listens on a network keeps auth on (``cluster/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsss_platform.ray_utils import LOOPBACK_ENV

MARKER = "WSSS_CLUSTER_ID"
HOST = "127.0.0.1"
STATE_FILE = "cluster.json"
# The per-node ports of `ray start` that have fixed defaults: two nodes on one machine must differ in each.
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


class ClusterError(RuntimeError):
    pass


def default_state_dir() -> Path:
    return Path(os.environ.get("WSSS_CLUSTER_DIR") or Path.home() / ".wsss" / "cluster")


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when nothing listens there, else a port the OS picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ClusterError("no free port on 127.0.0.1")


@dataclass
class LocalCluster:
    id: str
    state_dir: str
    temp_dir: str
    gcs_port: int
    dashboard_port: int
    workers: int
    cpus_per_node: float
    metrics_ports: list[int] = field(default_factory=list)  # the head's first

    @property
    def address(self) -> str:
        """What a driver passes to ``ray.init`` (or sets as RAY_ADDRESS)."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """The dashboard and Job Submission API: ``wsss submit … --address`` takes this."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def metrics_urls(self) -> list[str]:
        return [f"http://{HOST}:{p}/metrics" for p in self.metrics_ports]

    @property
    def prometheus_config(self) -> Path:
        return Path(self.state_dir) / "prometheus.yml"

    def write_prometheus_config(self, interval: str = "5s") -> None:
        """A scrape config over every node's metrics address. Static targets on 127.0.0.1, not Ray's
        service-discovery file: that one names the machine's external address, which a loopback cluster avoids."""
        import yaml

        targets = [f"{HOST}:{p}" for p in self.metrics_ports]
        doc = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
               "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}]}
        self.prometheus_config.write_text(yaml.safe_dump(doc, sort_keys=False))

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, state_dir: Path) -> LocalCluster | None:
        path = state_dir / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def env(self) -> dict[str, str]:
        # RAY_ADDRESS for every process of the cluster: Ray's State API client inside a worker (Train's
        # placement-group cleaner) otherwise may find another local Ray on this machine and give up.
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: with 0 (what keeps a single-node Ray on loopback) `ray start`
        # refuses to add a second node; every node is still bound to 127.0.0.1 by --node-ip-address.
        # PATH starts with this interpreter's bin: a submitted job's `python jobs/….py` is then the Python
        # that has the platform installed, also when `wsss` was run as .venv/bin/wsss without activating it.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **LOOPBACK_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", MARKER: self.id,
                "RAY_ADDRESS": self.address, "PATH": path}

    def node_command(self, head: bool) -> tuple[list[str], int]:
        """``ray start`` for one node, with ports of its own; returns it and the node's metrics port."""
        ray = str(Path(sys.executable).with_name("ray"))
        ports = {name: free_port() for name in NODE_PORTS}
        cmd = [ray, "start", "--node-ip-address", HOST, "--num-cpus", f"{self.cpus_per_node:g}", "--disable-usage-stats",
               *[f"--{name}={port}" for name, port in ports.items()]]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                    f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={self.address}"]
        return cmd, ports["metrics-export-port"]


def processes(cluster_id: str) -> list:
    """Every live process whose environment carries this cluster's id, and their descendants: what its
    nodes started (each raylet starts its dashboard and runtime-env agents with an environment of its own)."""
    import psutil

    out: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER) == cluster_id and p.status() != psutil.STATUS_ZOMBIE:
                out |= {q.pid: q for q in (p, *p.children(recursive=True)) if q.pid != os.getpid()}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(out.values())


def stop(cluster_id: str, grace: float = 15.0) -> int:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace`` seconds; returns how many it stopped."""
    import psutil

    victims = processes(cluster_id)
    total = len(victims)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        _, victims = psutil.wait_procs(victims, timeout=wait)
        if not victims:
            break
    if left := processes(cluster_id):
        raise ClusterError(f"{len(left)} process(es) of cluster {cluster_id} did not stop: "
                           f"{', '.join(str(p.pid) for p in left)}")
    return total


def list_nodes(dashboard: str, timeout: float = 10.0) -> list:
    """The cluster's nodes as Ray's State API (served by the head's dashboard) lists them."""
    from ray.util.state import list_nodes as state_nodes

    return state_nodes(address=dashboard, timeout=timeout, raise_on_missing_output=False, detail=True)


def wait_for_nodes(cluster: LocalCluster, count: int, timeout: float = 120.0) -> None:
    deadline, alive = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        try:
            alive = sum(n.state == "ALIVE" for n in list_nodes(cluster.dashboard, timeout=5))
        except Exception:  # the dashboard answers a few seconds after the head starts
            alive = 0
        if alive >= count:
            return
        time.sleep(1.0)
    raise ClusterError(f"{alive} of {count} nodes came up within {timeout:.0f}s; Ray's logs: "
                       f"{cluster.temp_dir}/session_latest/logs")


def _start_node(cluster: LocalCluster, head: bool) -> None:
    cmd, metrics_port = cluster.node_command(head)
    done = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=180)
    if done.returncode:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ClusterError(f"`ray start` for the {'head' if head else 'worker'} node failed "
                           f"(exit {done.returncode}):\n{tail}")
    cluster.metrics_ports.append(metrics_port)
    cluster.save()  # after each node: a failure later still leaves `down` what it needs


def up(workers: int, cpus_per_node: float, state_dir: Path, log=print) -> LocalCluster:
    """Start a head and ``workers`` worker nodes on 127.0.0.1; on any failure stop what was started."""
    if workers < 0:
        raise ClusterError(f"--workers {workers}: give 0 or more worker nodes")
    if (old := LocalCluster.load(state_dir)) is not None:
        if processes(old.id):
            raise ClusterError(f"a cluster is already up from {state_dir} (dashboard {old.dashboard}): "
                               "`wsss cluster down` first, or pass another --state-dir")
        (state_dir / STATE_FILE).unlink()
    # Ray's temp dir holds its unix sockets, whose paths must stay under ~107 characters: a short one in /tmp.
    cluster = LocalCluster(id=uuid.uuid4().hex[:12], state_dir=str(state_dir),
                           temp_dir=tempfile.mkdtemp(prefix="wsss-ray-"), gcs_port=free_port(6379),
                           dashboard_port=free_port(8265), workers=workers, cpus_per_node=cpus_per_node)
    cluster.save()
    try:
        log(f"[wsss cluster] starting the head node ({cpus_per_node:g} CPUs) …")
        _start_node(cluster, head=True)
        for i in range(workers):
            log(f"[wsss cluster] starting worker node {i + 1}/{workers} …")
            _start_node(cluster, head=False)
        wait_for_nodes(cluster, workers + 1)
        cluster.write_prometheus_config()
    except BaseException:
        stop(cluster.id)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return cluster


def describe(cluster: LocalCluster) -> str:
    """What `wsss cluster up` prints: where everything is, and the next commands."""
    return "\n".join([
        f"[wsss cluster] up: a head and {cluster.workers} worker node(s) on {HOST}, {cluster.cpus_per_node:g} CPUs each "
        "(Ray token auth off: loopback only)",
        f"  dashboard and job submission: {cluster.dashboard}",
        f"  submit a job:  wsss submit label --address {cluster.dashboard} --config FILE …   "
        f"(or export RAY_ADDRESS={cluster.dashboard})",
        f"  Ray address for drivers: {cluster.address}",
        f"  Prometheus metrics: {' '.join(cluster.metrics_urls)}",
        f"  Prometheus config: {cluster.prometheus_config}   (prometheus --config.file=…)",
        f"  Ray's logs: {cluster.temp_dir}/session_latest/logs",
        "  stop it: wsss cluster down" + ("" if cluster.state_dir == str(default_state_dir())
                                          else f" --state-dir {cluster.state_dir}"),
    ])


def status(state_dir: Path) -> str:
    import psutil

    cluster = LocalCluster.load(state_dir)
    if cluster is None:
        raise ClusterError(f"no cluster started from {state_dir}: `wsss cluster up --workers N` starts one")
    if not processes(cluster.id):
        raise ClusterError(f"the cluster started from {state_dir} is not running (its processes are gone); "
                           "`wsss cluster down` clears its state, `wsss cluster up` starts a new one")
    nodes = sorted(list_nodes(cluster.dashboard), key=lambda n: not n.is_head_node)
    lines = [f"[wsss cluster] {cluster.dashboard} · {sum(n.state == 'ALIVE' for n in nodes)} of {len(nodes)} nodes alive",
             f"  {'node':<14} {'role':<7} {'state':<6} resources"]
    total: dict[str, float] = {}
    for n in nodes:
        res = {k: v for k, v in (n.resources_total or {}).items() if not k.startswith("node:")}
        if n.state == "ALIVE":
            for k, v in res.items():
                total[k] = total.get(k, 0.0) + v
        lines.append(f"  {n.node_id[:12]:<14} {'head' if n.is_head_node else 'worker':<7} {n.state:<6} {_resources(res)}")
    # Every node offers Ray a share of the same machine's memory: their sum is not memory anyone has.
    shared = {k: v for k, v in total.items() if "memory" not in k}
    lines.append(f"  total (alive): {_resources(shared)}; memory: the nodes share this machine's "
                 f"{psutil.virtual_memory().total / 2**30:.1f} GiB")
    return "\n".join(lines)


def _resources(res: dict[str, float]) -> str:
    def fmt(k: str, v: float) -> str:
        return f"{k} {v / 2**30:.1f} GiB" if "memory" in k else f"{k} {v:g}"
    return ", ".join(fmt(k, v) for k, v in sorted(res.items()))


def down(state_dir: Path) -> tuple[LocalCluster, int]:
    cluster = LocalCluster.load(state_dir)
    if cluster is None:
        raise ClusterError(f"no cluster started from {state_dir}: nothing to stop")
    stopped = stop(cluster.id)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return cluster, stopped
