"""Shared route dependencies."""

from __future__ import annotations

from fastapi import Request

from ..runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")
