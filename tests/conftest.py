import sys
from pathlib import Path

# tests import their shared helpers (tests/reference.py) as a plain module
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size (real-config) parity tests; CI runs them too")
