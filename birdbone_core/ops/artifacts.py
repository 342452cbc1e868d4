"""A run's artifacts in S3-backed DVC: `publish` tracks and pushes them, `pull` restores them elsewhere.

    publish(RUN)   RUN becomes a DVC project (`dvc init --no-scm`, no git needed in a pod); every
                   top-level entry of RUN (run.json, recipe.yaml, ledger/, pruned/, model-*.gguf,
                   metrics.json, waves/, ...; dot-entries and *.dvc excluded) is `dvc add`ed and the
                   cache is `dvc push`ed to the remote. Then the run's index -- the text of its .dvc
                   files -- is written to REMOTE/runs/<run_id>/index.json, last, so a remote index only
                   ever names data that is already in the remote. Re-publishing pushes only new objects
                   (DVC is content-addressed) and leaves an unchanged index alone.
    pull(RUN_ID)   a fresh directory gets the index's .dvc files, then `dvc pull`: the same bytes, and
                   `birdbone revert/diff/log` work on it (the ledger holds every wave).

Remote: `--remote` / env BIRDBONE_DVC_REMOTE (s3://BUCKET/PREFIX, or a local path); endpoint for
MinIO or any S3-compatible store: `--endpoint-url` / env BIRDBONE_S3_ENDPOINT. Credentials only ever
come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or the
pod's IAM role): they are never written to .dvc/config, the index or a log line, and a remote URL
carrying credentials is refused.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from birdbone_core import __version__, atomic
from birdbone_core.errors import BirdboneError

ENV_REMOTE = "BIRDBONE_DVC_REMOTE"
ENV_ENDPOINT = "BIRDBONE_S3_ENDPOINT"
ENV_RUN_ID = "BIRDBONE_RUN_ID"
REMOTE_NAME = "birdbone"
INDEX_FORMAT = "birdbone-artifacts/1"
# temp names of birdbone_core.atomic (".name.XXXX.tmp", ".name.old") never belong in an artifact
DVCIGNORE = ".*.tmp\n.*.old\n__pycache__/\n"


@dataclass(frozen=True)
class Remote:
    url: str                      # s3://bucket/prefix or a local directory
    endpoint_url: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def index_key(self, run_id: str) -> str:
        return f"runs/{run_id}/index.json"


@dataclass
class PublishResult:
    run_id: str
    tracked: list[str]
    pushed: int                   # objects uploaded by `dvc push` this time (0 = nothing new)
    index_uploaded: bool
    index_url: str


def resolve_remote(url: str | None, endpoint_url: str | None) -> Remote:
    url = (url or os.environ.get(ENV_REMOTE, "")).strip()
    endpoint = (endpoint_url or os.environ.get(ENV_ENDPOINT, "")).strip() or None
    if not url:
        raise BirdboneError(f"no artifact remote: pass --remote s3://BUCKET/PREFIX or set {ENV_REMOTE}")
    parts = urlsplit(url)
    if parts.scheme and len(parts.scheme) > 1:     # (a one-letter "scheme" is a Windows drive)
        if parts.scheme != "s3":
            raise BirdboneError(f"{url}: unsupported artifact remote (use s3://BUCKET/PREFIX or a local path)")
        if "@" in parts.netloc or parts.password or parts.query:
            raise BirdboneError("the remote URL must not carry credentials; set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY in the environment instead")
        if not parts.netloc:
            raise BirdboneError(f"{url}: no bucket in the remote URL (s3://BUCKET/PREFIX)")
        url = url.rstrip("/")
    else:
        url = str(Path(url).resolve())
    if endpoint and "@" in urlsplit(endpoint).netloc:
        raise BirdboneError("the endpoint URL must not carry credentials")
    return Remote(url, endpoint)


def default_run_id(run_root: Path) -> str:
    return os.environ.get(ENV_RUN_ID) or Path(run_root).resolve().name


# ---- the run index on the remote (tiny JSON; s3fs -- DVC's own S3 client -- or plain files) -------------
def _s3(remote: Remote):
    import s3fs

    # a fresh client each time: s3fs caches listings per instance, and the index must be read fresh
    return s3fs.S3FileSystem(endpoint_url=remote.endpoint_url, skip_instance_cache=True)


def _index_path(remote: Remote, run_id: str) -> str:
    return f"{remote.url.removeprefix('s3://')}/{remote.index_key(run_id)}"


def read_index(remote: Remote, run_id: str) -> dict | None:
    key = remote.index_key(run_id)
    try:
        if remote.is_s3:
            try:
                body = _s3(remote).cat_file(_index_path(remote, run_id))
            except FileNotFoundError:
                return None
        else:
            p = Path(remote.url) / key
            if not p.is_file():
                return None
            body = p.read_bytes()
        return json.loads(body)
    except ValueError as e:
        raise BirdboneError(f"{remote.url}/{key}: corrupt run index ({e})") from None
    except Exception as e:
        raise BirdboneError(f"{remote.url}: cannot read {key}: {_short(e)}") from None


def write_index(remote: Remote, run_id: str, index: dict) -> None:
    key = remote.index_key(run_id)
    data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
    try:
        if remote.is_s3:
            _s3(remote).pipe_file(_index_path(remote, run_id), data)   # one PUT: readers see old or new
        else:
            atomic.write_bytes(Path(remote.url) / key, data)
    except Exception as e:
        raise BirdboneError(f"{remote.url}: cannot write {key}: {_short(e)}") from None


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# ---- DVC plumbing --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dvc_errors(what: str):
    """DVC errors as one-line BirdboneErrors; DVC's own chatter goes to stderr (stdout may be --json)."""
    try:
        from dvc.exceptions import DvcException
    except ImportError:
        raise BirdboneError("DVC is not installed: pip install 'birdbone-core[ops]'") from None
    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)               # its info lines go to stdout, which may be --json
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except DvcException as e:
        raise BirdboneError(f"{what}: {_short(e)}") from None
    finally:
        log.setLevel(level)


