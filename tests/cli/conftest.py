"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest
from helpers.tools import run_tool


@pytest.fixture
def tool():
    """run_tool(name, *args, input=None, check=True) -> CompletedProcess."""
    return run_tool
