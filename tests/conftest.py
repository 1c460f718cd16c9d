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


TOY = Path(__file__).resolve().parents[1] / "weights" / "toy-sd"


@pytest.fixture(scope="session")
def toy_epsilon(tmp_path_factory) -> Path:
    """weights/toy-sd with SD-v1's schedule in its scheduler/ (PNDM, epsilon, no zero terminal SNR), for the
    tests of computations that differ between the two ways of training. Its U-Net, trained for v on the toy
    schedule, predicts a poor epsilon here: those tests compare computations, not images."""
    import json
    import shutil

    from minisd.checkpoints.ldm import SD_SCHEDULER

    folder = tmp_path_factory.mktemp("toy-epsilon") / "toy-sd"
    shutil.copytree(TOY, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER, indent=1))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", SD_SCHEDULER["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


@pytest.fixture(params=["epsilon", "v-zero-snr"])
def toy_each_schedule(request) -> Path:
    """The toy teacher with SD-v1's schedule (toy_epsilon), then as shipped (v-prediction, zero terminal SNR)."""
    return request.getfixturevalue("toy_epsilon") if request.param == "epsilon" else TOY
