"""What the chart renders for hardening and its options, checked on real `helm template` output:
pod security (Pod Security "restricted"), ServiceAccount, worker probes and metrics, GPU rollout,
TLS, autoscaling (HPA, KEDA), ServiceMonitor, NetworkPolicy, extras, weight prefetch, Jobs,
`helm test`, the production and all-options values files; plus the Dockerfile's agreement with
the chart and the README's justification of every checkov finding `make deploy-check` allows.
"""

from __future__ import annotations

import importlib.util
import re

import jsonschema
import pytest
import yaml

from personalkv import config
from tests.unit.deploy.test_helm_chart import (
    CHART, ROOT, SCHEMA, SERVICES, VALUES, by_kind, configmap_data, helm, needs_helm, render,
    settings_env_names,
)

PRODUCTION = CHART / "values-production.yaml"
ALL_OPTIONS = CHART / "ci" / "all-options-values.yaml"
GPU_SERVICES = {"answering", "caching"}
WORKERS = {"mining", "caching"}


def pod_specs(docs) -> dict[str, dict]:
    """Pod spec of every workload: Deployments, Jobs and bare (helm test) Pods."""
    specs = {}
    for doc in docs:
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        if doc["kind"] in ("Deployment", "Job"):
            specs[name] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            specs[name] = doc["spec"]
    return specs


def container(docs, service: str) -> dict:
    return by_kind(docs, "Deployment")[service]["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# -- files that need no helm ---------------------------------------------------------------


@pytest.mark.parametrize("path", [PRODUCTION, ALL_OPTIONS], ids=["production", "all-options"])
def test_example_values_files_satisfy_the_schema(path):
    merged = yaml.safe_load(yaml.safe_dump(VALUES))

    def merge(base, over):
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    merge(merged, yaml.safe_load(path.read_text()))
    jsonschema.Draft7Validator(SCHEMA).validate(merged)


def test_dockerfile_matches_the_chart_user_cache_and_pins_its_bases():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    uid = VALUES["podSecurityContext"]["runAsUser"]
    assert f"--uid {uid}" in text and f"USER {uid}:{uid}" in text
    assert f"HF_HOME={VALUES['modelCache']['mountPath']}" in text
    assert re.search(r"^FROM \S+ AS cpu$", text, re.M) and re.search(r"^FROM \S+ AS cuda$", text, re.M)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base  # an exact release tag
    assert re.search(r'"torch==\$\{TORCH_VERSION\}"', text)
    # Nothing of the weights or the test data goes into the build context.
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines()
              if ln and not ln.startswith("#")]
    assert ignore[0] == "*" and "!shared/" in ignore and not any("tests" in ln for ln in ignore)


def test_every_allowed_checkov_finding_is_justified_in_the_deploy_readme():
    spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    readme = (ROOT / "deploy" / "README.md").read_text()
    section = readme.split("## checkov", 1)[1].split("\n## ", 1)[0]
    assert check.ALLOWED_FINDINGS["production"] == set()
    for name, ids in check.ALLOWED_FINDINGS.items():
        for check_id in ids:
            assert re.search(rf"`{check_id}`.*\|.*{name}", section), (name, check_id)
    # Findings skipped by annotation in the templates are justified there too.
    templates = "\n".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    for check_id in set(re.findall(r"checkov\.io/skip\d+: (CKV\w+)=", templates)):
        assert f"`{check_id}`" in section, check_id


# -- default render ------------------------------------------------------------------------


@needs_helm
def test_every_pod_meets_pod_security_restricted_and_mounts_no_token():
    docs = render("jobs.reindex.enabled=true", "jobs.recache.enabled=true")
    specs = pod_specs(docs)
    assert len(specs) == 4 + 2 + 2  # Deployments, Jobs, helm test Pods
    (account,) = by_kind(docs, "ServiceAccount").values()
    assert account["automountServiceAccountToken"] is False
    for name, pod in specs.items():
        assert pod["serviceAccountName"] == account["metadata"]["name"], name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsUser"] == 10001, name
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/dev/shm"} <= mounts, name
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"


@needs_helm
def test_workers_expose_metrics_and_are_probed_and_hand_tasks_back_within_the_grace():
    docs = render()
    for name in SERVICES:
        c = container(docs, name)
        pod = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), name
        assert "metrics" in {p["name"] for p in c["ports"]}, name
        if name in WORKERS:
            assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
            assert c["args"][-2:] == ["--metrics-port", str(port)]
            window = float(env_of(c)["PERSONALKV_CELERY_SOFT_SHUTDOWN_TIMEOUT_S"]["value"])
            assert 0 < window < pod["terminationGracePeriodSeconds"]
    # The worker's metrics endpoint must bind the pod's interface, not loopback.
    assert configmap_data(docs)["PERSONALKV_SERVER_HOST"] == "0.0.0.0"


