import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every quant test sees the same random data, run alone or in any order."""
    torch.manual_seed(0)
