"""Loop guard: the original DoctorGLM model repeated itself (paper, Table 2 A4)."""

from __future__ import annotations


def find_loop(tokens: list[int], *, max_period: int = 40, min_span: int = 24, min_repeats: int = 3) -> int:
    """Return the period of a loop at the end of tokens, or 0.

    A loop is a tail that repeats itself with period p for at least max(min_span, p * min_repeats)
    tokens (e.g. the same phrase three times in a row, or one token 24 times).
    """
    n = len(tokens)
    for period in range(1, max_period + 1):
        span = max(min_span, period * min_repeats)
        if n < span + period:
            break
        if tokens[n - span:] == tokens[n - span - period:n - period]:
            return period
    return 0
