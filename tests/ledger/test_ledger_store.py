"""The ledger on the fixture model: 3 prune+heal waves, a rollback and one more wave, rebuilt exactly."""
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load, save

from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger, format_diff, format_log, state_of, tensor_hash
from birdbone_core.ledger.delta import bits


def linear_names(state):
    return [n for n in state if ".layers." in n and n.endswith("proj.weight")]


def prune_and_heal(state, frac, seed, heal=0.01, neg_zeros=0):
    """Zero `frac` more of each linear weight by magnitude, then nudge `heal` of the survivors."""
    g = torch.Generator().manual_seed(seed)
    out = {n: t.clone() for n, t in state.items()}
    for n in linear_names(out):
        f = out[n].view(-1)                                          # [N]
        score = f.abs().masked_fill(f == 0, float("inf"))
        f.index_fill_(0, score.topk(int(frac * f.numel()), largest=False).indices, 0.0)
        alive = torch.nonzero(f).reshape(-1)                          # [a]
        pick = alive.index_select(0, torch.randperm(alive.numel(), generator=g)[: int(heal * alive.numel())])
        f.index_add_(0, pick, 1e-3 * torch.randn(pick.numel(), generator=g))
        if neg_zeros:                                                 # a sign-of-zero-only change
            f.index_fill_(0, torch.nonzero(f == 0).reshape(-1)[:neg_zeros], -0.0)
    return out


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.fixture(scope="module")
def history(_tiny_loaded, tmp_path_factory):
    """Waves 1-3 prune 10% more each (+1% healing), wave 4 reverts to 1, wave 5 prunes again."""
    run = tmp_path_factory.mktemp("run")
    base = {n: t.clone() for n, t in state_of(_tiny_loaded.model).items()}
    led = Ledger(run)
    led.init_base(base, meta={"model": "tiny-llama"}, metrics={"ppl": 24.6})
    snaps = [base]
    for k in (1, 2, 3):
        snaps.append(prune_and_heal(snaps[-1], 0.10, seed=k, neg_zeros=5 if k == 2 else 0))
        led.record_wave(k, snaps[-2], snaps[-1], {"ppl": 24.6 + k, "eval": {"kld": 0.01 * k}}, decision="accept")
    led.revert_marker(1, metrics={"ppl": 25.6})
    snaps.append(snaps[1])
    snaps.append(prune_and_heal(snaps[1], 0.05, seed=5))
    led.record_wave(5, snaps[1], snaps[5], {"ppl": 25.9})
    return led, snaps


def test_state_at_every_wave_is_exact(history):
    led, snaps = history
    for k, snap in enumerate(snaps):
        s = led.state_at(k, snaps[0])
        assert same_state(s, snap), k
        for n, rec in led.entry(k).tensors.items():                   # the recorded hashes, reproduced
            assert tensor_hash(s[n]) == rec.hash
    assert led.entry(2).sparsity > led.entry(1).sparsity > led.entry(0).sparsity
    assert any(bits(t).eq(bits(torch.tensor(-0.0))).any() for t in led.state_at(2, snaps[0]).values())


def test_tensors_at_streams_the_same_states_one_tensor_at_a_time(history, tmp_path):
    """tensors_at (a revert of a model bigger than memory) yields exactly state_at's tensors, in base order,
    through every wave including the revert marker; a damaged delta file is refused the same way."""
    led, snaps = history
    for k in (0, 2, 4, 5):
        streamed = list(led.tensors_at(k, snaps[0]))
        assert [n for n, _ in streamed] == list(led.entry(0).tensors)
        assert same_state(dict(streamed), snaps[k]), k
    damaged = Ledger(tmp_path)
    shutil.copytree(led.dir, damaged.dir)
    path = damaged.wave_dir(3) / "delta.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert same_state(dict(damaged.tensors_at(2, snaps[0])), snaps[2])
    with pytest.raises(BirdboneError, match="differ from the sha256 ledger/index.json recorded for wave 3"):
        list(damaged.tensors_at(3, snaps[0]))


def test_rebuilt_state_loads_into_the_model(history, tiny):
    led, snaps = history
    tiny.model.load_state_dict(led.state_at(3, snaps[0]))
    assert same_state(state_of(tiny.model), snaps[3])