@needs_helm
def test_gpu_services_roll_out_without_surge_on_the_cuda_image():
    docs = render()
    deployments = by_kind(docs, "Deployment")
    for name, dep in deployments.items():
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        if name in GPU_SERVICES:
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
            assert dep["spec"]["progressDeadlineSeconds"] >= 1800
            assert image.endswith(":0.1.0-cuda")
        else:
            assert "strategy" not in dep["spec"] and image.endswith(":0.1.0")
    recreate = render("services.answering.strategy.type=Recreate",
                      "services.answering.strategy.rollingUpdate=null")
    assert by_kind(recreate, "Deployment")["answering"]["spec"]["strategy"] == {"type": "Recreate"}


@needs_helm
@pytest.mark.parametrize("flag, bad, message", [
    ("--set", "services.mining.concurrency=2", "concurrency must be 1"),
    ("--set", "services.caching.softShutdownS=60", "softShutdownS must be below"),
    ("--set", "tls.enabled=true,tls.certManager.enabled=true", "issuerRef.name must name"),
])
def test_helm_refuses_inconsistent_options(flag, bad, message):
    result = helm("template", "r", str(CHART), flag, bad, check=False)
    assert result.returncode != 0 and message in result.stderr


# -- options -------------------------------------------------------------------------------


@needs_helm
def test_tls_mounts_the_certificate_probes_the_plaintext_health_port_and_tests_with_the_ca():
    docs = render("tls.enabled=true", "tls.certManager.enabled=true",
                  "tls.certManager.issuerRef.name=ca")
    (cert,) = by_kind(docs, "Certificate").values()
    assert cert["spec"]["secretName"] == "r-personalkv-tls"
    for name in ("ingestion", "answering"):
        assert f"r-personalkv-{name}.default.svc" in cert["spec"]["dnsNames"]
        c = container(docs, name)
        env = env_of(c)
        assert env["PERSONALKV_SERVER_TLS_CERT_FILE"]["value"] == "/etc/personalkv/tls/tls.crt"
        assert env["PERSONALKV_SERVER_HEALTH_PORT"]["value"] == "50060"
        assert c["readinessProbe"]["grpc"]["port"] == 50060
        assert c["livenessProbe"]["grpc"]["port"] == 50060
        test_pod = by_kind(docs, "Pod")[f"{name}-test-health"]
        args = test_pod["spec"]["containers"][0]["args"]
        assert "--ca=/etc/personalkv/tls/ca.crt" in args
        port = VALUES["server"][f"{name}Port"]
        assert args[0] == f"--address=r-personalkv-{name}:{port}"
    # Workers neither get the certificate nor serve gRPC.
    assert "PERSONALKV_SERVER_TLS_CERT_FILE" not in env_of(container(docs, "mining"))
    # The connection-age settings reach the servers and load.
    data = configmap_data(docs)
    assert float(data["PERSONALKV_SERVER_MAX_CONNECTION_AGE_S"]) == 300
    with pytest.MonkeyPatch.context() as mp:
        for key in ("PERSONALKV_SERVER_MAX_CONNECTION_AGE_S",
                    "PERSONALKV_SERVER_MAX_CONNECTION_AGE_GRACE_S",
                    "PERSONALKV_SERVER_KEEPALIVE_TIME_S"):
            mp.setenv(key, data[key])
        assert config.ServerSettings().max_connection_age_grace_s == 60


