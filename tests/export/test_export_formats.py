"""The GGUF tensor-format table (birdbone_core.quant.formats)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.formats import FORMATS, bits_per_weight, can_apply, get_format, quantizable_formats


def test_table_covers_the_formats_we_write_or_read():
    assert list(FORMATS) == ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                             "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
    for f in FORMATS.values():
        assert f.qtype == gguf.GGMLQuantizationType[f.name]
        assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[f.qtype]


@pytest.mark.parametrize("name,bpw", [("F32", 32), ("F16", 16), ("BF16", 16), ("Q8_0", 8.5), ("Q4_0", 4.5),
                                      ("Q4_1", 5.0), ("Q5_0", 5.5), ("Q5_1", 6.0), ("Q2_K", 2.625),
                                      ("Q3_K", 3.4375), ("Q4_K", 4.5), ("Q5_K", 5.5), ("Q6_K", 6.5625),
                                      ("IQ4_NL", 4.5), ("IQ4_XS", 4.25)])
def test_bits_per_weight(name, bpw):
    assert bits_per_weight(name) == bpw
    assert bits_per_weight(name.lower()) == bpw


def test_can_apply_needs_whole_blocks():
    assert can_apply("q8_0", 640) and can_apply("Q4_0", 32)
    assert not can_apply("Q4_K", 640)  # Gemma 3 270M rows: not a multiple of 256
    assert can_apply("Q4_K", 2048) and can_apply("F16", 7) and not can_apply("Q8_0", 72)


def test_quantizable_is_what_gguf_can_write():
    assert quantizable_formats() == ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
    for name in quantizable_formats():
        f = get_format(name)
        q = gguf.quants.quantize(np.ones((2, 64), dtype=np.float32), f.qtype)
        assert q.nbytes == f.n_bytes(128)


def test_unknown_format_is_a_user_error():
    with pytest.raises(BirdboneError, match="unknown GGUF tensor format 'Q9_9'"):
        bits_per_weight("Q9_9")
    with pytest.raises(BirdboneError, match="TQ1_0 is not supported"):
        get_format(gguf.GGMLQuantizationType.TQ1_0)
