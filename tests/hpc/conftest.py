"""Fixtures of the HPC lane: simulated nodes (network namespaces on this machine) and CURVE
keys.  Tests that need nodes are skipped, with the reason, where they cannot be made (not
root, no ``ip``, no network namespaces)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpi_imgproc.simnodes import SimNodes, simulated_nodes, unavailable_reason


@pytest.fixture(scope="session")
def can_make_nodes() -> None:
    """Skip unless simulated nodes can be made here."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def three_nodes(can_make_nodes: None) -> Iterator[SimNodes]:
    """Three unshaped nodes and a head node, removed after the module's tests."""
    with simulated_nodes(3) as sim:
        yield sim


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the server's key pair and one allowed client's (``mpi-imgproc keys``)."""
    folder = tmp_path_factory.mktemp("keys") / "keys"
    cli = [sys.executable, "-m", "mpi_imgproc.cli", "keys", str(folder)]
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    return folder
