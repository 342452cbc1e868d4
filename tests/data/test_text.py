import gzip
import json

import pytest
import torch

from birdbone_core.data.corpus import SLICES, shipped_path
from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.errors import BirdboneError


class ByteTok:
    """A tokenizer stand-in: one token per byte, BOS = 256."""
    bos_token_id = 256

    def __call__(self, text, add_special_tokens=True, **kw):
        ids = list(text.encode())
        return {"input_ids": ([256] if add_special_tokens else []) + ids}


def test_slices_are_disjoint_and_shipped():
    seen = set()
    for ranges in SLICES.values():
        idx = {i for lo, hi in ranges for i in range(lo, hi)}
        assert not idx & seen
        seen |= idx
    assert seen == set(range(497))
    calib, _ = read_text(None, "calib")
    ev, _ = read_text(None, "eval")
    assert calib.startswith("===== tutorial/") and ev.startswith("===== reference/")
    assert shipped_path("calib").is_file()


def test_read_jsonl_gz_and_errors(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert read_text(p, "eval")[0] == "hello\n\nworld"
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(BirdboneError, match=r"b.jsonl:2: each JSONL line needs"):
        read_text(bad, "eval")
    with pytest.raises(BirdboneError, match="not found"):
        read_text(tmp_path / "missing.txt", "eval")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(BirdboneError, match="empty"):
        read_text(tmp_path / "e.txt", "eval")


def test_calibration_blocks_are_seeded_and_start_with_bos():
    text = "abcdefghij" * 100
    a = calibration_blocks(ByteTok(), text, 5, 32, seed=1)
    b = calibration_blocks(ByteTok(), text, 5, 32, seed=1)
    c = calibration_blocks(ByteTok(), text, 5, 32, seed=2)
    assert a.shape == (5, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 256).all()
    with pytest.raises(BirdboneError, match="fewer than one sample"):
        calibration_blocks(ByteTok(), "short", 1, 32, 0)


def test_evaluation_chunks_follow_llamacpp():
    text = "".join(chr(97 + i % 26) for i in range(1000))
    ch = evaluation_chunks(ByteTok(), text, 64, max_chunks=None)
    assert ch.shape == (15, 64) and (ch[:, 0] == 256).all()
    assert ch[1, 1].item() == ord(text[65])                  # consecutive, no overlap
    assert evaluation_chunks(ByteTok(), text, 64, max_chunks=3).shape == (3, 64)
