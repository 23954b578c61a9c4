"""Checks of the cloud deployment files in cluster/ (issue 8).

* Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml) go through
  Ray's own preparation and validation (`prepare_config` + `validate_config`
  from ray.autoscaler._private.util, i.e. the schema
  ray/autoscaler/ray-schema.json shipped in the installed ray package), the
  same path `ray up` takes before it touches a cloud.
* KubeRay manifests (cluster/kuberay/raycluster.yaml, rayjob.yaml) are
  validated with jsonschema against the real CRDs in
  $TERNARYLM_SHARED/schemas/kuberay (default: <repo>/../shared). Kubernetes
  prunes unknown fields silently, so the validator closes every object schema
  that declares neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields`, so that a misspelt field is an error.
* The Dockerfile, the MLflow docker-compose files and the k8s MLflow server are
  parsed and checked for what the platform relies on.
* Nothing under cluster/ may contain a credential-looking literal.

Each check comes with a test showing that it fails on a broken input.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SHARED = Path(os.environ.get("TERNARYLM_SHARED", REPO.parent / "shared"))
CRD_DIR = SHARED / "schemas" / "kuberay"

LAUNCHER_CONFIGS = {"aws": CLUSTER / "aws.yaml", "gcp": CLUSTER / "gcp.yaml"}
STORAGE_SCHEME = {"aws": "s3", "gcp": "gs"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
K8S_MLFLOW = CLUSTER / "kuberay" / "mlflow.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
COMPOSE = CLUSTER / "mlflow" / "docker-compose.yaml"
COMPOSE_MINIO = CLUSTER / "mlflow" / "docker-compose.minio.yaml"
MLFLOW_DOCKERFILE = CLUSTER / "mlflow" / "Dockerfile"
MLFLOW_ENTRYPOINT = CLUSTER / "mlflow" / "entrypoint.sh"
MLFLOW_ENV_EXAMPLE = CLUSTER / "mlflow" / "mlflow.env.example"
README = CLUSTER / "README.md"

STUDY_ENTRYPOINT = "python studies/scaling.py --preset ladder"
MIN_WORKER_GROUP_START_TIMEOUT_S = 600
SECRET_WORDS = ("PASSWORD", "PASSWD", "SECRET", "TOKEN", "ACCESS_KEY", "API_KEY", "CREDENTIAL")


def load_yaml(path: Path):
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml_docs(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def rename_key(obj, path: tuple, new_key: str):
    """Copy of `obj` with the key at `path` renamed to `new_key` (a misspelling)."""
    obj = copy.deepcopy(obj)
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    parent[new_key] = parent.pop(path[-1])
    return obj


def set_value(obj, path: tuple, value):
    obj = copy.deepcopy(obj)
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return obj


def looks_secret(name: str) -> bool:
    upper = name.upper().replace("-", "_")
    return any(word in upper for word in SECRET_WORDS)


# --------------------------------------------------------------------------
# Ray cluster launcher configs
# --------------------------------------------------------------------------


def validate_launcher_config(config: dict) -> dict:
    """What `ray up` does first: merge provider defaults, then validate against
    ray/autoscaler/ray-schema.json (plus Ray's own cross-field checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def docker_env(run_options: list) -> dict:
    """Environment variables set by `-e K=V` / `--env K=V` / `--env=K=V` options."""
    env = {}
    for option in run_options:
        tokens = shlex.split(option)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in ("-e", "--env") and i + 1 < len(tokens):
                assignment, i = tokens[i + 1], i + 2
            elif token.startswith("--env="):
                assignment, i = token[len("--env=") :], i + 1
            else:
                i += 1
                continue
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def launcher_problems(config: dict, cloud: str) -> list:
    """Project requirements on a launcher config, beyond Ray's schema."""
    problems = []
    node_types = config.get("available_node_types", {})
    head_name = config.get("head_node_type")
    head = node_types.get(head_name, {})
    resources = head.get("resources", {})
    if resources.get("CPU") != 0:
        problems.append(f"head node type {head_name!r} must advertise CPU: 0, has {resources.get('CPU')!r}")
    if resources.get("trial_driver", 0) < 1000:
        problems.append("head node type must advertise the custom resource trial_driver: 1000")
    if head.get("resources", {}).get("GPU"):
        problems.append("head node type must be CPU-only")

    gpu_types = {
        name: nt
        for name, nt in node_types.items()
        if name != head_name and nt.get("resources", {}).get("GPU", 0) >= 1
    }
    if not gpu_types:
        problems.append("no GPU worker node type (resources.GPU >= 1)")
    for name, nt in gpu_types.items():
        if nt.get("min_workers", 0) != 0:
            problems.append(f"GPU node type {name!r} must scale from zero (min_workers: 0)")
        if nt.get("max_workers", config.get("max_workers", 0)) < 1:
            problems.append(f"GPU node type {name!r} cannot scale up (max_workers < 1)")
        if "docker" in nt:
            problems.append(f"GPU node type {name!r} overrides the docker settings of the cluster")

    docker = config.get("docker") or {}
    if not docker.get("image") or not docker.get("container_name"):
        problems.append("docker.image and docker.container_name must be set (project image)")
    for key in ("head_image", "worker_image", "head_run_options", "worker_run_options"):
        if key in docker:
            problems.append(f"docker.{key} would make nodes differ; use docker.image / docker.run_options")

    env = docker_env(docker.get("run_options", []))
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append("every node needs RAY_AUTH_MODE=token (docker run_options)")
    try:
        timeout = float(env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "0"))
    except ValueError:
        timeout = 0
    if timeout < MIN_WORKER_GROUP_START_TIMEOUT_S:
        problems.append(
            f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S must be >= {MIN_WORKER_GROUP_START_TIMEOUT_S} on every node"
        )
    storage = env.get("TERNARYLM_STORAGE_PATH", "")
    if not storage.startswith(f"{STORAGE_SCHEME[cloud]}://"):
        problems.append(f"TERNARYLM_STORAGE_PATH must be a {STORAGE_SCHEME[cloud]}:// URI, is {storage!r}")
    if not env.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        problems.append("MLFLOW_TRACKING_URI must be passed to every node as an http(s) URI")
    for name, value in env.items():
        if looks_secret(name) and value:
            problems.append(f"docker run option sets {name} literally; secrets belong in mounted files")

    mounts = config.get("file_mounts", {})
    if "~/.ray/auth_token" not in mounts:
        problems.append("the Ray auth token (~/.ray/auth_token) must be mounted on every node")
    if "~/.mlflow/credentials" not in mounts:
        problems.append("the MLflow credentials (~/.mlflow/credentials) must be mounted on every node")

    head_start = " ".join(config.get("head_start_ray_commands", []))
    if "--dashboard-host=0.0.0.0" in head_start:
        problems.append("the dashboard must not listen on all interfaces; use `ray dashboard` (SSH tunnel)")
    return problems


