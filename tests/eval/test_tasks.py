"""lm-eval integration: adapters score like an oracle, the offline tasks are well formed and beat chance on
the fixture model, missing task data gives one `error:` line naming the task."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from birdbone_core.data import build_tasks
from birdbone_core.errors import BirdboneError
from birdbone_core.eval.adapters import TorchLM
from birdbone_core.eval.tasks import (
    OFFLINE_TASKS,
    TASK_DIR,
    compare,
    load_tasks,
    offline_task_config,
    run_tasks,
)

CORPUS = Path("/work/shared/data/python-docs-3.11.txt.gz")


def _jsonl(name):
    return [json.loads(x) for x in (TASK_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def adapter(_tiny_loaded):
    return TorchLM(_tiny_loaded)


def test_shipped_tasks_are_well_formed():
    lastword, cloze = _jsonl("pydocs_lastword"), _jsonl("pydocs_cloze")
    assert len(lastword) >= 300 and len(cloze) >= 500
    for d in lastword:
        # LAMBADA filter: the target already occurs in the context
        assert d["target"].isalpha() and d["target"].lower() in {build_tasks._bare(w) for w in d["context"].split()}
    for d in cloze:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        rest = d["options"][d["label"]][len(d["choices"][d["label"]]):]
        assert all(o == c + rest for o, c in zip(d["options"], d["choices"]))
    labels = [d["label"] for d in cloze]          # the answer position is shuffled, not a constant
    assert min(labels.count(k) for k in range(4)) > len(cloze) / 8
    for name in OFFLINE_TASKS:
        cfg = offline_task_config(name)
        assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_file()


@pytest.mark.skipif(not CORPUS.is_file(), reason="the Python-docs corpus is not on this machine")
def test_builder_reproduces_committed_files(tmp_path, monkeypatch):
    monkeypatch.setattr(build_tasks, "OUT", tmp_path)
    build_tasks.main([str(CORPUS)])
    for name in OFFLINE_TASKS:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TASK_DIR / f"{name}.jsonl").read_bytes()


def test_builder_on_synthetic_text():
    body = ("Intro\n=====\n\n" + "The parser reads the file and the parser then checks every line of the file "
            "before it hands the result to the caller, who owns the file.\n\n   >>> code\n\n.. note::\n\n"
            "Short line.\n")
    paras = build_tasks.prose_paragraphs(body)
    assert len(paras) == 1 and paras[0].startswith("The parser")     # heading, code, directive dropped
    docs, _ = build_tasks.build_lastword(paras)
    assert docs and docs[0]["target"] == "file" and not docs[0]["context"].endswith("file")
    assert build_tasks.clean_inline("call :func:`len <x>` on ``s`` or see `docs <http://x>`_") == \
        "call len on s or see docs"


def test_torch_adapter_matches_full_forward_oracle(adapter, _tiny_loaded):
    pairs = [("The dictionary maps each key to a", " value"), ("Lists are mutable; tuples are", " immutable."),
             ("x", " = 1")]
    got = adapter.score_pairs(pairs, batch=3)          # batched, right-padded
    one = adapter.score_pairs(pairs, batch=1)
    assert [x[0] for x in one] == pytest.approx([x[0] for x in got], abs=1e-4)
    assert [x[1] for x in one] == [x[1] for x in got]
    model, tok = _tiny_loaded.model, _tiny_loaded.tokenizer
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ids = tok(ctx + cont)["input_ids"]
        n_ctx = len(tok(ctx)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        targets = torch.tensor(ids[n_ctx:])
        rows = logp[n_ctx - 1:len(ids) - 1]
        assert ll == pytest.approx(float(rows.gather(1, targets[:, None]).sum()), abs=1e-3)
        assert greedy == bool(torch.equal(rows.argmax(-1), targets))


def test_offline_tasks_beat_chance_on_fixture(adapter):
    res = run_tasks(adapter, list(OFFLINE_TASKS), limit=40)
    cloze, lastword = res["pydocs_cloze"], res["pydocs_lastword"]
    assert cloze["n"] == 40 and lastword["n"] == 40 and cloze["chance"] == 0.25
    assert 0 < cloze["acc_stderr"] < 0.1
    # the fixture model was trained on other Python docs: it must clearly beat guessing on the cloze
    assert cloze["acc"] > cloze["chance"] + 2 * cloze["acc_stderr"]
    assert 0.0 <= lastword["acc"] <= 1.0 and lastword["perplexity"] > 1.0
    rows = compare({"tasks": res}, {"tasks": res})
    assert [r["delta"] for r in rows] == [0.0, 0.0]


def test_missing_task_data_is_one_error_line_naming_the_task(tiny_path, capsys):
    from birdbone_core.cli import main

    # arc_easy's dataset is not in the HF cache here and downloads are off: no hang, no traceback
    assert main(["tasks", str(tiny_path), "--tasks", "pydocs_cloze,arc_easy", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task 'arc_easy'") and "--online" in err[0]
    with pytest.raises(BirdboneError, match="task 'no_such_task': unknown"):
        load_tasks(["no_such_task"])


def test_cli_json_on_fixture_with_base(tiny_path, tmp_path, capsys):
    from birdbone_core.cli import main

    out = tmp_path / "t.json"
    assert main(["tasks", str(tiny_path), "--base", str(tiny_path), "--tasks", "pydocs_cloze", "--limit", "8",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pydocs_cloze" in printed and "written:" in printed
    res = json.loads(out.read_text())
    assert res["deltas"][0]["delta"] == 0.0 and res["model_report"]["tasks"]["pydocs_cloze"]["n"] == 8


@pytest.mark.llamacpp
def test_llamacpp_adapter_agrees_with_torch(tmp_path, adapter, _tiny_loaded):
    pytest.importorskip("llama_cpp")
    from birdbone_core.eval.adapters import LlamaCppLM
    from birdbone_core.export.gguf_file import export_gguf

    gguf = tmp_path / "tiny-f32.gguf"
    export_gguf(_tiny_loaded.model, _tiny_loaded.tokenizer, gguf, out_type="f32")
    docs = _jsonl("pydocs_cloze")[:3]
    pairs = [(d["context"], o) for d in docs for o in d["options"]]
    with LlamaCppLM(gguf, n_ctx=512) as cpp:
        got = cpp.score_pairs(pairs)              # the options share a context: KV-cache reuse path
        fresh = [cpp.score_pairs([p])[0] for p in reversed(pairs)][::-1]
    want = adapter.score_pairs(pairs)
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=3e-4, abs=2e-3)
    assert [g[0] for g in got] == pytest.approx([f[0] for f in fresh], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_committed_jsonl_hash_is_stable():
    # the builder prints these; a changed file must come from a rebuild, not a hand edit
    digest = {n: hashlib.sha256((TASK_DIR / f"{n}.jsonl").read_bytes()).hexdigest()[:12] for n in OFFLINE_TASKS}
    text = (TASK_DIR / "README.md").read_text(encoding="utf-8")
    assert all(d in text for d in digest.values()), digest


@pytest.mark.slow
@pytest.mark.llamacpp
def test_gemma_beats_chance_on_offline_tasks():
    """Gemma 3 270M (the built-in GGUF, llama.cpp) is far above chance on both shipped tasks."""
    pytest.importorskip("llama_cpp")
    from birdbone_core.eval.adapters import LlamaCppLM
    from birdbone_core.model.default import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.skip("Gemma 3 270M is not assembled (make demo)")
    with LlamaCppLM(path, n_ctx=512) as lm:
        res = run_tasks(lm, list(OFFLINE_TASKS), limit=60)
    cloze, lastword = res["pydocs_cloze"], res["pydocs_lastword"]
    assert cloze["acc"] > 0.25 + 4 * cloze["acc_stderr"]               # chance 25%
    assert lastword["acc"] > 0.133 + 3 * lastword["acc_stderr"]       # trivial copy baseline 13.3%


def test_paired_delta():
    from birdbone_core.eval.tasks import paired_delta

    base, other = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    d, se = paired_delta(base, other)
    assert d == pytest.approx(-1 / 6) and se == pytest.approx((1 / 6 * 5 / 6 * 6 / 5 / 6) ** 0.5)
    assert paired_delta(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_delta(base, other[:-1])


def test_final_evaluate_reports_accuracy_deltas_with_stderr(tiny_path, tmp_path):
    """A recipe that lists tasks and canaries gets base vs compressed accuracy in RUN/metrics.json."""
    import json

    from birdbone_core.compress import compress

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: acc\ncalibration: {n_samples: 4, seq_len: 64}\n"
        "evaluation:\n  n_ctx: 64\n  max_chunks: 2\n  tasks: [pydocs_cloze]\n  task_limit: 24\n"
        "  canaries:\n    - {name: def-keyword, prompt: 'To define a function in Python, use the keyword',"
        " choices: [' def', ' banana']}\n"
        "prune: {method: magnitude, sparsity: 0.6}\nexport: {type: f32}\n")
    metrics = compress(tmp_path / "run", str(tiny_path), str(recipe))
    assert metrics == json.loads((tmp_path / "run" / "metrics.json").read_text())
    acc = metrics["accuracy"]
    [row] = acc["deltas"]
    assert row["task"] == "pydocs_cloze" and row["n"] == 24 and row["chance"] == 0.25
    assert row["delta"] == row["value"] - row["base"] and row["delta_stderr"] > 0
    assert {c["name"] for c in acc["compressed"]["canaries"]} == {"def-keyword"}
