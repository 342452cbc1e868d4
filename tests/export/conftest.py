"""Fixtures for GGUF export tests: the trained tiny Llama fixture (or a quick stand-in), exports of it,
and tests marked `llamacpp` skipped with a clear reason when llama-cpp-python is not installed."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama"
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def pytest_collection_modifyitems(config, items):
    if HAVE_LLAMA_CPP:
        return
    skip = pytest.mark.skip(reason="llama-cpp-python is not installed: pip install 'birdbone-core[llamacpp]'")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)


def _stand_in(root: Path) -> Path:
    """Same architecture and tokenizer recipe as tests/fixtures/train_tiny_llama.py, untrained (seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from birdbone_core.data.corpus import shipped_path

    text = gzip.open(shipped_path("calib"), "rt", encoding="utf-8").read()
    bos, eos, pad = "<|bos|>", "<|eos|>", "<|pad|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[bos, eos, pad], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, 0)])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, add_bos_token=True,
                            model_max_length=512, clean_up_tokenization_spaces=False).save_pretrained(root)
    torch.manual_seed(1337)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    if (FIXTURE / "config.json").is_file() and (FIXTURE / "model.safetensors").is_file():
        return FIXTURE
    return _stand_in(tmp_path_factory.mktemp("tiny-llama-stand-in"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer): float32, eval mode. Tests must not modify the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_exports(tiny_llama, tmp_path_factory):
    """out_type -> ExportResult of the tiny Llama, exported once per session."""
    from birdbone_core.export import export_gguf

    model, tok = tiny_llama
    out = tmp_path_factory.mktemp("tiny-gguf")
    return {t: export_gguf(model, tok, out / f"tiny-{t}.gguf", out_type=t) for t in ("f32", "f16", "bf16", "q8_0")}


@pytest.fixture(scope="session")
def eval_text() -> str:
    from birdbone_core.data.corpus import shipped_path

    return gzip.open(shipped_path("eval"), "rt", encoding="utf-8").read()[:4000]
