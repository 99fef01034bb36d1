"""One time unit for every wait in the harness, scalable for slow machines.

Every timeout is a multiple of :data:`UNIT`; ``HARNESS_TIMEOUT_FACTOR``
(default 1.0) scales them all, the way ``websockets``' test suite does.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def _factor() -> float:
    raw = os.environ.get("HARNESS_TIMEOUT_FACTOR", "1")
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"HARNESS_TIMEOUT_FACTOR must be a number, not {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"HARNESS_TIMEOUT_FACTOR must be positive, not {raw!r}")
    return value


#: One time unit in seconds. Waits are expressed as ``n * UNIT``.
UNIT: float = 1.0 * _factor()


def units(n: float) -> float:
    """Return *n* time units in seconds."""
    return n * UNIT


async def poll(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Call *check* until it returns something other than None.

    Raises TimeoutError naming *what* after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(interval)
