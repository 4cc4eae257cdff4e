import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tests run on one thread: deterministic timing on small CI machines, no oversubscription."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