@pytest.fixture(params=sorted(LAUNCHER_CONFIGS))
def cloud(request):
    return request.param


def test_launcher_config_passes_rays_validation(cloud):
    import ray.autoscaler

    # The file as written (before Ray merges provider defaults) already fits
    # the launcher schema shipped with the installed ray package ...
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(load_yaml(LAUNCHER_CONFIGS[cloud]), json.loads(schema_path.read_text()))
    # ... and passes Ray's full preparation + validation, as in `ray up`.
    prepared = validate_launcher_config(load_yaml(LAUNCHER_CONFIGS[cloud]))
    assert prepared["provider"]["type"] == cloud
    # Ray filled the per-type limits; the head never counts as a worker.
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


LAUNCHER_TYPOS = [
    (("max_workers",), "max_worker"),
    (("docker", "pull_before_run"), "pull_befor_run"),
    (("available_node_types", "gpu_worker", "min_workers"), "min_worker"),
    (("available_node_types", "gpu_worker", "max_workers"), "max_worker"),
    (("idle_timeout_minutes",), "idle_timeout_minute"),
    (("head_start_ray_commands",), "head_start_ray_command"),
]


@pytest.mark.parametrize("path,typo", LAUNCHER_TYPOS, ids=["/".join(p) for p, _ in LAUNCHER_TYPOS])
def test_misspelt_launcher_config_is_rejected(cloud, path, typo):
    broken = rename_key(load_yaml(LAUNCHER_CONFIGS[cloud]), path, typo)
    with pytest.raises(jsonschema.ValidationError) as excinfo:
        validate_launcher_config(broken)
    assert f"'{typo}' was unexpected" in excinfo.value.message


def test_launcher_config_rejects_wrong_types(cloud):
    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    broken = set_value(config, ("available_node_types", "head", "resources", "trial_driver"), "lots")
    with pytest.raises(jsonschema.ValidationError, match="lots"):
        validate_launcher_config(broken)


def test_launcher_config_meets_project_requirements(cloud):
    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    assert launcher_problems(config, cloud) == []
    env = docker_env(config["docker"]["run_options"])
    assert env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] == "900"


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: set_value(c, ("available_node_types", "head", "resources", "CPU"), 8), "CPU: 0"),
        (lambda c: set_value(c, ("available_node_types", "head", "resources"), {"CPU": 0}), "trial_driver"),
        (lambda c: set_value(c, ("available_node_types", "gpu_worker", "min_workers"), 2), "scale from zero"),
        (lambda c: set_value(c, ("available_node_types", "gpu_worker", "resources"), {"CPU": 8}), "no GPU worker"),
        (
            lambda c: set_value(
                c, ("docker", "run_options"), [o for o in c["docker"]["run_options"] if "RAY_AUTH_MODE" not in o]
            ),
            "RAY_AUTH_MODE",
        ),
        (
            lambda c: set_value(
                c,
                ("docker", "run_options"),
                [o.replace("=900", "=60") for o in c["docker"]["run_options"]],
            ),
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
        ),
        (
            lambda c: set_value(
                c,
                ("docker", "run_options"),
                [o for o in c["docker"]["run_options"] if "MLFLOW_TRACKING_URI" not in o],
            ),
            "MLFLOW_TRACKING_URI",
        ),
        (
            lambda c: set_value(
                c, ("docker", "run_options"), c["docker"]["run_options"] + ["-e MLFLOW_TRACKING_PASSWORD=hunter2hunter2"]
            ),
            "MLFLOW_TRACKING_PASSWORD",
        ),
        (lambda c: set_value(c, ("file_mounts",), {}), "auth_token"),
        (
            lambda c: set_value(
                c,
                ("head_start_ray_commands",),
                [x.replace("127.0.0.1", "0.0.0.0") for x in c["head_start_ray_commands"]],
            ),
            "dashboard",
        ),
    ],
)
def test_launcher_requirement_checks_catch_regressions(cloud, mutate, expected):
    broken = mutate(load_yaml(LAUNCHER_CONFIGS[cloud]))
    problems = launcher_problems(broken, cloud)
    assert any(expected in p for p in problems), problems


def test_launcher_storage_matches_cloud():
    gcp = load_yaml(LAUNCHER_CONFIGS["gcp"])
    options = [o.replace("gs://", "s3://") for o in gcp["docker"]["run_options"]]
    problems = launcher_problems(set_value(gcp, ("docker", "run_options"), options), "gcp")
    assert problems == ["TERNARYLM_STORAGE_PATH must be a gs:// URI, is 's3://YOUR-BUCKET/ternarylm'"]


def test_docker_env_parser():
    assert docker_env(["-e A=1", "--env B=2 --env=C=3", "--ulimit nofile=1:1", "-e 'D=x y'"]) == {
        "A": "1",
        "B": "2",
        "C": "3",
        "D": "x y",
    }


