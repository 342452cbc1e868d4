"""Bad input, second half: damaged run directories, out-of-range arguments and output targets that are
not birdbone's. Same rule as test_bad_inputs.py: exit 2, one `error:` line, nothing created or changed."""
import json
import shutil
from pathlib import Path

import pytest
from clitools import assert_clean_failure, cli
from test_bad_inputs import FAST, run_case


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_path):
    """A finished one-shot run on the fixture (baseline, pruned model, GGUF, ledger with wave 1)."""
    root = tmp_path_factory.mktemp("finished")
    (root / "r.yaml").write_text(FAST)
    run = root / "run"
    r = cli("compress", tiny_path, "-r", root / "r.yaml", "-o", run)
    assert r.returncode == 0, r.stderr
    return run


def _edit_json(rel, fn):
    def edit(run: Path):
        p = run / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return edit


def _write(rel, data: bytes):
    return lambda run: (run / rel).write_bytes(data)


def _flip(rel):
    def edit(run: Path):
        data = bytearray((run / rel).read_bytes())
        data[-1] ^= 1
        (run / rel).write_bytes(bytes(data))
    return edit


def _remove(rel):
    return lambda run: (run / rel).unlink()


DELTA = "ledger/wave-0001/delta.safetensors"
READERS = ("prune", "export", "evaluate", "verify")
RUN_CASES = [
    ("run.json-missing", _remove("run.json"), READERS + ("log",), "not a birdbone run directory"),
    ("run.json-empty", _write("run.json", b""), READERS + ("log",), "corrupt manifest"),
    ("run.json-syntax", _write("run.json", b'{"model": '), READERS + ("log",), "corrupt manifest"),
    ("run.json-array", _write("run.json", b"[]"), READERS + ("log",), "corrupt manifest"),
    ("run.json-binary", _write("run.json", b"\xff\xfe\x00"), READERS, "manifest"),
    ("run.json-no-model", _edit_json("run.json", lambda m: {k: v for k, v in m.items() if k != "model"}), READERS,
     "corrupt manifest"),
    ("run.json-steps-list", _edit_json("run.json", lambda m: {**m, "steps": []}), READERS, "corrupt manifest"),
    ("recipe-missing", _remove("recipe.yaml"), READERS, "recipe file not found"),
    ("recipe-syntax", _write("recipe.yaml", b"prune: {sparsity: [\n"), READERS, "not valid YAML"),
    ("recipe-edited", lambda run: (run / "recipe.yaml").write_text(
        (run / "recipe.yaml").read_text().replace("sparsity: 0.3", "sparsity: 0.6")), READERS, "changed since"),
    ("recipe-duplicate", lambda run: (run / "recipe.yaml").write_text(
        (run / "recipe.yaml").read_text() + "name: again\n"), READERS, "duplicate key 'name'"),
    ("baseline-flipped", _flip("baseline/reference.safetensors"), ("evaluate", "verify"), "differ from the sha256"),
    ("baseline-missing", _remove("baseline/reference.safetensors"), ("evaluate", "verify"), "reference.safetensors: missing"),
    ("delta-flipped", _flip(DELTA), ("log", "verify", "diff:0:1", "revert:1"), "damaged or swapped delta file"),
    ("delta-truncated", lambda run: (run / DELTA).write_bytes((run / DELTA).read_bytes()[:100]),
     ("log", "verify", "diff:0:1", "revert:1"), "damaged or swapped delta file"),
    ("delta-missing", _remove(DELTA), ("log", "verify", "diff:0:1", "revert:1"), "missing from the ledger"),
    ("entry-edited", _edit_json("ledger/wave-0001/entry.json", lambda e: {**e, "sparsity": 0.99}),
     ("log", "verify", "diff:0:1", "revert:1"), "damaged ledger"),
    ("index-syntax", _write("ledger/index.json", b"{"), ("log", "verify", "diff:0:1", "revert:1"), "index.json"),
    ("index-array", _write("ledger/index.json", b"[]"), ("log", "verify", "diff:0:1", "revert:1"), "index.json"),
]


def _args(cmd: str, run: Path, tmp: Path) -> tuple:
    name, *rest = cmd.split(":")
    if name == "diff":
        return ("diff", run, *rest)
    if name == "revert":
        return ("revert", run, "--to", rest[0], "-o", tmp / "reverted")
    return (name, run)


