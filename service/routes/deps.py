"""Shared route dependencies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from ..errors import APIError
from ..runtime import Runtime

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
    """Await a whole (not streamed) answer; cancel it when the client leaves first (499).

    Without streaming no send fails when the client leaves, so the request is polled for a disconnect,
    and the work's own cleanup (cancelling its engine rows) runs instead of generating for nobody."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise APIError(499, "client_closed", "the client closed the connection")
    return await task
