"""What kubernetes-validate's schemas cannot say about rendered crm-relay manifests.

Usage: python scripts/check_k8s.py RENDERED.yaml ...   (scripts/check_deploy renders them)

- every pod meets the restricted Pod Security Standard, with a read-only root filesystem and no
  service-account token;
- every volume has exactly one source (a patch that adds one without removing the other renders
  and passes the schema, and the API server then refuses it);
- the Service is ClusterIP and exposes no ops port (OPS_PORT: /metrics, /health, /admin), and
  the Ingress routes only the intake and webhook paths;
- a Deployment of more than one replica takes DATABASE_URL from a Secret and mounts no claim;
- a PodDisruptionBudget selects the pods.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

USER = 10001
PUBLIC_PATHS = {"/api/v1/forms", "/webhooks"}
VOLUME_SOURCES = {"emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected"}


def pod_problems(name: str, pod: dict[str, Any]) -> list[str]:
    """The restricted Pod Security Standard and our own rules for one pod template."""
    out = []
    ctx = {k: None for k in ("runAsNonRoot", "runAsUser", "seccompProfile")}
    ctx.update(pod.get("securityContext", {}))
    want = {"runAsNonRoot": True, "runAsUser": USER, "seccompProfile": {"type": "RuntimeDefault"}}
    out += [f"{name}: pod securityContext.{k} must be {v}" for k, v in want.items() if ctx[k] != v]
    if pod.get("automountServiceAccountToken") is not False:
        out.append(f"{name}: automountServiceAccountToken must be false")
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        out.append(f"{name}: no host namespaces")
    for c in pod.get("initContainers", []) + pod.get("containers", []):
        sc = c.get("securityContext", {})
        where = f"{name}/{c['name']}"
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc["capabilities"].get("add"):
            out.append(f"{where}: capabilities must drop ALL and add none")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{where}: readOnlyRootFilesystem must be true")
        if sc.get("privileged") or sc.get("runAsUser", USER) == 0:
            out.append(f"{where}: neither privileged nor root")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            out.append(f"{where}: /tmp must be a mounted volume (the root filesystem is read-only)")
    for volume in pod.get("volumes", []):
        sources = set(volume) - {"name"}
        if len(sources) != 1 or not sources <= VOLUME_SOURCES:
            out.append(f"{name}: volume {volume['name']} has sources {sorted(sources)}")
    return out


def deployment_problems(doc: dict[str, Any]) -> list[str]:
    name = f"Deployment/{doc['metadata']['name']}"
    pod = doc["spec"]["template"]["spec"]
    out = pod_problems(name, pod)
    if doc["spec"].get("replicas", 1) > 1:
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        ref = env.get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if not ref or ref.get("optional"):
            out.append(f"{name}: several replicas need DATABASE_URL from a required Secret key")
        if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])):
            out.append(f"{name}: several replicas cannot share a claim (and need none)")
    return out


def check(docs: list[dict[str, Any]]) -> list[str]:
    """Every problem found in one rendered variant."""
    out: list[str] = []
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    for doc in kinds.get("Deployment", []):
        out += deployment_problems(doc)
    configs = [d.get("data", {}) for d in kinds.get("ConfigMap", [])]
    ops_ports = {data["OPS_PORT"] for data in configs if "OPS_PORT" in data}
    for doc in kinds.get("Service", []):
        if doc["spec"].get("type", "ClusterIP") != "ClusterIP":
            out.append(f"Service/{doc['metadata']['name']}: must be ClusterIP")
        for port in doc["spec"].get("ports", []):
            if port.get("targetPort") == "ops" or str(port.get("targetPort")) in ops_ports:
                out.append(f"Service/{doc['metadata']['name']}: exposes the ops port")
    for doc in kinds.get("Ingress", []):
        paths = {p["path"] for r in doc["spec"]["rules"] for p in r["http"]["paths"]}
        if not paths <= PUBLIC_PATHS:
            out.append(f"Ingress: routes {sorted(paths - PUBLIC_PATHS)}, only {PUBLIC_PATHS}")
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in kinds.get("Deployment", [])]
    pdbs = [d["spec"]["selector"]["matchLabels"] for d in kinds.get("PodDisruptionBudget", [])]
    if not any(p.items() <= pod.items() for p in pdbs for pod in labels):
        out.append("no PodDisruptionBudget selects the Deployment's pods")
    return out


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        problems = check(docs)
        for problem in problems:
            print(f"{path}: {problem}")
        failed |= bool(problems)
        if not problems:
            print(f"{path}: {len(docs)} objects, restricted pods, private metrics and admin")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
