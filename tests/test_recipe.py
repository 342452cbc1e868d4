import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.recipe import Recipe, dump_recipe, load_recipe, parse_recipe


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_default_recipe_is_sparsegpt_50_q8():
    r = load_recipe(None)
    assert (r.prune.method, r.prune.sparsity, r.prune.pattern, r.export.type) == ("sparsegpt", 0.5, "unstructured", "q8_0")


def test_round_trip_and_hash(tmp_path):
    p = _write(tmp_path, "name: x\nprune: {method: wanda, sparsity: 0.3, pattern: '2:4'}\n")
    r = load_recipe(p)
    assert r.prune.nm == (2, 4)
    again = load_recipe(_write(tmp_path, dump_recipe(r)))
    assert again == r and again.sha256() == r.sha256()
    assert r.sha256() != Recipe().sha256()


@pytest.mark.parametrize("text", [
    "quantize: {target_size: 40%}",                       # every quantize default, types included
    "quantize: {target_bpw: 4.5}\nwaves: {max_per_wave: 0.1}\nstructure: {vocab: 32768}",
    "structure: {ffn: 0.4, waves: 4, heal_steps: 10, stop_loss: 0.05}",
    "evaluation: {tasks: [pydocs_cloze]}\nprune: {method: sparsegpt, sparsity: 0.5}",
])
def test_every_section_round_trips_with_its_hash(tmp_path, text):
    """What `birdbone init` writes (dump_recipe) reads back as the same recipe with the same hash, defaults
    included: each later step checks the hash, so a default that changes on the way back breaks a run."""
    r = load_recipe(_write(tmp_path, text + "\n"))
    again = load_recipe(_write(tmp_path, dump_recipe(r)))
    assert again == r and again.sha256() == r.sha256()


def test_a_structure_section_without_waves_keeps_its_hash():
    """waves / stop_loss at their defaults are not written: a recipe from before they existed hashes the same."""
    r = parse_recipe({"structure": {"vocab": 32768}})
    assert r.model_dump()["structure"] == {"vocab": 32768, "vocab_corpus": None, "layers": 0, "ffn": 0.0,
                                           "heads": 0.0, "per_layer": False, "metric": "angular", "multiple": 32,
                                           "heal_steps": 0, "heal_lr": None}
    assert parse_recipe({"structure": {"vocab": 32768, "waves": 2}}).sha256() != r.sha256()


@pytest.mark.parametrize("text,needle", [
    ("prune: {sparsity: 1.5}", "prune.sparsity: Input should be less than 1"),
    ("prune: {method: obs}", "prune.method: Input should be 'magnitude', 'wanda' or 'sparsegpt'"),
    ("prune: {pattern: '4:2'}", "prune.pattern"),
    ("prune: {sparsty: 0.5}", "prune.sparsty: unknown field"),
    ("bogus: 1", "bogus: unknown field"),
    ("export: {type: q4_k}", "export.type"),
    ("prune: {layer_sparsity: {'(': 0.5}}", "invalid regex"),
    ("- a\n- b", "top level must be a mapping"),
    ("prune: {sparsity: [", "not valid YAML"),
    ("calibration: {n_samples: 0}", "calibration.n_samples"),
    ("waves: {heal: {method: lora}}", "waves.heal.method"),
    ("waves: {max_per_wave: 0}", "waves.max_per_wave"),
    ("waves: {stop_loss: {patience: 0}}", "waves.stop_loss.patience"),
    ("prune: {sparsity: 0.3}\nexport: {type: f16}\nprune: {sparsity: 0.6}", "duplicate key 'prune' (line 3)"),
    ("prune: {sparsity: 0.3, sparsity: 0.6}", "duplicate key 'sparsity' (line 1)"),
    ("calibration: {n_samples: 100000, seq_len: 2048}", "calibration: Value error, n_samples x seq_len = 204,800,000"),
    ("prune: {sparsity: 0.5}\nwaves: {max_per_wave: 0.0001}", "is 5,000 waves, more than 200"),
    ("waves: {heal: {steps: 1000000000000}}", "waves.heal.steps: Input should be less than or equal to 1000000"),
])
def test_invalid_recipes_name_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(BirdboneError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert needle in msg and str(p) in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(BirdboneError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_sparsity_for_overrides_and_skip():
    r = parse_recipe({"prune": {"sparsity": 0.5, "layer_sparsity": {r"layers\.0\.": 0.2}, "skip": ["down_proj"]}})
    assert r.prune.sparsity_for("model.layers.0.self_attn.q_proj") == 0.2
    assert r.prune.sparsity_for("model.layers.1.self_attn.q_proj") == 0.5
    assert r.prune.sparsity_for("model.layers.1.mlp.down_proj") is None


def test_same_calibration_and_eval_file_refused(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x")
    with pytest.raises(BirdboneError, match="held out"):
        parse_recipe({"calibration": {"text": str(f)}, "evaluation": {"text": str(f)}})


def test_wave_targets():
    r = parse_recipe({"prune": {"sparsity": 0.5}, "waves": {"max_per_wave": 0.1}})
    assert [round(t, 6) for t in r.waves.targets(0.5)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert parse_recipe({"waves": {"max_per_wave": 0.3}}).waves.targets(0.5) == [0.25, 0.5]
