"""deploy/compose.yaml (the single-host stack) against the code it configures.

It must parse; every PERSONALKV_* variable it sets must be a setting of personalkv.config and
load into the settings classes; the URLs must name services of the file on the ports those
services listen on; the PersonalKV services must run the images' user and commands that exist.
`docker compose config` is also run when a Compose v2 CLI is available (skipped otherwise).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from personalkv import config
from tests.unit.deploy.test_helm_chart import settings_env_names

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_PATH = ROOT / "deploy" / "compose.yaml"
COMPOSE = yaml.safe_load(COMPOSE_PATH.read_text())
SERVICES = COMPOSE["services"]
PERSONALKV = ["ingestion", "answering", "mining", "caching"]
DEPENDENCIES = ["redis", "minio", "etcd", "milvus"]
# Listening ports of the third-party images (their documented defaults).
DEPENDENCY_PORTS = {"redis": 6379, "minio": 9000, "milvus": 19530, "etcd": 2379}
# Variables the PersonalKV containers get that are not PersonalKV settings.
FOREIGN_ENV = {"HF_HOME"}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def resolve(value) -> str:
    """The value with ${VAR:-default} replaced by its default (as with nothing exported)."""
    return VARIABLE.sub(lambda m: m.group(2) or "", str(value))


def env_of(name: str) -> dict[str, str]:
    return {k: resolve(v) for k, v in SERVICES[name]["environment"].items()}


def test_compose_has_the_dependencies_and_the_four_processes():
    assert set(SERVICES) == set(DEPENDENCIES + PERSONALKV)
    for name, service in SERVICES.items():
        image = resolve(service["image"])
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", (name, image)  # exact tags
    assert resolve(SERVICES["answering"]["image"]).endswith("-cuda")
    assert resolve(SERVICES["caching"]["image"]).endswith("-cuda")
    assert not resolve(SERVICES["ingestion"]["image"]).endswith("-cuda")


def test_personalkv_env_names_are_settings_and_load():
    names = settings_env_names()
    for name in PERSONALKV:
        env = env_of(name)
        personalkv = {k for k in env if k.startswith("PERSONALKV_")}
        assert personalkv <= names, (name, personalkv - names)
        assert set(env) - personalkv <= FOREIGN_ENV, name
    # The servers' environment loads into the real settings classes (secret given, as required).
    env = dict(env_of("ingestion"), PERSONALKV_AUTH_SECRET="x" * 32)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        settings = config.Settings()
    assert settings.server.host == "0.0.0.0" and settings.auth.require_secret
    assert settings.model.device == "cuda" and not settings.mining.profile_from_vlm


def test_urls_and_ports_name_services_defined_here():
    env = env_of("mining")
    broker = urlsplit(env["PERSONALKV_CELERY_BROKER_URL"])
    assert (broker.hostname, broker.port) == ("redis", DEPENDENCY_PORTS["redis"])
    storage = urlsplit(env["PERSONALKV_STORAGE_URL"])
    host, port = parse_qs(storage.query)["endpoint"][0].split(":")
    assert (host, int(port)) == ("minio", DEPENDENCY_PORTS["minio"])
    index = urlsplit(env["PERSONALKV_INDEX_URI"])
    assert (index.hostname, index.port) == ("milvus", DEPENDENCY_PORTS["milvus"])
    etcd_host, etcd_port = SERVICES["milvus"]["environment"]["ETCD_ENDPOINTS"].split(":")
    assert etcd_host in SERVICES and int(etcd_port) == DEPENDENCY_PORTS["etcd"]
    # PersonalKV's S3 keys are MinIO's root credentials (same variables, same defaults).
    minio = {k: resolve(v) for k, v in SERVICES["minio"]["environment"].items()}
    assert env["PERSONALKV_STORAGE_ACCESS_KEY"] == minio["MINIO_ROOT_USER"]
    assert env["PERSONALKV_STORAGE_SECRET_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    # Each server publishes the gRPC and metrics ports its settings name.
    for name in ("ingestion", "answering"):
        env = env_of(name)
        published = {int(p.split(":")[1]) for p in SERVICES[name]["ports"]}
        upper = name.upper()
        assert published == {int(env[f"PERSONALKV_SERVER_{upper}_PORT"]),
                             int(env[f"PERSONALKV_SERVER_{upper}_METRICS_PORT"])}
    for name in PERSONALKV:
        assert set(SERVICES[name]["depends_on"]) == {"redis", "minio", "milvus"}


def test_personalkv_services_run_as_the_image_user_with_real_commands():
    from services.cli import build_parser

    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    parser = build_parser()
    for name in PERSONALKV:
        service = SERVICES[name]
        assert service["user"] == "10001:10001" and service["read_only"] is True
        args = parser.parse_args(service["command"])  # exits (fails) on an unknown command
        assert args.command in ("serve", "worker")
        health = service["healthcheck"]["test"]
        if args.command == "worker":
            assert "--metrics-port" in service["command"]
            port = service["command"][service["command"].index("--metrics-port") + 1]
            assert f":{port}/metrics" in health[-1]
        else:
            assert health[1:] == ["python", "-m", "personalkv.api.health",
                                  "--server", name]
    # The model cache is a volume, never a layer of the image.
    for name in ("answering", "caching"):
        assert "hf-cache:/var/cache/huggingface" in SERVICES[name]["volumes"]
        assert SERVICES[name]["environment"]["HF_HOME"] == "/var/cache/huggingface"


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.mark.skipif(_compose_cli() is None, reason="no Compose v2 CLI (docker compose)")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run([*_compose_cli(), "-f", str(COMPOSE_PATH), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PERSONALKV_AUTH_SECRET": "x" * 32})
    assert result.returncode == 0, result.stderr
