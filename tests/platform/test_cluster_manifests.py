"""cluster/: every KubeRay manifest against the KubeRay CRD schemas, plus what a schema cannot say
(entrypoints are real `wsss` commands with valid configs, the image's Ray is the pinned one, credentials
only from Secrets); the cluster-launcher YAML through Ray's own config validation."""

import functools
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO.parent / "shared" / "kuberay"
MANIFESTS = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))
IMAGE_ROOT = "/home/ray/wsss/"  # where cluster/Dockerfile puts the repo
RAY = version("ray")


def documents() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


@functools.cache  # each CRD is over a megabyte of YAML
def crd_schema(kind: str) -> dict:
    path = KUBERAY / f"ray.io_{kind.lower()}s.yaml"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    crd = yaml.safe_load(path.read_text())
    v1 = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strip_kubernetes_keys(v1["schema"]["openAPIV3Schema"])


def strip_kubernetes_keys(node):
    """The CRD's OpenAPI schema without the ``x-kubernetes-*`` extensions (an API server's, not JSON Schema's)."""
    if isinstance(node, dict):
        return {k: strip_kubernetes_keys(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [strip_kubernetes_keys(v) for v in node]
    return node


def validate(doc: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, crd_schema(doc["kind"]), cls=jsonschema.Draft7Validator)


def test_there_is_a_raycluster_and_a_rayjob_for_labeling_a_sweep_and_training():
    kinds = [(name, d["kind"]) for name, d in documents()]
    assert ("raycluster.yaml", "RayCluster") in kinds
    commands = [shlex.split(d["spec"]["entrypoint"])[1] for _, d in documents() if d["kind"] == "RayJob"]
    assert sorted(commands) == ["label", "sweep", "train"]


@pytest.mark.parametrize("name, doc", [d for d in documents() if d[1]["kind"] in ("RayCluster", "RayJob")],
                         ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_manifest_passes_the_kuberay_crd_schema(name, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    validate(doc)


def test_the_schema_check_catches_a_broken_manifest():
    import jsonschema

    doc = next(d for _, d in documents() if d["kind"] == "RayCluster")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match=r"minReplicas|zero"):
        validate(broken)
    del broken["spec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError, match="headGroupSpec"):
        validate(broken)


def containers(doc: dict) -> list[dict]:
    if doc["kind"] != "RayCluster":
        return []
    spec = doc["spec"]
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_images_and_ray_versions_are_the_pinned_ray():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(RAY)}$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311", dockerfile, re.M)
    images = [c["image"] for _, d in documents() for c in containers(d)]
    images.append(yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())["docker"]["image"])
    assert images and all(i.endswith(f"-ray{RAY}") for i in images), images
    for _, d in documents():
        if d["kind"] == "RayCluster":
            assert d["spec"]["rayVersion"] == RAY


SECRETISH = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def test_credentials_come_only_from_secret_key_refs():
    seen = 0
    for name, d in documents():
        for c in containers(d):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} is inline"
                    assert env["valueFrom"]["secretKeyRef"]["name"], f"{name}: {env['name']}"
                    seen += 1
        if d["kind"] == "ConfigMap":
            assert not [k for k in d["data"] if SECRETISH.search(k)], f"{name}: a credential in a ConfigMap"
            assert "MLFLOW_TRACKING_URI" in d["data"]
    assert seen >= 2  # the S3 key id and secret, at least on the head


def test_every_entrypoint_is_a_wsss_command_with_a_valid_config():
    from wsss_platform.cli import build_parser

    parser = build_parser()
    for name, d in documents():
        if d["kind"] != "RayJob":
            continue
        argv = shlex.split(d["spec"]["entrypoint"])
        assert argv[0] == "wsss", f"{name}: {argv[0]}"
        args = parser.parse_args(argv[1:])  # exits (fails the test) on an unknown flag
        assert args.config.startswith(IMAGE_ROOT), f"{name}: the config is not in the image"
        local = REPO / args.config.removeprefix(IMAGE_ROOT)
        assert local.is_file(), f"{name}: {local} does not exist"
        args.config = str(local)
        load_job_config(args, local)


def load_job_config(args, path: Path) -> None:
    """The job's config with its flags and overrides applied, validated as the job would."""
    from wsss_platform import cli
    from wsss_platform.config import load_config

    if args.command == "label":
        from wsss_platform.label.config import LabelConfig

        load_config(LabelConfig, str(path), cli.label_overrides(args))
    elif args.command == "sweep":
        from wsss_platform.sweep.config import load_sweep_config

        load_sweep_config(str(path), cli.sweep_overrides(args))
    else:
        from wsss_platform.train.recipes import recipe_class

        load_config(recipe_class(args.recipe).config, str(path), cli.train_overrides(args))


def test_the_launcher_yaml_passes_rays_own_cluster_config_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs before it touches a cloud
    assert config["provider"]["type"] == "aws"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] > gpu["min_workers"] >= 0
    assert not SECRETISH.search(yaml.safe_dump(config["provider"]) + yaml.safe_dump(config.get("auth", {})))
    config["available_node_types"]["head"]["bogus"] = 1
    with pytest.raises(Exception, match="bogus"):
        validate_config(prepare_config(config))
