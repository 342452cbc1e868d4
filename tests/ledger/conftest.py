import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    """The ledger's ops are small and memory-bound; on a busy 2-core box, torch's thread pool makes each
    one wait for a descheduled worker (100x slower). One thread keeps these tests fast and unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
