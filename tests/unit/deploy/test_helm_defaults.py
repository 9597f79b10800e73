"""One source of defaults: every PERSONALKV_* value the chart's default render sets equals the
default in shared/personalkv/config.py, except the few listed in INTENTIONAL (each with why);
and the model-loading values (revision, offline) reach the pods.
"""

from __future__ import annotations

import pytest
import yaml
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from personalkv import config
from tests.unit.deploy.test_helm_chart import CHART, VALUES, configmap_data, needs_helm, render

# Where the chart's default differs from the library's on purpose (a cluster is not a laptop).
INTENTIONAL = {
    "PERSONALKV_MODEL_NAME": "a GPU cluster serves a VLM (Qwen2-VL-2B), not the text-only smollm2",
    "PERSONALKV_MODEL_DEVICE": "answering and caching run on GPU nodes",
    "PERSONALKV_MODEL_DTYPE": "bfloat16 on the GPU (float32 is the CPU default)",
    "PERSONALKV_MINING_PROFILE_FROM_VLM": "mining pods run on CPU nodes without the model cache",
    "PERSONALKV_STORAGE_URL": "the external S3 bucket (external.s3), not a local directory",
    "PERSONALKV_INDEX_URI": "a Milvus server (external.milvus); milvus-lite is one process only",
    "PERSONALKV_CELERY_BROKER_URL": "the external Redis (external.redis.url), not loopback",
    "PERSONALKV_SERVER_HOST": "pods serve on their interface (probes, Services), not loopback",
    "PERSONALKV_AUTH_REQUIRE_SECRET": "a cluster never starts with the dev HMAC key",
    "PERSONALKV_SERVER_GRACE_S": "pods get 30-60 s after SIGTERM (terminationGracePeriodSeconds); "
                                 "20 s of it for in-flight Asks, the rest for endpoint removal",
}


def settings_field(env_name: str) -> tuple[type[BaseSettings], str]:
    for cls in vars(config).values():
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls is not BaseSettings:
            prefix = cls.model_config.get("env_prefix", "").upper()
            field = env_name.removeprefix(prefix).lower()
            if prefix and env_name.startswith(prefix) and field in cls.model_fields:
                return cls, field
    raise KeyError(env_name)


def plain(value):
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def chart_env(docs) -> dict[str, set[str]]:
    """Every PERSONALKV_* value the render sets: the ConfigMap and plain `value` env entries of
    every container (Deployments, Jobs, test Pods)."""
    env: dict[str, set[str]] = {k: {v} for k, v in configmap_data(docs).items()}
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec) if doc["kind"] != "Pod" else spec
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            for e in c.get("env", []):
                if e["name"].startswith("PERSONALKV_") and "value" in e:
                    env.setdefault(e["name"], set()).add(e["value"])
    return env


@needs_helm
def test_default_render_sets_the_library_defaults_except_the_listed_ones(monkeypatch):
    env = chart_env(render())
    assert len(env) > 20
    differing = {}
    for name, values in sorted(env.items()):
        cls, field = settings_field(name)
        default = plain(cls.model_fields[field].default)
        for value in values:
            monkeypatch.setenv(name, value)
            parsed = plain(getattr(cls(), field))  # parsed as the pods parse it
            if parsed != default:
                differing[name] = (value, default)
        monkeypatch.delenv(name)
    unexplained = {k: v for k, v in differing.items() if k not in INTENTIONAL}
    assert unexplained == {}, "chart value != config.py default: " + ", ".join(
        f"{k}={v[0]!r} (library: {v[1]!r})" for k, v in unexplained.items())
    # Every listed exception is still one (a stale entry would hide a future divergence).
    assert set(INTENTIONAL) == set(differing)


def test_values_document_the_library_recompute_ratio():
    assert VALUES["model"]["recomputeRatio"] == config.ModelSettings.model_fields[
        "recompute_ratio"].default


@needs_helm
@pytest.mark.parametrize("values", [None, CHART / "values-production.yaml",
                                    CHART / "ci" / "all-options-values.yaml"],
                         ids=["default", "production", "all-options"])
def test_prefetched_weights_run_offline_and_the_revision_reaches_loader_and_prefetch(values):
    docs = render(values=values)
    data = configmap_data(docs)
    merged = yaml.safe_load((values or CHART / "values.yaml").read_text()).get("model", {})
    revision = merged.get("revision", "")
    assert data["PERSONALKV_MODEL_REVISION"] == revision
    prefetch = yaml.safe_load((values or CHART / "values.yaml").read_text()).get(
        "modelCache", {}).get("prefetch", {}).get("enabled", False)
    # Air-gapped / prefetched caches load offline; the default (an emptyDir) downloads.
    assert data["PERSONALKV_MODEL_HF_OFFLINE"] == ("true" if prefetch else "false")
    assert config.ModelSettings(hf_offline=data["PERSONALKV_MODEL_HF_OFFLINE"]).hf_offline is \
        prefetch
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        inits = {i["name"]: i for i in dep["spec"]["template"]["spec"].get("initContainers", [])}
        if "prefetch-weights" in inits:
            script = inits["prefetch-weights"]["args"][0]
            assert "revision=revision" in script and "PERSONALKV_MODEL_REVISION" in script
            assert inits["prefetch-weights"]["envFrom"][0]["configMapRef"]["name"] in {
                d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
                and "PERSONALKV_MODEL_NAME" in d["data"]}