# --------------------------------------------------------------------------
# KubeRay manifests against the real CRD schemas
# --------------------------------------------------------------------------

DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# ObjectMeta of a top-level object: the CRD only says `type: object` and the API
# server validates it itself; these are the fields a manifest in this repo may set.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_SUBDOMAIN},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def strict_schema(schema: dict) -> dict:
    """Kubernetes structural schema -> JSON schema that rejects unknown fields.

    * objects without `additionalProperties` or `x-kubernetes-preserve-unknown-fields`
      become closed (`additionalProperties: false`), recursively;
    * `x-kubernetes-int-or-string` accepts an integer or a string (and nothing else);
    * `nullable: true` also accepts null.
    """
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        return s
    if "properties" in s:
        s["properties"] = {name: strict_schema(sub) for name, sub in s["properties"].items()}
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict_schema(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict_schema(s["items"])
    for keyword in ("anyOf", "allOf", "oneOf"):
        if keyword in s:
            s[keyword] = [strict_schema(sub) for sub in s[keyword]]
    if "not" in s:
        s["not"] = strict_schema(s["not"])
    is_object = s.get("type") == "object" or "properties" in s
    if is_object and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s["additionalProperties"] = False
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


_CEL_IN_LIST = re.compile(r"^self in \[(.*)\]$")


def _check_cel_rules(validator, rules, instance, schema):
    """x-kubernetes-validations (CEL). Transition rules (oldSelf) only apply to
    updates; `self in [...]` is evaluated; anything else cannot be checked
    offline, so a manifest that sets such a field is reported instead of being
    waved through."""
    for rule in rules:
        expression = rule["rule"].strip()
        if "oldSelf" in expression:
            continue
        match = _CEL_IN_LIST.match(expression)
        if match:
            allowed = [item.strip().strip("'\"") for item in match.group(1).split(",")]
            if instance not in allowed:
                yield jsonschema.ValidationError(rule.get("message", f"must be one of {allowed}"))
            continue
        yield jsonschema.ValidationError(
            f"field uses CEL rule {expression!r} ({rule.get('message', '')}) that this test cannot "
            "evaluate; extend _check_cel_rules before using it"
        )


def _check_list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for keys {keys} = {key} in a list of type map")
            seen.add(key)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    validators={
        "x-kubernetes-validations": _check_cel_rules,
        "x-kubernetes-list-type": _check_list_type,
    },
)

K8S_FORMATS = jsonschema.FormatChecker()


@K8S_FORMATS.checks("int32")
def _is_int32(value):
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@K8S_FORMATS.checks("int64")
def _is_int64(value):
    return not isinstance(value, int) or -(2**63) <= value < 2**63


class CRDValidator:
    """Validate a manifest against one CustomResourceDefinition."""

    def __init__(self, crd_path: Path):
        crd = load_yaml(crd_path)
        self.group = crd["spec"]["group"]
        self.kind = crd["spec"]["names"]["kind"]
        self.schemas = {}
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["properties"]["apiVersion"] = {"const": f"{self.group}/{version['name']}"}
            schema["properties"]["kind"] = {"const": self.kind}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
            self.schemas[f"{self.group}/{version['name']}"] = schema

    def errors(self, manifest: dict) -> list:
        api_version = manifest.get("apiVersion")
        if api_version not in self.schemas:
            return [f"apiVersion {api_version!r} is not served by the {self.kind} CRD ({sorted(self.schemas)})"]
        validator = K8sValidator(self.schemas[api_version], format_checker=K8S_FORMATS)
        found = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
        return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in found]


@pytest.fixture(scope="module")
def crds():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found in {CRD_DIR} (set TERNARYLM_SHARED)")
    return {
        "RayCluster": CRDValidator(CRD_DIR / "ray.io_rayclusters.yaml"),
        "RayJob": CRDValidator(CRD_DIR / "ray.io_rayjobs.yaml"),
    }


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifest_matches_crd(crds, path):
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path.name} must hold exactly one manifest"
    manifest = docs[0]
    assert manifest["kind"] in crds
    assert crds[manifest["kind"]].errors(manifest) == []