@pytest.mark.parametrize("damage, commands, needle", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_damaged_run_directory(finished, tmp_path, damage, commands, needle):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    damage(run)
    for cmd in commands:
        assert_clean_failure(run_case(tmp_path, *_args(cmd, run, tmp_path)), needle)


ARG_CASES = [
    (("eval", "{model}", "--n-ctx", "0"), "--n-ctx: expected a positive integer"),
    (("eval", "{model}", "--n-ctx", "8"), "at least 16 tokens"),
    (("eval", "{model}", "--n-ctx", "100000"), "longer than the model's context"),
    (("eval", "{model}", "--max-chunks", "0"), "--max-chunks: expected a positive integer"),
    (("eval", "{model}", "--n-ctx", "many"), "--n-ctx: expected a positive integer"),
    (("eval", "{model}", "--text", "/nonexistent.txt"), "text file not found"),
    (("eval", "{model}", "--reference", "/nonexistent"), "no such file or directory"),
    (("diff", "{run}", "0", "5"), "no wave 5"),
    (("diff", "{run}", "-1", "0"), "no wave -1"),
    (("revert", "{run}", "--to", "-1", "-o", "{tmp}/out"), "no wave -1"),
    (("revert", "{run}", "--to", "9", "-o", "{tmp}/out"), "no wave 9"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "0"), "target_bpw"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "100"), "target_bpw"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bytes", "0"), "target_bytes"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "4", "--types", "Q9_K"), "unknown tensor type"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "4", "--override", "x"), "expected REGEX=TYPE"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "4", "--imatrix", "/nonexistent"), "does not exist"),
    (("quantize", "{model}", "-o", "{tmp}/q.gguf", "--bpw", "4", "--n-samples", "0"), "--n-samples: expected a positive"),
    (("imatrix", "{model}", "-o", "{tmp}/im.gguf", "--n-samples", "0"), "--n-samples: expected a positive"),
    (("imatrix", "{model}", "-o", "{tmp}/im.gguf", "--seq-len", "-5"), "--seq-len: expected a positive"),
    (("prune", "{tmp}/nope"), "not a birdbone run directory"),
    (("prune", "{model}/config.json"), "not a birdbone run directory"),
    (("wave", "{run}", "1", "nap"), "invalid choice"),
    (("bogus-command",), "invalid choice"),
    (("compress",), "required"),
]


@pytest.mark.parametrize("argv, needle", ARG_CASES, ids=[" ".join(a[:1] + a[2:]) for a, _ in ARG_CASES])
def test_bad_arguments(finished, tmp_path, tiny_path, argv, needle):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    args = [a.format(model=tiny_path, run=run, tmp=tmp_path) for a in argv]
    assert_clean_failure(run_case(tmp_path, *args), needle)


TARGET_CASES = [
    # (command, target kind, needle)
    ("compress", "user-dir", "not a birdbone run"),
    ("compress", "file", "is not a directory"),
    ("compress", "under-file", "cannot create the run directory"),
    ("revert", "run", "cannot be the run directory"),
    ("revert", "inside-run", "lie in it"),
    ("revert", "around-run", "contain it"),
    ("revert", "user-dir", "which birdbone did not write"),
    ("revert", "file", "is not a directory"),
    ("quantize", "user-file", "exists and birdbone did not write it"),
    ("quantize", "dir", "is a directory"),
    ("quantize", "under-file", "is not a directory"),
    ("imatrix", "user-file", "exists and birdbone did not write it"),
    ("imatrix", "dir", "is a directory"),
    ("report", "run", "cannot be the run directory"),
    ("report", "user-dir", "not part of a report"),
    ("tasks", "user-file", "exists and birdbone did not write it"),
    ("tasks", "dir", "is a directory"),
]


@pytest.mark.parametrize("command, kind, needle", TARGET_CASES, ids=[f"{c}-{k}" for c, k, _ in TARGET_CASES])
def test_output_targets_that_are_not_birdbones(finished, tmp_path, tiny_path, command, kind, needle):
    work = tmp_path / "work"
    work.mkdir()
    run = work / "run"
    shutil.copytree(finished, run)
    (work / "mine").mkdir()
    (work / "mine" / "notes.txt").write_text("keep me")
    (work / "afile").write_text("keep me too")
    (work / "a.gguf").write_text("the user's own")
    (work / "adir").mkdir()
    target = {"user-dir": work / "mine", "file": work / "afile", "under-file": work / "afile" / "x",
              "run": run, "inside-run": run / "pruned", "around-run": work, "user-file": work / "a.gguf",
              "dir": work / "adir"}[kind]
    (work / "r.yaml").write_text(FAST)
    args = {"compress": ("compress", tiny_path, "-r", work / "r.yaml", "-o", target),
            "revert": ("revert", run, "--to", "0", "-o", target),
            "quantize": ("quantize", tiny_path, "-o", target, "--bpw", "5", "--no-gptq", "--n-samples", "1"),
            "imatrix": ("imatrix", tiny_path, "-o", target, "--n-samples", "1"),
            "report": ("report", run, "-o", target),
            "tasks": ("tasks", run, "-o", target, "--limit", "1")}[command]
    assert_clean_failure(run_case(work, *args), needle)
