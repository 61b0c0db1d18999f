"""API-key authentication as a FastAPI dependency (Authorization: Bearer or X-API-Key)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from fastapi import Request

from .errors import APIError


def key_id(key: str) -> str:
    """A short, non-reversible id for the audit log; keys themselves are never logged."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:10]


class KeyChecker:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | None) -> str | None:
        """The key id when the presented key matches one (constant-time), else None."""
        if not presented:
            return None
        candidate = presented.encode()
        match = None
        for key in self._keys:  # compare against every key: timing does not tell which one matched
            if hmac.compare_digest(candidate, key):
                match = key
        return key_id(match.decode()) if match is not None else None


UNAUTHORIZED = "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)"


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The presented key. One rule for both headers: surrounding whitespace is not part of a key."""
    header = headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return (headers.get("x-api-key") or "").strip() or None


def presented_key(request: Request) -> str | None:
    return key_from_headers(request.headers)


async def require_api_key(request: Request) -> str:
    """Dependency for protected routes: returns the caller's key id ('anonymous' when keys are off).

    The request middleware checks the key before the body is read and leaves the key id in the request
    state; this dependency returns it (and checks itself when the app runs without that middleware)."""
    checker: KeyChecker = request.app.state.runtime.keys
    if not checker.enabled:
        request.state.key_id = "anonymous"
        return "anonymous"
    found = getattr(request.state, "key_id", None) or checker.check(presented_key(request))
    if found is None:
        raise APIError(401, "unauthorized", UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
    request.state.key_id = found
    return found
