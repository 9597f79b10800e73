"""`helm test` passes with every values file the chart ships: each test Pod can reach the
Service it dials through every NetworkPolicy on the way (render tests on `helm template`).

The policies are evaluated here as Kubernetes does (label selectors, peers, named ports); the
evaluator's refusals are checked too, so a pass means something.
"""

from __future__ import annotations

import pytest

from tests.unit.deploy.test_helm_chart import CHART, helm, needs_helm

NAMESPACE = "personalkv"
VALUES_FILES = {
    "default": None,
    "production": CHART / "values-production.yaml",
    "all-options": CHART / "ci" / "all-options-values.yaml",
}


def render_in_namespace(values=None, *sets: str) -> list[dict]:
    import yaml

    flags = ["-f", str(values)] if values else []
    flags += [f for s in sets for f in ("--set", s)]
    out = helm("template", "pkv", str(CHART), "--namespace", NAMESPACE,
               "--kube-version", "1.29.0", *flags).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# -- a NetworkPolicy evaluator ---------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all ANDed; {} selects everything."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": not (key in labels and labels[key] in values),
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


class Pod:
    def __init__(self, name: str, labels: dict, namespace: str, ports=()):
        self.name, self.labels, self.namespace = name, labels, namespace
        self.ports = list(ports)  # container ports: {name, containerPort, protocol}

    @property
    def namespace_labels(self) -> dict:
        return {"kubernetes.io/metadata.name": self.namespace}


def peer_matches(peer: dict, pod: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic is matched by selectors only
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False  # a podSelector alone means the policy's own namespace
    return selects(peer.get("podSelector") or {}, pod.labels)


def port_matches(rule_ports, port: dict) -> bool:
    if not rule_ports:
        return True  # no ports: every port
    return any(p.get("protocol", "TCP") == port.get("protocol", "TCP")
               and p.get("port") in (None, port["containerPort"], port.get("name"))
               for p in rule_ports)


def policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def admitted(policies: list[dict], src: Pod, dst: Pod, port: dict) -> bool:
    """Whether src may open a connection to dst's container `port` (ingress at dst, egress at
    src; a pod no policy selects for a direction is unrestricted in it)."""
    def allowed(direction: str, selected: Pod, other: Pod) -> bool:
        key, peers_key = direction.lower(), "from" if direction == "Ingress" else "to"
        applying = [p for p in policies if p["metadata"]["namespace"] == selected.namespace
                    and direction in policy_types(p)
                    and selects(p["spec"]["podSelector"], selected.labels)]
        if not applying:
            return True
        return any(port_matches(rule.get("ports"), port)
                   and (not rule.get(peers_key) or any(
                       peer_matches(peer, other, p["metadata"]["namespace"])
                       for peer in rule[peers_key]))
                   for p in applying for rule in p["spec"].get(key) or [])

    return allowed("Ingress", dst, src) and allowed("Egress", src, dst)


# -- what a helm test Pod dials ----------------------------------------------------------------


def helm_test_pods(docs) -> list[Pod]:
    return [Pod(d["metadata"]["name"], d["metadata"]["labels"], d["metadata"]["namespace"])
            for d in docs if d["kind"] == "Pod"
            and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]


def dialled(docs, test_pod_name: str) -> tuple[str, int]:
    (pod,) = [d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == test_pod_name]
    address = next(a for a in pod["spec"]["containers"][0]["args"]
                   if a.startswith("--address="))
    host, port = address.removeprefix("--address=").rsplit(":", 1)
    return host, int(port)


def backends(docs, service_name: str, port: int) -> list[tuple[Pod, dict]]:
    """The pods behind a Service port and the container port it forwards to."""
    (service,) = [d for d in docs if d["kind"] == "Service"
                  and d["metadata"]["name"] == service_name]
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    target = service_port.get("targetPort", port)
    out = []
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        template = dep["spec"]["template"]
        if not selects({"matchLabels": service["spec"]["selector"]},
                       template["metadata"]["labels"]):
            continue
        ports = template["spec"]["containers"][0]["ports"]
        (container_port,) = [p for p in ports if target in (p["name"], p["containerPort"])]
        pod = Pod(dep["metadata"]["name"], template["metadata"]["labels"],
                  dep["metadata"]["namespace"], ports)
        out.append((pod, container_port))
    return out


# -- the tests -------------------------------------------------------------------------------


@needs_helm
@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_helm_test_pod_is_admitted_to_the_service_it_dials(name):
    docs = render_in_namespace(VALUES_FILES[name])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert bool(policies) == (name != "default")  # production and all-options turn them on
    pods = helm_test_pods(docs)
    assert {p.labels["app.kubernetes.io/component"] for p in pods} == {"test"}
    assert len(pods) == 2  # ingestion and answering
    for test_pod in pods:
        host, port = dialled(docs, test_pod.name)
        targets = backends(docs, host, port)
        assert targets, (test_pod.name, host, port)
        for backend, container_port in targets:
            assert admitted(policies, test_pod, backend, container_port), (
                f"{name}: {test_pod.name} -> {backend.name}:{container_port['name']} refused "
                "by the NetworkPolicies")


@needs_helm
def test_the_evaluator_refuses_what_the_production_policies_refuse():
    """The same policies keep out what they should: a pod of another namespace, or another
    component of the release, cannot reach the gRPC port; the gateway namespace can; the test
    pod reaches the gRPC port only (not e.g. the metrics port, which is monitoring's)."""
    docs = render_in_namespace(VALUES_FILES["production"])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    (test_pod,) = [p for p in helm_test_pods(docs) if "ingestion" in p.name]
    [(ingestion, grpc)] = backends(docs, *dialled(docs, test_pod.name))
    assert grpc["name"] == "grpc"
    metrics = next(p for p in ingestion.ports if p["name"] == "metrics")
    mining = Pod("mining", {**test_pod.labels, "app.kubernetes.io/component": "mining"},
                 NAMESPACE)
    stranger = Pod("x", test_pod.labels, "default")  # the test pod's labels, another namespace
    gateway = Pod("gw", {"app": "envoy"}, "gateway")
    monitoring = Pod("prom", {"app": "prometheus"}, "monitoring")
    assert not admitted(policies, mining, ingestion, grpc)
    assert not admitted(policies, stranger, ingestion, grpc)
    assert not admitted(policies, test_pod, ingestion, metrics)
    assert admitted(policies, gateway, ingestion, grpc)
    assert admitted(policies, monitoring, ingestion, metrics)
    # and nothing may reach a test pod (the no-ingress policy)
    assert not admitted(policies, gateway, test_pod, {"containerPort": 8080, "name": "x"})
