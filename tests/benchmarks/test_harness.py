"""The harness's pure parts: Pareto front, token check, logits-file reader, profiles, the `birdbone quantize`
size budget and its retry, table and plots (no model or llama.cpp tool is run)."""
import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import harness_gguf  # noqa: E402
import harness_report  # noqa: E402
import heavylock  # noqa: E402
import plots  # noqa: E402


def test_pareto_front_keeps_only_undominated_points():
    pts = [(8.5, 0.0001, "Q8_0"), (6.6, 0.0007, "Q6_K"), (5.0, 0.003, "Q4_K_M"), (4.5, 0.012, "Q4_0"),
           (4.2, 0.008, "Q3_K_M"), (5.0, 0.004, "worse Q4"), (3.3, 0.03, "Q2_K"), (4.0, float("nan"), "nan")]
    front = plots.pareto_front(pts)
    assert [p[2] for p in front] == ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "Q8_0"]
    # Q4_0 (4.5 bpw, KLD 0.012) is beaten by Q3_K_M: fewer bits and lower KLD
    assert all(p[2] != "Q4_0" for p in front)
    assert plots.pareto_front([]) == []


def test_token_check_counts_the_bos_shift():
    ids = [5, 6, 7, 8, 9, 10]
    assert harness.token_check(ids, [0, 5, 6, 7], bos=0)["identical"]
    r = harness.token_check(ids, [5, 6, 7, 8], bos=0)  # llama.cpp stream without BOS: shifted, all differ
    assert not r["identical"] and r["first_difference"] == 0
    r = harness.token_check(ids, [5, 6, 99, 8], bos=None)
    assert r["n_equal"] == 3 and r["first_difference"] == 2 and r["equal_fraction"] == pytest.approx(0.75)


def test_read_logit_tokens(tmp_path):
    n_ctx, n_vocab, n_chunk = 4, 10, 2
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    p = tmp_path / "base.kld"
    p.write_bytes(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, n_chunk) + struct.pack("<8i", *toks) + b"\0" * 64)
    assert harness.read_logit_tokens(p) == (4, 2, toks)
    (tmp_path / "bad").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError):
        harness.read_logit_tokens(tmp_path / "bad")


def _doc():
    stats = lambda bpw, b: {"bpw": bpw, "file_bytes": b, "types": {}}  # noqa: E731
    cand = lambda tool, m, s, p, z, ppl: {"tool": tool, "method": m, "sparsity_target": s, "pattern": p, "tag": f"{tool}-{m}-{p}",  # noqa: E731
                                          "run": {"wall_s": 12.5, "peak_rss_mib": 700.0}, "info": {"zeros_fraction": z},
                                          "eval": {"ppl": ppl, "kld": 0.02, "top1": 0.9}}
    cands = [cand("birdbone", "sparsegpt", 0.5, "unstructured", 0.5, 30.9), cand("llm-compressor", "sparsegpt", 0.5, "2:4", 0.5, 33.0),
             cand("llm-compressor", "gptq", 0.0, "W4A16 g128", 0.15, 28.4)]
    for c in cands:
        c["label"] = harness_report._label(c)
    return {
        "model": "fixture", "model_path": "tests/fixtures/tiny-llama", "profile": "quick", "threads": 1,
        "profile_settings": {"n_ctx": 256},
        "machine": {"cpu_model": "CPU", "nproc": 2, "loadavg_start": [1.0], "loadavg_end": [2.0]},
        "versions": {"llama_cpp": {"tool_version": "x"}, "main_venv": {"torch": "2.13.0"}, "llmc_venv": {"llmcompressor": "0.14.0.1"}},
        "prepared": {"n_params": 10, "base_type": "F32", "eval": {"description": "eval"},
                     "calib": {"description": "calib", "n_samples": 4, "seq_len": 8}},
        "token_check": {"n_equal": 10, "n_compared": 10}, "torch_dense": {"ppl": 28.04},
        "llamacpp": {"kld_base": {"n_chunks": 2}, "rows": {
            "base": {"stats": stats(32.0, 10 * 2**20), "kld": {"ppl": 28.0431, "mean_kld": None}},
            "Q4_K_M": {"stats": stats(4.988, 2**20), "kld": {"ppl": 28.1, "mean_kld": 0.003, "same_top_p": 0.95},
                       "quantize": {"wall_s": 0.4, "peak_rss_mib": 40}, "bench": {"pp_tps": 9000, "tg_tps": 4000}},
            "Q4_K_M +imatrix": {"stats": stats(4.988, 2**20), "kld": {"ppl": 28.09, "mean_kld": 0.0028, "same_top_p": 0.955}}}},
        "birdbone_gguf": {"birdbone-sparsegpt -> Q4_K_M +imatrix": {"stats": stats(4.988, 2**20),
                                                                     "kld": {"ppl": 29.9, "mean_kld": 0.02, "same_top_p": 0.9}}},
        "birdbone_quantize": {"birdbone quantize @ Q4_K_M size": {
            "point": "Q4_K_M", "target_row": "Q4_K_M +imatrix", "target_file_bytes": 2**20,
            "stats": {"bpw": 4.97, "file_bytes": 2**20 - 4544, "types": {"Q4_K": 11, "F32": 9, "Q6_K": 2}},
            "kld": {"ppl": 28.01, "mean_kld": 0.0007, "same_top_p": 0.975}, "algorithm_s": 21.5,
            "quantize": {"wall_s": 80.5, "peak_rss_mib": 616.8}, "bench": {"pp_tps": 5000, "tg_tps": 2000}}},
        "candidates": cands, "notes": ["n1"], "total_seconds": 10,
    }


