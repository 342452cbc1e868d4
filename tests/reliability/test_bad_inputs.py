"""Bad input, as a hostile but fair user gives it: broken recipes, damaged models, wrong output targets,
out-of-range arguments, damaged run directories. Every case must end the same way: exit 2, exactly one
`error:` line naming the problem, no traceback or internal error, no hang, and nothing created or
changed on disk. The cases run in this process (`cli`), on the fixture model, a few milliseconds each
when the input is refused before the model loads, as it should be.

The counts these cases give are the README's reliability figures."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from clitools import assert_clean_failure, cli, tree
from safetensors.torch import load_file, save_file
from tiny_recipes import tiny_recipe

FAST = tiny_recipe("reliability", {"method": "magnitude", "sparsity": 0.3})
HANG_SECONDS = 120


class Hang(Exception):
    pass


def run_case(root: Path, *args):
    """`birdbone ARGS` in this process, with everything under `root` unchanged and nothing new."""
    before = tree(root)

    def alarm(*_):
        raise Hang(f"birdbone {' '.join(map(str, args))} ran past {HANG_SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_SECONDS)
    try:
        r = cli(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert tree(root) == before, "an input was modified or an output was left behind"
    return r


# ---- recipes ---------------------------------------------------------------------------------------
def _recipe(**sections) -> str:
    return json.dumps(sections)                      # JSON is YAML: one line per case


RECIPE_CASES = [
    # structure and syntax
    ("list", "- a\n- b\n", "top level must be a mapping"),
    ("scalar", "5\n", "top level must be a mapping"),
    ("syntax", "prune: {sparsity: [\n", "not valid YAML"),
    ("bad-indent", "prune:\n  sparsity: 0.5\n method: wanda\n", "not valid YAML"),
    ("tab-indent", "prune:\n\tsparsity: 0.5\n", "not valid YAML"),
    ("undefined-alias", "prune: *nothing\n", "not valid YAML"),
    ("binary", "\x00\x01\x02\xff", "not valid YAML"),
    ("dup-top", "prune: {sparsity: 0.3}\nprune: {sparsity: 0.6}\n", "duplicate key 'prune'"),
    ("dup-nested", "prune: {sparsity: 0.3, sparsity: 0.6}\n", "duplicate key 'sparsity'"),
    ("python-tag", "prune: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("unknown-top", _recipe(bogus=1), "bogus: unknown field"),
    ("unknown-prune", _recipe(prune={"sparsty": 0.5}), "prune.sparsty: unknown field"),
    ("unknown-heal", _recipe(waves={"heal": {"stepz": 3}}), "waves.heal.stepz: unknown field"),
    ("unknown-quant", _recipe(quantize={"bpw": 4}), "quantize.bpw: unknown field"),
    ("section-not-mapping", _recipe(prune=0.5), "prune"),
    # calibration / evaluation
    *[(f"n_samples={v}", _recipe(calibration={"n_samples": v}), "calibration.n_samples") for v in (0, -1, 100_001, "many", 1.5)],
    *[(f"seq_len={v}", _recipe(calibration={"seq_len": v}), "calibration.seq_len") for v in (0, 7, 200_000, "long")],
    ("calib-tokens", _recipe(calibration={"n_samples": 4096, "seq_len": 4096}), "calibration tokens"),
    ("seed-str", _recipe(calibration={"seed": "x"}), "calibration.seed"),
    *[(f"n_ctx={v}", _recipe(evaluation={"n_ctx": v}), "evaluation.n_ctx") for v in (0, 15, 131_073, "x")],
    *[(f"max_chunks={v}", _recipe(evaluation={"max_chunks": v}), "evaluation.max_chunks") for v in (0, -3)],
    ("task_limit=0", _recipe(evaluation={"task_limit": 0}), "evaluation.task_limit"),
    ("calib-text-missing", _recipe(calibration={"text": "/nonexistent/calib.txt"}), "calibration.text: /nonexistent"),
    ("eval-text-missing", _recipe(evaluation={"text": "/nonexistent/eval.txt"}), "evaluation.text: /nonexistent"),
    ("same-text", _recipe(calibration={"text": "/tmp/x.txt"}, evaluation={"text": "/tmp/x.txt"}), "held out"),
    # prune
    *[(f"method={v}", _recipe(prune={"method": v}), "prune.method") for v in ("obs", 3, None)],
    *[(f"sparsity={v}", _recipe(prune={"sparsity": v}), "prune.sparsity") for v in (-0.1, 1.0, 1.5, "half")],
    *[(f"pattern={v}", _recipe(prune={"pattern": v}), "prune.pattern") for v in ("4:2", "0:4", "2:0", "a:b", "2:4:8", "2-4", "")],
    ("layer_sparsity-regex", _recipe(prune={"layer_sparsity": {"(": 0.5}}), "invalid regex"),
    ("layer_sparsity-value", _recipe(prune={"layer_sparsity": {"mlp": 1.5}}), "prune.layer_sparsity"),
    ("prune-batch=0", _recipe(prune={"batch_size": 0}), "prune.batch_size"),
    ("blocksize=0", _recipe(prune={"sparsegpt": {"blocksize": 0}}), "prune.sparsegpt.blocksize"),
    *[(f"percdamp={v}", _recipe(prune={"sparsegpt": {"percdamp": v}}), "prune.sparsegpt.percdamp") for v in (0, 2)],
    ("allocation-name", _recipe(prune={"allocation": "bogus"}), "prune.allocation"),
    ("owl-m=0", _recipe(prune={"allocation": {"method": "owl", "m": 0}}), "prune.allocation"),
    ("owl-lam", _recipe(prune={"allocation": {"method": "owl", "lam": 0.6}}), "prune.allocation"),
    # export
    *[(f"export={v}", _recipe(export={"type": v}), "export.type") for v in ("q4_k", "f8", 3)],
    # waves, healing, stop-loss, regrowth
    *[(f"max_per_wave={v}", _recipe(waves={"max_per_wave": v}), "waves.max_per_wave") for v in (0, 1.5, "x")],
    ("too-many-waves", _recipe(prune={"sparsity": 0.5}, waves={"max_per_wave": 0.0001}), "more than 200"),
    ("heal-method", _recipe(waves={"heal": {"method": "lora"}}), "waves.heal.method"),
    *[(f"heal-steps={v}", _recipe(waves={"heal": {"steps": v}}), "waves.heal.steps") for v in (-1, 10 ** 12)],
    *[(f"heal-lr={v}", _recipe(waves={"heal": {"lr": v}}), "waves.heal.lr") for v in (0, 2)],
    ("heal-trainable", _recipe(waves={"heal": {"trainable": "all"}}), "waves.heal.trainable"),
    *[(f"lora-rank={v}", _recipe(waves={"heal": {"lora": {"rank": v}}}), "waves.heal.lora.rank") for v in (0, 5000)],
    ("heal-batch=0", _recipe(waves={"heal": {"batch_size": 0}}), "waves.heal.batch_size"),
    ("heal-n_samples=0", _recipe(waves={"heal": {"n_samples": 0}}), "waves.heal.n_samples"),
    ("lora-dropout=1", _recipe(waves={"heal": {"lora": {"dropout": 1}}}), "waves.heal.lora.dropout"),
    *[(f"threshold={v}", _recipe(waves={"stop_loss": {"threshold": v}}), "waves.stop_loss.threshold") for v in (0, -1)],
    ("patience=0", _recipe(waves={"stop_loss": {"patience": 0}}), "waves.stop_loss.patience"),
    *[(f"stages={v}", _recipe(waves={"stop_loss": {"gradual": True, "stages": v}}), "waves.stop_loss.stages") for v in (1, 11)],
    *[(f"regrow-fraction={v}", _recipe(waves={"regrow": {"fraction": v}}), "waves.regrow.fraction") for v in (0, 0.5)],
    ("regrow-method", _recipe(waves={"regrow": {"method": "x"}}), "waves.regrow.method"),
    # quantize
    *[(f"bpw={v}", _recipe(quantize={"target_bpw": v}), "quantize.target_bpw") for v in (1, 40, "x")],
    ("bytes=0", _recipe(quantize={"target_bytes": 0}), "quantize.target_bytes"),
    ("types-empty", _recipe(quantize={"target_bpw": 4, "types": []}), "quantize.types"),
    ("types-bogus", _recipe(quantize={"target_bpw": 4, "types": ["Q9_K"]}), "quantize.types"),
    ("override-regex", _recipe(quantize={"target_bpw": 4, "overrides": {"(": "Q4_0"}}), "quantize.overrides"),
    ("override-type", _recipe(quantize={"target_bpw": 4, "overrides": {"x": "Q9"}}), "quantize.overrides"),
    ("measure_blocks=-1", _recipe(quantize={"target_bpw": 4, "measure_blocks": -1}), "quantize.measure_blocks"),
    ("gptq-block=16", _recipe(quantize={"target_bpw": 4, "gptq": {"block_size": 16}}), "quantize.gptq.block_size"),
    ("gptq-damp=0", _recipe(quantize={"target_bpw": 4, "gptq": {"damp": 0}}), "quantize.gptq.damp"),
    ("imatrix-missing", _recipe(quantize={"target_bpw": 4, "imatrix": "/nonexistent/im.gguf"}), "quantize.imatrix"),
]


@pytest.mark.parametrize("text, needle", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe(tmp_path, tiny_path, text, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    for args in (("init", tmp_path / "run", "--model", tiny_path, "-r", recipe),
                 ("compress", tiny_path, "-r", recipe, "-o", tmp_path / "out")):
        assert_clean_failure(run_case(tmp_path, *args), "bad.yaml", needle)


# ---- model files -----------------------------------------------------------------------------------
def _config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is _DEL:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


_DEL = object()


def _write(name: str, data: bytes):
    def edit(d: Path):
        (d / name).write_bytes(data)
    return edit


def _weights(fn):
    def edit(d: Path):
        state = load_file(str(d / "model.safetensors"))
        fn(state)
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _bytes(fn):
    def edit(d: Path):
        p = d / "model.safetensors"
        p.write_bytes(fn(p.read_bytes()))
    return edit


def _remove(*names):
    def edit(d: Path):
        for n in names:
            (d / n).unlink()
    return edit


def _poison(value):
    def fn(state):
        state["model.layers.2.mlp.up_proj.weight"][5, 7] = value
    return fn


def _header_len(value: int):
    return lambda raw: value.to_bytes(8, "little") + raw[8:]


MODEL_CASES = [
    ("config-missing", _remove("config.json"), "no config.json"),
    ("config-json", _write("config.json", b'{"model_type": "llama",'), "invalid JSON"),
    ("config-array", _write("config.json", b"[1, 2]"), "expected a JSON object"),
    ("config-latin1", _write("config.json", b'{"model_type": "llama\xff"}'), "not UTF-8"),
    ("no-model_type", _config(model_type=_DEL), "no model_type"),
    ("gpt2", _config(model_type="gpt2"), "'gpt2' is not supported"),
    ("remote-code", _config(model_type="fancy", auto_map={"AutoModelForCausalLM": "m.M"}), "trust_remote_code"),
    *[(f"{k}={v}", _config(**{k: v}), f"{k} must be a positive integer")
      for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size")
      for v in (-1, 0, "8")],
    ("layers=1.5", _config(num_hidden_layers=1.5), "num_hidden_layers must be a positive integer"),
    *[(f"eps={v}", _config(rms_norm_eps=v), "rms_norm_eps must be a positive number") for v in (-1e-6, 0, "x")],
    *[(f"eps={v}", _config(rms_norm_eps=v), "rms_norm_eps must be below 1") for v in (1, 1e308)],
    *[(f"{k}={v}", _config(**{k: v}), f"{k} must be a token id below vocab_size") for k, v in
      (("bos_token_id", -1), ("eos_token_id", 1024), ("pad_token_id", "2"), ("eos_token_id", [1, 99999]))],
    ("fewer-layers", _config(num_hidden_layers=3), "the weights do not match the config"),
    ("more-layers", _config(num_hidden_layers=5), "the weights do not match the config"),
    ("wider", _config(intermediate_size=1024), "the weights do not match the config"),
    ("vocab", _config(vocab_size=2048), "the weights do not match the config"),
    ("weights-missing", _remove("model.safetensors"), "no weights found"),
    ("weights-empty", _write("model.safetensors", b""), "too short for a header"),
    ("weights-garbage", _write("model.safetensors", os.urandom(4096)), "corrupt safetensors"),
    ("weights-truncated", _bytes(lambda raw: raw[: len(raw) // 2]), "truncated"),
    ("weights-trailing", _bytes(lambda raw: raw + b"\0" * 64), "unexpected bytes after the tensor data"),
    ("header-huge", _bytes(_header_len(1 << 40)), "does not fit"),
    ("header-json", _bytes(lambda raw: raw[:8] + b"[" + raw[9:]), "corrupt safetensors"),
    ("nan", _weights(_poison(float("nan"))), "non-finite value(s) (NaN)"),
    ("inf", _weights(_poison(float("inf"))), "non-finite value(s) (Inf)"),
    ("huge", _weights(_poison(3e38)), "beyond any trained model's"),
    ("flipped-exponent", _weights(_poison(2.0 ** 100)), "beyond any trained model's"),
    ("extra-tensor", _weights(lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.ones(2, 2)})), "the weights do not match the config"),
    ("dropped-tensor", _weights(lambda s: s.pop("model.layers.1.mlp.down_proj.weight")), "the weights do not match the config"),
    ("reshaped", _weights(lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(256, 512)})), "the weights do not match the config"),
    ("pickle-only", lambda d: (torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin"),
                               (d / "model.safetensors").unlink()), "pickle format"),
    ("tokenizer-missing", _remove("tokenizer.json", "tokenizer_config.json"), "no tokenizer files"),
    ("tokenizer-garbage", _write("tokenizer.json", b"{not json"), "tokenizer.json: invalid JSON"),
    ("weights-dir", lambda d: ((d / "model.safetensors").unlink(), (d / "model.safetensors").mkdir()),
     "model.safetensors: not a regular file"),
    ("weights-dangling", lambda d: ((d / "model.safetensors").unlink(),
                                    (d / "model.safetensors").symlink_to(d / "gone.safetensors")),
     "gone.safetensors, which does not exist"),
]


@pytest.fixture
def model_copy(tmp_path, tiny_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_path, d)
    return d


@pytest.mark.parametrize("mutate, needle", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model(tmp_path, model_copy, mutate, needle):
    mutate(model_copy)
    (tmp_path / "r.yaml").write_text(FAST)
    for args in (("init", tmp_path / "run", "--model", model_copy, "-r", tmp_path / "r.yaml"),
                 ("eval", model_copy, "--n-ctx", "64", "--max-chunks", "1")):
        assert_clean_failure(run_case(tmp_path, *args), needle)


SPEC_CASES = [
    ("missing-dir", "{tmp}/nope", "no such file or directory"),
    ("missing-gguf", "{tmp}/nope.gguf", "GGUF file not found"),
    ("hub-id-offline", "someone/some-model", "downloads, which are off"),
    ("dev-zero", "/dev/zero", "not a regular file or directory"),
    ("text-file", "{tmp}/r.yaml", "not a model"),
    ("empty-gguf", "{tmp}/empty.gguf", "truncated or corrupt GGUF"),
    ("garbage-gguf", "{tmp}/garbage.gguf", "not a GGUF file"),
    ("empty-dir", "{tmp}/emptydir", "no config.json"),
]


@pytest.mark.parametrize("spec, needle", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_bad_model_spec(tmp_path, spec, needle):
    (tmp_path / "r.yaml").write_text(FAST)
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "garbage.gguf").write_bytes(b"NOPE" + os.urandom(256))
    (tmp_path / "emptydir").mkdir()
    spec = spec.format(tmp=tmp_path)
    for args in (("init", tmp_path / "run", "--model", spec, "-r", tmp_path / "r.yaml"),
                 ("compress", spec, "-r", tmp_path / "r.yaml", "-o", tmp_path / "out"),
                 ("eval", spec)):
        assert_clean_failure(run_case(tmp_path, *args), needle)


def test_a_model_whose_scores_overflow_is_an_error_not_a_number(tmp_path, model_copy):
    """Weights within range can still give a mean NLL past exp()'s range (found by the fuzzer, as an
    OverflowError): `eval` says the scores are not finite, it does not crash or print inf."""
    _weights(lambda s: s["model.embed_tokens.weight"].mul_(5e4 / s["model.embed_tokens.weight"].abs().max()))(model_copy)
    assert_clean_failure(run_case(tmp_path, "eval", model_copy, "--n-ctx", "64", "--max-chunks", "1"),
                         "outputs hold NaN/Inf")
