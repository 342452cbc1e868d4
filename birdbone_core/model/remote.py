"""Models from S3: `--model s3://BUCKET/PREFIX/` names a checkpoint folder (a Hugging Face directory or a
folder holding one .gguf), e.g. one the nightly DAG found. It is downloaded once into the model cache,

    $BIRDBONE_CACHE/s3/<sha256 of the listing>/      (the listing: every object's key, size and ETag)

and every step loads the local copy. The same bytes are fetched once whatever the folder is called; a
changed checkpoint lists differently and is fetched again. The copy appears only when complete (a
download into a temp folder, then a rename), so a step that dies mid-download leaves nothing half-written.
Endpoint for MinIO or any S3-compatible store: env BIRDBONE_S3_ENDPOINT (as `birdbone publish`);
credentials come from boto3's usual chain (env, config files, instance roles), never from arguments.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.model.default import cache_dir_default
from birdbone_core.ops.artifacts import ENV_ENDPOINT

MAX_OBJECTS = 10_000          # a checkpoint folder, not a bucket


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (BUCKET, "PREFIX/"); the prefix always names a folder."""
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket or not prefix.strip("/"):
        raise BirdboneError(f"{uri}: give a checkpoint folder as s3://BUCKET/PREFIX/")
    return bucket, prefix.strip("/") + "/"


def listing_sha256(objects: list[tuple[str, int, str]]) -> str:
    """sha256 of sorted (key relative to the folder, size, ETag) rows: the identity of a checkpoint."""
    h = hashlib.sha256()
    for key, size, etag in sorted(objects):
        h.update(f"{key}\0{size}\0{etag.strip(chr(34))}\n".encode())
    return h.hexdigest()


def list_objects(fs, bucket: str, prefix: str) -> list[tuple[str, int, str]]:
    """(key relative to prefix, size, ETag) of every object under the folder."""
    found = fs.find(f"{bucket}/{prefix}", detail=True)
    if len(found) > MAX_OBJECTS:
        raise BirdboneError(f"s3://{bucket}/{prefix}: more than {MAX_OBJECTS} objects; name one checkpoint")
    root = f"{bucket}/{prefix}"
    return [(path[len(root):], int(info.get("size", 0)), str(info.get("ETag", "")))
            for path, info in found.items() if info.get("type") != "directory" and path.startswith(root)]


def fetch_s3(uri: str) -> Path:
    """The local copy of checkpoint folder `uri` (downloaded now unless the cache already holds it)."""
    bucket, prefix = split_s3_uri(uri)
    try:
        import s3fs
    except ImportError:
        raise BirdboneError(f"{uri}: S3 models need s3fs (pip install 'birdbone-core[ops]')") from None
    try:
        endpoint = os.environ.get(ENV_ENDPOINT, "").strip() or None
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        objects = list_objects(fs, bucket, prefix)
        if not objects:
            raise BirdboneError(f"{uri}: no objects under this prefix")
        for rel, _, _ in objects:
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise BirdboneError(f"{uri}: object key {rel!r} would leave the checkpoint folder")
        dest = cache_dir_default() / "s3" / listing_sha256(objects)
        if dest.is_dir():
            return dest
        with atomic.staged_dir(dest) as tmp:
            for rel, size, _ in objects:
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{bucket}/{prefix}{rel}", str(target))
                if target.stat().st_size != size:
                    raise BirdboneError(f"{uri}{rel}: downloaded {target.stat().st_size} bytes, listed {size}")
        return dest
    except OSError as e:      # s3fs maps S3 errors (no bucket, access denied, no endpoint) to OSError
        raise BirdboneError(f"{uri}: {type(e).__name__}: {e}") from None
