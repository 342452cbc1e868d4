"""`birdbone quantize`, `birdbone imatrix` and the export step with a recipe `quantize:` section, end to
end on the fixture model (plain rounding where GPTQ is not the point, to stay fast)."""
import json

import gguf
import pytest

from birdbone_core.cli import main
from birdbone_core.quant.importance import read_imatrix


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """The CLI in this process (no interpreter start-up per call): returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("BIRDBONE_PROGRESS", "0")

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_imatrix_then_quantize_with_it(run_cli, tmp_path, tiny_path):
    code, _, err = run_cli("imatrix", tiny_path, "-o", tmp_path / "im.gguf", "--n-samples", "4", "--seq-len", "128")
    assert code == 0, err
    im = read_imatrix(tmp_path / "im.gguf")
    assert len(im.values) == 28 and im.chunk_count == 4 and im.chunk_size == 128
    out = tmp_path / "q.gguf"
    code, stdout, err = run_cli("quantize", tiny_path, "-o", out, "--bpw", "5.0", "--types", "Q4_K,Q6_K", "--no-gptq",
                "--imatrix", tmp_path / "im.gguf", "--n-samples", "2", "--override", "token_embd=q8_0",
                "--report", tmp_path / "rep.json")
    assert code == 0, err
    assert "bits per weight" in stdout
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert {v for k, v in types.items() if k != "token_embd.weight"} <= {"Q4_K", "Q6_K", "F32"}
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["bits_per_weight"] <= 5.0 and rep["types"] == types
    f = gguf.GGUFReader(out).fields
    assert "imatrix-file" in f["birdbone.quant.method"].contents()


@pytest.mark.parametrize("args, msg", [
    ([], "give --size, --bpw or --bytes"),
    (["--size", "12 parsecs"], "give bytes with a unit"),
    (["--size", "2KB"], "below the file's header and metadata alone"),
    (["--size", "1MB", "--bpw", "4"], "give one of target_bpw, target_bytes, target_size"),
    (["--bpw", "4", "--override", "noequals"], "expected REGEX=TYPE"),
    (["--bpw", "4", "--types", "Q9_K"], "unknown tensor type"),
    (["--bpw", "4", "--imatrix", "/nonexistent/im.gguf"], "does not exist"),
    (["--bpw", "1.6", "--types", "Q8_0", "--no-gptq"], "below the smallest possible size"),
])
def test_errors_are_one_line(run_cli, tmp_path, tiny_path, args, msg):
    code, _, err = run_cli("quantize", tiny_path, "-o", tmp_path / "x.gguf", "--n-samples", "1", *args)
    assert code == 2, err
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


def test_quantize_and_imatrix_replace_only_their_own_files(run_cli, tmp_path, tiny_path):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF not really, but the user's")
    folder = tmp_path / "folder"
    folder.mkdir()
    for cmd, extra in (("quantize", ["--bpw", "5", "--no-gptq"]), ("imatrix", [])):
        for target, needle in ((mine, "exists and birdbone did not write it"), (folder, "is a directory"),
                               (mine / "x.gguf", "is not a directory")):
            code, _, err = run_cli(cmd, tiny_path, "-o", target, "--n-samples", "1", *extra)
            assert code == 2 and err.startswith(f"error: {target}: ") and needle in err, err
    assert mine.read_bytes() == b"GGUF not really, but the user's" and not any(folder.iterdir())
    im = tmp_path / "im.gguf"
    for _ in range(2):                                   # its own earlier output is replaced
        code, _, err = run_cli("imatrix", tiny_path, "-o", im, "--n-samples", "1", "--seq-len", "64")
        assert code == 0, err
    q = tmp_path / "q.gguf"
    for _ in range(2):
        code, _, err = run_cli("quantize", tiny_path, "-o", q, "--bpw", "5", "--no-gptq", "--n-samples", "1")
        assert code == 0, err


RECIPE = """
name: prune-quant
calibration: {n_samples: 2, seq_len: 128}
evaluation: {n_ctx: 128, max_chunks: 4}
prune: {method: magnitude, sparsity: 0.3}
quantize: {target_bpw: 4.6, types: [Q4_K, Q4_0], gptq: {enabled: true}}
"""


def test_export_step_with_quantize_section(run_cli, tmp_path, tiny_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    run = tmp_path / "run"
    for args in (("init", run, "--model", tiny_path, "-r", tmp_path / "r.yaml"), ("prune", run), ("export", run)):
        code, _, err = run_cli(*args)
        assert code == 0, (args, err)
    manifest = json.loads((run / "run.json").read_text())
    info = manifest["steps"]["export"]
    ggufs = list(run.glob("*.gguf"))
    assert len(ggufs) == 1
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(ggufs[0]).tensors}
    assert set(types.values()) <= {"Q4_K", "Q4_0", "F32"}
    rep = json.loads((run / "quant_report.json").read_text())
    assert rep["bits_per_weight"] <= 4.6 and rep["types"] == types
    assert info["path"] == str(ggufs[0]) and info["bytes"] == ggufs[0].stat().st_size
    assert info["types"] == {t: n for t, n in ((t, list(types.values()).count(t)) for t in set(types.values()))}
    assert 0 < info["bits_per_weight"] <= 4.6 and info["budget_bytes"] > 0
    assert info["streamed"] is True and rep["runtime"]["streamed"] is True   # RUN/pruned read a layer at a time


@pytest.mark.parametrize("size", ["1.9MB", "45%"])
def test_size_is_the_file_size(run_cli, tmp_path, tiny_path, size):
    """--size is the whole file's size (header, metadata and tensor table included), in bytes with a unit or
    as a share of the model (F16 bytes for a directory): the file lands at or under it, and close to it."""
    from birdbone_core.model.load import load_model

    out = tmp_path / "q.gguf"
    code, _, err = run_cli("quantize", tiny_path, "-o", out, "--size", size, "--no-gptq", "--n-samples", "2",
                           "--measure-blocks", "0", "--types", "Q4_0,Q5_0,Q8_0,Q4_K,Q6_K")
    assert code == 0, err
    if size.endswith("%"):
        target = 0.45 * 2 * sum(p.numel() for p in load_model(str(tiny_path)).model.parameters())
    else:
        target = 1.9e6
    assert target * 0.97 < out.stat().st_size <= target
    assert "file size " + size in gguf.GGUFReader(out).fields["birdbone.quant.target"].contents()


def test_header_only_export_measures_the_real_header(tmp_path, tiny_path):
    """export_gguf(header_only=True) writes nothing and gives the bytes before the tensor data of the file
    the same call writes (what a --size budget subtracts)."""
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.model.gguf_header import read_gguf_header
    from birdbone_core.model.load import load_model

    lm = load_model(str(tiny_path))
    meta = {"birdbone.recipe": "x" * 300}
    head = export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf", out_type="q8_0", extra_metadata=meta,
                       header_only=True)
    assert list(tmp_path.iterdir()) == []
    full = export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf", out_type="q8_0", extra_metadata=meta)
    assert head.n_bytes == read_gguf_header(full.path).data_offset


def test_export_step_size_is_a_share_of_the_model_the_run_started_from(run_cli, tmp_path, tiny_path):
    """In a run, `quantize.target_size: 20%` (what `make demo SIZE=20%` sets through the DAG's targets) is a
    share of the model file the run started from (here the fixture's safetensors), not of the pruned copy."""
    (tmp_path / "r.yaml").write_text(RECIPE.replace("target_bpw: 4.6, types: [Q4_K, Q4_0]",
                                                    "target_size: 20%, measure_blocks: 0, "
                                                    "types: [Q4_0, Q5_0, Q8_0, Q4_K, Q6_K]"))
    run = tmp_path / "run"
    for args in (("init", run, "--model", tiny_path, "-r", tmp_path / "r.yaml"), ("prune", run), ("export", run)):
        code, _, err = run_cli(*args)
        assert code == 0, (args, err)
    source = sum(f.stat().st_size for f in tiny_path.glob("*.safetensors"))
    size = json.loads((run / "run.json").read_text())["steps"]["export"]["bytes"]
    assert 0.2 * source * 0.97 < size <= 0.2 * source
