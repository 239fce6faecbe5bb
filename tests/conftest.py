"""Shared fixtures: real servers on loopback (moto S3, MLflow), generated datasets."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Keep every Ray this suite starts on 127.0.0.1 (read by ray at import time, inherited by children).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SYNTHSHAPES = SHARED / "benchmarks" / "synthshapes"
BIN = Path(sys.executable).parent
# Distinctive test credentials (moto accepts any), so a test can grep everything a job wrote for them.
TEST_KEY = "AKIAWSSSTESTKEY7Q3Z"
TEST_SECRET = "wsssTestSecret/9f2c4e1a8b7d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def s3_log(tmp_path_factory) -> Path:
    """The S3 server's access log: one line per request (``"GET /bucket/key HTTP/1.1" 200``)."""
    return tmp_path_factory.mktemp("moto") / "requests.log"


@pytest.fixture
def s3_requests(s3_log):
    """``s3_requests(method, path)``: the requests the S3 server has answered for ``path``
    (``/bucket/key``, exactly, query strings apart) with that method so far."""
    def count(method: str, path: str) -> int:
        text = re.sub(r"\x1b\[[0-9;]*m", "", s3_log.read_text(errors="replace"))  # werkzeug colours its log
        return sum(f'"{method} {path} ' in line or f'"{method} {path}?' in line for line in text.splitlines())
    return count


@pytest.fixture(scope="session")
def s3_server(s3_log):
    """A real S3 API (moto in server mode) on loopback; yields its endpoint URL.

    Credentials and endpoint go through the standard AWS environment variables, exactly as a user
    would configure a real S3-compatible store.
    """
    port = free_port()
    log = open(s3_log, "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_for_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": TEST_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields ``s3://<bucket>``."""
    import hashlib

    import s3fs

    # Bucket names stop at 63 characters, so a long test name is cut; the hash keeps the parameters of one
    # test (which share the cut prefix) in buckets of their own.
    node = request.node.name
    slug = node.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    name = f"t-{slug}-{hashlib.sha1(node.encode()).hexdigest()[:8]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def synthshapes() -> Path:
    if not (SYNTHSHAPES / "dev").is_dir():
        pytest.skip("../shared/benchmarks/synthshapes is not present")
    return SYNTHSHAPES


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session, on loopback only (as the embedded default runs).

    Started after the S3 server so that its workers inherit the S3 endpoint and credentials.
    """
    import ray

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on loopback."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_for_port(port, proc, timeout=90)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real Ray head started with `ray start` on loopback; yields its dashboard (job API) address."""
    port, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("rayhead")
    # RAY_ADDRESS for every process of the head: Ray's State API client inside a worker (Train's
    # placement-group cleaner) otherwise finds two Ray instances on this machine and gives up.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_ADDRESS": f"127.0.0.1:{port}"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
           "--disable-usage-stats", "--include-dashboard", "true", "--temp-dir", str(temp),
           # Fixed default agent ports would collide with the session's own local Ray.
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
           "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        kill_processes_mentioning(str(temp))  # `ray stop` would also stop the session's own Ray


def kill_processes_mentioning(text: str) -> None:
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def kill_processes_with_env(key: str, value: str) -> None:
    """Kill every process whose environment has ``key=value`` (Ray workers rename their cmdline)."""
    import psutil

    victims = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(key) == value:
                p.kill()
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    psutil.wait_procs(victims, timeout=30)


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, ray_local):
    """A 20-image demo VOC dataset and its `wsss label` output (tiny random CLIP, CAA): training input."""
    from wsss_platform.config import build_config
    from wsss_platform.datasets.demo import write_demo_dataset
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import run_label

    root = tmp_path_factory.mktemp("train")
    write_demo_dataset(str(root / "voc"), "voc", 20, seed=4)
    run_label(build_config(LabelConfig, {}, [f"dataset.uri={root / 'voc'}", f"output={root / 'labels'}", "model.name=tiny",
                                             "model.pretrained=none", "refine=[caa]", "tracking.enabled=false", "cache=none"]))
    return root


@pytest.fixture(scope="session")
def labelled_cams(labelled):
    """The demo VOC's train split labeled with no refiner, its CAMs kept (cache: cams): AffinityNet's input."""
    from wsss_platform.config import build_config
    from wsss_platform.label.config import LabelConfig
    from wsss_platform.label.job import run_label

    run_label(build_config(LabelConfig, {}, [f"dataset.uri={labelled / 'voc'}", f"output={labelled / 'cams'}",
                                             "model.name=tiny", "model.pretrained=none", "refine=[]",
                                             "tracking.enabled=false"]))
    return labelled / "cams"


@pytest.fixture(scope="session")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no system Chromium/chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = chromium
    b = webdriver.Chrome(options=opts, service=Service(driver))
    yield b
    b.quit()
