"""The quantizer on a model streamed layer by layer (quant/stream.py) gives what the whole-model quantizer
gives on the fixture: the same calibration statistics bit for bit, the same measured KL per allocation, and
`birdbone quantize` writes the same GGUF bytes streamed and --in-memory."""
import json

import pytest
import torch

from birdbone_core.cli import main
from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.model.load import open_streamed
from birdbone_core.quant import engine
from birdbone_core.quant.calibration import collect_sensitivity
from birdbone_core.quant.config import Quantize
from birdbone_core.quant.engine import measure_candidates
from birdbone_core.quant.stream import SpilledTensors, stream_measured_kl, stream_sensitivity
from birdbone_core.quant.trials import allocations, in_memory_kl
from birdbone_core.runtime import Placement


@pytest.fixture(scope="module")
def text():
    return read_text(None, "calib")[0]


@pytest.fixture
def streamed(tiny_path):
    sm, tok = open_streamed(str(tiny_path), Placement(torch.device("cpu")))
    assert all(p.is_meta for p in sm.model.model.layers.parameters())   # nothing of the layers read yet
    return sm, tok


def test_streamed_statistics_are_the_whole_model_pass_bit_for_bit(_tiny_loaded, streamed, text, tmp_path):
    sm, tok = streamed
    tiny = _tiny_loaded.model
    blocks = calibration_blocks(tok, text, 4, 64, 0)
    whole = collect_sensitivity(tiny, blocks, batch_size=2)
    spill = SpilledTensors(tmp_path)
    sens = stream_sensitivity(sm, blocks, spill, batch_size=2)
    assert sens.hessian is spill and set(spill) == set(whole.hessian) and len(whole.hessian) == 29
    # q/k/v (and gate/up) share one input, so one file: 4 layers x 4 inputs + the head
    assert spill.n_files == len(list(tmp_path.glob("*.safetensors"))) == 17
    for name, H in whole.hessian.items():
        assert torch.equal(spill[name], H), name
    assert set(sens.fisher) == set(whole.fisher)
    for name, F in whole.fisher.items():
        assert torch.equal(sens.fisher[name], F), name
    assert torch.equal(sens.embed_ids, whole.embed_ids) and torch.equal(sens.embed_g2, whole.embed_g2)
    assert sens.n_tokens == whole.n_tokens == blocks.numel()
    assert all(p.is_meta for p in sm.model.model.layers.parameters())   # every layer freed again


def test_streamed_trials_measure_the_whole_models_kl(_tiny_loaded, streamed, text):
    sm, tok = streamed
    tiny = _tiny_loaded.model
    blocks = calibration_blocks(tok, text, 4, 64, 0)
    sens = collect_sensitivity(tiny, blocks, batch_size=4)
    cfg = Quantize(target_bpw=5.0, types=["Q4_0", "Q5_0", "Q8_0"], gptq={"enabled": False})
    with pytest.MonkeyPatch.context() as mp:      # both encodings of the embedding, as for a big tensor
        mp.setattr(engine, "ALTERNATE_SHARE", 0.08)
        cands = measure_candidates(tiny, cfg, sens)
    combos = allocations(cands, int(5.0 * cands.n_weights / 8), ["token_embd.weight"])
    quantized = [r.quantized for _, r, _ in combos]
    assert len(quantized) >= 3
    held = calibration_blocks(tok, text, 2, 64, 1)
    whole = in_memory_kl(tiny, held)(quantized)
    sm.release()                 # as the pipeline does between calibration and trials (buffers stay put)
    sm.materialize_rest()
    streamed_kl = stream_measured_kl(sm, quantized, held)
    assert len(set(whole)) == len(whole)           # the allocations differ, and so do their KLs
    assert streamed_kl == pytest.approx(whole, rel=1e-6)
    assert all(p.is_meta for p in sm.model.model.layers.parameters())


def test_quantize_cli_streamed_and_in_memory_write_the_same_bytes(tiny_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BIRDBONE_PROGRESS", "0")
    files = {}
    for mode in ("streamed", "in-memory"):
        out = tmp_path / f"{mode}.gguf"
        args = ["quantize", str(tiny_path), "-o", str(out), "--bpw", "4.5", "--n-samples", "4",
                "--measure-blocks", "2", "--report", str(tmp_path / f"{mode}.json")]
        assert main(args + (["--in-memory"] if mode == "in-memory" else [])) == 0, capsys.readouterr().err
        files[mode] = out.read_bytes()
    assert files["streamed"] == files["in-memory"]
    report = json.loads((tmp_path / "streamed.json").read_text())
    assert report["runtime"]["streamed"] is True and "streamed" not in json.loads(
        (tmp_path / "in-memory.json").read_text())["runtime"]
    assert not list(tmp_path.glob(".birdbone-quant-*"))       # the spilled Hessians are gone
