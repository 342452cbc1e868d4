"""The ledger delta codec's file bytes are a function of the delta alone."""


def test_delta_bytes_do_not_depend_on_the_writers_metadata_order():
    """safetensors keeps metadata in a per-process hash map order; pack's bytes must not vary with it."""
    import json
    import struct

    import torch
    from safetensors.torch import load, save

    from birdbone_core.ledger.codec import canonical_header

    t = {"w.old": torch.arange(5, dtype=torch.float32), "w.idx": torch.ones(3, dtype=torch.int32)}
    outs = set()
    for order in (["format", "tensors"], ["tensors", "format"]):
        values = {"format": "birdbone-ledger-delta/1", "tensors": json.dumps({"w": {"shape": [5], "n": "é"}})}
        raw = save(t, metadata={k: values[k] for k in order})
        c = canonical_header(raw)
        assert len(c) == len(raw)
        (n,) = struct.unpack("<Q", c[:8])
        assert list(json.loads(c[8:8 + n])["__metadata__"]) == ["format", "tensors"]
        back = load(c)
        assert all(torch.equal(back[k], t[k]) for k in t)
        outs.add(c)
    assert len(outs) == 1