def test_table_has_every_row_and_the_measured_numbers():
    doc = _doc()
    rows = harness_report.table_rows(doc)
    assert [r["tool"] for r in rows] == ["llama.cpp"] * 3 + ["birdbone"] * 3 + ["llm-compressor"] * 2
    assert rows[0]["ppl_t"] == 28.04 and rows[0]["kld_l"] is None      # base: torch dense ppl next to llama.cpp's
    bbq = rows[3]  # birdbone quantize right after llama.cpp's rows: CLI wall/RSS, its own algorithm time, bench
    assert bbq["artifact"] == "birdbone quantize @ Q4_K_M size" and bbq["make_s"] == 80.5 and bbq["algo_s"] == 21.5
    assert bbq["rss"] == 616.8 and bbq["kld_l"] == 0.0007 and bbq["pp"] == 5000
    assert rows[4]["make_s"] is None and rows[4]["kld_l"] == 0.02       # pruned GGUF: no quantize run, no export_s
    md = harness_report.markdown(doc)
    lines = md.splitlines()
    start = lines.index(next(l for l in lines if l.startswith("| tool |")))
    table = [l for l in lines[start:start + len(rows) + 3] if l.startswith("| ")]  # the main table, then a blank line
    assert len(table) == 1 + len(rows) and not lines[start + len(rows) + 2].startswith("|")
    assert all(l.count("|") == table[0].count("|") for l in table)
    assert "| llm-compressor | SparseGPT 2:4 |" in md and "GPTQ W4A16 g128 (fake-quant)" in md
    assert "28.0431" in md and "0.00300" in md and "95.00%" in md and "9000 / 4000" in md
    # the side-by-side table: both sizes, both KLDs and their ratio (0.0007 / 0.0028 = 0.25)
    assert "| Q4_K_M | 1,048,576 | 1,044,032 | 4.988 | 4.970 | 0.00280 | 0.00070 | 0.25 | 28.0900 | 28.0100 |" in md
    assert "95.50% / 97.50% | Q4_K×11 F32×9 Q6_K×2 |" in md


def test_quantize_comparison_skips_points_without_a_llamacpp_row():
    doc = _doc()
    doc["birdbone_quantize"]["birdbone quantize @ Q2_K size"] = dict(
        doc["birdbone_quantize"]["birdbone quantize @ Q4_K_M size"], point="Q2_K", target_row="Q2_K +imatrix")
    assert [r["point"] for r in harness_report.quantize_comparison(doc)] == ["Q4_K_M"]
    doc["birdbone_quantize"] = {}
    assert harness_report.quantize_comparison(doc) == [] and "KLD ratio" not in harness_report.markdown(doc)


def test_plots_write_pngs(tmp_path):
    kld_rows, sp_rows = harness_report.plot_rows(_doc())
    assert {r["group"] for r in kld_rows} == {"llama.cpp", "llama.cpp +imatrix", "birdbone pruned (50%) -> llama-quantize",
                                               harness_report.BBQ_GROUP}
    assert [r["label"] for r in kld_rows if r["group"] == harness_report.BBQ_GROUP] == ["bb@Q4_K_M"]
    assert len(sp_rows) == 2  # GPTQ has no sparsity axis
    p1 = plots.plot_kld_vs_bpw(kld_rows, tmp_path / "k.png", "t", styles=harness_report.PLOT_STYLES)
    p2 = plots.plot_ppl_vs_sparsity(sp_rows, tmp_path / "s.png", "t", dense_ppl=28.0)
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert plots.plot_kld_vs_bpw([{"bpw": 4.0, "kld": None}], tmp_path / "none.png", "t") is None


