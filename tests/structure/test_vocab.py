"""Vocabulary trimming: merge traces follow each tokenizer's rule; the corpus tokenizes to the same pieces
after the trim (HF on the fixture; llama.cpp on the fixture's BPE GGUF and on a sentencepiece GGUF); the
kept rows give the same logits in torch and in llama.cpp; the record restores the model bit for bit; sizes
no vocabulary can take are refused."""
from __future__ import annotations

import copy
import importlib.util
import io
from collections import Counter

import gguf
import numpy as np
import pytest
import torch
from clitools import assert_clean_failure, cli

from birdbone_core.data.text import read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.export.vocab import read_gguf_tokenizer, write_tokenizer_gguf
from birdbone_core.structure.tokenizers import hf_pieces, tokenization_diff, trim_vocab, vocab_from_gguf
from birdbone_core.structure.vocab import Vocab, merge_trace, plan_vocab, restore_embeddings, trim_embeddings

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text(None, "calib")[0][:12000]


@pytest.fixture(scope="module")
def held() -> str:
    return read_text(None, "eval")[0][:12000]


def _gguf_pieces(path, text: str) -> list[str]:
    from birdbone_core.eval.llamacpp import open_llama

    with open_llama(path, vocab_only=True) as llm:
        return [llm._model.token_get_text(i) for i in llm.tokenize(text.encode(), add_bos=False, special=False)]


# ------------------------------------------------------------------------------------------- kernels


def test_spm_trace_merges_by_score_leftmost_on_ties():
    pieces = ["a", "b", "c", "ab", "bc", "abc"]
    assert merge_trace(Vocab(pieces, "spm", set(), scores=[0, 0, 0, -2.0, -1.0, -0.5]), "abc") == ["bc", "abc"]
    assert merge_trace(Vocab(pieces, "spm", set(), scores=[0, 0, 0, -1.0, -1.0, -0.5]), "abc") == ["ab", "abc"]
    # SPM never needs a lone character: "abc" forms even when only merged pieces exist
    assert merge_trace(Vocab(["ab", "abc"], "spm", set(), scores=[-1.0, -0.5]), "abc") == ["ab", "abc"]


def test_bpe_trace_needs_characters_and_follows_ranks():
    v = Vocab(["a", "b", "c", "ab", "bc", "abc"], "bpe", set(), ranks={("b", "c"): 0, ("a", "bc"): 1, ("a", "b"): 2})
    assert merge_trace(v, "abc") == ["a", "b", "c", "bc", "abc"]
    v.ranks = {("a", "b"): 0, ("ab", "c"): 1, ("b", "c"): 2}
    assert merge_trace(v, "abc") == ["a", "b", "c", "ab", "abc"]


def test_plan_keeps_traces_always_and_budget():
    pieces = ["<s>", "a", "b", "c", "ab", "bc", "abc", "x", "y"]
    v = Vocab(pieces, "bpe", {0}, ranks={("b", "c"): 0, ("a", "bc"): 1, ("a", "b"): 2, ("x", "y"): 3})
    assert plan_vocab([v], Counter({6: 5})) == [0, 1, 2, 3, 5, 6]          # abc, its chars, bc; never ab
    assert plan_vocab([v], Counter({6: 5}), keep=7) == [0, 1, 2, 3, 4, 5, 6]  # filled by prior (id order)
    # most frequent first; a token whose trace does not fit is skipped, not half-kept; the rest by prior
    assert plan_vocab([v], Counter({6: 5, 7: 9}), keep=3) == [0, 1, 7]
    with pytest.raises(BirdboneError, match="smaller than"):
        plan_vocab([v], Counter(), keep=0)
    with pytest.raises(BirdboneError, match="has 9"):
        plan_vocab([v], Counter(), keep=10)


# ------------------------------------------------------------------------------------- the fixture (BPE)


