"""Parsers and the command runner of the llama.cpp reference harness (no llama.cpp build needed)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import reference as ref  # noqa: E402

# Real `llama-perplexity --kl-divergence` stdout (tiny-llama Q3_K_M vs its F32 base, 40 chunks of 256;
# chunk rows 4-39 cut out).
KLD_OUT = """\

chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      25.5095 ±    5.5015       0.01462 ±    0.00992       0.00723 ±    0.00067     1.857 ±  0.202 %    97.638 ±  1.353 %
   2      27.8527 ±    4.0206       0.00426 ±    0.00747       0.00751 ±    0.00047     1.898 ±  0.144 %    96.850 ±  1.098 %
   3      32.3317 ±    3.8842       0.00489 ±    0.00678       0.00780 ±    0.00041     1.939 ±  0.153 %    94.751 ±  1.144 %
  40      28.2798 ±    0.9209       0.00840 ±    0.00183       0.00805 ±    0.00014     1.967 ±  0.065 %    92.303 ±  0.374 %

====== Perplexity statistics ======
Mean PPL(Q)                   :  28.279798 ±   0.920896
Mean PPL(base)                :  28.043157 ±   0.915105
Cor(ln(PPL(Q)), ln(PPL(base))):  99.84%
Mean ln(PPL(Q)/PPL(base))     :   0.008403 ±   0.001834
Mean PPL(Q)/PPL(base)         :   1.008438 ±   0.001849
Mean PPL(Q)-PPL(base)         :   0.236641 ±   0.051934

====== KL divergence statistics ======
Mean    KLD:   0.008050 ±   0.000145
Maximum KLD:   0.335632
99.9%   KLD:   0.100626
99.0%   KLD:   0.043067
95.0%   KLD:   0.023928
90.0%   KLD:   0.017026
Median  KLD:   0.005243
10.0%   KLD:   0.001677
 5.0%   KLD:   0.001026
 1.0%   KLD:   0.000087
 0.1%   KLD:   0.000013
Minimum KLD:   0.000002

====== Token probability statistics ======
Mean    Δp: -0.255 ± 0.027 %
Maximum Δp: 24.817%
99.9%   Δp:  9.707%
99.0%   Δp:  4.805%
95.0%   Δp:  1.975%
90.0%   Δp:  1.036%
75.0%   Δp:  0.149%
Median  Δp: -0.004%
25.0%   Δp: -0.331%
10.0%   Δp: -1.923%
 5.0%   Δp: -3.690%
 1.0%   Δp: -7.164%
 0.1%   Δp: -13.312%
Minimum Δp: -22.557%
RMS Δp    :  1.967 ± 0.065 %
Same top p: 92.303 ± 0.374 %

"""


def test_parse_kld_summary():
    r = ref.parse_kld_output(KLD_OUT)
    assert r["ppl"] == pytest.approx(28.279798) and r["ppl_base"] == pytest.approx(28.043157)
    assert r["mean_kld"] == pytest.approx(0.008050) and r["mean_kld_unc"] == pytest.approx(0.000145)
    assert r["kld_99"] == pytest.approx(0.043067) and r["median_kld"] == pytest.approx(0.005243)
    assert r["same_top_p"] == pytest.approx(0.92303) and r["rms_dp"] == pytest.approx(0.01967)
    assert r["mean_dp"] == pytest.approx(-0.00255) and r["ln_ppl_cor"] == pytest.approx(0.9984)
    assert r["n_chunks"] == 40 and "from_chunk_row" not in r


def test_parse_kld_truncated_output_falls_back_to_last_row():
    # llama.cpp's logger thread can lose the last lines at exit: cut inside the KLD block
    cut = KLD_OUT[:KLD_OUT.index("95.0%   KLD")]
    r = ref.parse_kld_output(cut)
    assert r["mean_kld"] == pytest.approx(0.008050) and r["kld_99"] == pytest.approx(0.043067)
    assert r["same_top_p"] == pytest.approx(0.92303) and r["rms_dp"] == pytest.approx(0.01967)
    assert set(r["from_chunk_row"]) == {"rms_dp", "rms_dp_unc", "same_top_p", "same_top_p_unc"}
    assert "median_kld" not in r


def test_parse_kld_half_written_row_is_not_a_row():
    text = KLD_OUT[:KLD_OUT.index("====")]
    text = text[:text.rindex("92.303")]  # last row lost its "same top p" column
    r = ref.parse_kld_output(text)
    assert r["n_chunks"] == 3 and r["from_chunk_row"]


def test_parse_kld_nothing():
    with pytest.raises(ValueError):
        ref.parse_kld_output("llama_model_load: error loading model\n")


def test_final_ppl_and_chunks():
    text = "perplexity: calculating perplexity over 5 chunks, n_ctx=256, batch_size=2048, n_seq=8\n" \
           "[1]25.1403,[2]27.7366,[3]32.1765,[4]43.5831,[5]41.6641,\nFinal estimate: PPL = 41.6641 +/- 4.03865\n"
    assert ref._final_ppl(text) == (41.6641, 4.03865)
    assert ref._n_chunks(text) == 5
    assert ref._final_ppl(text.split("Final")[0]) == (41.6641, None)  # final line lost


def test_logits_header(tmp_path):
    p = tmp_path / "base.kld"
    p.write_bytes(b"_logits_" + (256).to_bytes(4, "little") + (1024).to_bytes(4, "little") + (40).to_bytes(4, "little"))
    assert ref.logits_header(p) == {"n_ctx": 256, "n_vocab": 1024, "n_chunk": 40}
    (tmp_path / "bad").write_bytes(b"GGUF" * 8)
    with pytest.raises(ValueError):
        ref.logits_header(tmp_path / "bad")


def test_run_tool_peak_rss_is_the_tool_not_python():
    big = bytearray(200 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # this process now holds >200 MiB
    r = ref.run_tool([sys.executable, "-c", "pass"])
    assert 0 < r.peak_rss_mib < 150 and r.wall_s > 0
    del big


def test_run_tool_failure_carries_stderr():
    with pytest.raises(ref.ToolRunError) as e:
        ref.run_tool([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    assert e.value.returncode == 3 and "boom" in str(e.value)


def test_run_tool_timeout():
    with pytest.raises(ref.ToolRunError, match="timeout"):
        ref.run_tool([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
