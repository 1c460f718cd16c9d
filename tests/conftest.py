import sys
from pathlib import Path

import pytest

# tests import their shared helpers (tests/reference.py) as a plain module
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # `python -m pytest -m "not slow"` is the fast loop for development; CI runs the whole suite
    config.addinivalue_line("markers", "slow: over ~5 s on 2 CPU cores: real-size parity, toy training runs, "
                                       "two-process gloo, the toy quick start; CI runs them too")


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """A toy data set of 64 images (48 in train/, 16 in heldout/), written once for the toy world's command
    tests; they read it and write elsewhere."""
    from minisd.toy.dataset import write_dataset

    root = tmp_path_factory.mktemp("toy")
    write_dataset(root, n=64, seed=0, heldout=0.25, workers=1)
    return root
