"""The Helm chart in deploy/helm/personalkv: values vs schema, docs, env names, rendering.

The helm tests need a `helm` binary: $HELM, else the one `make deploy-tools` installs into
.tools/bin (`make deploy-check` and `make test` install it and run these), else PATH; they are
skipped only when there is none.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic_settings import BaseSettings

from personalkv import config

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy" / "helm" / "personalkv"
VALUES_TEXT = (CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
# Env vars the templates may set that are not PersonalKV settings.
FOREIGN_ENV = {"HF_HOME", "HF_TOKEN"}
SERVICES = ["ingestion", "answering", "mining", "caching"]


def settings_env_names() -> set[str]:
    """PERSONALKV_<SECTION>_<FIELD> of every settings class in personalkv.config."""
    names = set()
    for cls in vars(config).values():
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls is not BaseSettings:
            prefix = cls.model_config.get("env_prefix", "")
            if prefix:
                names |= {(prefix + field).upper() for field in cls.model_fields}
    return names


def validate(values) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(values)


# --- values.yaml against values.schema.json ------------------------------------------------


def test_schema_is_valid_draft7_and_accepts_the_default_values():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    validate(VALUES)


def _set(values, path, value):
    *parents, leaf = path.split(".")
    node = values
    for key in parents:
        node = node[key]
    node[leaf] = value


@pytest.mark.parametrize(
    "path, value",
    [
        ("services.ingestion.replicas", -1),  # negative replicas
        ("secrets.authSecret", "inline-hmac-key"),  # a value where a reference belongs
        ("secrets.s3SecretKey", {"name": "s3", "key": "k", "value": "minioadmin"}),
        ("secrets.authSecret.name", ""),  # a required secret without a name
        ("services.search", {"enabled": True}),  # unknown service
        ("services.ingestion.replica", 2),  # misspelt key
        ("services.ingestion.gpu", {"resourceName": "nvidia.com/gpu", "count": 1}),
        ("services.answering.gpu.count", -1),
        ("model.dtype", "fp8"),
        ("external.milvus.uri", "./var/index/milvus.db"),  # milvus-lite is one process only
        ("extraConfig", {"HF_TOKEN": "x"}),  # not a PersonalKV setting
        ("server.answeringPort", 0),
        ("image.digest", "latest"),  # a digest is sha256:<64 hex>
        ("tls.healthPort", 0),
        ("services.answering.strategy", {"type": "BlueGreen"}),
        ("services.mining.autoscaling.listLength", 0),
        ("services.ingestion.autoscaling.minReplicas", 0),
        ("serviceAccount.automountToken", "no"),
        ("keda.redisAddress", "redis://redis:6379"),  # HOST:PORT, not a URL
        ("services.answering.autoscaling.keda.serverAddress", "prometheus:9090"),  # a URL
        ("services.answering.autoscaling.keda.threshold", 0),
        ("services.answering.autoscaling.keda.scaler", "cpu"),  # unknown key
        ("secrets.hfToken", "hf_abc"),  # a value where a reference belongs
    ],
)
def test_schema_rejects_bad_values(path, value):
    values = copy.deepcopy(VALUES)
    _set(values, path, value)
    with pytest.raises(jsonschema.ValidationError):
        validate(values)


# --- every leaf key documented with `# --` --------------------------------------------------


def _undocumented(node, lines, path=""):
    """Keys whose comment block lacks `# --`; a documented mapping counts as one leaf."""
    missing = []
    for key_node, value_node in node.value:
        key_path = f"{path}.{key_node.value}".lstrip(".")
        block, line = [], key_node.start_mark.line - 1
        while line >= 0 and lines[line].strip().startswith("#"):
            block.append(lines[line].strip())
            line -= 1
        documented = any(c.startswith("# --") for c in block)
        is_group = isinstance(value_node, yaml.MappingNode) and value_node.value
        if is_group and not documented:
            missing += _undocumented(value_node, lines, key_path)
        elif not documented:
            missing.append(key_path)
    return missing


def test_every_leaf_key_in_values_has_a_doc_comment():
    root = yaml.compose(VALUES_TEXT)
    assert _undocumented(root, VALUES_TEXT.splitlines()) == []


def test_each_service_block_has_the_scheduling_keys():
    for name in SERVICES:
        block = VALUES["services"][name]
        for key in ["replicas", "resources", "nodeSelector", "tolerations", "affinity",
                    "terminationGracePeriodSeconds", "topologySpreadConstraints",
                    "priorityClassName", "runtimeClassName", "strategy",
                    "progressDeadlineSeconds", "autoscaling", "probes"]:
            assert key in block, (name, key)
    for name in ["answering", "caching"]:
        assert VALUES["services"][name]["gpu"] == {"resourceName": "nvidia.com/gpu", "count": 1}


# --- env names the templates set exist in personalkv.config --------------------------------


def test_env_names_in_templates_are_settings_fields():
    text = "\n".join(p.read_text() for p in sorted((CHART / "templates").rglob("*")) if p.is_file())
    used = set(re.findall(r"\bPERSONALKV_[A-Z0-9_]+\b", text))
    assert len(used) > 20  # the ConfigMap and the secret env entries
    assert used - settings_env_names() == set()
    other = set(re.findall(r"-\s+name:\s+([A-Z][A-Z0-9_]+)\s*$", text, re.M)) - used
    assert other <= FOREIGN_ENV


# --- helm lint / helm template (when a helm binary is available) ---------------------------

_TOOLS_HELM = ROOT / ".tools" / "bin" / "helm"
HELM = os.environ.get("HELM") or (str(_TOOLS_HELM) if _TOOLS_HELM.exists() else None) or shutil.which("helm")
needs_helm = pytest.mark.skipif(not HELM, reason="no helm binary ($HELM or PATH)")


def helm(*args, check=True):
    result = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def render(*sets: str, strings: tuple[str, ...] = (), values: Path | None = None) -> list[dict]:
    flags = [f for s in sets for f in ("--set", s)]
    flags += [f for s in strings for f in ("--set-string", s)]
    flags += ["-f", str(values)] if values else []
    out = helm("template", "r", str(CHART), "--kube-version", "1.29.0", *flags).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return {d["metadata"]["name"].removeprefix("r-personalkv-"): d for d in docs
            if d["kind"] == kind}


def configmap_data(docs) -> dict[str, str]:
    """The settings ConfigMap (not the optional Grafana dashboard's)."""
    (configmap,) = [c for c in by_kind(docs, "ConfigMap").values()
                    if not c["metadata"]["name"].endswith("-dashboard")]
    return configmap["data"]


@needs_helm
def test_helm_lint():
    helm("lint", "--strict", str(CHART))


@needs_helm
def test_default_render_runs_each_service_with_its_command_probes_and_gpus(monkeypatch):
    docs = render()
    deployments = by_kind(docs, "Deployment")
    assert sorted(deployments) == sorted(SERVICES)
    assert set(by_kind(docs, "Service")) == {"ingestion", "answering"}
    args = {n: d["spec"]["template"]["spec"]["containers"][0]["args"]
            for n, d in deployments.items()}
    assert args["ingestion"] == ["serve", "ingestion"]
    assert args["answering"] == ["serve", "answering"]
    assert args["mining"] == ["worker", "--queue", "mining", "--concurrency", "1",
                              "--metrics-port", "9460"]
    assert args["caching"] == ["worker", "--queue", "caching", "--concurrency", "1",
                               "--metrics-port", "9460"]
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        container = pod["containers"][0]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == (name in {"answering", "caching"}), name
        if gpus:
            assert pod["nodeSelector"] and pod["tolerations"]
        if name in {"ingestion", "answering"}:
            assert container["readinessProbe"]["grpc"]["service"].startswith("personalkv.v1.")
            grpc_port = container["ports"][0]["containerPort"]
            assert container["livenessProbe"]["grpc"]["port"] == grpc_port
        secret_env = {e["name"] for e in container["env"] if "valueFrom" in e}
        assert ("PERSONALKV_AUTH_SECRET" in secret_env) == (name in {"ingestion", "answering"})
    # The rendered ConfigMap (plus secrets) loads into the real settings classes.
    data = configmap_data(docs)
    assert set(data) <= settings_env_names()
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PERSONALKV_AUTH_SECRET", "x" * 32)
    settings = config.Settings()
    assert settings.server.host == "0.0.0.0" and settings.auth.require_secret is True
    assert settings.storage.url == (
        "s3://personalkv?endpoint=minio:9000&secure=false&region=us-east-1")
    assert settings.model.dtype == "bfloat16" and settings.index.uri == "http://milvus:19530"


@needs_helm
def test_options_render_pvc_pdb_and_secret_broker_url():
    docs = render("modelCache.type=pvc", "services.answering.podDisruptionBudget.enabled=true",
                  "secrets.redisUrl.name=redis-auth", "secrets.milvusToken.name=milvus-auth",
                  strings=("extraConfig.PERSONALKV_SERVICE_MAX_NEW_TOKENS=64",))
    assert list(by_kind(docs, "PersistentVolumeClaim")) == ["model-cache"]
    assert list(by_kind(docs, "PodDisruptionBudget")) == ["answering"]
    configmap = configmap_data(docs)
    assert "PERSONALKV_CELERY_BROKER_URL" not in configmap
    assert configmap["PERSONALKV_SERVICE_MAX_NEW_TOKENS"] == "64"
    mining = by_kind(docs, "Deployment")["mining"]["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in mining["env"]
            if "valueFrom" in e}
    assert refs["PERSONALKV_CELERY_BROKER_URL"] == "redis-auth"
    assert refs["PERSONALKV_INDEX_TOKEN"] == "milvus-auth"


@needs_helm
@pytest.mark.parametrize("flag, bad, message", [
    ("--set", "services.ingestion.replicas=-1", "replicas"),
    ("--set", "server.graceS=120", "graceS must be below"),
    ("--set-string", "extraConfig.PERSONALKV_MODEL_NAME=x", "is set by the chart"),
])
def test_helm_refuses_bad_values(flag, bad, message):
    result = helm("template", "r", str(CHART), "--kube-version", "1.29.0", flag, bad,
                  check=False)
    assert result.returncode != 0 and message in result.stderr
