"""llama.cpp imatrix files: read what llama-imatrix wrote (GGUF and legacy .dat), write what
llama-quantize reads, and collect the same numbers from our own forward pass."""
import gzip
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.importance import Imatrix, collect_input_stats, read_imatrix, write_imatrix

DATA = Path(__file__).parent / "data"
GGUF_FILE, DAT_FILE = DATA / "tiny-llama-imatrix.gguf", DATA / "tiny-llama-imatrix.dat"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"


def test_reads_both_formats_llama_imatrix_wrote():
    a, b = read_imatrix(GGUF_FILE), read_imatrix(DAT_FILE)
    assert len(a.values) == len(b.values) == 28  # 4 layers x 7 linear weights (no output: tied)
    assert set(a.values) == set(b.values)
    assert a.chunk_count == b.chunk_count == 20 and a.chunk_size == 128
    assert a.datasets == b.datasets == ["calib.txt"]
    for k in a.values:
        assert a.values[k].shape == (256,) if "ffn_down" not in k else (512,)
        np.testing.assert_allclose(a.values[k], b.values[k], rtol=1e-6)
        assert a.counts[k] == 2560  # 20 chunks x 128 tokens


def test_write_read_roundtrip(tmp_path):
    a = read_imatrix(GGUF_FILE)
    write_imatrix(tmp_path / "x.gguf", a)
    c = read_imatrix(tmp_path / "x.gguf")
    assert set(c.values) == set(a.values) and c.chunk_count == 20 and c.datasets == ["calib.txt"]
    for k in a.values:
        np.testing.assert_allclose(c.values[k], a.values[k], rtol=1e-6)


def test_bad_files(tmp_path):
    with pytest.raises(BirdboneError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\x7fjunk")
    with pytest.raises(BirdboneError, match="imatrix"):
        read_imatrix(tmp_path / "junk.dat")
    (tmp_path / "short.dat").write_bytes(DAT_FILE.read_bytes()[:300])
    with pytest.raises(BirdboneError, match="imatrix"):
        read_imatrix(tmp_path / "short.dat")


def test_collected_importance_matches_llama_imatrix(tiny_path):
    """Our forward-pass statistics on the same 20 chunks (llama.cpp's chunking: BOS first) equal the file's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from birdbone_core.data.corpus import shipped_path

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    text = gzip.open(shipped_path("calib"), "rt", encoding="utf-8").read()[:200000]
    ids = tok(text)["input_ids"]
    chunks = torch.tensor(ids[: 20 * 128]).view(20, 128).clone()
    chunks[:, 0] = tok.bos_token_id
    stats = collect_input_stats(model, chunks, batch_size=10)
    ref = read_imatrix(GGUF_FILE)
    for il in range(4):
        for gguf_name, hf in (("attn_q", "self_attn.q_proj"), ("attn_output", "self_attn.o_proj"),
                              ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            ours = stats[f"model.layers.{il}.{hf}"].mean_square().numpy()
            theirs = ref.values[f"blk.{il}.{gguf_name}.weight"]
            np.testing.assert_allclose(ours, theirs, rtol=2e-3, atol=1e-6 * theirs.max())
    assert stats["lm_head"].n_tokens == 2560


def test_importance_file_steers_the_codec():
    """The imatrix path of the codecs weights each column's error by its importance."""
    from birdbone_core.quant.codecs import quantize_dequantize

    im = read_imatrix(GGUF_FILE).values["blk.0.ffn_down.weight"]
    W = torch.randn(64, im.shape[0])
    w = torch.from_numpy(im)
    e_with = float((((quantize_dequantize("Q4_K", W, w) - W) ** 2) * w).sum())
    e_without = float((((quantize_dequantize("Q4_K", W) - W) ** 2) * w).sum())
    assert e_with < e_without


def test_llama_quantize_reads_our_file(tmp_path, tiny_path):
    """llama-quantize loads an imatrix we wrote (when the llama.cpp tools are built)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import llamacpp_tools

    exe = llamacpp_tools.bin_dir() / "llama-quantize"
    if not exe.is_file():
        pytest.skip("llama.cpp tools not built (tests/benchmarks/llamacpp_tools.py)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from birdbone_core.export import export_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    base = export_gguf(model, AutoTokenizer.from_pretrained(tiny_path), tmp_path / "f32.gguf", out_type="f32").path
    im = Imatrix(read_imatrix(GGUF_FILE).values, read_imatrix(GGUF_FILE).counts, ["birdbone"], 20, 128)
    write_imatrix(tmp_path / "ours.gguf", im)
    r = subprocess.run([str(exe), "--imatrix", str(tmp_path / "ours.gguf"), str(base),
                        str(tmp_path / "q.gguf"), "Q4_K_M", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loaded 28 importance matrix entries" in r.stdout + r.stderr
