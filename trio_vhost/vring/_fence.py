"""The one place that orders memory accesses between us and the peer sharing the ring.

Python has no memory-barrier primitive. The split ring needs exactly one kind of ordering
that the hardware does not give for free: a **store followed by a load** of a different
location (DESIGN.md §6):

* device: store ``used.idx`` (or ``avail_event`` / ``used.flags``), then load ``used_event``
  / ``avail.flags`` (or re-load ``avail.idx``);
* driver: store ``avail.idx`` (or ``used_event``), then load ``avail_event`` / ``used.flags``.

Without a full barrier either side may read a stale value and both decide that the other one
will notify: a lost notification and a hung queue (the spec's "suitable memory barrier" in
"Supplying Buffers to The Device" and "Receiving Used Buffers From The Device").

Why a lock works: on x86-64 every LOCK-prefixed read-modify-write (and ``xchg``) is a full
barrier, store->load included. CPython's ``threading.Lock`` on Linux is a POSIX semaphore
(or a futex mutex); ``acquire()`` and ``release()`` each do one atomic read-modify-write on
the lock word, which the compiler emits as a locked instruction. The C call boundary also
stops the compiler from moving our numpy stores across it. The lock is private and never
contended, so it costs ~100 ns (measured in ``lab/ring-spike.md``).

Store->store and load->load order need no fence on x86 (TSO): numpy slice assignments and
scalar stores are plain ``mov``/``memcpy`` stores that retire in program order. On a weakly
ordered CPU (aarch64) glibc's semaphore operations are only acquire/release, which is not a
store->load barrier; this module is where a real barrier would go there.
"""

from __future__ import annotations

import threading
from typing import Final

__all__ = ["fence"]

_LOCK: Final = threading.Lock()


def fence() -> None:
    """Order every memory access before the call before every access after it (x86-64)."""
    _LOCK.acquire()
    _LOCK.release()
