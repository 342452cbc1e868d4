"""The harness's pure parts: Pareto front, token check, logits-file reader, table and plots (no tools run)."""
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import harness  # noqa: E402
import harness_report  # noqa: E402
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
        "candidates": cands, "notes": ["n1"], "total_seconds": 10,
    }


def test_table_has_every_row_and_the_measured_numbers():
    doc = _doc()
    rows = harness_report.table_rows(doc)
    assert [r["tool"] for r in rows] == ["llama.cpp"] * 3 + ["birdbone", "birdbone", "llm-compressor", "llm-compressor"]
    assert rows[0]["ppl_t"] == 28.04 and rows[0]["kld_l"] is None      # base: torch dense ppl next to llama.cpp's
    md = harness_report.markdown(doc)
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert len(table) == 1 + len(rows)
    assert all(l.count("|") == table[0].count("|") for l in table)
    assert "| llm-compressor | SparseGPT 2:4 |" in md and "GPTQ W4A16 g128 (fake-quant)" in md
    assert "28.0431" in md and "0.00300" in md and "95.00%" in md and "9000 / 4000" in md


def test_plots_write_pngs(tmp_path):
    kld_rows, sp_rows = harness_report.plot_rows(_doc())
    assert {r["group"] for r in kld_rows} == {"llama.cpp", "llama.cpp +imatrix", "birdbone pruned (50%) -> llama-quantize"}
    assert len(sp_rows) == 2  # GPTQ has no sparsity axis
    p1 = plots.plot_kld_vs_bpw(kld_rows, tmp_path / "k.png", "t")
    p2 = plots.plot_ppl_vs_sparsity(sp_rows, tmp_path / "s.png", "t", dense_ppl=28.0)
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert plots.plot_kld_vs_bpw([{"bpw": 4.0, "kld": None}], tmp_path / "none.png", "t") is None


def test_profiles_cover_both_models_and_name_known_variants():
    import reference

    for (model, profile), prof in harness.PROFILES.items():
        assert model in ("fixture", "gemma") and profile in ("quick", "full")
        variants = list(reference.VARIANTS) if prof["variants"] == "all" else prof["variants"]
        assert set(variants) <= set(reference.VARIANTS) and set(prof["bb_quants"]) <= set(reference.VARIANTS)
        assert {p for _, _, p in prof["prune"]} <= {"unstructured", "2:4"}


def test_heavy_lock_is_reentrant_and_released(tmp_path, monkeypatch):
    import fcntl

    lock = tmp_path / "heavy.lock"
    monkeypatch.setenv("BIRDBONE_HEAVY_LOCK", str(lock))
    monkeypatch.setattr(harness, "LOCK_ALL", True)
    with harness.heavy("outer"):
        with harness.heavy("inner"):  # would deadlock if it took the flock again on a new descriptor
            with open(lock) as f, pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the outer block
    assert harness._HELD[0] == 0
    with open(lock) as f:  # released at the end
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
