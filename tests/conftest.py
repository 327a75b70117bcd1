"""Shared fixtures: a tiny ToyStreets benchmark generated once per test session."""

import pytest

TOY_SIZE = (32, 64)
TOY_N_TRAIN, TOY_N_VAL = 8, 4
TOY_CONDITIONS = ("night", "fog", "rain", "snow")


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A ToyStreets root (32x64, 8 train / 4 val, all conditions). Read-only: do not modify it."""
    from dasslab import toystreets

    root = tmp_path_factory.mktemp("toystreets") / "toy"
    toystreets.generate(root, TOY_SIZE, TOY_N_TRAIN, TOY_N_VAL, seed=0, conditions=TOY_CONDITIONS, progress=False)
    return root


@pytest.fixture(scope="session")
def toy_cfg(toy_root):
    """A runs.Config whose data table points at ``toy_root``."""
    from dasslab import runs

    return runs.Config.wrap({
        "profile": "test", "device": "cpu",
        "data": {"dataset": "toystreets", "root": str(toy_root), "size": list(TOY_SIZE),
                 "n_train": TOY_N_TRAIN, "n_val": TOY_N_VAL, "seed": 0, "conditions": list(TOY_CONDITIONS)},
    })


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is fastest, and 2 threads on a shared 2-core box thrash. Per module,
    because some tests call ``runs.set_threads()`` and change the global setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    """One intra-op thread for unit tests: tiny tensors only lose to threading overhead."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    torch.set_num_threads(1)
