"""Streaming (birdbone_core.model.stream, prune.streamed): a checkpoint pruned and exported one layer at a
time gives exactly what the in-memory path gives, on every supported architecture."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tinymodels import ARCHS, VOCAB

from birdbone_core.errors import BirdboneError
from birdbone_core.export.gguf_file import export_gguf
from birdbone_core.ledger.store import state_of
from birdbone_core.model.layers import decoder_layers
from birdbone_core.model.load import load_model, load_tokenizer
from birdbone_core.model.stream import SafetensorsWriter, StreamedModel, streamable
from birdbone_core.model.tensors import SafetensorsState
from birdbone_core.prune.config import Prune
from birdbone_core.prune.sequential import prune_sequential
from birdbone_core.prune.streamed import prune_streamed


def _blocks(n: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_prune_and_export_equal_in_memory(arch, tiny_dir, tmp_path):
    src = tiny_dir(arch)
    assert streamable(src)
    cfg = Prune(method="sparsegpt", sparsity=0.5)
    lm = load_model(str(src))
    mem_report = prune_sequential(lm.model, _blocks(), cfg)

    sm = StreamedModel.open(src)
    assert list(sm.checkpoint_state()) == list(state_of(lm.model))   # what the ledger records, in its order
    report = prune_streamed(sm, _blocks(), cfg, tmp_path / "pruned", load_tokenizer(src))
    assert report.layer_rel_error == mem_report.layer_rel_error
    assert all(p.device.type == "meta" for layer in decoder_layers(sm.model) for p in layer.parameters())

    out = load_file(str(tmp_path / "pruned" / "model.safetensors"))    # one plain safetensors file
    mem = state_of(lm.model)
    assert set(mem) - set(out) <= {"lm_head.weight"}
    assert all(torch.equal(out[n], mem[n]) for n in out)
    again = load_model(str(tmp_path / "pruned"))                       # transformers loads it
    assert all(torch.equal(t, mem[n]) for n, t in again.model.state_dict().items())

    done = StreamedModel.open(tmp_path / "pruned", materialize=False)
    a = export_gguf(done.model, load_tokenizer(tmp_path / "pruned"), tmp_path / "streamed.gguf",
                    out_type="q8_0", state=done.checkpoint_state())
    b = export_gguf(again.model, again.tokenizer, tmp_path / "in-memory.gguf", out_type="q8_0")
    assert a.path.read_bytes() == b.path.read_bytes()


def test_streamed_prune_refuses_nan_weights_and_writes_nothing(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    sm = StreamedModel.open(src)
    with pytest.raises(BirdboneError, match=r"model.layers.1.mlp.up_proj.weight holds 1 non-finite"):
        prune_streamed(sm, _blocks(), Prune(method="magnitude", sparsity=0.5), tmp_path / "out",
                       load_tokenizer(src))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [src]


def test_state_reads_one_tensor_at_a_time_without_the_files_mapping(tiny_dir):
    src = tiny_dir("qwen2")
    st = SafetensorsState(src, torch.float16)
    ref = load_file(str(src / "model.safetensors"))
    assert st.shapes == {n: tuple(t.shape) for n, t in ref.items()}
    t = st["model.norm.weight"]
    assert t.dtype == torch.float16 and torch.equal(t, ref["model.norm.weight"].half())
    assert isinstance(t.untyped_storage().nbytes(), int) and t.untyped_storage().nbytes() == t.numel() * 2


def test_safetensors_writer_takes_tensors_in_header_order_only(tmp_path):
    a, b = torch.randn(3, 4, dtype=torch.bfloat16), torch.arange(6, dtype=torch.float32)
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", a.dtype, (3, 4)), ("b", b.dtype, (6,))])
    with pytest.raises(ValueError, match="expected"):
        w.write("b", b)
    w.write("a", a)
    w.write("b", b)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)
    short = SafetensorsWriter(tmp_path / "y.safetensors", [("a", a.dtype, (3, 4))])
    with pytest.raises(ValueError, match="never written"):
        short.close()


def test_what_does_not_stream_says_so(tiny_dir, tmp_path):
    assert not streamable(tmp_path)                                   # no checkpoint
    src = tiny_dir("llama")
    cfg = (src / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "gemma3"')
    (src / "config.json").write_text(cfg)
    assert not streamable(src)                                        # the multimodal wrapper: in memory



@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_streamed_prune_from_a_gguf_equals_in_memory(arch, tiny_dir, tmp_path):
    """A GGUF source streams too: each tensor dequantized on its own, with transformers' GGUF transforms (Llama
    q/k rows, Gemma norms), gives the tensors `from_pretrained(gguf_file=...)` gives, pruned the same."""
    src = tiny_dir(arch)
    lm = load_model(str(src))
    gguf = tmp_path / f"{arch}.gguf"
    export_gguf(lm.model, lm.tokenizer, gguf, out_type="q8_0")       # rows of 64: Q8_0 blocks, F32 norms
    assert streamable(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where = dict(gguf_file=gguf.name, local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True), **where)
    mem = load_model(str(gguf))                      # the same per-tensor reader, into a whole model
    assert type(mem.model) is type(reference)
    assert list(state_of(mem.model)) == list(state_of(reference))
    assert all(torch.equal(state_of(mem.model)[n], t) for n, t in state_of(reference).items())
    text = "def f(x):\n    return x * 2  # Grüße, 日本"
    assert mem.tokenizer(text).input_ids == AutoTokenizer.from_pretrained(str(tmp_path), **where)(text).input_ids
    sm = StreamedModel.open(gguf)
    state = sm.checkpoint_state()
    assert list(state) == list(state_of(mem.model))
    assert all(torch.equal(state[n], t) for n, t in state_of(mem.model).items())
    cfg = Prune(method="wanda", sparsity=0.5)
    prune_sequential(mem.model, _blocks(), cfg)
    prune_streamed(sm, _blocks(), cfg, tmp_path / "pruned", load_tokenizer(gguf))
    out = load_file(str(tmp_path / "pruned" / "model.safetensors"))
    assert all(torch.equal(t, state_of(mem.model)[n]) for n, t in out.items())