def test_trim_keeps_corpus_tokenization_logits_and_restores_exactly(tiny, corpus, held):
    orig = copy.deepcopy(tiny.model)
    t = trim_vocab(tiny.model, tiny.tokenizer, corpus)
    n = len(t.record.kept)
    assert t.corpus_identical and 256 < n < 1024
    assert tiny.model.config.vocab_size == n and tiny.model.get_input_embeddings().weight.shape == (n, 256)
    assert hf_pieces(t.tokenizer, corpus) == hf_pieces(tiny.tokenizer, corpus)
    ids = tiny.tokenizer(corpus[:400])["input_ids"]
    new = t.tokenizer(corpus[:400])["input_ids"]
    assert [t.record.kept[i] for i in new] == ids                        # BOS included, ids map back
    with torch.no_grad():
        full = orig(torch.tensor([ids])).logits[0][:, t.record.kept]
        cut = tiny.model(torch.tensor([new])).logits[0]
    assert torch.equal(full, cut)                                           # same rows, same numbers
    diff = tokenization_diff(lambda s: hf_pieces(tiny.tokenizer, s), lambda s: hf_pieces(t.tokenizer, s), held)
    assert 0 < diff["share_differing"] < 1 and diff["examples"]             # outside the corpus: shorter pieces
    restore_embeddings(tiny.model, t.record)
    assert tiny.model.config.vocab_size == 1024
    for (k, a), (_, b) in zip(orig.state_dict().items(), tiny.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@needs_llama_cpp
def test_trimmed_bpe_gguf_tokenizes_like_the_original_and_runs_like_torch(tiny, corpus, tmp_path):
    from birdbone_core.eval.llamacpp import llama_logits

    export_gguf(tiny.model, tiny.tokenizer, tmp_path / "full.gguf", out_type="f32")
    t = trim_vocab(tiny.model, tiny.tokenizer, corpus)
    export_gguf(tiny.model, t.tokenizer, tmp_path / "trim.gguf", out_type="f32")
    assert _gguf_pieces(tmp_path / "trim.gguf", corpus) == _gguf_pieces(tmp_path / "full.gguf", corpus)
    ids = t.tokenizer(corpus[:300])["input_ids"]
    with torch.no_grad():
        ref = tiny.model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(tmp_path / "trim.gguf", ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 2e-2 * np.abs(ref).max()


# ------------------------------------------------------------------------------- sentencepiece (SPM)


def _spm_tokenizer_gguf(text: str, path, vocab_size: int = 700):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.vocab_size()
    kinds = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    w = gguf.GGUFWriter(str(path), arch="tokenizer")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i).encode() for i in range(n)])
    w.add_token_scores([float(sp.get_score(i)) for i in range(n)])
    w.add_token_types([int(k) for k in kinds])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def _tiny_llama(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


@needs_llama_cpp
def test_trimmed_spm_gguf_tokenizes_the_corpus_like_llama_cpp_did(corpus, held, tmp_path):
    from birdbone_core.eval.llamacpp import llama_tokenize

    n = _spm_tokenizer_gguf(read_text(None, "calib")[0][:150000], tmp_path / "tok.gguf")
    model = _tiny_llama(n)
    export_gguf(model, None, tmp_path / "full.gguf", out_type="f32", source_gguf=tmp_path / "tok.gguf")
    tok = read_gguf_tokenizer(tmp_path / "full.gguf")
    counts = Counter(llama_tokenize(tmp_path / "full.gguf", corpus[:3000]))
    kept = plan_vocab([vocab_from_gguf(tok)], counts)
    assert len(kept) < n
    trim_embeddings(model, kept)
    write_tokenizer_gguf(tok.subset(kept), tmp_path / "tok-trim.gguf")
    export_gguf(model, None, tmp_path / "trim.gguf", out_type="f32", source_gguf=tmp_path / "tok-trim.gguf")
    full, trim = _gguf_pieces(tmp_path / "full.gguf", corpus[:3000]), _gguf_pieces(tmp_path / "trim.gguf", corpus[:3000])
    assert trim == full and any(len(p) > 2 for p in full)
    # held-out text falls back to shorter pieces and bytes, and still decodes to itself
    assert _gguf_pieces(tmp_path / "trim.gguf", held[:2000]) != _gguf_pieces(tmp_path / "full.gguf", held[:2000])
    new_tok = read_gguf_tokenizer(tmp_path / "trim.gguf")
    assert new_tok.n_tokens == len(kept) and new_tok.get("tokenizer.ggml.bos_token_id") == kept.index(tok.get(
        "tokenizer.ggml.bos_token_id"))


# ----------------------------------------------------------------------------------------------- CLI


def test_structure_vocab_cli_writes_the_record(tiny_path, tmp_path, corpus):
    (tmp_path / "domain.txt").write_text(corpus)
    out = tmp_path / "small-vocab"
    r = cli("structure", tiny_path, "-o", out, "--vocab", "0", "--vocab-corpus", tmp_path / "domain.txt",
            "--gguf", tmp_path / "small.gguf")
    assert r.returncode == 0, r.stderr
    assert gguf.GGUFReader(str(tmp_path / "small.gguf")).tensors[0].data.size > 0
    import json

    rec = json.loads((out / "structure.json").read_text())["vocab"]
    assert rec["of"] == 1024 and rec["kept"] == len(rec["kept_ids"]) < 1024 and rec["corpus_tokenizes_identically"]
    from transformers import AutoConfig, AutoTokenizer
    assert AutoConfig.from_pretrained(out).vocab_size == rec["kept"]
    assert len(AutoTokenizer.from_pretrained(out)) == rec["kept"]
    emb = next(t for t in gguf.GGUFReader(str(tmp_path / "small.gguf")).tensors if t.name == "token_embd.weight")
    assert emb.shape[1] == rec["kept"]


def test_structure_vocab_refuses_sizes_below_the_byte_set(tiny_path, tmp_path):
    out = tmp_path / "x"
    assert_clean_failure(cli("structure", tiny_path, "-o", out, "--vocab", "100"), "256 byte tokens")
    assert_clean_failure(cli("structure", tiny_path, "-o", out, "--vocab", "257"), "smaller than")
    assert not out.exists()


def test_healing_after_cuts_lowers_the_kl_to_the_dense_model(tiny_path, tmp_path):
    out = tmp_path / "healed"
    r = cli("structure", tiny_path, "-o", out, "--vocab", "0", "--ffn", "0.5", "--heal-steps", "12",
            "--heal-lr", "1e-3", "--n-samples", "8", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    import json

    rec = json.loads((out / "structure.json").read_text())
    assert rec["heal"]["steps"] == 12 and rec["heal"]["kl_after"] < 0.9 * rec["heal"]["kl_before"], rec["heal"]
    assert_clean_failure(cli("structure", tiny_path, "-o", tmp_path / "y", "--ffn", "0.5", "--heal-steps", "-1"),
                         "--heal-steps")


def test_restricted_teacher_cache_scores_a_trimmed_student(tiny, corpus):
    from birdbone_core.data.text import calibration_blocks
    from birdbone_core.heal.distill import mean_topk_kl, restrict_cache, teacher_topk
    from birdbone_core.structure.vocab import renumber

    blocks = calibration_blocks(tiny.tokenizer, corpus, 4, 32, 0)
    cache = teacher_topk(tiny.model, blocks, 16)
    everything = restrict_cache(cache, list(range(1024)), 1024)
    assert torch.equal(everything.indices, cache.indices) and torch.equal(everything.values, cache.values)
    student = copy.deepcopy(tiny.model)
    rec = trim_embeddings(student, sorted(set(blocks.unique().tolist()) | set(range(300))))
    small = restrict_cache(cache, rec.kept, 1024)
    assert (small.values == float("-inf")).any()                            # some top-k tokens are gone
    kl = mean_topk_kl(student, renumber(blocks, rec.kept, 1024), small)
    assert np.isfinite(kl) and 0 <= kl < 0.5 * mean_topk_kl(tiny.model, blocks, restrict_cache(
        teacher_topk(_shuffled(tiny.model), blocks, 16), list(range(1024)), 1024))


def _shuffled(model):
    """A model that disagrees with `model` (its decoder weights permuted): a scale for 'large' KL."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.model.layers.parameters():
            p.copy_(p.flatten()[torch.randperm(p.numel(), generator=torch.Generator().manual_seed(0))].view_as(p))
    return m
