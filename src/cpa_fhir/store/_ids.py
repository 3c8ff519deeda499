"""Ids the server assigns: UUIDs whose leading bits are the time (RFC 9562 version 7).

Random (version 4) ids land anywhere in the tables' B-tree indexes, so each commit
dirties pages all over them; ids that grow with time land together at the end.
Pure apart from reading the clock and the system's random source.
"""

from __future__ import annotations

import os
import threading
import time

_RAND_B_BITS = 62
_POOL_BYTES = 4096

# Random bytes drawn from the system a page at a time: one system call per id cost
# more than the rest of making it. A forked child starts with none of its parent's.
_pool = bytearray()
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool_lock
    _pool.clear()
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _random_bytes(size: int) -> bytes:
    with _pool_lock:
        if len(_pool) < size:
            _pool.extend(os.urandom(_POOL_BYTES))
        out = bytes(_pool[:size])
        del _pool[:size]
        return out


def time_ordered_id() -> str:
    """A new UUID version 7: 48 bits of Unix milliseconds, then 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(_random_bytes(10), "big")
    rand_a = (rand >> 68) & 0xFFF
    rand_b = rand & ((1 << _RAND_B_BITS) - 1)
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    digits = f"{value:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"
