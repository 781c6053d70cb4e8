import os
import secrets

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("HLH_TEST_SEED", secrets.randbits(32)))
    print(f"HLH_TEST_SEED={seed} ({request.node.nodeid})")
    return np.random.default_rng(seed)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run the whole-space checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="whole-space check: run with --runslow (nightly)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _settings_read_afresh():
    """HLH_MLX_* settings are read once per process (hlh_mlx.config); tests set them with
    monkeypatch, so each test starts and ends with them unread."""
    from hlh_mlx import config
    config.reset()
    yield
    config.reset()
