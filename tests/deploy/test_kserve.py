"""deploy/kserve: the InferenceService manifest against KServe's CRD schema (a vendored subset, no
cluster), its pod against Kubernetes' own schema (kubernetes-validate), its `ember serve` command line
against ember's parser, and the Dockerfile (built only where a Docker daemon answers)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from ember.cliconfig import parse_config
from ember.commands.serve import ServeConfig

REPO = Path(__file__).resolve().parents[2]
KSERVE = REPO / "deploy" / "kserve"
SCHEMA = json.loads((Path(__file__).parent / "data" / "kserve_inferenceservice_v1beta1.subset.json").read_text())


@pytest.fixture(scope="module")
def isvc() -> dict:
    return yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())


def errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_manifest_is_a_valid_inference_service(isvc):
    assert errors(isvc) == []


def test_the_schema_catches_mistakes(isvc):
    import copy

    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplica"] = 1                          # a misspelt field
    bad["spec"]["predictor"]["scaleMetric"] = "tokens"                  # not one of KServe's metrics
    container = bad["spec"]["predictor"]["containers"][0]
    container["resources"]["limits"]["memory"] = "4 GB"                  # not a Kubernetes quantity
    container["readinessProbe"]["httpGet"].pop("port")
    bad["metadata"]["name"] = "Ember_SmolLM2"
    found = "\n".join(errors(bad))
    for what in ("minReplica", "tokens", "4 GB", "'port' is a required property", "Ember_SmolLM2"):
        assert what in found, (what, found)


def test_predictor_pod_is_valid_kubernetes(isvc):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    predictor = isvc["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]},
           "spec": {"containers": predictor["containers"], **({"volumes": predictor["volumes"]}
                                                                 if "volumes" in predictor else {})}}
    kv.validate(pod, desired_version=kv.latest_version(), strict=True)  # raises on unknown or mistyped fields


def test_container_runs_ember_serve_as_kserve_expects(isvc):
    [container] = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"      # the name KServe's storage initializer looks for
    args = container["args"]
    assert args[0] == "serve"
    cfg = parse_config(ServeConfig, args[1:], "ember serve")   # the flags exist and their values parse
    port = container["ports"][0]["containerPort"]
    assert cfg.port == port and cfg.host == "0.0.0.0"
    assert str(cfg.model).startswith("/mnt/models")        # where the storage initializer puts STORAGE_URI
    assert {e["name"]: e["value"] for e in container["env"]}["STORAGE_URI"].startswith(("pvc://", "s3://", "gs://",
                                                                                        "hf://", "https://"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port}
    assert cfg.threads is not None and cfg.threads < int(container["resources"]["limits"]["cpu"])
    ann = isvc["metadata"]["annotations"]
    assert ann["prometheus.kserve.io/port"] == str(port) and ann["prometheus.kserve.io/path"] == "/metrics"


def test_dockerfile_copies_what_exists_and_runs_a_valid_command():
    text = (KSERVE / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for src in sources:
                assert (REPO / src).exists(), src
    cmd = json.loads(next(line for line in text.splitlines() if line.startswith("CMD "))[4:])
    assert cmd[0] == "serve"
    cfg = parse_config(ServeConfig, cmd[1:], "ember serve")
    assert cfg.port == 8080 and cfg.host == "0.0.0.0"
    assert "ARG CUDA=" in text   # the optional CUDA build argument


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_daemon(), reason="needs a running Docker daemon (docker info)")
def test_dockerfile_builds_and_the_image_runs_ember(tmp_path):
    tag = "ember-test:cpu"
    subprocess.run(["docker", "build", "-f", str(KSERVE / "Dockerfile"), "-t", tag, str(REPO)], check=True,
                   timeout=3600)
    out = subprocess.run(["docker", "run", "--rm", tag, "serve", "--help"], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert "--replicas" in out and "--model" in out
