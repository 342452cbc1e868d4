"""make_models.py on the `tiny` shape: the directory loads with transformers, the shard index covers every
tensor, and the bytes depend only on the seed."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_models  # noqa: E402


def test_tiny_model_directory_loads_and_index_covers_every_tensor(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny"
    r = make_models.make("tiny", out, seed=3, verify=False)
    spec = make_models.SHAPES["tiny"]
    assert r["shards"] > 1 and not list(tmp_path.glob(".*partial*"))

    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (
        spec["hidden_size"], spec["num_hidden_layers"], spec["vocab_size"])
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == cfg.vocab_size
    text = "The list of the modules."
    ids = tok(text)["input_ids"]
    assert ids[0] == cfg.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text

    model = AutoModelForCausalLM.from_pretrained(out)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    assert set(wm) == set(expected)
    stored = {}
    for shard in sorted(set(wm.values())):
        with safe_open(str(out / shard), framework="pt") as f:
            for k in f.keys():
                assert wm[k] == shard and k not in stored
                stored[k] = f.get_tensor(k)
    assert {k: tuple(v.shape) for k, v in stored.items()} == expected
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in stored.values()) == r["bytes"]
    assert all(v.dtype == torch.bfloat16 for v in stored.values())
    assert torch.equal(stored["model.norm.weight"], torch.ones(spec["hidden_size"], dtype=torch.bfloat16))
    emb = stored["model.embed_tokens.weight"].float()
    assert abs(emb.std().item() - spec["initializer_range"]) < 1e-3
    for k, v in model.state_dict().items():  # what transformers loaded is what was written
        assert torch.equal(v, stored[k]), k
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()

    again = make_models.make("tiny", tmp_path / "again", seed=3, verify=False)
    assert again["shards"] == r["shards"]
    for shard in sorted(set(wm.values())):
        assert (out / shard).read_bytes() == (tmp_path / "again" / shard).read_bytes()
