import os

import pytest

# Two threads keep tests from fighting over the cores when pytest runs beside other work.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_torch():
    import torch

    torch.manual_seed(0)
    yield