KUBERAY_TYPOS = [
    (RAYCLUSTER, ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    (RAYCLUSTER, ("spec", "enableInTreeAutoscaling"), "enableInTreeAutoScaling"),
    (RAYCLUSTER, ("spec", "workerGroupSpecs", 0, "maxReplicas"), "maxReplica"),
    (RAYCLUSTER, ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"), "resource"),
    (RAYCLUSTER, ("spec", "authOptions", "mode"), "mdoe"),
    (RAYCLUSTER, ("metadata", "namespace"), "namepsace"),
    (RAYJOB, ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    (RAYJOB, ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
    (RAYJOB, ("spec", "entrypoint"), "entryPoint"),
    (
        RAYJOB,
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "tolerations", 0, "effect"),
        "efect",
    ),
]


@pytest.mark.parametrize("path,key_path,typo", KUBERAY_TYPOS, ids=[t for _, _, t in KUBERAY_TYPOS])
def test_misspelt_kuberay_manifest_is_rejected(crds, path, key_path, typo):
    manifest = load_yaml(path)
    errors = crds[manifest["kind"]].errors(rename_key(manifest, key_path, typo))
    assert errors, f"misspelling {typo!r} went unnoticed"
    assert any(f"'{typo}'" in e for e in errors), errors


KUBERAY_BAD_VALUES = [
    (("spec", "workerGroupSpecs", 0, "minReplicas"), "0"),  # string for an int32
    (("spec", "workerGroupSpecs", 0, "maxReplicas"), 2**40),  # int32 overflow
    (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "cpu"), "eight"),
    (("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits", "cpu"), 8.5),
    (("spec", "authOptions", "mode"), "tokens"),
    (("spec", "managedBy"), "someone-else"),  # CEL `self in [...]`
    (("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # rayStartParams are strings
    (("apiVersion",), "ray.io/v2"),
    (("kind",), "RayJob"),
]


@pytest.mark.parametrize("key_path,value", KUBERAY_BAD_VALUES, ids=[str(v) for _, v in KUBERAY_BAD_VALUES])
def test_kuberay_validator_rejects_bad_values(crds, key_path, value):
    manifest = load_yaml(RAYCLUSTER)
    assert crds["RayCluster"].errors(set_value(manifest, key_path, value))


def test_kuberay_validator_accepts_int_or_string_quantities(crds):
    manifest = load_yaml(RAYCLUSTER)
    limits = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits")
    for value in (8, "8", "7500m"):
        assert crds["RayCluster"].errors(set_value(manifest, limits + ("cpu",), value)) == []


def test_kuberay_validator_reports_uncheckable_cel_rules(crds):
    manifest = load_yaml(RAYJOB)
    strategy = {"onSuccess": {"policy": "DeleteCluster"}, "onFailure": {"policy": "DeleteNone"}}
    errors = crds["RayJob"].errors(set_value(manifest, ("spec", "deletionStrategy"), strategy))
    assert any("CEL rule" in e for e in errors), errors


def test_strict_schema_semantics():
    schema = strict_schema(
        {
            "type": "object",
            "properties": {
                "quantity": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "nested": {"type": "object", "properties": {"a": {"type": "string"}}},
                "maybe": {"type": "string", "nullable": True},
            },
        }
    )
    validator = K8sValidator(schema)
    assert validator.is_valid({"quantity": 3, "free": {"anything": [1]}, "labels": {"x": "y"}, "maybe": None})
    assert validator.is_valid({"quantity": "3Gi", "nested": {"a": "b"}})
    assert not validator.is_valid({"quantity": 3.5})
    assert not validator.is_valid({"unknown": 1})
    assert not validator.is_valid({"nested": {"b": "c"}})
    assert not validator.is_valid({"labels": {"x": 1}})


def test_list_map_keys_must_be_unique():
    validator = K8sValidator(
        {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        }
    )
    assert validator.is_valid([{"name": "a"}, {"name": "b"}])
    assert not validator.is_valid([{"name": "a"}, {"name": "a"}])


def ray_containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def parse_ray_start_resources(value: str) -> dict:
    """rayStartParams.resources is the escaped JSON string KubeRay passes to bash."""
    return json.loads(value.strip().strip('"').replace('\\"', '"'))


def kuberay_problems(cluster_spec: dict) -> list:
    problems = []
    if (cluster_spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    if cluster_spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    head_params = cluster_spec["headGroupSpec"].get("rayStartParams", {})
    if head_params.get("num-cpus") != "0":
        problems.append("the head must start with num-cpus 0")
    try:
        head_resources = parse_ray_start_resources(head_params.get("resources", ""))
    except ValueError:
        head_resources = {}
    if head_resources.get("trial_driver", 0) < 1000:
        problems.append("the head must advertise trial_driver: 1000 (rayStartParams.resources)")

    gpu_groups = [
        g
        for g in cluster_spec.get("workerGroupSpecs", [])
        if int(g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        >= 1
    ]
    if not gpu_groups:
        problems.append("no GPU worker group (nvidia.com/gpu limit)")
    for group in gpu_groups:
        if group.get("minReplicas") != 0 or group.get("maxReplicas", 0) < 1:
            problems.append(f"GPU group {group['groupName']!r} must autoscale from 0")

    for role, container in ray_containers(cluster_spec):
        env = {e["name"]: e for e in container.get("env", [])}
        timeout = env.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", {}).get("value", "0")
        if float(timeout) < MIN_WORKER_GROUP_START_TIMEOUT_S:
            problems.append(f"{role}: RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S must be >= {MIN_WORKER_GROUP_START_TIMEOUT_S}")
        if not env.get("TERNARYLM_STORAGE_PATH", {}).get("value", "").startswith(("s3://", "gs://")):
            problems.append(f"{role}: TERNARYLM_STORAGE_PATH must point to S3 / GCS")
        if not env.get("MLFLOW_TRACKING_URI", {}).get("value", "").startswith("http"):
            problems.append(f"{role}: MLFLOW_TRACKING_URI missing")
        if "secretKeyRef" not in env.get("MLFLOW_TRACKING_PASSWORD", {}).get("valueFrom", {}):
            problems.append(f"{role}: MLFLOW_TRACKING_PASSWORD must come from a Secret (secretKeyRef)")
        for name, entry in env.items():
            if looks_secret(name) and "value" in entry:
                problems.append(f"{role}: {name} is set literally; use valueFrom.secretKeyRef")
        if container.get("workingDir") != "/opt/ternarylm":
            problems.append(f"{role}: workingDir must be the project checkout in the image")
    return problems


def test_raycluster_meets_project_requirements():
    assert kuberay_problems(load_yaml(RAYCLUSTER)["spec"]) == []


@pytest.mark.parametrize(
    "key_path,value,expected",
    [
        (("authOptions",), {"mode": "disabled"}, "authOptions"),
        (("enableInTreeAutoscaling",), False, "enableInTreeAutoscaling"),
        (("headGroupSpec", "rayStartParams", "num-cpus"), "4", "num-cpus"),
        (("headGroupSpec", "rayStartParams", "resources"), '"{\\"trial_driver\\": 1}"', "trial_driver"),
        (("workerGroupSpecs", 0, "minReplicas"), 1, "autoscale"),
        (
            ("workerGroupSpecs", 0, "template", "spec", "containers", 0, "env", 0),
            {"name": "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "value": "60"},
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
        ),
        (
            ("headGroupSpec", "template", "spec", "containers", 0, "env", 4),
            {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2hunter2"},
            "MLFLOW_TRACKING_PASSWORD",
        ),
    ],
)
def test_kuberay_requirement_checks_catch_regressions(key_path, value, expected):
    spec = load_yaml(RAYCLUSTER)["spec"]
    if len(key_path) > 1 and key_path[-2] == "env":  # find the env entry by name, not position
        env = spec
        for key in key_path[:-1]:
            env = env[key]
        names = [e["name"] for e in env]
        key_path = (*key_path[:-1], names.index(value["name"]))
    spec = set_value(spec, key_path, value)
    problems = kuberay_problems(spec)
    assert any(expected in p for p in problems), problems


def test_rayjob_runs_the_ladder_study_on_the_same_cluster_spec():
    job = load_yaml(RAYJOB)
    assert job["spec"]["entrypoint"] == STUDY_ENTRYPOINT
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == load_yaml(RAYCLUSTER)["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    )


def dockerfile_arg_defaults(text: str) -> dict:
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^\s*ARG\s+([A-Z_]+)=(\S+)", text, re.M)}


def test_ray_version_is_the_same_everywhere():
    ray_version = dockerfile_arg_defaults(DOCKERFILE.read_text())["RAY_VERSION"]
    assert load_yaml(RAYCLUSTER)["spec"]["rayVersion"] == ray_version
    assert load_yaml(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"] == ray_version


def test_images_are_tagged_with_the_project_version():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = [load_yaml(p)["docker"]["image"] for p in LAUNCHER_CONFIGS.values()]
    images += [c["image"] for _, c in ray_containers(load_yaml(RAYCLUSTER)["spec"])]
    for image in images:
        assert image.rsplit("/", 1)[-1] == f"ternarylm:{version}", image


# --------------------------------------------------------------------------
# MLflow server on Kubernetes
# --------------------------------------------------------------------------


def allowed_host(allowed: list, host: str) -> bool:
    """MLflow's Host-header rule (mlflow.server.security_utils.is_allowed_host_header)."""
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def flag_value(args: list, flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def k8s_mlflow_problems(docs: list, tracking_uri: str) -> list:
    problems = []
    kinds = [d.get("kind") for d in docs]
    if "Secret" in kinds:
        problems.append("Secrets must be created out of band and referenced by name, not committed")
    deployments = [d for d in docs if d.get("kind") == "Deployment" and d["metadata"]["name"] == "mlflow"]
    if not deployments:
        return problems + ["no mlflow Deployment"]
    container = deployments[0]["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container.get("command", []) + container.get("args", [])]
    if flag_value(args, "--app-name") != "basic-auth":
        problems.append("mlflow server must run with --app-name basic-auth")
    allowed = (flag_value(args, "--allowed-hosts") or "").split(",")
    host = urlsplit(tracking_uri).netloc
    for needed in (host, "localhost:5000"):
        if not allowed_host(allowed, needed):
            problems.append(f"--allowed-hosts does not admit Host header {needed!r}")
    env = {e["name"]: e for e in container.get("env", [])}
    if "secretKeyRef" not in env.get("MLFLOW_AUTH_ADMIN_PASSWORD", {}).get("valueFrom", {}):
        problems.append("MLFLOW_AUTH_ADMIN_PASSWORD must come from a Secret")
    for doc in docs:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env", []):
                if looks_secret(e["name"]) and "value" in e:
                    problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {e['name']} is set literally")
    services = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Service"}
    for name, svc in services.items():
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name} must stay ClusterIP (use kubectl port-forward)")
    if host.split(".")[0].split(":")[0] not in services:
        problems.append(f"MLFLOW_TRACKING_URI host {host!r} has no Service in mlflow.yaml")
    return problems


def raycluster_tracking_uri() -> str:
    head = load_yaml(RAYCLUSTER)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    return next(e["value"] for e in head["env"] if e["name"] == "MLFLOW_TRACKING_URI")


def test_k8s_mlflow_server():
    assert k8s_mlflow_problems(load_yaml_docs(K8S_MLFLOW), raycluster_tracking_uri()) == []


def test_k8s_mlflow_checks_catch_regressions():
    docs = load_yaml_docs(K8S_MLFLOW)
    uri = raycluster_tracking_uri()

    def mlflow_container(d):
        dep = next(x for x in d if x.get("kind") == "Deployment" and x["metadata"]["name"] == "mlflow")
        return dep["spec"]["template"]["spec"]["containers"][0]

    no_auth = copy.deepcopy(docs)
    c = mlflow_container(no_auth)
    i = c["args"].index("--app-name")
    del c["args"][i : i + 2]
    assert any("basic-auth" in p for p in k8s_mlflow_problems(no_auth, uri))

    narrow = copy.deepcopy(docs)
    c = mlflow_container(narrow)
    c["args"][c["args"].index("--allowed-hosts") + 1] = "localhost:*"
    assert any("allowed-hosts" in p for p in k8s_mlflow_problems(narrow, uri))

    literal = copy.deepcopy(docs)
    c = mlflow_container(literal)
    c["env"] = [e for e in c["env"] if e["name"] != "MLFLOW_AUTH_ADMIN_PASSWORD"] + [
        {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2hunter2"}
    ]
    assert any("MLFLOW_AUTH_ADMIN_PASSWORD" in p for p in k8s_mlflow_problems(literal, uri))

    with_secret = docs + [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {}}]
    assert any("Secret" in p for p in k8s_mlflow_problems(with_secret, uri))


def test_allowed_host_rule_matches_mlflow():
    try:
        from mlflow.server.security_utils import is_allowed_host_header
    except ImportError:  # pragma: no cover - mlflow is a project dependency
        pytest.skip("mlflow not installed")
    allowed = ["mlflow", "mlflow:*", "localhost:*", "10.*"]
    for host in ("mlflow", "mlflow:5000", "localhost:5000", "10.0.0.7:5000", "evil.example:5000", "mlflowx:5000"):
        assert allowed_host(allowed, host) == is_allowed_host_header(allowed, host), host


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list:
    """(INSTRUCTION, arguments) pairs; joins continuation lines, drops comments."""
    instructions, buffer = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        buffer = ""
    return instructions


def dockerfile_problems(text: str) -> list:
    problems = []
    instructions = parse_dockerfile(text)
    args = dockerfile_arg_defaults(text)

    def expand(value: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)

    froms = [expand(a) for k, a in instructions if k == "FROM"]
    if not froms or not froms[0].startswith("nvidia/cuda:"):
        problems.append(f"base image must be a CUDA image (nvidia/cuda), is {froms[:1]}")
    elif "devel" not in froms[0]:
        problems.append("base image must be a CUDA -devel image (nvcc for DeepSpeed ops)")
    runs = [(i, a) for i, (k, a) in enumerate(instructions) if k == "RUN"]
    pip_installs = [(i, a) for i, a in runs if "pip install" in a]

    def installs(pattern: str) -> list:
        """RUN instructions with a `pip install` command (up to && ; |) matching pattern."""
        return [i for i, a in pip_installs if re.search(r"pip install[^&;|]*?" + pattern, a)]

    if not installs(r"[\s\"']deepspeed(==|[\"'\s]|$)"):
        problems.append("DeepSpeed must be baked into the image (pip install deepspeed)")
    if not installs(r"[\s\"']torch(==|[\"'\s]|$)"):
        problems.append("PyTorch must be installed in the image")
    if not installs(r"[\s\"']ray\[[^\]]*train[^\]]*\]"):
        problems.append("Ray with the train extra must be installed in the image")
    project = installs(r"\s\.(\s|$)")
    if not project:
        problems.append("the project must be installed with `pip install .`")
    copies = [(i, a) for i, (k, a) in enumerate(instructions) if k in ("COPY", "ADD")]
    copied = {src for _, a in copies for src in a.split()[:-1] if not src.startswith("--")}
    for needed in ("pyproject.toml", "platform", "studies"):
        if needed not in copied:
            problems.append(f"{needed} must be copied into the image")
    if "." in copied:
        problems.append("do not COPY the whole build context (it may hold env files / credentials)")
    platform_copies = [i for i, a in copies if "platform" in a.split()]
    if project and platform_copies and max(project) < max(platform_copies):
        problems.append("`pip install .` runs before the package sources are copied")
    for keyword, value in instructions:
        if keyword in ("ENV", "ARG") and any(looks_secret(tok.split("=")[0]) for tok in value.split()):
            problems.append(f"{keyword} {value!r} looks like a secret baked into the image")
    return problems


def test_dockerfile_bakes_in_cuda_torch_deepspeed_and_the_project():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ('"deepspeed==${DEEPSPEED_VERSION}"', "tqdm", "DeepSpeed"),
        ("RUN pip install . \\", "RUN true \\", "pip install ."),
        ("COPY platform ./platform", "COPY . ./", "whole build context"),
        ("-cudnn-devel-", "-cudnn-runtime-", "devel"),
        ("FROM nvidia/cuda:", "FROM python:3.12-slim #", "CUDA image"),
        ("ARG TORCH_VERSION=2.9.1", "ARG TORCH_VERSION=2.9.1\nENV HF_TOKEN=abc", "secret"),
    ],
)
def test_dockerfile_checks_catch_regressions(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text, f"test fixture out of date: {old!r} not in Dockerfile"
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


def test_parse_dockerfile_joins_continuations_and_skips_comments():
    text = "# syntax=docker/dockerfile:1\nFROM a:b\nRUN x \\\n    # note\n    && y\n\nCOPY a b ./\n"
    assert parse_dockerfile(text) == [("FROM", "a:b"), ("RUN", "x && y"), ("COPY", "a b ./")]


# --------------------------------------------------------------------------
# MLflow server on VMs (docker compose)
# --------------------------------------------------------------------------

_REQUIRED_REF = re.compile(r"^\$\{\w+:\?[^}]*\}$")


def compose_problems(compose: dict) -> list:
    problems = []
    services = compose.get("services", {})
    for needed in ("postgres", "mlflow"):
        if needed not in services:
            problems.append(f"service {needed!r} missing")
    mlflow = services.get("mlflow", {})
    command = mlflow.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    if command[:2] != ["mlflow", "server"]:
        problems.append("mlflow service must run `mlflow server`")
    if flag_value(command, "--app-name") != "basic-auth":
        problems.append("mlflow server must run with --app-name basic-auth")
    if not flag_value(command, "--allowed-hosts"):
        problems.append("mlflow server needs --allowed-hosts for the Host headers of the Ray nodes")
    env = mlflow.get("environment", {})
    if not _REQUIRED_REF.match(str(env.get("MLFLOW_AUTH_ADMIN_PASSWORD", ""))):
        problems.append("MLFLOW_AUTH_ADMIN_PASSWORD must be a required ${VAR:?...} from the env file")
    if not str(env.get("MLFLOW_BACKEND_STORE_URI", "")).startswith("postgresql://"):
        problems.append("the tracking store must be PostgreSQL")
    if "mlflow_auth" not in str(env.get("MLFLOW_AUTH_DATABASE_URI", "")):
        problems.append("the basic-auth user store must live in PostgreSQL (MLFLOW_AUTH_DATABASE_URI)")
    if not env.get("MLFLOW_ARTIFACTS_DESTINATION") or "--serve-artifacts" not in command:
        problems.append("artifacts must be proxied to an object store (--serve-artifacts + destination)")
    for name, service in services.items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            if looks_secret(key) and not _REQUIRED_REF.match(str(value)):
                problems.append(f"{name}: {key} must be a required ${{VAR:?...}} reference, is {value!r}")
        if name != "mlflow" and service.get("ports"):
            problems.append(f"{name}: only MLflow may publish a port")
    for port in mlflow.get("ports", []):
        bind = str(port).rsplit(":", 2)[0] if str(port).count(":") >= 2 else "0.0.0.0"
        default = re.match(r"^\$\{\w+:-([^}]*)\}$", bind)
        if (default.group(1) if default else bind) in ("0.0.0.0", "", "*"):
            problems.append(f"mlflow port {port!r} listens on all interfaces by default")
    return problems


def test_compose_runs_mlflow_with_basic_auth_postgres_and_object_store():
    assert compose_problems(load_yaml(COMPOSE)) == []


def test_compose_minio_override_keeps_minio_private():
    override = load_yaml(COMPOSE_MINIO)
    assert "minio" in override["services"]
    for name, service in override["services"].items():
        assert not service.get("ports"), f"{name} publishes a port"
        for key, value in (service.get("environment") or {}).items():
            if looks_secret(key) or key.endswith(("_USER", "_KEY_ID")):
                assert _REQUIRED_REF.match(str(value)), (name, key, value)
    assert override["services"]["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda c: c["services"]["mlflow"].update(command=["mlflow", "server", "--host", "0.0.0.0"]), "basic-auth"),
        (
            lambda c: c["services"]["mlflow"]["environment"].update(MLFLOW_AUTH_ADMIN_PASSWORD="hunter2hunter2"),
            "MLFLOW_AUTH_ADMIN_PASSWORD",
        ),
        (
            lambda c: c["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-mlflow}"),
            "POSTGRES_PASSWORD",
        ),
        (lambda c: c["services"]["postgres"].update(ports=["5432:5432"]), "publish"),
        (lambda c: c["services"]["mlflow"].update(ports=["5000:5000"]), "all interfaces"),
        (lambda c: c["services"].pop("postgres"), "postgres"),
    ],
)
def test_compose_checks_catch_regressions(mutate, expected):
    compose = load_yaml(COMPOSE)
    mutate(compose)
    problems = compose_problems(compose)
    assert any(expected in p for p in problems), problems


def test_env_example_holds_names_only():
    for line in MLFLOW_ENV_EXAMPLE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"not NAME=value: {line!r}"
        if looks_secret(name) or name.endswith("_USER") and name.startswith("MINIO"):
            assert value == "", f"{name} must be left empty in the example"
    names = {line.partition("=")[0] for line in MLFLOW_ENV_EXAMPLE.read_text().splitlines() if "=" in line and not line.startswith("#")}
    compose_text = "\n".join(
        line for path in (COMPOSE, COMPOSE_MINIO) for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    referenced = set(re.findall(r"\$\{(\w+)", compose_text))
    assert referenced <= names, f"variables used by compose but missing from the example: {referenced - names}"


def test_mlflow_image_has_auth_and_postgres_support():
    text = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"mlflow\[auth\]", text), "basic-auth needs mlflow[auth] (Flask-WTF)"
    assert "psycopg2" in text, "PostgreSQL stores need psycopg2"
    assert "entrypoint.sh" in text and "ENTRYPOINT" in text


def run_entrypoint(env: dict, command: list) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()}
    return subprocess.run(
        ["sh", str(MLFLOW_ENTRYPOINT), *command], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def test_mlflow_entrypoint_renders_auth_config():
    uri = "postgresql://mlflow:p%40ss@postgres:5432/mlflow_auth"
    result = run_entrypoint(
        {"MLFLOW_AUTH_DATABASE_URI": uri, "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16, "PYTHON": sys.executable},
        [
            "sh",
            "-c",
            'cat "$MLFLOW_AUTH_CONFIG_PATH"; "$PYTHON" -c "import os; print(oct(os.stat(os.environ[\'MLFLOW_AUTH_CONFIG_PATH\']).st_mode & 0o777))"; '
            'rm -r "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"',
        ],
    )
    assert result.returncode == 0, result.stderr
    *ini_lines, mode = result.stdout.strip().splitlines()
    import configparser

    parser = configparser.ConfigParser()
    parser.read_string("\n".join(ini_lines))
    assert parser["mlflow"]["database_uri"] == uri  # % survives configparser interpolation
    assert parser["mlflow"]["admin_username"] == "admin"
    assert "admin_password" not in parser["mlflow"], "the admin password stays in the environment"
    assert mode == "0o600", "the rendered INI holds the database password: owner-only"


@pytest.mark.parametrize("missing", ["MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD"])
def test_mlflow_entrypoint_refuses_to_start_without_settings(missing):
    env = {"MLFLOW_AUTH_DATABASE_URI": "postgresql://u:p@h/db", "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16}
    del env[missing]
    result = run_entrypoint(env, ["true"])
    assert result.returncode != 0
    assert missing in result.stderr


# --------------------------------------------------------------------------
# No credentials in cluster/
# --------------------------------------------------------------------------

CREDENTIAL_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("GCP service-account key", re.compile(r"\"private_key(_id)?\"\s*:\s*\"[^\"]+\"")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b")),
    ("AWS secret access key", re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}\b")),
]
# A name that mentions a secret, assigned a value: as a YAML key at the start of
# a line, as a quoted (JSON) key anywhere, or with `=` (shell, INI, env files,
# command-line flags). Prose such as "the token: run ..." is not an assignment.
_SECRET_NAME = r"[A-Za-z0-9_.\-]*(?:password|passwd|secret|token|access[_-]?key|api[_-]?key|credential)[A-Za-z0-9_.\-]*"
_SECRET_ASSIGNMENTS = [
    re.compile(rf"(?i)^\s*(?:-\s+)?[\"']?({_SECRET_NAME})[\"']?\s*:(?!:)\s*(.*)"),
    re.compile(rf"(?i)\\?[\"']({_SECRET_NAME})\\?[\"']\s*:\s*(.*)"),
    re.compile(rf"(?i)({_SECRET_NAME})\s*=(?!=)\s*(.*)"),
]
_URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.\-]*://([^/\s:@]+):([^@\s/]+)@")
_CURL_USER = re.compile(r"(?:^|\s)(?:-u|--user)\s+[\"']?[^:\s\"']+:([^\s\"']+)")
# A value that is not a literal: variable reference, template or named placeholder.
_PLACEHOLDER = re.compile(r"^(\$|<|%s|\{\{|#|~/|/)|^$|YOUR-|REPLACE|CHANGE-?ME|EXAMPLE", re.I)


def _is_placeholder(value: str) -> bool:
    value = value.strip().lstrip("\\\"'").strip()
    return bool(_PLACEHOLDER.search(value))


def credential_findings(text: str, markdown: bool = False) -> list:
    findings = []
    in_code = not markdown
    for number, line in enumerate(text.splitlines(), 1):
        if markdown and line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        for label, pattern in CREDENTIAL_PATTERNS:
            if pattern.search(line):
                findings.append(f"line {number}: {label}")
        if not in_code:
            continue
        matches = [m for pattern in _SECRET_ASSIGNMENTS for m in pattern.finditer(line)]
        for match in matches:
            if line[: match.start(1)].endswith("${"):  # ${NAME:?message} / ${NAME:-default}
                continue
            value = match.group(2).split(" #")[0].strip()
            if value in ("", "|", ">", "|-", ">-") or _is_placeholder(value):
                continue  # empty, a YAML block (its lines are checked on their own) or a reference
            findings.append(f"line {number}: {match.group(1)} has a literal value")
        for match in _URL_CREDENTIALS.finditer(line):
            if not _is_placeholder(match.group(2)):
                findings.append(f"line {number}: credentials embedded in a URL")
        for match in _CURL_USER.finditer(line):
            if not _is_placeholder(match.group(1)):
                findings.append(f"line {number}: literal password passed to -u/--user")
    return findings


def cluster_files() -> list:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_every_path_the_cluster_readme_names_exists():
    """The deployment guide points only at files and folders that are there."""
    named = set(re.findall(r"\b(?:cluster|studies)/[A-Za-z0-9_./-]*[A-Za-z0-9_]",
                           README.read_text()))
    assert named, "the README names no cluster/ or studies/ path"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, missing


def test_no_credentials_committed_in_cluster_dir():
    findings = []
    for path in cluster_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            findings.append(f"{path}: binary file in cluster/")
            continue
        findings += [f"{path.relative_to(REPO)}: {f}" for f in credential_findings(text, path.suffix == ".md")]
    assert findings == []


def test_all_yaml_in_cluster_dir_parses():
    for path in cluster_files():
        if path.suffix in (".yaml", ".yml"):
            assert load_yaml_docs(path), path


# Built at run time so that this file itself holds no credential-looking literal.
_FAKE_KEY_ID = "AKIA" + "Q" * 16
_FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "b" * 18


@pytest.mark.parametrize(
    "line",
    [
        f"aws_access_key_id = {_FAKE_KEY_ID}",
        f"AWS_SECRET_ACCESS_KEY={_FAKE_SECRET}",
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "password: hunter2hunter2",
        '  "password": "hunter2hunter2",',
        "POSTGRES_PASSWORD=hunter2hunter2",
        "MLFLOW_TRACKING_PASSWORD: 'hunter2hunter2'",
        "- --from-literal=auth_token=0123456789abcdef",
        "value: postgresql://mlflow:hunter2@postgres:5432/mlflow",
        'curl -u "admin:hunter2hunter2" http://localhost:5000',
    ],
)
def test_credential_scan_flags_literals(line):
    assert credential_findings(line), line


@pytest.mark.parametrize(
    "line",
    [
        "POSTGRES_PASSWORD=",
        "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (openssl rand -hex 24)}",
        "value: postgresql://$(DB_USER):$(DB_PASSWORD)@mlflow-postgres:5432/mlflow",
        "- name: MLFLOW_TRACKING_PASSWORD",
        "key: password",
        'export RAY_AUTH_TOKEN=$(kubectl get secret "$SECRET" -o jsonpath=x | base64 -d)',
        'curl -u "admin:${MLFLOW_ADMIN_PASSWORD}" http://localhost:5000',
        "aws ecr get-login-password --region us-west-2 | docker login --password-stdin x",
        ': "${MLFLOW_AUTH_ADMIN_PASSWORD:?MLFLOW_AUTH_ADMIN_PASSWORD must be set}"',
        "mlflow_tracking_password = %s",
    ],
)
def test_credential_scan_accepts_references(line):
    assert credential_findings(line) == [], line


def test_credential_scan_of_markdown_looks_at_code_only():
    prose = "The admin password: choose it well.\n"
    code = "```bash\npassword: hunter2hunter2\n```\n"
    assert credential_findings(prose, markdown=True) == []
    assert credential_findings(prose + code, markdown=True)
    assert credential_findings("token " + _FAKE_KEY_ID, markdown=True), "key patterns apply to prose too"


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------

def test_readme_submits_the_study_the_rayjob_runs():
    """The README's `ray job submit` runs what the KubeRay RayJob runs, and every config the
    guide deploys with (`ray up X`, `kubectl apply -f X`, `docker compose -f X`) parses."""
    text = README.read_text()
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    submits = re.findall(r"ray job submit [^\n]*? -- ([^\n`]+)", text)
    assert submits and all(s.strip() == job["spec"]["entrypoint"] for s in submits), submits
    deployed = re.findall(r"(?:ray up|kubectl apply -f|docker compose[^\n]*? -f) (\S+\.ya?ml)",
                          text)
    assert deployed
    for path in deployed:
        assert list(yaml.safe_load_all((REPO / path).read_text())), path
