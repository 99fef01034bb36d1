"""Helpers for the real-call tests."""

from __future__ import annotations

import pytest

from astmarks.protocol import ControlFormat


@pytest.fixture(params=[ControlFormat.PLAIN, ControlFormat.JSON], ids=lambda f: f.value)
def fmt(request: pytest.FixtureRequest) -> ControlFormat:
    """Run the test in both control formats."""
    value: ControlFormat = request.param
    return value
