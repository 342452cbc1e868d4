"""Tokenizer metadata: pre-tokenizer recognition, sentencepiece vocabularies, verbatim copy from a GGUF."""
from __future__ import annotations

import gzip
import json

import gguf
import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.export.vocab import LLAMA3_REGEX, QWEN2_REGEX

TEXTS = [
    "Hello world",
    "def f(x):\n    return x + 1  # add one\n\n\n",
    "   leading spaces, trailing spaces   ",
    "numbers 3.14159 1234567 and 12 don't can't I'M WE'LL",
    "unicode: héllo — naïve café 東京 🚀🦙",
]


def _small_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, bos_token_id=0, eos_token_id=1)).eval()


def _variant(tok, pre_tokenizer: dict, normalizer: dict | None = None, ignore_merges: bool = False):
    """The fixture's byte-level BPE vocabulary with another pre-tokenizer (as Llama 3 / Qwen2 ship theirs)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tj = json.loads(tok.backend_tokenizer.to_str())
    tj["pre_tokenizer"] = pre_tokenizer
    tj["normalizer"] = normalizer
    tj["model"]["ignore_merges"] = ignore_merges
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(tj)), bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, pad_token=tok.pad_token)


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}


VARIANTS = {
    "llama-bpe": dict(pre_tokenizer=_split(LLAMA3_REGEX), ignore_merges=True),
    "qwen2": dict(pre_tokenizer=_split(QWEN2_REGEX), normalizer={"type": "NFC"}),
}


@pytest.mark.parametrize("pre", list(VARIANTS))
def test_pre_tokenizer_is_recognised(tiny_llama, tmp_path, pre):
    _, tok = tiny_llama
    variant = _variant(tok, **VARIANTS[pre])
    res = export_gguf(_small_llama(len(tok)), variant, tmp_path / "v.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    assert f["tokenizer.ggml.pre"].contents() == pre
    assert f["tokenizer.ggml.add_bos_token"].contents() is True  # the fixture's BOS post-processor is kept


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", list(VARIANTS))
def test_llama_cpp_tokenizes_variants_like_hf(tiny_llama, tmp_path, pre, eval_text):
    from birdbone_core.eval.llamacpp import llama_tokenize

    _, tok = tiny_llama
    variant = _variant(tok, **VARIANTS[pre])
    res = export_gguf(_small_llama(len(tok)), variant, tmp_path / "v.gguf", out_type="f32")
    for text in [*TEXTS, eval_text[:1500]]:
        assert llama_tokenize(res.path, text) == variant(text)["input_ids"], (pre, text[:40])


def test_unknown_pre_tokenizer_regex_is_rejected(tiny_llama, tmp_path):
    _, tok = tiny_llama
    variant = _variant(tok, _split(r"\p{L}+|\s+"))
    with pytest.raises(BirdboneError, match="not one llama.cpp is known to reproduce"):
        export_gguf(_small_llama(len(tok)), variant, tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_non_bpe_tokenizer_is_rejected(tiny_llama, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, tok = tiny_llama
    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    msg = r"tokenizer \w+ \(tokenizer.json model WordLevel, decoder None\) is not supported"
    with pytest.raises(BirdboneError, match=msg):
        export_gguf(_small_llama(len(tok)), PreTrainedTokenizerFast(tokenizer_object=wl), tmp_path / "v.gguf")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    from birdbone_core.data.corpus import shipped_path

    d = tmp_path_factory.mktemp("spm")
    text = gzip.open(shipped_path("calib"), "rt", encoding="utf-8").read()[:200_000]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(d / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return d / "tokenizer.model"


class _SpmTokenizer:
    """What export needs from a sentencepiece-backed HF tokenizer: where its tokenizer.model is."""

    def __init__(self, path):
        self.vocab_file = str(path)
        self.bos_token_id, self.eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True):
        raise RuntimeError("transformers 5 cannot build this tokenizer without protobuf")


@pytest.mark.llamacpp
def test_sentencepiece_vocab(spm_model, tmp_path, eval_text):
    import sentencepiece as spm

    from birdbone_core.eval.llamacpp import llama_tokenize

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    res = export_gguf(_small_llama(416), _SpmTokenizer(spm_model), tmp_path / "s.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert len(f["tokenizer.ggml.scores"].data) == 416  # padded to the embedding rows
    for text in [*TEXTS, eval_text[:1500]]:
        assert llama_tokenize(res.path, text) == [1, *sp.encode(text)], text[:40]


def test_source_gguf_tokenizer_is_copied_verbatim(tiny_exports, tiny_llama, tmp_path):
    model, _ = tiny_llama
    src = tiny_exports["f32"].path
    res = export_gguf(model, None, tmp_path / "copy.gguf", out_type="f16", source_gguf=src)
    a, b = gguf.GGUFReader(src).fields, gguf.GGUFReader(res.path).fields
    keys = [k for k in a if k.startswith("tokenizer.")]
    assert keys == [k for k in b if k.startswith("tokenizer.")]
    for k in keys:
        assert a[k].types == b[k].types, k
        assert [bytes(a[k].parts[i]) for i in a[k].data] == [bytes(b[k].parts[i]) for i in b[k].data], k
    assert b["birdbone.tokenizer"].contents() == f"copied from {src.name}"


def test_source_gguf_with_other_vocab_size_is_rejected(tiny_exports, tiny_llama, tmp_path):
    _, tok = tiny_llama
    with pytest.raises(BirdboneError, match="has 1024 tokens but the model's embedding has 2048 rows"):
        export_gguf(_small_llama(2048), None, tmp_path / "x.gguf", source_gguf=tiny_exports["f32"].path)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_fields_read_as_gguf_reader_reads_them(tiny_exports, spm_model, tmp_path):
    """read_gguf_tokenizer (birdbone's header walk) gives every tokenizer.* field exactly as gguf.GGUFReader
    does: types, strings as bytes, per-token scores and types, merges; for a BPE and a sentencepiece vocab."""
    from birdbone_core.export.vocab import read_gguf_tokenizer

    spm_gguf = export_gguf(_small_llama(416), _SpmTokenizer(spm_model), tmp_path / "s.gguf", out_type="f32").path
    for path in (tiny_exports["f32"].path, spm_gguf):
        fields = gguf.GGUFReader(path).fields
        want = {}
        for k, f in fields.items():
            if not k.startswith("tokenizer."):
                continue
            vtype, sub = f.types[0], (f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            strings = gguf.GGUFValueType.STRING in (vtype, sub)
            want[k] = (vtype, sub, [bytes(f.parts[i]) for i in f.data] if strings else f.contents())
            if vtype == gguf.GGUFValueType.STRING:
                want[k] = (vtype, None, want[k][2][0])
        got = read_gguf_tokenizer(path)
        assert got.fields == want
        assert got.source_name == fields["general.name"].contents()
        assert len(want["tokenizer.ggml.token_type"][2]) == got.n_tokens > 0
