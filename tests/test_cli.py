"""The CLI end to end on the fixture model, and how it treats bad input: one line, non-zero exit,
no traceback, nothing partial left behind.

`birdbone compress` and the bad-input cases run as real processes; the commands that read a finished run
(steps one by one, eval, log, diff, revert) call the same `main` in this process, which spares each one
the ~5-10 s of importing torch and transformers again (every step as its own process, one retried after
a SIGKILL, compared bit for bit with an uninterrupted run: tests/dags/test_airflow_server.py).
Both sides use one torch thread: float sums are reproducible run to run, not across thread counts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clitools import assert_clean_failure, cli, run_cli, tree
from gguf import GGUFReader
from safetensors.torch import load_file

from birdbone_core.ledger import Ledger

FAST = """
name: fast-{method}
calibration: {{n_samples: 16, seq_len: 128}}
evaluation: {{n_ctx: 128, max_chunks: 8}}
prune: {{method: {method}, sparsity: 0.5}}
export: {{type: {type}}}
"""


def _recipe(tmp_path, method="sparsegpt", type="f16"):
    p = tmp_path / f"{method}-{type}.yaml"
    p.write_text(FAST.format(method=method, type=type))
    return p


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_path):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    # a real process, one torch thread (the step-by-step run it is compared with uses one too)
    r = run_cli("compress", tiny_path, "-r", _recipe(tmp), "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def test_compress_writes_everything(compressed):
    m = json.loads((compressed / "metrics.json").read_text())
    c = m["compressed"]
    assert Path(c["path"]).is_file() and c["path"].endswith("model-f16.gguf")
    assert abs(c["sparsity"] - 0.5) < 1e-3
    assert c["ppl"] > m["base"]["ppl"] and c["kld"] > 0 and 0 < c["top1"] < 1
    # the pruned safetensors reload in transformers with the zeros in place
    w = load_file(str(compressed / "pruned" / "model.safetensors"))
    q = w["model.layers.1.self_attn.q_proj.weight"]
    assert abs((q == 0).float().mean().item() - 0.5) < 0.01
    manifest = json.loads((compressed / "run.json").read_text())
    assert set(manifest["steps"]) == {"baseline", "prune", "export", "evaluate"}
    assert not [p for p in compressed.rglob("*.tmp")]


@pytest.mark.llamacpp
def test_llamacpp_perplexity_agrees_with_torch(compressed):
    pytest.importorskip("llama_cpp")
    c = json.loads((compressed / "metrics.json").read_text())["compressed"]
    # F16 export of the pruned weights, same token chunks, same protocol: within 1%
    assert abs(c["ppl_llamacpp"] / c["ppl"] - 1) < 0.01, c


def test_steps_one_by_one_match_compress(tmp_path, compressed, tiny_path):
    run = tmp_path / "steps"
    recipe = _recipe(tmp_path)
    assert cli("init", run, "--model", tiny_path, "-r", recipe).returncode == 0
    for step in ("baseline", "prune", "prune", "export", "evaluate"):   # a retried step is harmless
        r = cli(step, run)
        assert r.returncode == 0, r.stderr
    a = load_file(str(run / "pruned" / "model.safetensors"))
    b = load_file(str(compressed / "pruned" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ra, rb = GGUFReader(run / "model-f16.gguf"), GGUFReader(compressed / "model-f16.gguf")
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert ta.keys() == tb.keys()
    assert all(ta[k].data.tobytes() == tb[k].data.tobytes() and ta[k].tensor_type == tb[k].tensor_type for k in ta)
    # the steps stream the model layer by layer, compress holds it: the same ledger either way
    la, lb = Ledger(run), Ledger(compressed)
    assert [la.entry(w).digest for w in (0, 1)] == [lb.entry(w).digest for w in (0, 1)]
    assert la.delta_bytes(1) == lb.delta_bytes(1)
    # and the streamed evaluate scores exactly what the in-memory one does
    ma, mb = (json.loads((d / "metrics.json").read_text())["compressed"] for d in (run, compressed))
    assert {k: ma[k] for k in ("ppl", "kld", "top1", "sparsity")} == {k: mb[k] for k in ("ppl", "kld", "top1", "sparsity")}
    r = cli("init", run, "--model", tiny_path, "-r", _recipe(tmp_path, "wanda"))
    assert r.returncode == 2 and "different model or recipe" in r.stderr


def test_compress_honours_its_load_options(tmp_path, tiny_path):
    """`compress --allow-pickle` reaches the loader and the run's manifest (it was once dropped)."""
    model = tmp_path / "pickled"
    shutil.copytree(tiny_path, model)
    state = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    recipe = _recipe(tmp_path, "magnitude")
    refused = cli("compress", model, "-r", recipe, "-o", tmp_path / "refused")
    assert_clean_failure(refused, "pickle")
    r = cli("compress", model, "-r", recipe, "-o", tmp_path / "run", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["model"]["options"]["allow_pickle"] is True


def test_eval_command_on_run_dir(compressed, tiny_path):
    r = cli("eval", compressed, "--reference", tiny_path, "--n-ctx", "128", "--max-chunks", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_scored"] == 2 * 63 and out["kld"] > 0


def test_corrupt_safetensors(tmp_path, tiny_path):
    bad = tmp_path / "bad-model"
    shutil.copytree(tiny_path, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "out"
    r = run_cli("compress", bad, "-r", _recipe(tmp_path), "-o", out)
    assert_clean_failure(r, "model.safetensors", "corrupt")
    assert not (out / "pruned").exists() and not list(out.glob("*.gguf"))


def test_truncated_gguf(tmp_path, compressed):
    g = tmp_path / "trunc.gguf"
    src = (compressed / "model-f16.gguf").read_bytes()
    g.write_bytes(src[: len(src) // 3])
    out = tmp_path / "out"
    r = run_cli("compress", g, "-r", _recipe(tmp_path), "-o", out)
    assert_clean_failure(r, "trunc.gguf", "truncated or corrupt GGUF")
    assert not out.exists() or not any(out.iterdir())


def test_invalid_recipe(tmp_path, tiny_path):
    p = tmp_path / "r.yaml"
    p.write_text("prune: {method: sparsegpt, sparsity: 2}\n")
    out = tmp_path / "out"
    r = run_cli("compress", tiny_path, "-r", p, "-o", out)
    assert_clean_failure(r, "r.yaml", "prune.sparsity")
    assert not out.exists()


def test_compress_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert_clean_failure(cli("compress", tiny_path, "-r", _recipe(tmp_path), "-o", user), "not a birdbone run")
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    for target, needle in ((tmp_path / "afile", "is not a directory"), (tmp_path / "afile" / "run", "cannot create")):
        assert_clean_failure(cli("init", target, "--model", tiny_path, "-r", _recipe(tmp_path)), needle)
    assert (tmp_path / "afile").read_text() == "x"


def test_a_hand_edited_run_recipe_is_refused(tmp_path, tiny_path):
    run = tmp_path / "run"
    assert cli("init", run, "--model", tiny_path, "-r", _recipe(tmp_path)).returncode == 0
    text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(text.replace("sparsity: 0.5", "sparsity: 0.7"))
    assert_clean_failure(cli("baseline", run), "recipe.yaml", "changed since `birdbone init`")
    (run / "recipe.yaml").write_text(text + "prune: {}\n")
    assert_clean_failure(cli("prune", run), "recipe.yaml", "duplicate key 'prune'")
    assert not (run / "baseline").exists() and not (run / "pruned").exists()


def test_a_second_process_waits_for_the_runs_lock_even_after_a_sigkill(tmp_path, tiny_path):
    """Two processes on one run: the second names the holder and waits; killing the holder (SIGKILL, no
    clean-up) releases the lock and the second goes on."""
    import signal

    run = tmp_path / "run"
    assert cli("init", run, "--model", tiny_path, "-r", _recipe(tmp_path)).returncode == 0
    env = {**os.environ, "BIRDBONE_PROGRESS": "0"}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from birdbone_core.steps import Run\n"
         "with Run(Path(sys.argv[1])).locked('test'):\n    print('locked', flush=True); time.sleep(300)", str(run)],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        waiter = subprocess.Popen([sys.executable, "-m", "birdbone_core.cli", "publish", str(run), "--enabled", "false"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = waiter.stderr.readline()
        assert f"is being worked on by PID {holder.pid} (test" in line and "waiting" in line, line
        assert waiter.poll() is None                       # still waiting while the holder lives
        holder.send_signal(signal.SIGKILL)
        _, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert f"PID {waiter.pid} (publish" in (run / ".lock").read_text()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("n_ctx, needles", [("0", ("--n-ctx: expected a positive integer, got 0",)),
                                            ("8", ("n_ctx=8", "at least 16 tokens")),
                                            ("100000", ("n_ctx=100000", "longer than the model's context (512 tokens)"))])
def test_eval_n_ctx_out_of_range(tiny_path, n_ctx, needles):
    assert_clean_failure(cli("eval", tiny_path, "--n-ctx", n_ctx), *needles)


def test_recipe_n_ctx_beyond_the_models_context(tmp_path, tiny_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(FAST.format(method="magnitude", type="f16").replace("n_ctx: 128", "n_ctx: 100000"))
    out = tmp_path / "run"
    assert_clean_failure(cli("compress", tiny_path, "-r", recipe, "-o", out), "n_ctx=100000", "longer than")
    assert not out.exists()


def test_nm_pattern_that_does_not_divide_a_width_is_refused_before_any_work(tmp_path, tiny_path):
    width = json.loads((tiny_path / "config.json").read_text())["hidden_size"]
    m = next(m for m in range(3, 64) if width % m)
    recipe = tmp_path / "nm.yaml"
    recipe.write_text(FAST.format(method="wanda", type="f16").replace("sparsity: 0.5", f"pattern: '1:{m}'"))
    out = tmp_path / "run"
    assert_clean_failure(cli("compress", tiny_path, "-r", recipe, "-o", out), f"prune.pattern 1:{m}",
                          f"has {width} inputs, not a multiple of {m}")
    assert not out.exists()


def test_the_step_loop_refuses_a_run_pruned_in_one_shot_before_writing(compressed):
    before = tree(compressed)
    for cmd in ("run", "prepare"):
        assert_clean_failure(cli(cmd, compressed), "already pruned in one shot")
    assert tree(compressed) == before and not (compressed / "base").exists()


def test_step_on_missing_run(tmp_path):
    assert_clean_failure(run_cli("prune", tmp_path / "nope"), "not a birdbone run directory")


def test_eval_command_on_exported_gguf(compressed):
    """`birdbone eval` reads our own GGUF back (dequantized by transformers) and agrees with the run."""
    m = json.loads((compressed / "metrics.json").read_text())
    r = cli("eval", compressed / "model-f16.gguf", "--n-ctx", "128", "--max-chunks", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["ppl"] / m["compressed"]["ppl"] - 1) < 2e-3


def test_ledger_log_diff_revert(tmp_path, compressed, tiny_path):
    r = cli("log", compressed)
    assert r.returncode == 0 and "one-shot sparsegpt" in r.stdout, r.stdout + r.stderr
    r = cli("diff", compressed, "0", "1", "--top", "3")
    assert r.returncode == 0 and "28 tensors changed" in r.stdout and "mlp" in r.stdout, r.stderr
    # revert to the base reproduces the source bytes; to wave 1 the pruned bytes
    assert cli("revert", compressed, "--to", "0", "-o", tmp_path / "w0").returncode == 0
    assert cli("revert", compressed, "--to", "1", "-o", tmp_path / "w1").returncode == 0
    base = load_file(str(tiny_path / "model.safetensors"))
    w0 = load_file(str(tmp_path / "w0" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "w1" / "model.safetensors"))
    pruned = load_file(str(compressed / "pruned" / "model.safetensors"))
    assert all(torch.equal(w0[k], base[k]) for k in base)
    assert w1.keys() == pruned.keys() and all(torch.equal(w1[k], pruned[k]) for k in pruned)
    assert_clean_failure(run_cli("revert", compressed, "--to", "7", "-o", tmp_path / "w7"), "no wave 7")


def test_revert_never_replaces_what_it_did_not_write(tmp_path, compressed):
    """`revert -o` onto the run itself, into it, onto a folder around it or onto a user's folder is
    refused before any work, and nothing changes; its own earlier output may be replaced."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    afile = tmp_path / "afile"
    afile.write_text("keep me too")
    before = tree(compressed)
    for target, needle in ((compressed, "cannot be the run directory"), (compressed / "pruned", "lie in it"),
                           (compressed.parent, "contain it"), (user, "'notes.txt', which birdbone did not write"),
                           (afile, "is not a directory")):
        assert_clean_failure(cli("revert", compressed, "--to", "0", "-o", target), str(target), needle)
    assert tree(compressed) == before
    assert (user / "notes.txt").read_text() == "keep me" and afile.read_text() == "keep me too"
    out = tmp_path / "again"
    for wave in ("1", "0"):                     # a second revert into its own output replaces it
        assert cli("revert", compressed, "--to", wave, "-o", out).returncode == 0
    assert (out / ".birdbone-output").is_file() and (out / "model.safetensors").is_file()
