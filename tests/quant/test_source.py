"""Re-quantizing a model loaded from a quantized GGUF keeps the source's blocks where the weights are
unchanged and the type stays: exact bytes, zero error; changed tensors are re-encoded."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.quant.config import Quantize
from birdbone_core.quant.engine import choose, measure_candidates, quantize_model

MIX = {"token_embd": "Q8_0", r"blk\.0\.ffn_down\.": "Q4_0", r"blk\.1\.attn_v\.": "Q5_K"}


@pytest.fixture(scope="module")
def source(_tiny_loaded, tmp_path_factory):
    """A mixed Q4_K / Q8_0 / Q4_0 / Q5_K GGUF of the fixture, and the model transformers loads back from it."""
    from birdbone_core.model.load import load_model

    lm = _tiny_loaded
    q = quantize_model(lm.model, Quantize(target_bpw=16.0, types=["Q4_K"], overrides=MIX), None)
    path = tmp_path_factory.mktemp("src") / "mixed.gguf"
    export_gguf(lm.model, lm.tokenizer, path, out_type="f16", quantized=q.quantized)
    return path, load_model(str(path))


def _file_blocks(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors
            if t.tensor_type.name not in ("F32", "F16")}


def test_unchanged_tensors_keep_their_blocks(source):
    path, lm = source
    cfg = Quantize(target_bpw=16.0, types=["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    cands = measure_candidates(lm.model, cfg, None, source_gguf=path)
    src = _file_blocks(path)
    assert cands.from_source == {n: t for n, (t, _) in src.items()}      # every block tensor qualifies
    for name, (t, raw) in src.items():
        assert cands.options[name][t][1] == 0.0                          # no error: they are the weights
        assert cands.packed[name][t].tobytes() == raw
        assert all(err > 0 for ty, (_, err) in cands.options[name].items() if ty != t)
    # at the source's own size the budget can only afford the source mix, and picks its exact bytes
    r = choose(cands, sum(len(raw) for _, raw in src.values()) + cands.fixed_bytes)
    assert r.kept_source == sorted(src)
    assert {n: r.types[n] for n in src} == {n: t for n, (t, _) in src.items()}
    assert all(r.quantized[n][1].tobytes() == raw for n, (_, raw) in src.items())


def test_changed_tensor_is_reencoded(source):
    path, lm = source
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3   # one weight moved: no longer the file's
    cfg = Quantize(target_bpw=16.0, types=["Q4_K", "Q8_0", "Q4_0", "Q5_K"])
    cands = measure_candidates(model, cfg, None, source_gguf=path)
    assert "blk.0.attn_q.weight" not in cands.from_source
    assert "blk.0.attn_k.weight" in cands.from_source
    assert cands.options["blk.0.attn_q.weight"]["Q4_K"][1] > 0


def test_opt_out_and_type_not_allowed(source):
    path, lm = source
    off = measure_candidates(lm.model, Quantize(target_bpw=16.0, types=["Q4_K"], keep_source=False), None,
                             source_gguf=path)
    assert off.from_source == {}
    only_q4k = measure_candidates(lm.model, Quantize(target_bpw=16.0, types=["Q4_K"]), None, source_gguf=path)
    assert "token_embd.weight" not in only_q4k.from_source                # its Q8_0 is not a candidate
    assert "blk.2.attn_q.weight" in only_q4k.from_source


def test_corrupt_source_is_a_clear_error(source, tmp_path):
    _, lm = source
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(BirdboneError, match="bad.gguf"):
        measure_candidates(lm.model, Quantize(target_bpw=16.0, types=["Q4_K"]), None, source_gguf=bad)
