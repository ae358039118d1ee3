"""`njit`: numba's compiler with its on-disk cache when there is somewhere to keep it.

numba refuses `cache=True` at decoration time ("cannot cache function ...: no locator
available") when neither the package's `__pycache__` nor the user cache directory
(`$NUMBA_CACHE_DIR`, else `~/.cache`) is writable, e.g. for a user without a writable
HOME.  Then the function is compiled per process instead (slower first call, same code).
"""
from __future__ import annotations

from typing import Any, Callable

import numba


def njit(**options: Any) -> Callable[[Callable], Callable]:
    """Decorator: `numba.njit(cache=True, **options)`, or without the cache if numba has no
    writable place for it."""
    def decorate(fn: Callable) -> Callable:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as e:
            if "cannot cache" not in str(e):
                raise
            return numba.njit(cache=False, **options)(fn)
    return decorate
