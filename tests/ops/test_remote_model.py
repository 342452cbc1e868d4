"""`--model s3://BUCKET/PREFIX/`: a checkpoint folder on a real S3 API server (moto over HTTP) is fetched
once into the model cache, named by its listing's hash, and the run loads the local copy."""
import json
import os

import pytest
from clitools import assert_clean_failure, cli

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

BUCKET = "birdbone-checkpoints"


@pytest.fixture
def s3_env(s3_server, tmp_path, monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "test-secret",
                 "AWS_DEFAULT_REGION": "us-east-1", "BIRDBONE_S3_ENDPOINT": s3_server,
                 "BIRDBONE_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    return s3


def _upload(s3, directory, prefix: str) -> None:
    for f in sorted(directory.iterdir()):
        s3.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/_COMPLETE", Body=b"")


def test_s3_checkpoint_is_fetched_once_and_run(s3_env, tiny_path, tmp_path):
    _upload(s3_env, tiny_path, "ckpts/tiny-a")
    r = cli("init", tmp_path / "run-a", "--model", f"s3://{BUCKET}/ckpts/tiny-a/")
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "run-a" / "run.json").read_text())["model"]
    assert model["spec"] == f"s3://{BUCKET}/ckpts/tiny-a/" and model["kind"] == "hf_dir"
    local = tmp_path / "cache" / "s3"
    (copy,) = local.iterdir()
    assert model["path"] == str(copy)
    for f in tiny_path.iterdir():
        assert (copy / f.name).read_bytes() == f.read_bytes(), f.name
    stamp = os.stat(copy / "model.safetensors").st_mtime_ns
    # the same bytes under another name: the cached copy, not a second download
    _upload(s3_env, tiny_path, "ckpts/tiny-renamed")
    assert cli("init", tmp_path / "run-b", "--model", f"s3://{BUCKET}/ckpts/tiny-renamed").returncode == 0
    assert [p.name for p in local.iterdir()] == [copy.name]
    assert os.stat(copy / "model.safetensors").st_mtime_ns == stamp
    # a changed checkpoint is a new copy
    s3_env.put_object(Bucket=BUCKET, Key="ckpts/tiny-a/README.md", Body=b"changed\n")
    assert cli("init", tmp_path / "run-c", "--model", f"s3://{BUCKET}/ckpts/tiny-a/").returncode == 0
    assert len(list(local.iterdir())) == 2


def test_missing_s3_checkpoint_is_one_error_line(s3_env, tmp_path):
    r = cli("init", tmp_path / "run", "--model", f"s3://{BUCKET}/no-such-checkpoint/")
    assert_clean_failure(r, "no objects")
    assert not (tmp_path / "run").exists()
    r = cli("init", tmp_path / "run", "--model", "s3://no-such-bucket-xyz/ckpt/")
    assert_clean_failure(r, "s3://no-such-bucket-xyz/ckpt/")
    r = cli("init", tmp_path / "run", "--model", f"s3://{BUCKET}")
    assert_clean_failure(r, "s3://BUCKET/PREFIX/")
    assert not (tmp_path / "run").exists()