@needs_helm
def test_autoscaling_keda_on_queue_lengths_and_cpu_hpa():
    docs = render("services.mining.autoscaling.enabled=true",
                  "services.caching.autoscaling.enabled=true",
                  "services.ingestion.autoscaling.enabled=true",
                  "external.redis.url=redis://queue.data:6380/4",
                  "keda.passwordSecret.name=redis-auth")
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"mining", "caching"}
    for queue, obj in scaled.items():
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue  # Celery's Redis list for the queue
        assert trigger["metadata"]["address"] == "queue.data:6380"
        assert trigger["metadata"]["databaseIndex"] == "4"
        assert trigger["authenticationRef"]["name"] == "r-personalkv-redis"
        assert obj["spec"]["scaleTargetRef"]["name"] == f"r-personalkv-{queue}"
        behavior = obj["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == obj["spec"]["cooldownPeriod"]
    (auth,) = by_kind(docs, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"][0]["name"] == "redis-auth"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "r-personalkv-ingestion"
    deployments = by_kind(docs, "Deployment")
    for name in ("ingestion", "mining", "caching"):
        assert "replicas" not in deployments[name]["spec"], name  # the autoscaler owns it
    assert deployments["answering"]["spec"]["replicas"] == 1



@needs_helm
def test_answering_scales_on_queued_and_in_flight_asks_or_on_cpu_without_keda():
    from personalkv.observability import REGISTRY  # with the serving metrics registered

    docs = render("services.answering.autoscaling.enabled=true",
                  "services.answering.autoscaling.keda.threshold=6",
                  "services.answering.autoscaling.maxReplicas=5")
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {"answering"} and not by_kind(docs, "HorizontalPodAutoscaler")
    spec = scaled["answering"]["spec"]
    assert spec["scaleTargetRef"]["name"] == "r-personalkv-answering"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 5)
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "prometheus" and meta["threshold"] == "6"
    assert meta["serverAddress"] == VALUES["services"]["answering"]["autoscaling"]["keda"][
        "serverAddress"]
    # the query reads the gauges the answering process exports, from this release's Service
    service = by_kind(docs, "Service")["answering"]["metadata"]["name"]
    names = set(re.findall(r"personalkv_\w+", meta["query"]))
    assert names == {"personalkv_answer_requests_queued", "personalkv_answer_requests_in_flight"}
    for name in names:
        assert REGISTRY.get_sample_value(name) is not None, name
    assert meta["query"].count(f'service="{service}"') == 2
    assert meta["query"].count('namespace="default"') == 2
    assert "replicas" not in by_kind(docs, "Deployment")["answering"]["spec"]

    custom = render("services.answering.autoscaling.enabled=true",
                    "services.answering.autoscaling.keda.query=sum(up)")
    assert by_kind(custom, "ScaledObject")["answering"]["spec"]["triggers"][0]["metadata"][
        "query"] == "sum(up)"

    fallback = render("services.answering.autoscaling.enabled=true",
                      "services.answering.autoscaling.keda.enabled=false")
    assert not by_kind(fallback, "ScaledObject")
    (hpa,) = by_kind(fallback, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "r-personalkv-answering"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@needs_helm
def test_service_monitor_and_network_policies_cover_every_component():
    docs = render("metrics.serviceMonitor.enabled=true", "networkPolicy.enabled=true")
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = by_kind(docs, "Service")
    assert set(services) == {"ingestion", "answering", "mining-metrics", "caching-metrics"}
    for svc in services.values():
        assert selector.items() <= svc["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    policies = by_kind(docs, "NetworkPolicy")
    assert set(policies) == set(SERVICES) | {"no-ingress"}
    for name in SERVICES:
        ports = {p["port"] for rule in policies[name]["spec"]["ingress"] for p in rule["ports"]}
        assert ports == ({"grpc", "metrics"} if name in ("ingestion", "answering") else {"metrics"})
    assert policies["no-ingress"]["spec"]["policyTypes"] == ["Ingress"]
    assert "ingress" not in policies["no-ingress"]["spec"]


@needs_helm
def test_all_options_render_extras_prefetch_jobs_and_scheduling():
    docs = render(values=ALL_OPTIONS)
    deployments = by_kind(docs, "Deployment")
    deployments = {d["metadata"]["name"].removeprefix("pkv-"): d for d in docs
                   if d["kind"] == "Deployment"}
    assert set(deployments) == set(SERVICES)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert env_of(c)["TZ"]["value"] == "UTC"
        assert {"configMapRef": {"name": "site-proxy"}} in c["envFrom"]
        assert "/etc/ssl/corporate" in {m["mountPath"] for m in c["volumeMounts"]}
        assert "corporate-ca" in {v["name"] for v in pod["volumes"]}
        inits = [i["name"] for i in pod["initContainers"]]
        assert inits[-1] == "wait-for-redis"
        assert ("prefetch-weights" in inits) == (name in GPU_SERVICES)
        assert pod["serviceAccountName"] == "personalkv-runner"
        assert pod["imagePullSecrets"] == [{"name": "ghcr-pull"}]
        assert "@sha256:" in c["image"]
        if name in GPU_SERVICES:
            prefetch = pod["initContainers"][0]
            assert env_of(prefetch)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
            assert set(env_of(prefetch)) == {"HF_HOME", "HF_TOKEN"}  # no S3 / auth secrets
            assert env_of(c)["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
        else:
            assert "HF_TOKEN" not in env_of(c)
    # caching runs on CPU here (gpu.count 0): the CPU image, no GPU limit, still the cache.
    caching = deployments["caching"]["spec"]["template"]["spec"]
    assert caching["containers"][0]["image"].endswith("@sha256:" + "1" * 64)
    assert "nvidia.com/gpu" not in caching["containers"][0]["resources"]["limits"]
    answering = deployments["answering"]["spec"]
    assert answering["strategy"] == {"type": "Recreate"}
    assert answering["template"]["spec"]["runtimeClassName"] == "nvidia"
    assert answering["template"]["spec"]["priorityClassName"] == "gpu-high"
    (spread,) = deployments["ingestion"]["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ingestion"
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    assert jobs["pkv-reindex"]["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "reindex", "--stack"]
    assert "helm.sh/hook" not in jobs["pkv-reindex"]["metadata"]["annotations"]
    assert jobs["pkv-recache"]["metadata"]["annotations"]["helm.sh/hook"] == (
        "post-install,post-upgrade")
    # The Jobs run commands the CLI has.
    from services.cli import build_parser

    for job in jobs.values():
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert build_parser().parse_args(args).stack is True


@needs_helm
def test_production_values_gpu_answering_irsa_and_guaranteed_gpu_pods(monkeypatch):
    docs = render(values=PRODUCTION)
    answering = by_kind(docs, "Deployment")["answering"]["spec"]["template"]["spec"]
    c = answering["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]
    assert c["image"] == "ghcr.io/personalkv/personalkv@sha256:" + "2" * 64
    assert answering["runtimeClassName"] == "nvidia"
    assert answering["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # answering scales on the serving signal, read from the Prometheus the ServiceMonitor feeds
    (trigger,) = by_kind(docs, "ScaledObject")["answering"]["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "kube-prometheus-stack" in trigger["metadata"][
        "serverAddress"]
    assert by_kind(docs, "ServiceMonitor")
    # IRSA: the role on the ServiceAccount, no static S3 keys; empty keys reach the settings,
    # and the S3 store then signs with the pod's identity (web identity token), not a dev key.
    (account,) = by_kind(docs, "ServiceAccount").values()
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]
    env = env_of(c)
    assert env["PERSONALKV_STORAGE_ACCESS_KEY"] == {
        "name": "PERSONALKV_STORAGE_ACCESS_KEY", "value": ""}
    for key, value in configmap_data(docs).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PERSONALKV_STORAGE_ACCESS_KEY", "")
    monkeypatch.setenv("PERSONALKV_STORAGE_SECRET_KEY", "")
    from minio.credentials import IamAwsProvider

    from personalkv.storage.factory import open_object_store

    store = open_object_store(settings=config.StorageSettings())
    assert isinstance(store._client._provider, IamAwsProvider)
    assert set(configmap_data(docs)) <= settings_env_names()


@needs_helm
def test_recache_job_waits_for_the_workers_and_gives_up_before_its_deadline():
    from services.cli import build_parser

    for deadline in (VALUES["jobs"]["recache"]["activeDeadlineSeconds"], 600):
        docs = render("jobs.recache.enabled=true", "jobs.reindex.enabled=true",
                      f"jobs.recache.activeDeadlineSeconds={deadline}")
        jobs = by_kind(docs, "Job")
        args = build_parser().parse_args(jobs["recache"]["spec"]["template"]["spec"][
            "containers"][0]["args"])
        assert jobs["recache"]["spec"]["activeDeadlineSeconds"] == deadline
        # the command's own timeout ends first, with time left to start and enqueue
        assert args.stack and 0 < args.timeout <= deadline - 60, (deadline, args.timeout)
        assert args.timeout >= 0.9 * deadline - 1e-9  # and most of the deadline is waiting
        reindex = jobs["reindex"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert reindex == ["reindex", "--stack"]  # works in the pod itself: nothing to wait for
    result = helm("template", "r", str(CHART), "--set", "jobs.recache.enabled=true",
                  "--set", "jobs.recache.activeDeadlineSeconds=60", check=False)
    assert result.returncode != 0 and "activeDeadlineSeconds must exceed 60" in result.stderr


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("digest, ok", [
    ("", True), (DIGEST, True),
    (f"registry.example.com:5000/team/personalkv@{DIGEST}", True),  # a whole reference
    ("sha256:abc", False), ("latest", False), ("ghcr.io/personalkv/personalkv:0.1.0", False),
    (f"ghcr.io/personalkv/personalkv:0.1.0@{DIGEST[:-1]}", False),
])
def test_schema_accepts_a_digest_or_a_whole_digest_reference(digest, ok):
    values = yaml.safe_load(yaml.safe_dump(VALUES))
    values["image"]["gpuDigest"] = digest
    if ok:
        jsonschema.Draft7Validator(SCHEMA).validate(values)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft7Validator(SCHEMA).validate(values)


@needs_helm
def test_pods_pull_by_digest_or_by_the_whole_reference_given():
    reference = f"registry.example.com:5000/team/personalkv-cuda@{DIGEST}"
    docs = render(f"image.digest={DIGEST}", f"image.gpuDigest={reference}",
                  "jobs.recache.enabled=true")
    images = {name: spec["containers"][0]["image"] for name, spec in pod_specs(docs).items()}
    for name, image in images.items():
        gpu = any(s in name for s in ("Deployment/r-personalkv-answering",
                                      "Deployment/r-personalkv-caching"))
        assert image == (reference if gpu else f"ghcr.io/personalkv/personalkv@{DIGEST}"), name
