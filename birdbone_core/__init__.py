"""birdbone: shed the weights that carry no load, heal what remains, export to llama.cpp GGUF."""

__version__ = "0.1.0"