def _open_repo(root: Path, remote: Remote):
    """RUN as a DVC project (created once, without git) with the remote configured -- URL and endpoint
    only: credentials stay in the environment."""
    from dvc.repo import Repo

    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=True)
    if not (root / ".dvcignore").is_file() or (root / ".dvcignore").read_text() != DVCIGNORE:
        atomic.write_text(root / ".dvcignore", DVCIGNORE)
    repo = Repo(str(root))
    want = {"url": remote.url, **({"endpointurl": remote.endpoint_url} if remote.endpoint_url else {})}
    conf = repo.config.read("repo")
    core = conf.get("core", {})
    if conf.get("remote", {}).get(REMOTE_NAME) != want or core.get("remote") != REMOTE_NAME \
            or core.get("analytics") is not False:
        with repo.config.edit("repo") as c:
            c["remote"][REMOTE_NAME] = want
            c["core"]["remote"] = REMOTE_NAME
            c["core"]["analytics"] = False      # a `dvc` CLI run in RUN (pods, air-gapped hosts) stays offline
        repo.close()
        repo = Repo(str(root))
    return repo


def trackable(root: Path) -> list[str]:
    """Top-level entries of RUN that are artifacts (sorted): everything but dot-entries and .dvc files."""
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and not p.name.endswith(".dvc")
                  and (p.is_file() or p.is_dir()) and not p.is_symlink())


