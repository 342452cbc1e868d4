"""Builders for tiny random checkpoints of every supported architecture (used by conftest and tests).

Everything is created locally (random weights, a BPE tokenizer trained on a few sentences); nothing is
fetched from a hub.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
VOCAB = 320
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes weights that carry no load.",
    "Quantization stores each weight in fewer bits.",
    "llama.cpp runs GGUF files on a laptop CPU.",
    "Hello world, hello birdbone!",
] * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_config(arch: str):
    from transformers import AutoConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    extra = {
        "llama": dict(tie_word_embeddings=False),
        "mistral": dict(tie_word_embeddings=False, sliding_window=None),
        "qwen2": dict(tie_word_embeddings=True),
        "qwen3": dict(tie_word_embeddings=True, head_dim=16),
        "gemma3_text": dict(head_dim=16, num_key_value_heads=1, sliding_window=16, query_pre_attn_scalar=16),
    }[arch]
    return AutoConfig.for_model(arch, **{**common, **extra})


def randomize(model, seed: int = 0) -> None:
    """Non-trivial values everywhere (norms included), so equality checks mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def build_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    randomize(model, seed)
    return model.eval()


# --- a tiny llama GGUF ---------------------------------------------------------------------------


def write_llama_gguf(path: Path, model, tokenizer, arch: str = "llama") -> None:
    """An F32 GGUF of `model`, written by birdbone's exporter (verified in llama.cpp by tests/export)."""
    from birdbone_core.export.gguf_file import export_gguf

    export_gguf(model, tokenizer, path, out_type="f32")
