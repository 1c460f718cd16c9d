import sys
from pathlib import Path

# tests import their shared helpers (tests/reference.py) as a plain module
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # `python -m pytest -m "not slow"` is the fast loop for development; CI runs the whole suite
    config.addinivalue_line("markers", "slow: over ~5 s on 2 CPU cores: real-size parity, toy training runs, "
                                       "two-process gloo, the toy quick start; CI runs them too")
