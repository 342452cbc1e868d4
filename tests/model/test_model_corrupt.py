"""Damaged files are reported as one-line BirdboneErrors naming the file, before heavy loading."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.model.load import load_model


def _expect_corrupt_safetensors(directory, file):
    with pytest.raises(BirdboneError) as err:
        load_model(str(directory))
    msg = str(err.value)
    assert msg.startswith(f"{file}: corrupt safetensors file (")
    assert "\n" not in msg
    return msg


def test_truncated_safetensors(tiny_dir):
    d = tiny_dir("llama")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    assert "truncated" in _expect_corrupt_safetensors(d, f)


def test_safetensors_garbage_length_prefix(tiny_dir):
    d = tiny_dir("qwen3")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = b"\xde\xad\xbe\xef\xde\xad\xbe\xef"
    f.write_bytes(bytes(data))
    _expect_corrupt_safetensors(d, f)


def test_safetensors_garbage_header_json(tiny_dir):
    d = tiny_dir("gemma3_text")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    assert "unreadable header" in _expect_corrupt_safetensors(d, f)


def test_safetensors_trailing_garbage(tiny_dir):
    d = tiny_dir("llama")
    f = d / "model.safetensors"
    with f.open("ab") as fh:
        fh.write(b"junk")
    _expect_corrupt_safetensors(d, f)


def test_tiny_garbage_file(tiny_dir):
    d = tiny_dir("llama")
    f = d / "model.safetensors"
    f.write_bytes(b"oops")
    assert "too short" in _expect_corrupt_safetensors(d, f)


def _write_gguf(path, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.02])
def test_truncated_gguf(tmp_path, keep):
    f = tmp_path / "m.gguf"
    _write_gguf(f)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BirdboneError) as err:
        load_model(str(f))
    assert str(err.value).startswith(f"{f}: truncated or corrupt GGUF (")


def test_gguf_bad_magic(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(BirdboneError, match="not a GGUF file"):
        load_model(str(f))


def test_gguf_bad_version(tmp_path):
    f = tmp_path / "m.gguf"
    _write_gguf(f)
    data = bytearray(f.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(BirdboneError, match="unsupported GGUF version 99"):
        load_model(str(f))


def test_gguf_unsupported_arch(tmp_path):
    f = tmp_path / "m.gguf"
    _write_gguf(f, arch="gpt2")
    with pytest.raises(BirdboneError, match=r"GGUF architecture 'gpt2' is not supported \(supported: gemma3, llama, qwen2, qwen3\)"):
        load_model(str(f))


def test_every_gguf_truncation_is_caught(tiny_gguf, tmp_path):
    from birdbone_core.model.checks import check_gguf

    data = tiny_gguf[0].read_bytes()
    f = tmp_path / "cut.gguf"
    for cut in list(range(0, 4096, 61)) + list(range(4096, len(data), max(1, len(data) // 50))):
        f.write_bytes(data[:cut])
        with pytest.raises(BirdboneError, match=r"(truncated or corrupt GGUF|not a GGUF file)"):
            check_gguf(f, ["llama"])


def test_every_safetensors_truncation_is_caught(pristine_dirs, tmp_path):
    from birdbone_core.model.checks import check_safetensors

    data = (pristine_dirs["llama"] / "model.safetensors").read_bytes()
    f = tmp_path / "cut.safetensors"
    for cut in list(range(0, 2048, 37)) + list(range(2048, len(data), len(data) // 50)):
        f.write_bytes(data[:cut])
        with pytest.raises(BirdboneError, match="corrupt safetensors file"):
            check_safetensors(f)


def test_header_walk_matches_gguf_reader(tiny_gguf):
    from birdbone_core.model.gguf_header import ArraySummary, read_gguf_header

    path = tiny_gguf[0]
    ours = read_gguf_header(path)
    ref = gguf.GGUFReader(path)
    assert [(t.name, t.offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in ref.tensors
    ]
    assert ours.data_offset == ref.data_offset
    assert ours.metadata["general.architecture"] == "llama"
    assert ours.metadata["llama.block_count"] == 2
    assert ours.metadata["tokenizer.ggml.tokens"] == ArraySummary(8, 320)
    assert set(ours.metadata) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def test_gguf_unknown_tensor_type(tmp_path):
    from birdbone_core.model.gguf_header import read_gguf_header

    f = tmp_path / "m.gguf"
    _write_gguf(f)
    data = bytearray(f.read_bytes())
    header = read_gguf_header(f)
    # Tensor-info record: name, n_dims (u32), dims (u64 each; one here), type (u32), offset (u64).
    name = b"output_norm.weight"
    at = data.index(name) + len(name) + 4 + 8
    data[at : at + 4] = (250).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    assert header.tensors[-1].name == "output_norm.weight"
    with pytest.raises(BirdboneError, match="unknown tensor type 250"):
        load_model(str(f))