def test_rollback_restores_exact_bytes_and_keeps_history(history):
    led, snaps = history
    e = led.entry(4)
    assert (e.kind, e.reverts_to, e.decision) == ("revert", 1, "revert to wave 1")
    assert same_state(led.state_at(4, snaps[0]), led.state_at(1, snaps[0]))
    assert [x.kind for x in led.log()] == ["base", "wave", "wave", "wave", "revert", "wave"]
    assert all((led.wave_dir(w) / "delta.safetensors").is_file() for w in range(1, 6))
    assert led.diff(1, 4).tensors == []
    with pytest.raises(BirdboneError, match="cannot revert to wave 5"):
        led.revert_marker(5)


def test_diff_from_deltas_matches_rebuilt_states(history):
    led, snaps = history
    fast, full = led.diff(1, 3), led.diff(1, 3, snaps[0])
    assert fast.tensors == full.tensors and len(fast.tensors) == len(linear_names(snaps[0]))
    for r in fast.tensors:
        a, b = snaps[1][r.name], snaps[3][r.name]
        assert r.changed == int((bits(a) != bits(b)).sum())
        assert r.l2 == pytest.approx(float((b.double() - a.double()).norm()), rel=1e-12)
        assert r.sparsity_b == pytest.approx(float((b == 0).double().mean()))
    back = led.diff(3, 1)
    assert [(r.name, r.changed, r.l2) for r in back.tensors] == [(r.name, r.changed, r.l2) for r in fast.tensors]
    assert (fast.a.metrics["ppl"], fast.b.metrics["ppl"]) == (25.6, 27.6)


def test_tables_render(history):
    led, _ = history
    con = Console(record=True, width=220)
    con.print(format_log(led.log()))
    con.print(format_diff(led.diff(0, 5), top=3))
    out = con.export_text()
    assert "revert→1" in out and "eval.kld" in out and "largest 3 shown" in out and "mlp" in out


def test_tampered_delta_is_caught(history, tmp_path):
    led0, snaps = history
    led = Ledger(tmp_path)
    shutil.copytree(led0.dir, led.dir)
    path = led.wave_dir(2) / "delta.safetensors"
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + hlen])["__metadata__"]
    tensors = load(raw)
    name = next(n.removesuffix(".old") for n in tensors if n.endswith(".old"))
    tensors[f"{name}.new"] = tensors[f"{name}.new"].clone()
    tensors[f"{name}.new"].view(-1)[0] += 1.0                          # one value altered
    path.write_bytes(save(tensors, metadata=meta))
    assert same_state(led.state_at(1, snaps[0]), snaps[1])            # earlier waves still fine
    # first line of defence: the delta file's sha256 in index.json (also catches a swapped file)
    for check in (lambda: led.state_at(2, snaps[0]), lambda: led.diff(1, 2), led.verify):
        with pytest.raises(BirdboneError, match="differ from the sha256 ledger/index.json recorded for wave 2"):
            check()
    swapped = Ledger(tmp_path / "swapped")
    shutil.copytree(led0.dir, swapped.dir)
    (swapped.wave_dir(2) / "delta.safetensors").write_bytes((swapped.wave_dir(1) / "delta.safetensors").read_bytes())
    with pytest.raises(BirdboneError, match="wave 2 .damaged or swapped delta file"):
        swapped.diff(0, 3)
    # the next ones hold for a ledger written before that hash was kept: the tensors' own hashes
    index = json.loads(led.index_path.read_text())
    for w in index["waves"]:
        del w["delta_sha256"]
    led.index_path.write_text(json.dumps(index))
    with pytest.raises(BirdboneError, match=rf"wave 2: tensor '{name}' does not match its recorded hash"):
        led.state_at(2, snaps[0])
    tensors[f"{name}.old"] = tensors[f"{name}.old"].clone()
    tensors[f"{name}.old"].view(-1)[0] += 1.0
    path.write_bytes(save(tensors, metadata=meta))
    with pytest.raises(BirdboneError, match=rf"wave 2: tensor '{name}': delta does not apply"):
        led.state_at(3, snaps[0])
    path.write_bytes(raw[:-100])
    with pytest.raises(BirdboneError, match="wave 2.*damaged delta file"):
        led.state_at(2, snaps[0])
    other = dict(snaps[0], **{name: snaps[1][name]})
    with pytest.raises(BirdboneError, match=rf"wave 0 \(base\): tensor '{name}' differs"):
        led.state_at(1, other)


