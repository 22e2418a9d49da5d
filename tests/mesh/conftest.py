"""What the chart tests share: the helm binary (skipped with the reason when there is none)."""

from pathlib import Path

import pytest

from tests.mesh import chart_tools as ct


@pytest.fixture(scope="module")
def helm_bin() -> Path:
    binary, reason = ct.helm_binary()
    if binary is None:
        pytest.skip(reason)
    return binary
