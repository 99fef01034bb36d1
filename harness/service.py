"""The start/stop shape every long-lived part of the harness shares."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Service:
    """Something started and stopped: usable as ``async with``.

    ``stop()`` must cope with a partial ``start()``: if starting fails, what
    did start is stopped before the error goes on.
    """

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> object:
        """Stop; what it returns is the subclass's business."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