def test_group_styles_keep_the_fixed_style_and_keep_the_others_apart():
    fixed = harness_report.PLOT_STYLES
    groups = ["llama.cpp", "llama.cpp +imatrix", "birdbone pruned (50%) -> llama-quantize", harness_report.BBQ_GROUP]
    st = plots.group_styles(groups, fixed)
    assert st[harness_report.BBQ_GROUP] == fixed[harness_report.BBQ_GROUP]
    others = [st[g] for g in groups if g not in fixed]
    mine = fixed[harness_report.BBQ_GROUP]
    assert all(o["marker"] != mine["marker"] and o["color"] != mine["color"] for o in others)
    assert len({o["marker"] for o in others}) == len({o["color"] for o in others}) == len(others)
    assert plots.group_styles(["b", "a"]) == {"a": {"marker": "o", "color": "C0"}, "b": {"marker": "s", "color": "C1"}}


def test_profiles_cover_both_models_and_name_known_variants():
    import quant_vs_llamacpp
    import reference

    known = set(reference.VARIANTS) | set(quant_vs_llamacpp.EXTRA_VARIANTS)
    for (model, profile), raw in harness.PROFILES.items():
        assert model in ("fixture", "gemma") and profile in ("quick", "full")
        prof = harness.resolve_points(raw, list(reference.VARIANTS))
        assert set(prof["variants"]) <= known and set(prof["bb_quants"]) <= set(reference.VARIANTS)
        assert prof["bb_quantize"] and set(prof["bb_quantize"]) <= set(prof["variants"])
        assert {p for _, _, p in prof["prune"]} <= {"unstructured", "2:4"}
    # issue 3's must-show points in the quick Gemma run; issue 4's embedding points in the full one
    assert harness.resolve_points(harness.PROFILES[("gemma", "quick")], list(reference.VARIANTS))["bb_quantize"] == ["Q4_K_M", "Q3_K_M"]
    full = harness.resolve_points(harness.PROFILES[("gemma", "full")], list(reference.VARIANTS))["bb_quantize"]
    assert {"Q4_K_M-emb_q5_0", "Q4_K_M-emb_q4_0", "Q4_0-pure", "Q3_K_M-emb_q4_0", "Q2_K-emb_q4_0"} <= set(full)
    fixture = harness.resolve_points(harness.PROFILES[("fixture", "quick")], list(reference.VARIANTS))
    assert fixture["bb_quantize"] == fixture["variants"] == harness.QUICK_VARIANTS  # "all": every variant it runs
    with pytest.raises(SystemExit, match="Q5_K_M"):
        harness.resolve_points(dict(raw, variants=["Q4_K_M"], extra_variants=[], bb_quantize=["Q5_K_M"]), [])


def test_tensor_budget_leaves_room_for_the_header_the_types_and_the_padding():
    names = ["token_embd.weight", "blk.0.attn_q.weight"]
    b = harness_gguf.tensor_budget(1_000_000, base_file_bytes=700_000, base_tensor_bytes=600_000, tensor_names=names)
    # 100,000 header bytes of the base + (17 + 10) + (19 + 10) for the types JSON + 1 KiB + 2 * 32 padding
    assert b == 1_000_000 - 100_000 - (27 + 29 + 1024 + 64)
    assert harness_gguf.tensor_budget(1_000_001, 700_000, 600_000, names) == b + 1


class _FakeRef:
    """Stands in for reference.run_tool: writes `birdbone quantize`'s output file and --report as if the
    header took `header` bytes on top of the --bytes budget."""

    def __init__(self, header: int):
        self.header, self.budgets = header, []

    def run_tool(self, cmd):
        budget, out, rep = int(cmd[cmd.index("--bytes") + 1]), Path(cmd[cmd.index("-o") + 1]), Path(cmd[cmd.index("--report") + 1])
        self.budgets.append(budget)
        out.write_bytes(b"\0" * (max(budget, 0) + self.header))
        rep.write_text(json.dumps({"tensor_bytes": budget, "seconds": 1.5}))
        return SimpleNamespace(record=lambda: {"cmd": " ".join(cmd), "wall_s": 2.0, "peak_rss_mib": 50.0})


