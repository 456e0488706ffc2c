"""Guest memory: mapped regions, the immutable memory table, and driver-side guest RAM.

Synchronous; uses only mmap, numpy and os. See :mod:`trio_vhost.mem.region` for the rule on
how long views may live.
"""

from __future__ import annotations

from .guest import DEFAULT_UVA_BASE as DEFAULT_UVA_BASE
from .guest import GuestRam as GuestRam
from .region import MemoryRegion as MemoryRegion
from .table import MAX_MEM_SLOTS as MAX_MEM_SLOTS
from .table import MemoryTable as MemoryTable

__all__ = ["DEFAULT_UVA_BASE", "MAX_MEM_SLOTS", "GuestRam", "MemoryRegion", "MemoryTable"]
