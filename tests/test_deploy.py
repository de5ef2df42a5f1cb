"""deploy/kubernetes/ and deploy/compose/ (issue #13), checked offline: no cluster or
container engine runs here. The Kubernetes manifests are validated against the
Kubernetes OpenAPI schemas bundled with ``kubernetes-validate`` (strict: an unknown
field fails); the compose file against the Compose Specification's JSON schema
vendored in ``check-jsonschema``. Then what the schemas cannot know: the probes,
the grace period and the settings fit this worker."""

from __future__ import annotations

import copy
import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from wa_worker import daemon
from wa_worker.config import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
# the oldest Kubernetes minor still commonly run, and the newest the validator knows
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# settings of the fleet contract that another branch adds to config.py (leases): accepted here by name
FLEET_SETTINGS = {"WORKER_ID", "MAX_INSTANCES"}
# the graceful stop, at most: runners, the acknowledgements' flush, the HTTP server's close,
# then the final POST /leases (one proxy call: EDGE_TIMEOUT_S)
GRACEFUL_STOP_S = daemon.SHUTDOWN_GRACE_S + 1 + 3 + Settings.model_fields["EDGE_TIMEOUT_S"].default


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: _docs(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def _kind(kind: str, name: str = "wa-worker") -> dict[str, Any]:
    return next(d for docs in _manifests().values() for d in docs
                if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_kubernetes_manifests_are_valid_against_the_schemas(version):
    manifests = _manifests()
    assert {"deployment.yaml", "secret.yaml", "pdb.yaml", "configmap.yaml", "service.yaml",
            "statefulset.yaml"} <= set(manifests)
    for docs in manifests.values():
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any violation
    # the validator is real: a wrong type and an unknown field are refused
    bad = copy.deepcopy(_kind("Deployment"))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    bad = copy.deepcopy(_kind("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_kustomization_lists_the_manifests():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    listed = set(kust["resources"])
    assert all((K8S / r).is_file() for r in listed)
    # statefulset.yaml is the alternative to deployment.yaml, never applied with it
    assert listed == set(_manifests()) - {"statefulset.yaml"}


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet"])
def test_the_pods_fit_the_worker(kind):
    workload = _kind(kind)
    pod = workload["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= GRACEFUL_STOP_S
    (c,) = pod["containers"]
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    env = {e["name"]: e for e in c["env"]}
    assert env["PORT"]["value"] == str(port)
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    # liveness gives a stopping worker (503 on /ready, /health still 200) no reason to be killed
    assert c["livenessProbe"]["periodSeconds"] * c["livenessProbe"]["failureThreshold"] >= 60
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    # the journal's place: /data, an emptyDir (Deployment) or a per-pod claim (StatefulSet)
    assert env["STATE_DB"]["value"].startswith("/data/") and env["AUTH_DIR"]["value"].startswith("/data/")
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    if kind == "Deployment":
        assert any(v["name"] == "data" and "emptyDir" in v for v in pod["volumes"])
    else:
        assert workload["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    labels = workload["spec"]["template"]["metadata"]["labels"]
    for selector in (workload["spec"]["selector"]["matchLabels"], _kind("PodDisruptionBudget")["spec"]["selector"]
                     ["matchLabels"], _kind("Service")["spec"]["selector"]):
        assert selector.items() <= labels.items()


def test_secret_and_configmap_hold_worker_settings_only():
    fields = set(Settings.model_fields) | FLEET_SETTINGS
    secret = _kind("Secret")["stringData"]
    assert set(secret) == {"WORKER_SECRET", "DATABASE_URL", "API_TOKEN"}
    assert set(_kind("ConfigMap")["data"]) <= fields
    # the secrets are never in the ConfigMap
    assert not set(_kind("ConfigMap")["data"]) & {"WORKER_SECRET", "DATABASE_URL", "API_TOKEN"}
    assert _kind("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def _compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_the_compose_file_is_valid_against_the_compose_spec():
    schema = _compose_schema()
    doc = yaml.safe_load(COMPOSE.read_text())
    jsonschema.validate(doc, schema)  # raises on any violation
    bad = copy.deepcopy(doc)
    bad["services"]["worker-1"]["stop_grace_period"] = ["40s"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(doc)
    bad["services"]["worker-1"]["restrat"] = "always"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_the_compose_fleet_is_postgres_and_three_workers():
    doc = yaml.safe_load(COMPOSE.read_text())  # YAML anchors and merge keys resolved as Compose does
    services = doc["services"]
    assert services["postgres"]["image"].startswith("postgres:15")
    assert "healthcheck" in services["postgres"]
    assert services["pgbouncer"]["profiles"] == ["pgbouncer"]  # optional
    assert services["pgbouncer"]["environment"]["POOL_MODE"] == "transaction"
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert len(workers) == 3
    ids = {s["environment"]["WORKER_ID"] for s in workers.values()}
    volumes = {s["volumes"][0] for s in workers.values()}
    assert len(ids) == 3 and len(volumes) == 3, "each worker its own id and its own journal"
    fields = set(Settings.model_fields) | FLEET_SETTINGS
    for s in workers.values():
        env = s["environment"]
        assert set(env) <= fields
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        grace = s["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) >= GRACEFUL_STOP_S
        assert all(v.endswith(":/data") for v in s["volumes"])
