"""cluster/: the launcher YAMLs against Ray's own schema, the KubeRay manifests' structure.

Each check also runs on a broken copy, which it must reject.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
SCHEMA_PATH = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
CUSTOM_RESOURCE = "transform"


class ConfigProblem(Exception):
    """A cluster config that Ray or KubeRay would reject, or that misses part of the layout."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConfigProblem(what)


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


# -- cluster launcher --------------------------------------------------------------------


def check_launcher(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Ray's schema, the cross-field rules `ray up` adds, and this project's layout."""
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as exc:
        raise ConfigProblem(f"schema: {exc.message}") from None
    types = config["available_node_types"]
    _require(config.get("head_node_type") in types, "head_node_type is not a node type")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    _require(
        sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"],
        "sum of min_workers exceeds max_workers",
    )
    for name, node in workers.items():
        _require(
            0 <= node.get("min_workers", 0) <= node["max_workers"] <= config["max_workers"],
            f"{name}: need 0 <= min_workers <= max_workers <= global max_workers",
        )
    _require(types[config["head_node_type"]]["resources"].get("CPU") == 0, "head must have CPU 0")
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [
        t
        for t in workers.values()
        if t["resources"].get(CUSTOM_RESOURCE, 0) >= 1 and not t["resources"].get("GPU")
    ]
    _require(bool(gpu), "no GPU worker type")
    _require(bool(cpu), f"no CPU worker type with the {CUSTOM_RESOURCE!r} resource")

    images = [config["docker"]["image"]] + [t["docker"]["worker_image"] for t in gpu]
    for image in images:
        _require(
            image.startswith(f"rayproject/ray:{ray.__version__}-py"),
            f"{image}: not a rayproject/ray image of Ray {ray.__version__} (installed here)",
        )
    _require(all(img.endswith("-gpu") for img in images[1:]), "GPU workers need a -gpu image")

    mounts = {remote: local for remote, local in config["file_mounts"].items()}
    checkout = [remote for remote, local in mounts.items() if local == "."]
    _require(len(checkout) == 1, "file_mounts must copy the checkout ('.') once")
    _require(
        f"pip install -e {checkout[0]}" in config["setup_commands"],
        "setup_commands must pip install -e the mounted checkout",
    )
    _require("~/.ray/auth_token" in mounts, "the auth token must be copied to the nodes")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        _require("RAY_AUTH_MODE=token ray start" in start, f"{key}: ray start without token auth")


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_is_valid(name: str, schema: dict[str, Any]) -> None:
    check_launcher(_load(name), schema)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_up_preparation(name: str) -> None:
    # What `ray up` does before it contacts the cloud: fill defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(_load(name))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"head", "gpu_worker", "cpu_worker"}


def _drop_provider(c: dict[str, Any]) -> None:
    del c["provider"]


def _unknown_key(c: dict[str, Any]) -> None:
    c["max_worker"] = 3


def _fractional_resource(c: dict[str, Any]) -> None:
    c["available_node_types"]["cpu_worker"]["resources"][CUSTOM_RESOURCE] = 0.5


def _head_not_a_type(c: dict[str, Any]) -> None:
    c["head_node_type"] = "ray.head.default"


def _min_above_max(c: dict[str, Any]) -> None:
    c["available_node_types"]["gpu_worker"]["min_workers"] = 5


def _no_gpu_type(c: dict[str, Any]) -> None:
    del c["available_node_types"]["gpu_worker"]


def _stale_image(c: dict[str, Any]) -> None:
    c["docker"]["image"] = "rayproject/ray:2.9.0-py311-cpu"


def _no_install(c: dict[str, Any]) -> None:
    c["setup_commands"] = []


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_drop_provider, "schema: 'provider' is a required property"),
        (_unknown_key, "schema: Additional properties"),
        (_fractional_resource, "schema: 0.5 is not of type 'integer'"),
        (_head_not_a_type, "head_node_type"),
        (_min_above_max, "gpu_worker: need"),
        (_no_gpu_type, "no GPU worker type"),
        (_stale_image, "rayproject/ray image of Ray"),
        (_no_install, "pip install -e"),
    ],
)
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_broken_launcher_config_is_rejected(
    name: str, breakage: Any, message: str, schema: dict[str, Any]
) -> None:
    config = _load(name)
    breakage(config)
    with pytest.raises(ConfigProblem, match=re.escape(message)):
        check_launcher(config, schema)


# -- KubeRay ------------------------------------------------------------------------------


def _container(template: dict[str, Any], where: str) -> dict[str, Any]:
    containers = template.get("spec", {}).get("containers") or []
    _require(len(containers) >= 1, f"{where}: template has no containers")
    container = containers[0]
    _require(bool(container.get("image")), f"{where}: container without image")
    for kind in ("requests", "limits"):
        amounts = container.get("resources", {}).get(kind, {})
        _require(
            {"cpu", "memory"} <= set(amounts), f"{where}: resources.{kind} needs cpu and memory"
        )
    return container


def _custom_resources(group: dict[str, Any]) -> dict[str, Any]:
    """rayStartParams.resources, which KubeRay wants as a quoted JSON string."""
    text = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(text)) if text else {}


def check_raycluster_spec(spec: dict[str, Any], where: str) -> str:
    """Head + GPU group + CPU "transform" group; returns the one image all pods use."""
    _require(spec.get("rayVersion") == ray.__version__, f"{where}: rayVersion != {ray.__version__}")
    _require(spec.get("authOptions", {}).get("mode") == "token", f"{where}: token auth is off")
    head = spec.get("headGroupSpec")
    _require(isinstance(head, dict), f"{where}: no headGroupSpec")
    _require(head.get("rayStartParams", {}).get("num-cpus") == "0", f"{where}: head runs tasks")
    images = {_container(head.get("template", {}), f"{where} head")["image"]}
    groups = spec.get("workerGroupSpecs") or []
    _require(len(groups) >= 2, f"{where}: need a GPU and a CPU workerGroupSpec")
    gpu = cpu = 0
    for group in groups:
        name = group.get("groupName")
        _require(bool(name), f"{where}: workerGroupSpec without groupName")
        low, count, high = (group.get(k, -1) for k in ("minReplicas", "replicas", "maxReplicas"))
        _require(
            0 <= low <= count <= high,
            f"{where} {name}: need minReplicas <= replicas <= maxReplicas",
        )
        container = _container(group.get("template", {}), f"{where} {name}")
        images.add(container["image"])
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        gpu += gpus >= 1
        cpu += gpus == 0 and _custom_resources(group).get(CUSTOM_RESOURCE, 0) >= 1
    _require(gpu >= 1, f"{where}: no group with an nvidia.com/gpu limit")
    _require(cpu >= 1, f"{where}: no CPU group declaring {CUSTOM_RESOURCE!r}")
    _require(len(images) == 1, f"{where}: pods use different images {sorted(images)}")
    return images.pop()


def check_raycluster(doc: dict[str, Any]) -> str:
    _require(doc.get("apiVersion") == "ray.io/v1", "RayCluster: apiVersion must be ray.io/v1")
    _require(doc.get("kind") == "RayCluster", "RayCluster: wrong kind")
    _require(bool(doc.get("metadata", {}).get("name")), "RayCluster: no metadata.name")
    return check_raycluster_spec(doc.get("spec", {}), "RayCluster")


def check_rayjob(doc: dict[str, Any]) -> str:
    _require(doc.get("apiVersion") == "ray.io/v1", "RayJob: apiVersion must be ray.io/v1")
    _require(doc.get("kind") == "RayJob", "RayJob: wrong kind")
    _require(bool(doc.get("metadata", {}).get("name")), "RayJob: no metadata.name")
    spec = doc.get("spec", {})
    entrypoint = spec.get("entrypoint", "")
    config = re.fullmatch(r"python jobs/pipeline\.py --config (\S+\.yaml)", entrypoint)
    _require(
        config is not None and (REPO / config.group(1)).is_file(),
        "RayJob: entrypoint must run jobs/pipeline.py with a config",
    )
    _require("rayClusterSpec" in spec, "RayJob: no rayClusterSpec")
    _require(spec.get("shutdownAfterJobFinishes") is True, "RayJob: cluster outlives the job")
    return check_raycluster_spec(spec["rayClusterSpec"], "RayJob")


def test_raycluster_manifest() -> None:
    check_raycluster(_load("kuberay/raycluster.yaml"))


def test_rayjob_manifest() -> None:
    check_rayjob(_load("kuberay/rayjob.yaml"))


def test_manifests_use_the_dockerfile_image() -> None:
    image = check_raycluster(_load("kuberay/raycluster.yaml"))
    assert check_rayjob(_load("kuberay/rayjob.yaml")) == image
    dockerfile = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith(f"rayproject/ray:{ray.__version__}-py")
    assert "pip install --no-cache-dir -e /home/ray/raycompat" in dockerfile
    # The RayJob's relative entrypoint resolves against the image's WORKDIR.
    assert re.search(r"^WORKDIR /home/ray/raycompat$", dockerfile, re.M)


def _rc(c: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside either manifest."""
    return c["spec"]["rayClusterSpec"] if c["kind"] == "RayJob" else c["spec"]


def _worker_container(c: dict[str, Any]) -> dict[str, Any]:
    """The first container of the first worker group."""
    return _rc(c)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


KUBERAY_BREAKAGES = [
    (lambda c: c.update(apiVersion="ray.io/v1alpha1"), "apiVersion must be ray.io/v1"),
    (lambda c: _rc(c).pop("headGroupSpec"), "no headGroupSpec"),
    (lambda c: _rc(c).update(rayVersion="2.9.0"), "rayVersion"),
    (lambda c: _rc(c)["workerGroupSpecs"].pop(0), "need a GPU and a CPU workerGroupSpec"),
    (
        lambda c: _worker_container(c).pop("resources"),
        "resources.requests needs cpu and memory",
    ),
    (
        lambda c: _rc(c)["headGroupSpec"]["template"]["spec"].update(containers=[]),
        "template has no containers",
    ),
    (lambda c: _rc(c)["workerGroupSpecs"][1]["rayStartParams"].clear(), "no CPU group declaring"),
    (lambda c: _rc(c)["workerGroupSpecs"][0].update(minReplicas=9), "minReplicas <= replicas"),
    (lambda c: _worker_container(c).update(image="rayproject/ray:2.60.0"), "different images"),
]


@pytest.mark.parametrize("breakage, message", KUBERAY_BREAKAGES)
@pytest.mark.parametrize(
    "name, check",
    [("kuberay/raycluster.yaml", check_raycluster), ("kuberay/rayjob.yaml", check_rayjob)],
)
def test_broken_kuberay_manifest_is_rejected(
    name: str, check: Any, breakage: Any, message: str
) -> None:
    doc = copy.deepcopy(_load(name))
    breakage(doc)
    with pytest.raises(ConfigProblem, match=re.escape(message)):
        check(doc)


def test_broken_rayjob_entrypoint_is_rejected() -> None:
    doc = _load("kuberay/rayjob.yaml")
    del doc["spec"]["entrypoint"]
    with pytest.raises(ConfigProblem, match="entrypoint"):
        check_rayjob(doc)
