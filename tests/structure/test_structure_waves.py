"""Structural waves: the cuts go in even waves, each healed and checked by a stop-loss that reverts it
exactly; every wave's record (what went, the tensors it changed as they were) rebuilds any earlier state,
the uncut model included, bit for bit (`birdbone revert OUT --structure K`)."""
import json

import pytest
import torch
from clitools import assert_clean_failure, cli
from safetensors.torch import load_file

from birdbone_core.model.load import load_model
from birdbone_core.structure.apply import plan_waves
from birdbone_core.structure.config import Structure

TEXT = "def square(x):\n    return x ** 2  # the square of x\n"
SMALL = ("--n-samples", "8", "--seq-len", "64")


def _same_model(a_path, b_path) -> None:
    a, b = load_model(str(a_path)), load_model(str(b_path))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.tensor([a.tokenizer(TEXT)["input_ids"]])
    assert a.tokenizer(TEXT)["input_ids"] == b.tokenizer(TEXT)["input_ids"]
    assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    assert a.model.generation_config.to_dict() == b.model.generation_config.to_dict()


def test_waves_split_the_cuts_evenly():
    w = plan_waves(Structure(vocab=0, layers=3, ffn=0.6, heads=0.5, waves=2))
    assert [c.vocab for c in w] == [True, False]
    assert [c.layers for c in w] == [1, 2]
    assert [round(c.ffn, 6) for c in w] == [0.3, 0.6] and [c.heads for c in w] == [0.25, 0.5]
    with pytest.raises(ValueError, match="waves: 1"):
        Structure(ffn=0.5, per_layer=True, waves=2)


def test_every_structural_wave_reverts_exactly(tiny_path, tmp_path):
    out = tmp_path / "cut"
    r = cli("structure", tiny_path, "-o", out, "--vocab", "0", "--layers", "1", "--ffn", "0.5", "--waves", "2",
            "--heal-steps", "3", *SMALL)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "structure.json").read_text())
    assert [w["decision"] for w in rec["waves"]] == ["accept", "accept"]
    assert rec["waves"][0]["width"]["sizes_after"]["intermediate_size"] == 384      # half of the cut per wave
    assert rec["width"]["sizes_after"]["intermediate_size"] == 256 and len(rec["layers"]["removed"]) == 1
    assert all("bits_per_byte" in w for w in rec["waves"])
    for k in (0, 1, 2):
        assert cli("revert", out, "--structure", str(k), "-o", tmp_path / f"r{k}").returncode == 0
    _same_model(tmp_path / "r0", tiny_path)           # the uncut model, bit for bit, with its own tokenizer
    _same_model(tmp_path / "r2", out)
    r1 = load_model(str(tmp_path / "r1")).model.config
    assert (r1.intermediate_size, r1.num_hidden_layers, r1.vocab_size) == (384, 4, rec["vocab"]["kept"])
    # a record that no longer matches the model is refused, not half-applied
    (tmp_path / "r1" / "model.safetensors").replace(out / "model.safetensors")
    assert_clean_failure(cli("revert", out, "--structure", "0", "-o", tmp_path / "bad"), "the record")
    assert not (tmp_path / "bad").exists()
    assert_clean_failure(cli("revert", out, "--structure", "3", "-o", tmp_path / "bad"), "no structural wave 3")


def test_a_wave_stores_only_the_tensors_it_changed(tiny_path, tmp_path):
    out = tmp_path / "cut"
    assert cli("structure", tiny_path, "-o", out, "--ffn", "0.25", *SMALL).returncode == 0
    stored = load_file(str(out / "waves" / "1" / "before.safetensors"))
    assert sorted(stored) == sorted(f"model.layers.{i}.mlp.{m}.weight" for i in range(4)
                                    for m in ("gate_proj", "up_proj", "down_proj"))
    assert stored["model.layers.0.mlp.gate_proj.weight"].shape == (512, 256)     # as it was before the cut
    assert cli("revert", out, "--structure", "0", "-o", tmp_path / "r0").returncode == 0
    _same_model(tmp_path / "r0", tiny_path)


def test_the_stop_loss_reverts_a_costly_wave_exactly(tiny_path, tmp_path):
    out = tmp_path / "cut"
    r = cli("structure", tiny_path, "-o", out, "--layers", "1", "--ffn", "0.5", "--waves", "2", "--heal-steps", "3",
            "--stop-loss", "0.02", *SMALL)
    assert r.returncode == 0, r.stderr
    waves = json.loads((out / "structure.json").read_text())["waves"]
    assert [w["decision"] for w in waves] == ["accept", "rollback"] and "reverted" in waves[1]["reason"]
    assert waves[1]["bits_per_byte"] > 1.02 * json.loads((out / "structure.json").read_text())[
        "held_out"]["bits_per_byte_before"]
    assert not (out / "waves" / "2" / "before.safetensors").exists()      # nothing changed, nothing stored
    log = cli("log", out)
    assert log.returncode == 0 and "rollback" in log.stdout and "intermediate_size 512 -> 384" in log.stdout
    # the model is exactly the one after wave 1: the rolled-back wave left no trace in the weights
    assert cli("revert", out, "--structure", "1", "-o", tmp_path / "r1").returncode == 0
    _same_model(tmp_path / "r1", out)
    assert load_model(str(out)).model.config.intermediate_size == 384