def test_crash_before_index_update_then_retry(history, tmp_path, monkeypatch):
    _, snaps = history
    led = Ledger(tmp_path)
    led.init_base(snaps[0])
    led.record_wave(1, snaps[0], snaps[1], {"ppl": 1.0})

    def crash(self, index):
        raise RuntimeError("killed")
    monkeypatch.setattr(Ledger, "_commit_index", crash)
    with pytest.raises(RuntimeError, match="killed"):
        led.record_wave(2, snaps[1], snaps[2], {"ppl": 2.0})
    monkeypatch.undo()
    assert (led.wave_dir(2) / "delta.safetensors").is_file()          # written, but not committed
    assert led.last_wave == 1 and len(led.log()) == 2
    with pytest.raises(BirdboneError, match="wave 2 is not recorded"):
        led.state_at(2, snaps[0])
    assert same_state(led.state_at(1, snaps[0]), snaps[1])
    e = led.record_wave(2, snaps[1], snaps[2], {"ppl": 2.0})
    assert led.last_wave == 2 and e.metrics == {"ppl": 2.0}
    assert same_state(led.state_at(2, snaps[0]), snaps[2])


def test_rerecording_and_wrong_inputs(history, tmp_path):
    _, snaps = history
    led = Ledger(tmp_path)
    with pytest.raises(BirdboneError, match="no ledger"):
        led.log()
    first = led.init_base(snaps[0], base_snapshot=True)
    assert led.init_base(snaps[0]).digest == first.digest             # same base: no-op
    with pytest.raises(BirdboneError, match="different base"):
        led.init_base(snaps[1])
    e1 = led.record_wave(1, snaps[0], snaps[1], {"ppl": 1.0})
    led.record_wave(2, snaps[1], snaps[2], {"ppl": 2.0})
    r = led.revert_marker(1)
    assert led.revert_marker(1) == r and led.last_wave == 3             # a retried revert: no-op
    again = led.record_wave(1, snaps[0], snaps[1], {"ppl": 1.5})       # same change: no-op, first kept
    assert again.digest == e1.digest and again.metrics == {"ppl": 1.0} and led.last_wave == 3
    with pytest.raises(BirdboneError, match="already recorded with a different change"):
        led.record_wave(1, snaps[0], snaps[2], {})
    with pytest.raises(BirdboneError, match="next wave is 4"):
        led.record_wave(5, snaps[1], snaps[2], {})
    with pytest.raises(BirdboneError, match="old state's tensor .* differs from the recorded state after wave 3"):
        led.record_wave(4, snaps[0], snaps[2], {})
    with pytest.raises(BirdboneError, match="lacks tensor"):
        led.record_wave(4, snaps[1], {k: v for k, v in list(snaps[2].items())[1:]}, {})
    with pytest.raises(BirdboneError, match="metrics must be JSON"):
        led.record_wave(4, snaps[1], snaps[2], {"t": torch.ones(1)})
    assert same_state(led.state_at(3), snaps[1])                      # from the stored base snapshot


def test_delta_storage_is_much_smaller_than_a_snapshot(history, tmp_path, tiny_path):
    led, snaps = history
    full = (tiny_path / "model.safetensors").stat().st_size            # the model file (tied lm_head once)
    touched = sum(snaps[0][n].numel() * 4 for n in linear_names(snaps[0]))   # raw bytes of pruned tensors
    pure = Ledger(tmp_path)
    pure.init_base(snaps[0])
    pure.record_wave(1, snaps[0], prune_and_heal(snaps[0], 0.10, seed=1, heal=0.0), {})
    sizes = {"prune only": (pure.wave_dir(1) / "delta.safetensors").stat().st_size,
             "prune + 1% healing": (led.wave_dir(1) / "delta.safetensors").stat().st_size}
    for what, size in sizes.items():
        print(f"10% wave, {what}: {size / full:.3f} of the model file, {size / touched:.3f} of the pruned tensors")
        assert size / full < 0.15 and size / touched < 0.17
    assert led.entry(1).delta_bytes <= sizes["prune + 1% healing"]
