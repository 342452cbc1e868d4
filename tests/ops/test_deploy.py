"""Deployment files: Kubernetes manifests, docker-compose stack, images. No cluster or Docker engine
here, so: parse everything, check it against what the code and the other files expect, and validate the
manifests against the Kubernetes schema when kubernetes-validate is available."""
import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import birdbone_core

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
IMAGES = ROOT / "images"
LOCK = dict(ln.split("==") for ln in (ROOT / "requirements/birdbone.txt").read_text().splitlines()
            if ln and not ln.startswith("#"))
SECRETISH = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)
# what KubernetesPodOperator calls (cncf.kubernetes 10.x): create/read/list/watch/patch/delete pods,
# read their logs, list events; exec only for an XCom sidecar
ALLOWED = {"pods": {"create", "get", "list", "watch", "patch", "delete"}, "pods/log": {"get"},
           "events": {"list", "watch"}, "pods/exec": {"create", "get"}}
REQUIRED = {"pods": {"create", "get", "list", "watch", "delete"}, "pods/log": {"get"}}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    out = {}
    for f in sorted(K8S.glob("*.yaml")):
        for d in _docs(f):
            assert {"apiVersion", "kind"} <= set(d), f
            if d["kind"] == "Kustomization":
                continue
            key = (d["kind"], d["metadata"].get("name") or d["metadata"].get("generateName"))
            assert key not in out, f"{key} defined twice"
            out[key] = d
    return out


def test_every_namespaced_object_lives_in_the_birdbone_namespace(manifests):
    assert ("Namespace", "birdbone") in manifests
    for (kind, name), d in manifests.items():
        if kind != "Namespace":
            assert d["metadata"].get("namespace") == "birdbone", (kind, name)
    kust = _docs(K8S / "kustomization.yaml")[0]
    assert all((K8S / r).is_file() for r in kust["resources"])
    assert "secret-s3.template.yaml" not in kust["resources"]     # created from the shell, never applied


def test_rbac_is_least_privilege_for_the_pod_operator(manifests):
    kinds = {k for k, _ in manifests}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    roles = [d for (k, _), d in manifests.items() if k == "Role"]
    assert len(roles) == 1
    granted: dict[str, set] = {}
    for rule in roles[0]["rules"]:
        assert rule["apiGroups"] == [""], rule
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "resourceNames" not in rule
        for res in rule["resources"]:
            granted.setdefault(res, set()).update(rule["verbs"])
    assert set(granted) <= set(ALLOWED), granted
    for res, verbs in granted.items():
        assert verbs <= ALLOWED[res], (res, verbs - ALLOWED[res])
    for res, verbs in REQUIRED.items():
        assert verbs <= granted.get(res, set()), res
    assert "secrets" not in granted
    binding = next(d for (k, _), d in manifests.items() if k == "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": roles[0]["metadata"]["name"]}
    for s in binding["subjects"]:
        assert ("ServiceAccount", s["name"]) in manifests
    pod = manifests[("Pod", "birdbone-step")]
    # the step pods' own identity has no role and no API token
    sa = pod["spec"]["serviceAccountName"]
    assert sa not in {s["name"] for s in binding["subjects"]}
    assert manifests[("ServiceAccount", sa)]["automountServiceAccountToken"] is False


def test_gpu_pod_template(manifests):
    pod = manifests[("Pod", "birdbone-step")]
    spec = pod["spec"]
    (c,) = spec["containers"]
    assert c["name"] == "base" and c["command"] == ["birdbone"]             # KubernetesPodOperator's container
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "H100" in spec["nodeSelector"]["nvidia.com/gpu.product"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # S3 credentials only by reference to the secret; no secret-looking value inline
    secret = manifests[("Secret", "birdbone-s3")]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert set(refs) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(r["name"] == "birdbone-s3" and r["key"] in secret["stringData"] for r in refs.values())
    assert not [e for e in c["env"] if SECRETISH.search(e["name"]) and "value" in e]
    # every referenced object is defined
    for v in spec["volumes"]:
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in manifests
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in spec["volumes"]}
    for ef in c["envFrom"]:
        cm = manifests[("ConfigMap", ef["configMapRef"]["name"])]
        assert "BIRDBONE_PUSHGATEWAY" in cm["data"] and "BIRDBONE_DVC_REMOTE" in cm["data"]
        assert not [k for k in cm["data"] if SECRETISH.search(k)]
    assert c["image"].startswith("birdbone-core:" + birdbone_core.__version__)


def test_secret_template_has_no_values(manifests):
    secret = manifests[("Secret", "birdbone-s3")]
    assert "data" not in secret and set(secret["stringData"].values()) == {""}


def test_pushgateway_endpoint_matches_its_service(manifests):
    svc = manifests[("Service", "pushgateway")]
    url = manifests[("ConfigMap", "birdbone-ops")]["data"]["BIRDBONE_PUSHGATEWAY"]
    assert url == f"http://pushgateway.birdbone.svc.cluster.local:{svc['spec']['ports'][0]['port']}"
    dep = manifests[("Deployment", "pushgateway")]
    assert dep["spec"]["selector"]["matchLabels"].items() <= svc["spec"]["selector"].items()