def test_quantize_within_checks_the_size_and_retries_smaller(tmp_path, monkeypatch):
    monkeypatch.setattr(heavylock, "LOCK_ALL", False)  # not the machine-wide lock: other users' jobs hold it
    out = tmp_path / "bbq-Q4_K_M.gguf"
    ref = _FakeRef(header=3000)
    rec = harness_gguf._quantize_within(out, 10_000, 7_000, "model", tmp_path / "r.yaml", ref, 1)  # fits first time
    assert ref.budgets == [7_000] and rec["file_bytes"] == 10_000 == out.stat().st_size and len(rec["attempts"]) == 1
    ref = _FakeRef(header=3500)  # the header estimate fell 500 B short: one more run, 500 + 4096 B smaller
    rec = harness_gguf._quantize_within(out, 10_000, 7_000, "model", tmp_path / "r.yaml", ref, 1)
    assert ref.budgets == [7_000, 7_000 - 500 - 4096] and rec["file_bytes"] == out.stat().st_size <= 10_000
    assert [a["file_bytes"] for a in rec["attempts"]] == [10_500, 10_000 - 4096] and rec["algorithm_s"] == 1.5
    with pytest.raises(SystemExit, match="stays larger"):  # a file that never fits is an error, and is not kept
        harness_gguf._quantize_within(out, 10_000, 7_000, "model", tmp_path / "r.yaml", _FakeRef(header=20_000), 1)
    assert not out.exists()


def test_heavy_lock_is_reentrant_and_released(tmp_path, monkeypatch):
    import fcntl

    lock = tmp_path / "heavy.lock"
    monkeypatch.setenv("BIRDBONE_HEAVY_LOCK", str(lock))
    monkeypatch.setattr(heavylock, "LOCK_ALL", True)
    with heavylock.heavy("outer"):
        with heavylock.heavy("inner"):  # would deadlock if it took the flock again on a new descriptor
            with open(lock) as f, pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the outer block
    assert heavylock._HELD[0] == 0
    with open(lock) as f:  # released at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)


def test_quantize_side_sizes_each_point_by_llamacpps_imatrix_file_and_reuses_work(tmp_path, monkeypatch):
    monkeypatch.setattr(heavylock, "LOCK_ALL", False)
    ref = _FakeRef(header=2000)
    ref.gguf_stats = lambda p: ({"file_bytes": 50_000, "tensor_bytes": 48_000, "bpw": 32.0,
                                 "tensor_types": {"token_embd.weight": "F32"}} if p.name == "base-f32.gguf" else
                                {"file_bytes": p.stat().st_size, "tensor_bytes": p.stat().st_size - 2000, "bpw": 4.9, "types": {}})
    ref.kld = lambda p, logits, threads: {"ppl": 28.0, "mean_kld": 0.001, "same_top_p": 0.97, "logits": logits.name}
    st = {"base_gguf": "base-f32.gguf"}
    prof = {"calib": (32, 256), "n_ctx": 256, "bench": {}, "bb_quantize": ["Q4_K_M", "Q3_K_M", "Q2_K"]}
    lc = {"rows": {f"{v} +imatrix": {"stats": {"file_bytes": b}} for v, b in (("Q4_K_M", 30_000), ("Q3_K_M", 25_000))}}
    done = harness_gguf.quantize_side(prof, tmp_path, st, ref, lc, "model", 1, 1, no_bench=True)
    assert list(done) == ["birdbone quantize @ Q4_K_M size", "birdbone quantize @ Q3_K_M size"]  # no Q2_K row: skipped
    # --bytes = target - base header (2,000) - types JSON (17 + 10) - 1 KiB - 32 B padding
    assert ref.budgets == [30_000 - 2000 - 27 - 1024 - 32, 25_000 - 2000 - 27 - 1024 - 32]
    for v, target in (("Q4_K_M", 30_000), ("Q3_K_M", 25_000)):
        r = done[harness_gguf.bbq_key(v)]
        assert r["file_bytes"] <= r["target_file_bytes"] == target and r["kld"]["logits"] == "base-c256.kld"
    assert (tmp_path / "bbq-Q4_K_M.gguf").is_file() and not (tmp_path / "bbq-Q3_K_M.gguf").exists()  # scored, removed
    assert "n_samples: 32, seq_len: 256, seed: 0" in (tmp_path / "bb-quantize-recipe.yaml").read_text()
    again = harness_gguf.quantize_side(prof, tmp_path, st, ref, lc, "model", 1, 1, no_bench=True)
    assert again == json.loads(json.dumps(done)) and len(ref.budgets) == 2  # a rerun reuses every row: no new quantize


def test_llamacpp_points_include_quant_vs_llamacpps_embedding_variants(monkeypatch):
    import reference

    calls = []
    monkeypatch.setattr(reference, "llama_quantize", lambda *a, **kw: calls.append((a, kw)))
    harness_gguf._quantize_point(Path("base.gguf"), Path("o.gguf"), "Q2_K-emb_q4_0", Path("imx.gguf"), 1)
    harness_gguf._quantize_point(Path("base.gguf"), Path("o.gguf"), "Q4_0-pure", None, 1)
    assert [c[0][2:] for c in calls] == [("Q2_K", Path("imx.gguf"), ("--token-embedding-type", "q4_0")),
                                         ("Q4_0", None, ("--pure",))]
