"""Export failure paths: clear one-line errors, never a partial file at out_path."""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import pytest
import torch

import birdbone_core.export.gguf_file as gguf_file
from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unsupported_architecture_lists_supported_ones(tiny_llama, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_llama
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(BirdboneError) as err:
        export_gguf(model, tok, tmp_path / "x.gguf")
    msg = str(err.value)
    assert "'gpt2'" in msg and "gemma3_text, llama, mistral, qwen2, qwen3" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_unknown_out_type(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(BirdboneError, match="unknown GGUF out_type 'q4_k'; choose one of f32, f16, bf16, q8_0"):
        export_gguf(model, tok, tmp_path / "x.gguf", out_type="q4_k")


def test_missing_output_directory(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(BirdboneError, match="does not exist"):
        export_gguf(model, tok, tmp_path / "no" / "such" / "dir" / "x.gguf")


def test_output_directory_not_writable(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root ignores the mode bits: make the file creation itself fail instead
            def deny(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(tempfile, "mkstemp", deny)
        with pytest.raises(BirdboneError, match=f"{locked}.*(is not writable|failed: .*Permission denied)"):
            export_gguf(model, tok, locked / "x.gguf")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.fixture
def fail_on_third_tensor(monkeypatch):
    calls = {"n": 0}
    real = gguf_file._encode

    def encode(a, fmt):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure mid-write")
        return real(a, fmt)

    monkeypatch.setattr(gguf_file, "_encode", encode)
    return calls


def test_error_mid_write_leaves_no_file(tiny_llama, tmp_path, fail_on_third_tensor):
    model, tok = tiny_llama
    with pytest.raises(RuntimeError, match="simulated failure"):
        export_gguf(model, tok, tmp_path / "x.gguf")
    assert fail_on_third_tensor["n"] == 3
    assert list(tmp_path.iterdir()) == []  # neither x.gguf nor the temporary file


def test_error_mid_write_keeps_existing_good_file(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    out = tmp_path / "x.gguf"
    export_gguf(model, tok, out, out_type="f16")
    before = _digest(out)
    real = gguf_file._encode
    calls = {"n": 0}

    def encode(a, fmt):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # even an interrupt must not leave a half-written file
        return real(a, fmt)

    monkeypatch.setattr(gguf_file, "_encode", encode)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, tok, out, out_type="f32")
    assert _digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


@pytest.mark.parametrize("out_type, scale, needle", [
    ("f16", 2.0 ** 100, "beyond the f16 range (65504) that F16 stores"),      # finite in fp32, Inf in f16
    ("q8_0", 2.0 ** 100, "beyond the f16 range (65504) that Q8_0 stores"),    # Inf block scales
    ("f32", float("nan"), "NaN/Inf value(s)"),
])
def test_weights_that_would_be_written_as_nan_or_inf_are_refused(tiny_llama, tmp_path, out_type, scale, needle):
    model, tok = tiny_llama
    out = tmp_path / "x.gguf"
    export_gguf(model, tok, out, out_type="f32")
    before = _digest(out)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.data.clone()
    try:
        w.data[:, :1] *= scale
        with pytest.raises(BirdboneError) as e:
            export_gguf(model, tok, out, out_type=out_type)
    finally:
        w.data.copy_(saved)
    assert "blk.0.ffn_down.weight" in str(e.value) and needle in str(e.value)
    assert _digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]
    with pytest.raises(BirdboneError, match="beyond the f16 range"):
        gguf_file.check_storable("t", np.array([1e5], np.float32), "Q4_K")
    gguf_file.check_storable("t", np.array([1e30], np.float32), "BF16")     # bf16 holds it


def test_unmappable_tensor_is_a_user_error(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny_llama
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    model.register_buffer("extra_calibration_scale", torch.ones(3))
    with pytest.raises(BirdboneError, match="no GGUF name for tensor 'extra_calibration_scale'"):
        export_gguf(model, tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_vocab_larger_than_embedding_is_a_user_error(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = tiny_llama
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(BirdboneError, match="only 100 rows"):
        export_gguf(model, tok, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_missing_llama_cpp_says_how_to_install(monkeypatch, tmp_path):
    import sys

    from birdbone_core.eval import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(BirdboneError, match=r"pip install 'birdbone-core\[llamacpp\]'"):
        llamacpp.llama_tokenize(tmp_path / "x.gguf", "hi")


@pytest.mark.llamacpp
def test_llama_cpp_load_failure_is_a_user_error(tmp_path):
    from birdbone_core.eval.llamacpp import llama_tokenize

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(BirdboneError, match="llama.cpp could not load .*bad.gguf"):
        llama_tokenize(bad, "hi")