def publish(run_root: Path, remote_url: str | None = None, endpoint_url: str | None = None,
            run_id: str | None = None, jobs: int = 4) -> PublishResult:
    """Track every artifact of RUN with DVC, push what is new, then (last) upload the run's index."""
    root = Path(run_root).resolve()
    if not (root / "run.json").is_file():
        raise BirdboneError(f"{run_root}: not a birdbone run directory (no run.json)")
    remote = resolve_remote(remote_url, endpoint_url)
    run_id = run_id or default_run_id(root)
    if "/" in run_id or run_id in ("", ".", ".."):
        raise BirdboneError(f"{run_id!r}: a run id cannot contain '/'")
    with _dvc_errors(f"publishing {run_root}"):
        repo = _open_repo(root, remote)
        try:
            targets = trackable(root)
            for stale in root.glob("?*.dvc"):           # an output that is gone (e.g. a deleted state)
                if stale.is_file() and not stale.name.startswith(".") and stale.name[:-4] not in targets:
                    stale.unlink()
            repo.add([str(root / t) for t in targets])
            pushed = int(repo.push(remote=REMOTE_NAME, jobs=jobs) or 0)
        finally:
            repo.close()
    dvc_files = {f"{t}.dvc": (root / f"{t}.dvc").read_text() for t in targets}
    index = {"format": INDEX_FORMAT, "run_id": run_id, "dvc_files": dvc_files}
    old = read_index(remote, run_id)
    uploaded = old is None or {k: old.get(k) for k in index} != index
    if uploaded:
        index["published"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        index["birdbone"] = __version__
        write_index(remote, run_id, index)
    return PublishResult(run_id, targets, pushed, uploaded, f"{remote.url}/{remote.index_key(run_id)}")


def pull(run_id: str, out_dir: Path, remote_url: str | None = None, endpoint_url: str | None = None,
         model: str | None = None, jobs: int = 4) -> dict:
    """Restore a published run into `out_dir` (new or a previous pull of the same run). `model`
    points the copy's manifest at a local copy of the base model; without it, a base path that does not
    exist here is replaced by the run's own base copy (RUN/base/). Revert rebuilds every wave from that
    base and checks every tensor hash, so a wrong base is refused, not silently used."""
    remote = resolve_remote(remote_url, endpoint_url)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / ".dvc").is_dir()):
        raise BirdboneError(f"{out_dir}: exists and is not a pulled run; choose a new directory")
    index = read_index(remote, run_id)
    if index is None:
        raise BirdboneError(f"{remote.url}: no published run {run_id!r} (no {remote.index_key(run_id)})")
    if index.get("format") != INDEX_FORMAT:
        raise BirdboneError(f"{remote.url}/{remote.index_key(run_id)}: not a {INDEX_FORMAT} index")
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for name, text in sorted(index["dvc_files"].items()):
        if "/" in name or not name.endswith(".dvc") or name.startswith("."):
            raise BirdboneError(f"run index names a bad file {name!r}")
        outs = (yaml.safe_load(text) or {}).get("outs") if isinstance(text, str) else None
        if not outs or [o.get("path") for o in outs] != [name[:-4]]:   # each pointer restores its own name only
            raise BirdboneError(f"run index entry {name!r} does not point at {name[:-4]!r}")
        atomic.write_text(out / name, text)
        names.append(name)
    with _dvc_errors(f"pulling {run_id}"):
        repo = _open_repo(out, remote)
        try:
            result = repo.pull(targets=[str(out / n) for n in names], remote=REMOTE_NAME, jobs=jobs, force=True)
        finally:
            repo.close()
    if model is not None:
        relocate_model(out, model)
    else:
        _use_pulled_base_if_needed(out)
    stats = result.get("stats", {}) if isinstance(result, dict) else {}
    return {"run_id": run_id, "dir": str(out), "fetched": int(stats.get("fetched", 0)),
            "outputs": [n[:-4] for n in names]}


def _use_pulled_base_if_needed(run_dir: Path) -> None:
    """On another machine the manifest's base model path usually does not exist; the run's own base copy
    (RUN/base/, written by `prepare`) does, and the ledger's hashes check it tensor by tensor."""
    try:
        path = json.loads((run_dir / "run.json").read_text())["model"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not Path(path).is_absolute() or not Path(path).exists():
        if (run_dir / "base" / "config.json").is_file():
            relocate_model(run_dir, str(run_dir / "base"))


def relocate_model(run_dir: Path, model: str) -> None:
    """Point a pulled run's manifest at a local copy of its base model (kept: the published path)."""
    manifest = Path(run_dir) / "run.json"
    m = json.loads(manifest.read_text())
    if not Path(model).exists():
        raise BirdboneError(f"{model}: no such base model")
    m["model"].setdefault("published_path", m["model"]["path"])
    m["model"]["path"] = str(Path(model).resolve())
    atomic.write_json(manifest, m)

