"""Work a clone does only to report on itself: the finalists' test accuracy and, with
``clone(report_tuned=True)``, each finalist built and tuned for the selection regret. It
chooses nothing and none of it ships, so what measures a clone's cost leaves it out: the
tables' seconds subtract ``profile["report_accuracy"]``, and a sampler of the process's
memory (the benchmarks' ``PeakMemory``) skips its samples while :func:`is_reporting`.

    >>> with reporting_only():
    ...     is_reporting()
    True
    >>> is_reporting()
    False
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["reporting_only", "is_reporting"]

_ACTIVE = threading.Event()  # process-wide, as the resident memory it qualifies


@contextmanager
def reporting_only() -> Iterator[None]:
    """Mark the block as reporting-only work (nested blocks keep the outer mark)."""
    outer = _ACTIVE.is_set()
    _ACTIVE.set()
    try:
        yield
    finally:
        if not outer:
            _ACTIVE.clear()


def is_reporting() -> bool:
    """Whether a :func:`reporting_only` block is running in this process."""
    return _ACTIVE.is_set()
