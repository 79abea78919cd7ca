"""The qemu guest fixture (see qemu.py). Session-scoped work dir; each test module gets a scratch dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.qemu import Guest


@pytest.fixture(scope="session")
def vm_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vm-work")


@pytest.fixture(scope="module")
def guest(tmp_path_factory, vm_workdir):
    """A Guest whose scratch dir (shared rw with the guest at the same path) is fresh per module."""
    why = Guest.available()
    if why:
        pytest.skip(why)
    scratch = tmp_path_factory.mktemp("vm-scratch")
    return Guest(scratch, vm_workdir)
