"""Export the tiny trained Llama to F32/F16/BF16/Q8_0 GGUF and check llama.cpp runs it like torch does."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import birdbone_core
from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf

N_CTX = 128  # perplexity chunk length (the model's context is 512)

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
WEIGHT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
FILE_TYPE = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
# llama.cpp perplexity vs torch, relative: F32 differs only by float rounding (and llama.cpp's F16 KV cache)
PPL_TOL = {"f32": 1e-3, "f16": 1e-2, "bf16": 2e-2, "q8_0": 2e-2}
TOKENIZE_TEXTS = [
    "Hello world",
    "def f(x):\n    return x + 1  # add one\n\n\n",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tnewlines\r\n mixed  \n\n  ",
    "numbers 3.14159 1234567 0x1F don't can't I'M",
    "unicode: héllo — naïve café 東京 🚀🦙",
]


def torch_perplexity(model, ids: list[int], n_ctx: int, bos: int) -> tuple[float, int]:
    """llama-perplexity protocol in plain torch: chunks of n_ctx, first token -> BOS, score the second half."""
    n_chunks = len(ids) // n_ctx
    chunks = torch.tensor(ids[: n_chunks * n_ctx]).view(n_chunks, n_ctx).clone()
    chunks[:, 0] = bos
    first = n_ctx // 2
    with torch.no_grad():
        logits = model(input_ids=chunks).logits[:, first: n_ctx - 1].double()
    targets = chunks[:, first + 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
    return math.exp(nll / targets.numel()), targets.numel()


@pytest.fixture(scope="module")
def eval_ids(tiny_llama, eval_text) -> list[int]:
    _, tok = tiny_llama
    return tok(eval_text)["input_ids"]  # BOS first, as llama.cpp tokenizes (checked below)


@pytest.fixture(scope="module")
def torch_ppl(tiny_llama, eval_ids):
    model, tok = tiny_llama
    return torch_perplexity(model, eval_ids, N_CTX, tok.bos_token_id)


@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_tensor_types_and_metadata(tiny_exports, tiny_llama, out_type):
    model, _ = tiny_llama
    res = tiny_exports[out_type]
    assert res.path.stat().st_size == res.n_bytes
    reader = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == res.tensor_types
    assert "output.weight" not in types  # tied embeddings: llama.cpp reuses token_embd
    assert len(types) == 2 + 9 * model.config.num_hidden_layers
    for t in reader.tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else WEIGHT_TYPE[out_type]), t.name
    assert res.fallbacks == {}
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == FILE_TYPE[out_type]
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    assert fields["birdbone.out_type"].contents() == out_type
    assert f"{WEIGHT_TYPE[out_type]}:" in fields["birdbone.tensor_types"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 0
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["llama.attention.head_count_kv"].contents() == model.config.num_key_value_heads
    expected_bpw = {"f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5}[out_type]
    assert expected_bpw <= res.bits_per_weight < expected_bpw * 1.01


def test_f32_roundtrips_through_transformers_gguf_loader(tiny_exports, tiny_llama):
    """transformers' GGUF loader un-permutes q/k: loading our F32 file must give back the exact weights."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny_llama
    path = tiny_exports["f32"].path
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    sd, sd_back = model.state_dict(), back.state_dict()
    for name, w in sd.items():
        assert torch.equal(w, sd_back[name]), name


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_like_hf(tiny_exports, tiny_llama, eval_text):
    from birdbone_core.eval.llamacpp import llama_tokenize

    _, tok = tiny_llama
    path = tiny_exports["f16"].path
    for text in [*TOKENIZE_TEXTS, eval_text]:
        assert llama_tokenize(path, text) == tok(text)["input_ids"], text[:40]


@pytest.mark.llamacpp
@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_llama_cpp_loads_and_generates(tiny_exports, tiny_llama, out_type):
    from birdbone_core.eval.llamacpp import llama_generate, llama_greedy_ids

    model, tok = tiny_llama
    path = tiny_exports[out_type].path
    prompt_ids, ids = llama_greedy_ids(path, "The list", 12)
    assert prompt_ids == tok("The list")["input_ids"]
    assert len(ids) <= 12
    assert isinstance(llama_generate(path, "The list", 4), str)
    if out_type == "f32":  # greedy decoding must follow torch's token for token
        x = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        ref = out[0, x.shape[1]:].tolist()
        if ref and ref[-1] == tok.eos_token_id:
            ref = ref[:-1]  # llama.cpp stops before the end-of-generation token
        assert ids == ref


@pytest.mark.llamacpp
@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_perplexity_matches_torch(tiny_exports, eval_ids, torch_ppl, out_type):
    from birdbone_core.eval.llamacpp import llama_perplexity

    ref, n_ref = torch_ppl
    ppl, n = llama_perplexity(tiny_exports[out_type].path, eval_ids, N_CTX)
    assert n == n_ref == (len(eval_ids) // N_CTX) * (N_CTX // 2 - 1)
    assert abs(ppl / ref - 1) < PPL_TOL[out_type], (out_type, ppl, ref)


@pytest.mark.llamacpp
def test_top1_logits_agree(tiny_exports, tiny_llama, eval_ids):
    from birdbone_core.eval.llamacpp import llama_logits

    model, _ = tiny_llama
    ids = eval_ids[:64]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    for out_type, min_agree in (("f32", 1.0), ("f16", 0.95), ("q8_0", 0.9)):
        got = llama_logits(tiny_exports[out_type].path, ids)
        agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
        assert agree >= min_agree, (out_type, agree)
        if out_type == "f32":
            assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()) * 10


def test_extra_metadata_and_name(tiny_llama, tiny_llama_dir, tmp_path):
    model, tok = tiny_llama
    res = export_gguf(model, tok, tmp_path / "m.gguf", out_type="f16",
                      extra_metadata={"birdbone.recipe": "prune-50", "birdbone.seed": 7, "birdbone.ppl": 12.5})
    f = gguf.GGUFReader(res.path).fields
    assert f["general.name"].contents() == tiny_llama_dir.name
    assert f["birdbone.recipe"].contents() == "prune-50"
    assert f["birdbone.seed"].contents() == 7
    assert f["birdbone.ppl"].contents() == 12.5
    assert f["birdbone.version"].contents() == birdbone_core.__version__
    assert res.path.stat().st_mode & 0o044  # published with the usual umask, not mkstemp's 0600
    with pytest.raises(BirdboneError, match="value must be str, int or float, not list"):
        export_gguf(model, tok, tmp_path / "n.gguf", extra_metadata={"birdbone.bad": [1, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
