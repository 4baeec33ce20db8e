"""Shared test set-up.

Eight host CPU devices are forced before JAX is imported so that sharding tests
can build a real 8-device mesh on a CPU-only machine.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Folder of the real EM volumes (`../shared/data`); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM volumes not found: {SHARED_DATA} (../shared/data) is absent")
    return SHARED_DATA
