"""`birdbone structure`: a model directory every other command takes, the record of what went, and one
`error:` line for bad input, with nothing written."""
import json

from clitools import assert_clean_failure, cli
from transformers import AutoConfig


def test_structure_writes_a_smaller_model_and_its_record(tiny_path, tmp_path):
    out = tmp_path / "narrow"
    r = cli("structure", tiny_path, "-o", out, "--layers", "1", "--ffn", "0.25", "--heads", "0.5",
            "--n-samples", "4", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (3, 384, 2, 1)
    rec = json.loads((out / "structure.json").read_text())
    assert rec["layers"]["of"] == 4 and len(rec["layers"]["removed"]) == 1
    assert rec["layers"]["removed"][0] not in (0, 3)                 # never the first or last layer
    assert all(len(x) == 128 for x in rec["width"]["ffn_removed"]) and len(rec["width"]["ffn_removed"]) == 3
    assert rec["params_after"] < rec["params_before"]
    # a second run may replace its own output; `birdbone eval` scores it against the original
    assert cli("structure", tiny_path, "-o", out, "--ffn", "0.5", "--n-samples", "4", "--seq-len", "64").returncode == 0
    assert AutoConfig.from_pretrained(out).intermediate_size == 256
    ev = cli("eval", out, "--reference", tiny_path)
    assert ev.returncode == 0, ev.stderr


def test_bad_structure_requests_fail_cleanly(tiny_path, tmp_path):
    out = tmp_path / "x"
    assert_clean_failure(cli("structure", tiny_path, "-o", out), "nothing to remove")
    assert_clean_failure(cli("structure", tiny_path, "-o", out, "--layers", "4"), "leave none")
    assert_clean_failure(cli("structure", tiny_path, "-o", out, "--ffn", "1.5"), "[0, 1)")
    assert not out.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert_clean_failure(cli("structure", tiny_path, "-o", tmp_path / "mine", "--ffn", "0.25"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_structure_per_layer_ffn_and_heads_write_a_deci_gguf(tiny_path, tmp_path):
    import gguf

    out = tmp_path / "ragged"
    r = cli("structure", tiny_path, "-o", out, "--ffn", "0.4", "--heads", "0.375", "--per-layer", "--n-samples", "4",
            "--seq-len", "64", "--gguf", tmp_path / "ragged.gguf")
    assert r.returncode == 0, r.stderr
    sizes = json.loads((out / "structure.json").read_text())["width"]["sizes_after"]
    widths, kv = sizes["ffn_widths"], sizes["kv_heads"]
    assert len(set(widths)) > 1 and len(set(kv)) > 1 and sum(kv) == 5
    f = gguf.GGUFReader(str(tmp_path / "ragged.gguf")).fields
    assert f["general.architecture"].contents() == "deci" and f["deci.feed_forward_length"].contents() == widths
    assert f["deci.attention.head_count_kv"].contents() == kv
    assert cli("eval", out, "--reference", tiny_path).returncode == 0      # the directory reloads
