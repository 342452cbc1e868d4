import contextlib
import copy

import pytest
import torch

from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.prune.sequential import prune_sequential
from birdbone_core.recipe import parse_recipe


@contextlib.contextmanager
def one_thread():
    """Backprop on a tiny model with 2 threads on contended cores is ~15x slower than with 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_module():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def heal_data(_tiny_loaded):
    tok = _tiny_loaded.tokenizer
    calib = calibration_blocks(tok, read_text(None, "calib")[0], n_samples=16, seq_len=128, seed=0)
    chunks = evaluation_chunks(tok, read_text(None, "eval")[0], n_ctx=128, max_chunks=32)
    return calib, chunks


@pytest.fixture(scope="session")
def dense_eval(_tiny_loaded, heal_data):
    """(EvalResult, scored hidden states) of the dense fixture on the eval chunks."""
    with one_thread():
        return evaluate(_tiny_loaded.model, heal_data[1])


@pytest.fixture(scope="session")
def pruned(_tiny_loaded, heal_data):
    """The fixture pruned 50% unstructured with Wanda (a copy; tests deep-copy it again to heal)."""
    lm = copy.deepcopy(_tiny_loaded)
    cfg = parse_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4}}).prune
    with one_thread():
        prune_sequential(lm.model, heal_data[0], cfg)
    return lm
