"""Structural compression that stock llama.cpp runs faster: narrower layers (width.py: FFN neurons,
attention KV groups, uniform across layers as llama.cpp's graphs require) and fewer layers (depth.py:
layer importance, a drop plan that keeps each kept layer's attention type, renumbering). Every change
returns a record that restores the original weights bit for bit."""
from birdbone_core.structure.depth import DropRecord, drop_layers, revert_drop
from birdbone_core.structure.width import WidthRecord, WidthReport, prune_width, restore_width

__all__ = ["DropRecord", "WidthRecord", "WidthReport", "drop_layers", "prune_width", "restore_width", "revert_drop"]
