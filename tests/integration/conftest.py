import os

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.fuse)


@pytest.fixture(autouse=True)
def _needs_fuse():
    # CI runs as root with /dev/fuse; a test that needs a mount must pass there.
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.fail("integration tests need root and /dev/fuse (run them as CI does)")