def test_manifests_agree_with_the_airflow_operator_settings(manifests):
    tree = ast.parse((ROOT / "operators" / "settings.py").read_text())
    node = next((n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 and getattr(getattr(n, "targets", [None])[0] if isinstance(n, ast.Assign) else n.target,
                             "id", None) == "K8S_DEFAULTS"), None)
    assert node is not None, "operators/settings.py defines no K8S_DEFAULTS"
    d = ast.literal_eval(node.value)
    pod = manifests[("Pod", "birdbone-step")]
    spec, (c,) = pod["spec"], pod["spec"]["containers"]
    assert d["namespace"] == "birdbone"
    assert d["service_account"] == spec["serviceAccountName"]
    assert d["node_selector"] == spec["nodeSelector"] and d["tolerations"] == spec["tolerations"]
    assert d["image"] == c["image"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    assert {d["model_cache_pvc"], d["runs_pvc"]} == claims
    assert ("Secret", d["s3_secret"]) in manifests
    assert set(d["s3_secret_keys"]) <= set(manifests[("Secret", d["s3_secret"])]["stringData"])


def _kubernetes_validate() -> str | None:
    return shutil.which("kubernetes-validate") or next(
        (str(p) for p in [ROOT / ".venv-airflow" / "bin" / "kubernetes-validate"] if p.is_file()), None)


def test_manifests_validate_against_the_kubernetes_schema():
    exe = _kubernetes_validate()
    if exe is None:
        pytest.skip("kubernetes-validate not installed")
    files = [str(f) for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"]
    r = subprocess.run([exe, "-k", "1.31", "--strict", *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- docker-compose --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def test_compose_stack(compose):
    svc = compose["services"]
    assert {"postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
            "minio", "pushgateway", "prometheus", "grafana"} <= set(svc)
    cmds = {n: " ".join(s.get("command", [])) if isinstance(s.get("command"), list) else s.get("command", "")
            for n, s in svc.items()}
    for name, sub in (("airflow-apiserver", "api-server"), ("airflow-scheduler", "scheduler"),
                      ("airflow-dag-processor", "dag-processor"), ("airflow-triggerer", "triggerer")):
        assert f"airflow {sub}" in cmds[name]
        assert svc[name]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        assert svc[name]["environment"]["BIRDBONE_PUSHGATEWAY"] == "http://pushgateway:9091"
    for name, s in svc.items():
        image = s.get("image", "")
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), (name, image)  # pinned tags
        for p in s.get("ports", []):
            assert p.startswith("127.0.0.1:"), (name, p)                     # nothing on all interfaces
        env = s.get("environment", {})
        for k, v in env.items():                 # secrets only by ${VAR} from .env / the shell
            if (SECRETISH.search(k) and not k.endswith("_FILE")) or "@" in str(v):
                assert re.search(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(v)), (name, k, v)
        for vol in s.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), (name, src)
        if "build" in s:
            assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).is_file()


def test_compose_wires_prometheus_and_grafana(compose):
    svc = compose["services"]
    prom_mount = next(v for v in svc["prometheus"]["volumes"] if v.startswith("./prometheus/"))
    cfg = yaml.safe_load((ROOT / prom_mount.split(":")[0]).read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "pushgateway")
    assert job["honor_labels"] is True and job["static_configs"][0]["targets"] == ["pushgateway:9091"]
    mounts = dict(v.split(":")[:2] for v in svc["grafana"]["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/birdbone.yaml").read_text())["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert (ROOT / "grafana/dashboards/birdbone.json").is_file()
    assert mounts["./grafana/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"


# ---- images ------------------------------------------------------------------------------------------
def _dockerfile(name: str) -> tuple[str, dict[str, str]]:
    text = (IMAGES / name).read_text()
    return text, dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.airflow"])
def test_images_install_the_tested_versions(name):
    text, args = _dockerfile(name)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    installed = md.version("birdbone-core")              # the package the tests import
    assert args["BIRDBONE_VERSION"] == pyproject == birdbone_core.__version__ == installed
    import torch
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert args["PIP_VERSION"] == md.version("pip") == LOCK["pip"]
    assert re.search(r'test "\$\(\S*birdbone --version\)" = "birdbone \$\{BIRDBONE_VERSION\}"', text)
    assert re.search(r"^COPY .*requirements/birdbone\.txt /tmp/constraints\.txt$", text, re.M)
    assert "-c /tmp/constraints.txt" in text
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(re.search(r":\d[\w.-]*$", f) for f in froms)           # pinned base tags
    if froms[0].startswith("python:"):
        assert froms[0].split(":")[1].startswith(".".join(map(str, sys.version_info[:3])))
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")               # runs as non-root
    for line in re.findall(r"pip install ([^\n\\&]+)", text):               # every pip install pinned
        for spec in re.findall(r'"([^"]+)"', line):
            assert "==" in spec or spec.startswith("/"), (name, spec)
    ignore = (IMAGES / f"{name}.dockerignore").read_text().split()
    assert {"!pyproject.toml", "!birdbone_core/", "!requirements/birdbone.txt"} <= set(ignore)


def test_cpu_and_cuda_images_differ_only_where_they_must():
    cpu, cpu_args = _dockerfile("Dockerfile.cpu")
    cuda, cuda_args = _dockerfile("Dockerfile.cuda")
    assert cpu_args == cuda_args
    assert "download.pytorch.org/whl/cpu" in cpu and "download.pytorch.org" not in cuda
    assert re.search(r'ENTRYPOINT \["birdbone"\]', cpu) and re.search(r'ENTRYPOINT \["birdbone"\]', cuda)
