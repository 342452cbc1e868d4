"""GGUF export for llama.cpp: `export_gguf(model, tokenizer, out_path, out_type=...)`."""
from birdbone_core.export.gguf_file import OUT_TYPES, ExportResult, export_gguf

__all__ = ["OUT_TYPES", "ExportResult", "export_gguf"]
