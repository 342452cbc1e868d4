"""load_model / resolve_source on tiny local checkpoints of every supported architecture."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tinymodels import ARCHS, build_model

from birdbone_core.errors import BirdboneError
from birdbone_core.model.load import load_model
from birdbone_core.model.source import SUPPORTED_ARCHITECTURES, ModelSource, preflight, resolve_source

EXPECTED = {  # arch -> (class name, gguf arch)
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3"),
}


def _assert_same_weights(model, directory):
    saved = {}
    for f in sorted(directory.glob("*.safetensors")):
        saved.update(load_file(f))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("arch", ARCHS)
def test_load_each_arch(pristine_dirs, arch):
    lm = load_model(str(pristine_dirs[arch]))
    cls, gguf_arch = EXPECTED[arch]
    assert type(lm.model).__name__ == cls
    assert (lm.model_type, lm.gguf_arch) == (arch, gguf_arch)
    assert lm.source == ModelSource("hf_dir", str(pristine_dirs[arch]))
    assert not lm.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in lm.model.parameters())
    _assert_same_weights(lm.model, pristine_dirs[arch])
    ids = lm.tokenizer("Hello world", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == lm.tokenizer.bos_token_id
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], lm.model.config.vocab_size)


def test_tied_embeddings_stay_tied(pristine_dirs):
    lm = load_model(str(pristine_dirs["qwen2"]))
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight


def test_requested_dtype(pristine_dirs):
    lm = load_model(str(pristine_dirs["llama"]), dtype=torch.bfloat16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_supported_architectures_table():
    assert SUPPORTED_ARCHITECTURES == {
        "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma3": "gemma3", "gemma3_text": "gemma3",
    }


def test_sharded_safetensors_load(tmp_path, tiny_tokenizer):
    model = build_model("llama", seed=3)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    lm = load_model(str(tmp_path))
    _assert_same_weights(lm.model, tmp_path)


def test_sharded_missing_shard(tmp_path, tiny_tokenizer):
    build_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(tmp_path)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(BirdboneError, match=rf"model.safetensors.index.json: shard {victim.name} is missing"):
        load_model(str(tmp_path))


def _make_pickle_only(directory):
    for f in directory.glob("*.safetensors"):
        f.unlink()
    torch.save(build_model("llama").state_dict(), directory / "pytorch_model.bin")


def test_pickle_refused_unless_allowed(tiny_dir):
    d = tiny_dir("llama")
    _make_pickle_only(d)
    with pytest.raises(BirdboneError, match=r"pickle format \(pytorch_model.bin\).*allow_pickle"):
        load_model(str(d))
    lm = load_model(str(d), allow_pickle=True)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    for name, tensor in build_model("llama").state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], tensor), name


def test_pth_only_refused(tiny_dir):
    d = tiny_dir("llama")
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save({}, d / "consolidated.00.pth")
    with pytest.raises(BirdboneError, match="consolidated.00.pth"):
        load_model(str(d))
    with pytest.raises(BirdboneError, match="only as pytorch_model.bin"):
        load_model(str(d), allow_pickle=True)


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_unsupported_arch_lists_supported(tiny_dir):
    d = tiny_dir("llama")
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(BirdboneError) as err:
        load_model(str(d))
    msg = str(err.value)
    assert "config.json" in msg and "'gpt2'" in msg
    assert "llama, mistral, qwen2, qwen3, gemma3, gemma3_text" in msg


def test_remote_code_config_mentions_flag(tiny_dir):
    d = tiny_dir("llama")
    _edit_config(d, model_type="fancy", auto_map={"AutoModelForCausalLM": "modeling_fancy.FancyLM"})
    with pytest.raises(BirdboneError, match="trust_remote_code"):
        load_model(str(d))


def test_config_parse_error(tiny_dir):
    d = tiny_dir("llama")
    (d / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }')
    with pytest.raises(BirdboneError, match=r"config.json: invalid JSON \(line 2 column"):
        load_model(str(d))


@pytest.mark.parametrize("remove, message", [
    ("config.json", "no config.json"),
    ("model.safetensors", "no weights found"),
    ("tokenizer.json", "no tokenizer files"),
])
def test_missing_files(tiny_dir, remove, message):
    d = tiny_dir("llama")
    (d / remove).unlink()
    with pytest.raises(BirdboneError, match=message):
        load_model(str(d))


def test_weights_not_matching_config(tiny_dir):
    d = tiny_dir("llama")
    _edit_config(d, num_hidden_layers=3)  # layer 2 would silently be random
    with pytest.raises(BirdboneError, match=r"weight\(s\) missing from the checkpoint.*layers\.2"):
        load_model(str(d))


def test_wrong_shapes_named(tiny_dir):
    d = tiny_dir("llama")
    _edit_config(d, vocab_size=400)
    with pytest.raises(BirdboneError, match=r"2 weight\(s\) have the wrong shape .*checkpoint 320x64, config expects 400x64"):
        load_model(str(d))


def test_transformers_errors_are_wrapped(tiny_dir):
    d = tiny_dir("llama")
    _edit_config(d, hidden_act="no_such_activation")
    with pytest.raises(BirdboneError, match=rf"^{d}: failed to load model \(.*no_such_activation"):
        load_model(str(d))


def test_tokenizer_errors_are_wrapped(tiny_dir):
    d = tiny_dir("llama")
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')   # JSON, not a tokenizer
    with pytest.raises(BirdboneError, match=rf"^{d}: failed to load tokenizer \("):
        load_model(str(d))


def test_gemma3_multimodal_loads_text_model(tmp_path, tiny_tokenizer):
    from tinymodels import randomize, tiny_config
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=32, patch_size=8)
    cfg = Gemma3Config(text_config=tiny_config("gemma3_text").to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7)
    full = Gemma3ForConditionalGeneration(cfg).eval()
    randomize(full, seed=5)
    full.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    lm = load_model(str(tmp_path))
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert (lm.model_type, lm.gguf_arch) == ("gemma3_text", "gemma3")
    tensors = list(lm.model.parameters()) + list(lm.model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, full(input_ids=ids).logits, rtol=0, atol=0)


def test_gguf_loads_dequantized(tiny_gguf):
    path, original = tiny_gguf
    lm = load_model(str(path))
    assert lm.source.kind == "gguf" and type(lm.model).__name__ == "LlamaForCausalLM"
    assert (lm.model_type, lm.gguf_arch) == ("llama", "llama")
    # Q/K un-permuted and F32 values exact: the GGUF holds exactly the original weights.
    for name, tensor in original.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], tensor), name
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert lm.tokenizer("Hello world")["input_ids"][0] == 1


def test_gguf_metadata_is_converted_once_per_header(tiny_gguf, tmp_path, monkeypatch):
    """A GGUF's config and tokenizer are converted by transformers once, into $BIRDBONE_CACHE/gguf-meta/<key of
    the header bytes>; a second load reads that copy (transformers' GGUF parsing is not called again), and
    the same header copied to another file name shares it."""
    import shutil

    import transformers

    from birdbone_core.model.gguf_state import converted_metadata

    monkeypatch.setenv("BIRDBONE_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    first = converted_metadata(path)
    assert first.parent == tmp_path / "cache" / "gguf-meta" and (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]          # no temporary left behind

    real = transformers.AutoConfig.from_pretrained

    def refuse_gguf(*a, **k):
        assert "gguf_file" not in k, "converted again"
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse_gguf)
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)
    assert converted_metadata(copy) == first
    assert load_model(str(path)).tokenizer("Hello world")["input_ids"][0] == 1


# --- resolve_source -------------------------------------------------------------------------------


def test_resolve_kinds(pristine_dirs, tiny_gguf, tmp_path):
    gguf_path, _ = tiny_gguf
    assert resolve_source(str(pristine_dirs["llama"])) == ModelSource("hf_dir", str(pristine_dirs["llama"]))
    assert resolve_source(str(gguf_path)).kind == "gguf"
    only_gguf = tmp_path / "only"
    only_gguf.mkdir()
    shutil.copy(gguf_path, only_gguf / "m.gguf")
    assert resolve_source(str(only_gguf)) == ModelSource("gguf", str(only_gguf / "m.gguf"))
    assert resolve_source("google/gemma-3-270m", offline=False) == ModelSource("hub", "google/gemma-3-270m")
    assert "hub model google/gemma-3-270m" in ModelSource("hub", "google/gemma-3-270m").describe()


def test_hub_id_offline_is_refused():
    with pytest.raises(BirdboneError, match=r"google/gemma-3-270m: no such local file or directory; as a hub id it would need downloads, which are off.*offline=False"):
        load_model("google/gemma-3-270m")


@pytest.mark.parametrize("spec, message", [
    ("./no/such/dir", "no such file or directory"),
    ("missing.gguf", "GGUF file not found"),
])
def test_bad_local_specs(spec, message):
    with pytest.raises(BirdboneError, match=message):
        resolve_source(spec)


def test_plain_file_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(BirdboneError, match="not a model"):
        resolve_source(str(f))


@pytest.mark.parametrize("changes, needle", [
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number, got -1e-06"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"vocab_size": True}, "vocab_size must be a positive integer, got True"),
])
def test_config_values_out_of_range_refused_before_loading(tiny_dir, changes, needle):
    d = tiny_dir("llama")
    _edit_config(d, **changes)
    with pytest.raises(BirdboneError, match="config.json: " + re.escape(needle)):
        preflight(resolve_source(str(d)))
    with pytest.raises(BirdboneError, match=re.escape(needle)):
        load_model(str(d))


def test_checkpoint_with_more_layers_than_the_config_is_refused(tiny_dir):
    d = tiny_dir("llama")
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    _edit_config(d, num_hidden_layers=n - 1)
    with pytest.raises(BirdboneError, match=rf"weight\(s\) in the checkpoint that this config.json has no place for "
                                            rf"\(e.g. model.layers.{n - 1}\."):
        load_model(str(d))


@pytest.mark.parametrize("poison, kinds", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf")])
def test_non_finite_weights_are_named(tiny_dir, poison, kinds):
    from safetensors.torch import load_file, save_file

    d = tiny_dir("llama")
    state = load_file(str(d / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = state[name].clone()
    state[name][3, :2] = poison
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BirdboneError, match=rf"weights {re.escape(name)} holds \d+ non-finite value\(s\) \({kinds}\)"):
        load_model(str(d))


def test_special_files_and_dangling_links_are_named_for_what_they_are(tmp_path):
    with pytest.raises(BirdboneError, match="/dev/zero: not a regular file or directory"):
        resolve_source("/dev/zero")
    link = tmp_path / "model"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(BirdboneError, match=rf"a symlink to {re.escape(str(tmp_path / 'gone'))}, which does not exist"):
        resolve_source(str(link))
