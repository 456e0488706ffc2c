"""The vectorised chain follower (vring/follow.py) against walk_chain, its specification.

For random descriptor tables, tidy and hostile (loops, ``next`` out of range, readable after
writable, buffers outside memory or across regions, zero lengths, INDIRECT heads and INDIRECT
mid-chain, chains longer than MAX_FOLLOW), popping a batch must give exactly what walking
each head with :func:`walk_chain` gives: the same chains (as objects, as segments and as
per-chain rows), or the same first error, with nothing returned and ``next_avail`` unmoved.

Guest memory (one memfd) with canaries the backend does not map::

    [canary 4K][A 64K: rings, data, indirect tables][canary 4K][B1 8K][B2 8K][canary 4K]

B1 and B2 are adjacent in guest-physical space: a buffer may legally span them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from trio_vhost.errors import VirtqueueError
from trio_vhost.mem import GuestRam, MemoryTable
from trio_vhost.vring import ChainBatch, DescriptorChain, QueueState, SplitQueue, walk_chain
from trio_vhost.vring.follow import FOLLOW_MIN, MAX_FOLLOW
from trio_vhost.vring.layout import DESC_DTYPE
from trio_vhost.vring.layout import VIRTQ_DESC_F_INDIRECT as IND
from trio_vhost.vring.layout import VIRTQ_DESC_F_NEXT as NEXT
from trio_vhost.vring.layout import VIRTQ_DESC_F_WRITE as WRITE

K = 1024
GPA = 0x40_0000
A = GPA + 4 * K
B1, B2 = A + 68 * K, A + 76 * K
END = B2 + 8 * K
DESC = A  # up to 256 entries
AVAIL, USED = A + 0x1000, A + 0x1400
DATA = A + 0x2000  # 24K of buffers
IND1 = A + 0x8000  # indirect tables
SIZES = [8, 16, 64, 128]


@pytest.fixture(scope="module")
def env():
    ram = GuestRam.create(END - GPA + 4 * K, gpa=GPA)
    table = MemoryTable.from_regions(
        [
            ram.backend_region(4 * K, 64 * K),
            ram.backend_region(72 * K, 8 * K),
            ram.backend_region(80 * K, 8 * K),
        ]
    )
    yield ram, table
    table.close()
    ram.close()


def _state(size: int, next_avail: int, *, indirect: bool) -> QueueState:
    return QueueState(
        size=size,
        desc_gpa=DESC,
        avail_gpa=AVAIL,
        used_gpa=USED,
        next_avail=next_avail,
        next_used=next_avail,
        indirect=indirect,
    )


def _load(ram, size, rows, heads, next_avail, ind_rows=()):
    ram.view[:] = 0
    ram.write(DESC, np.array(rows, dtype=DESC_DTYPE).tobytes())
    if ind_rows:
        ram.write(IND1, np.array(ind_rows, dtype=DESC_DTYPE).tobytes())
    avail = np.zeros(3 + size, dtype="<u2")
    avail[1] = (next_avail + len(heads)) & 0xFFFF
    for i, head in enumerate(heads):
        avail[2 + (next_avail + i) % size] = head
    ram.write(AVAIL, avail.tobytes())


def _expected(table, ram, size, heads, *, indirect):
    """Walk every head with walk_chain: the chains, or the first error.

    A batch checks all its heads against the ring size before it looks at any chain.
    """
    desc = memoryview(ram.read(DESC, 16 * size))
    chains = []
    for head in heads:
        if head >= size:
            return VirtqueueError, f"available ring head {head} >= queue size {size}"
    for head in heads:
        try:
            chains.append(walk_chain(table, desc, size, head, indirect=indirect))
        except VirtqueueError as exc:
            return VirtqueueError, str(exc)
    return chains, None


def check_batch(batch: ChainBatch, chains: list[DescriptorChain], table: MemoryTable) -> None:
    """Every view of the batch agrees with the walked chains."""
    assert batch.count == len(chains)
    assert batch.chains == chains
    assert [batch.chain(i) for i in range(batch.count)] == chains
    seg = batch.segments
    starts = seg.start.tolist()
    assert starts[0] == 0
    assert starts[-1] == seg.total
    assert sorted(batch.walked) == [i for i in range(batch.count) if starts[i] == starts[i + 1]]
    regions = seg.region.tolist()
    for i, chain in enumerate(chains):
        a, b = starts[i], starts[i + 1]
        if a == b:
            assert batch.walked[i] == chain
            continue
        readable, writable = [], []
        for j in range(a, b):
            addr, n = int(seg.addr[j]), int(seg.length[j])
            assert n > 0
            region = table.regions[regions[j]]
            assert region.gpa + int(seg.offset[j]) == addr
            assert addr + n <= region.gpa + region.size
            (writable if seg.writable[j] else readable).append((addr, n))
        assert (tuple(readable), tuple(writable)) == (chain.readable, chain.writable)
    if seg.uniform:
        assert starts == list(range(0, seg.uniform * batch.count + 1, seg.uniform))
    simple = batch.simple
    assert simple.tolist() == [starts[i + 1] - starts[i] == 1 for i in range(batch.count)]
    assert sorted(batch.complex_chains) == np.flatnonzero(~simple).tolist()
    for i, chain in enumerate(chains):
        buffers = chain.readable + chain.writable
        if simple[i]:
            assert buffers == ((int(batch.addr[i]), int(batch.length[i])),)
            assert bool(batch.writable[i]) == bool(chain.writable)
        else:
            assert (int(batch.addr[i]), int(batch.length[i]), int(batch.region[i])) == (0, 0, -1)
    assert batch.readable_len.tolist() == [c.readable_len for c in chains]
    assert batch.writable_len.tolist() == [c.writable_len for c in chains]


# -- random tables ------------------------------------------------------------------------------

addrs = st.one_of(
    st.integers(DATA, DATA + 20 * K),  # region A
    st.integers(B1, END - 64),  # B1 / B2
    st.sampled_from([0, GPA, A - 1, B1 - 8, B2 - 16, END - 1, END, (1 << 64) - 8]),
)
lengths = st.one_of(
    st.integers(1, 600),
    st.sampled_from([0, 1, 16, 512, 4096, 0xFFFF_FFFF]),
)


@st.composite
def tables(draw):
    """A descriptor table: tidy chains laid out by a driver, then some rows made hostile."""
    size = draw(st.sampled_from(SIZES))
    rows = [(DATA, 16, 0, 0)] * size
    heads = []
    free = list(range(size))
    order = draw(st.permutations(free))
    pos = 0
    # tidy chains: [readable...][writable...], like a driver makes them; often all of one
    # length (the layout the follower interleaves without sorting)
    same = draw(st.sampled_from([None, None, 2, 3, 4]))
    while pos < size and not (same and pos + same > size):
        n = same or draw(st.integers(1, min(8, size - pos)))
        idx = order[pos : pos + n]
        pos += n
        n_read = draw(st.integers(0, n))
        for k, i in enumerate(idx):
            flags = (WRITE if k >= n_read else 0) | (NEXT if k + 1 < n else 0)
            nxt = idx[k + 1] if k + 1 < n else draw(st.integers(0, 0xFFFF))
            addr = draw(st.integers(DATA, DATA + 20 * K))
            rows[i] = (addr, draw(st.integers(1, 600)), flags, nxt)
        heads.append(idx[0])
    # hostile edits
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
        i = draw(st.integers(0, size - 1))
        addr, length, flags, nxt = rows[i]
        what = draw(
            st.sampled_from(
                ["addr", "len", "flags", "next", "next_out", "loop", "indirect", "write"]
            )
        )
        if what == "addr":
            addr = draw(addrs)
        elif what == "len":
            length = draw(lengths)
        elif what == "flags":
            flags = draw(st.integers(0, 7))
        elif what == "next":
            nxt = draw(st.integers(0, size - 1))
        elif what == "next_out":
            flags |= NEXT
            nxt = draw(st.integers(size, 0xFFFF))
        elif what == "loop":
            flags |= NEXT
            nxt = i
        elif what == "indirect":
            flags = IND | draw(st.sampled_from([0, 0, NEXT, WRITE]))
            addr, length = IND1, 16 * draw(st.integers(1, 3))
        elif what == "write":
            flags ^= WRITE
        rows[i] = (addr, length, flags, nxt)
    if draw(st.integers(0, 3)) == 0:
        extra = draw(st.lists(st.integers(0, size + 2), max_size=4))
        heads += extra
    heads = draw(st.permutations(heads))[:size]
    ind_rows = [
        (draw(st.integers(DATA, DATA + 20 * K)), draw(st.integers(1, 64)), NEXT, 1),
        (draw(st.integers(DATA, DATA + 20 * K)), draw(st.integers(0, 64)), WRITE, 0),
        (0, 0, 0, 0),
    ]
    # some heads become one INDIRECT descriptor pointing at a table of their own (as Linux
    # posts every multi-buffer request), tidy or with hostile rows
    tables = []
    for t, head in enumerate(h for h in heads if h < size):
        if t >= 8 or draw(st.integers(0, 2)):
            continue
        gpa = IND1 + 0x400 + 0x200 * t
        m = draw(st.integers(1, 6))
        n_read = draw(st.integers(0, m))
        entries = []
        for k in range(m):
            flags = (WRITE if k >= n_read else 0) | (NEXT if k + 1 < m else 0)
            addr = draw(st.integers(DATA, DATA + 20 * K))
            entries.append((addr, draw(st.integers(1, 600)), flags, k + 1 if k + 1 < m else 0))
        if draw(st.integers(0, 5)) == 0:
            k = draw(st.integers(0, m - 1))
            addr, length, flags, nxt = entries[k]
            what = draw(st.sampled_from(["addr", "len", "flags", "next", "loop", "write"]))
            if what == "addr":
                addr = draw(addrs)
            elif what == "len":
                length = draw(lengths)
            elif what == "flags":
                flags = draw(st.integers(0, 7))
            elif what == "next":
                nxt = draw(st.integers(0, 8))
            elif what == "loop":
                flags, nxt = flags | NEXT, k
            else:
                flags ^= WRITE
            entries[k] = (addr, length, flags, nxt)
        size_bytes = draw(
            st.one_of(*[st.just(16 * m)] * 6, st.sampled_from([0, 8, 16 * m + 8, 16 * 40]))
        )
        flags = IND | draw(st.sampled_from([0] * 6 + [WRITE, NEXT]))
        where = draw(st.sampled_from([gpa] * 16 + [B2 - 16, END - 8]))
        rows[head] = (where, size_bytes, flags, 0)
        tables.append((gpa, entries))
    return {
        "size": size,
        "rows": rows,
        "heads": heads,
        "ind_rows": ind_rows,
        "tables": tables,
        "indirect": draw(st.sampled_from([True, True, True, False])),
        "next_avail": draw(st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF))),
    }


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=tables(), batch=st.sampled_from([1, 3, FOLLOW_MIN, 16, 64, 256]))
def test_batch_agrees_with_walk_chain(env, spec, batch):
    ram, table = env
    size, heads = spec["size"], spec["heads"]
    _load(ram, size, spec["rows"], heads, spec["next_avail"], spec["ind_rows"])
    for gpa, entries in spec["tables"]:
        ram.write(gpa, np.array(entries, dtype=DESC_DTYPE).tobytes())
    before = ram.view.copy()
    taken = heads[:batch]
    expected, message = _expected(table, ram, size, taken, indirect=spec["indirect"])
    state = _state(size, spec["next_avail"], indirect=spec["indirect"])
    queue = SplitQueue(table, state)
    if expected is VirtqueueError:
        event("error")
        with pytest.raises(VirtqueueError) as info:
            queue.pop_arrays(batch)
        assert str(info.value) == message
        assert queue.next_avail == spec["next_avail"]
    else:
        got = queue.pop_arrays(batch)
        event(f"walked {min(len(got.walked), 2)}+, uniform {got.segments.uniform}")
        if spec["tables"] and spec["indirect"]:
            event(f"indirect tables, walked {min(len(got.walked), 2)}+")
        check_batch(got, expected, table)
        assert queue.next_avail == (spec["next_avail"] + len(taken)) & 0xFFFF
        assert SplitQueue(table, state).pop_batch(batch) == expected
    assert (ram.view == before).all(), "popping wrote guest memory"


# -- fixed cases ------------------------------------------------------------------------------


def _pop(env, size, rows, heads, *, indirect=False, ind_rows=()):
    ram, _ = env
    _load(ram, size, rows, heads, 0, ind_rows)
    return _pop_loaded(env, size, heads, indirect=indirect)


def _pop_loaded(env, size, heads, *, indirect):
    ram, table = env
    expected, message = _expected(table, ram, size, heads, indirect=indirect)
    queue = SplitQueue(table, _state(size, 0, indirect=indirect))
    if expected is VirtqueueError:
        with pytest.raises(VirtqueueError) as info:
            queue.pop_arrays(len(heads))
        assert str(info.value) == message
        assert queue.next_avail == 0
        return None
    batch = queue.pop_arrays(len(heads))
    check_batch(batch, expected, table)
    return batch


def blk_rows(count, size, *, write=False):
    """``count`` virtio-blk requests: header, 4K data, status, descriptors 3i..3i+2."""
    rows = [(DATA, 16, 0, 0)] * size
    for i in range(count):
        data_flags = NEXT | (0 if write else WRITE)
        rows[3 * i] = (DATA + 32 * i, 16, NEXT, 3 * i + 1)
        rows[3 * i + 1] = (B1 + 64 * i, 64, data_flags, 3 * i + 2)
        rows[3 * i + 2] = (DATA + 0x1000 + i, 1, WRITE, 0)
    return rows, [3 * i for i in range(count)]


@pytest.mark.parametrize("write", [False, True])
def test_blk_shaped_batch_is_uniform(env, write):
    rows, heads = blk_rows(20, 64, write=write)
    batch = _pop(env, 64, rows, heads)
    assert batch is not None
    assert batch.segments.uniform == 3
    assert not batch.walked
    assert batch.segments.region.tolist()[:3] == [0, 1, 0]


def test_one_bad_chain_is_walked_the_rest_followed(env):
    rows, heads = blk_rows(20, 64)
    rows[3 * 7 + 1] = (B2 - 16, 64, NEXT | WRITE, 3 * 7 + 2)  # spans B1 and B2: legal
    rows[3 * 9 + 1] = (B1, 0, NEXT | WRITE, 3 * 9 + 2)  # zero length: legal
    batch = _pop(env, 64, rows, heads)
    assert batch is not None
    assert sorted(batch.walked) == [7, 9]
    assert batch.segments.uniform == 0


@pytest.mark.parametrize(
    "edit",
    [
        lambda rows: rows.__setitem__(4, (B1, 64, NEXT | WRITE, 200)),  # next out of range
        lambda rows: rows.__setitem__(4, (B1, 64, NEXT | WRITE, 3)),  # loop back to the head
        lambda rows: rows.__setitem__(5, (DATA, 1, 0, 0)),  # readable after writable data
        lambda rows: rows.__setitem__(5, (DATA, 1, NEXT | WRITE, 5)),  # a loop at the end
        lambda rows: rows.__setitem__(4, (END, 64, NEXT | WRITE, 5)),  # data outside memory
        lambda rows: rows.__setitem__(3, (A - 16, 16, NEXT, 4)),  # header outside memory
        lambda rows: rows.__setitem__(5, (END + 1, 1, WRITE, 0)),  # status outside memory
        lambda rows: rows.__setitem__(5, (DATA, 1, WRITE | IND, 0)),  # INDIRECT not negotiated
    ],
)
def test_hostile_chain_in_a_followed_batch_raises_like_walk_chain(env, edit):
    rows, heads = blk_rows(20, 64)
    edit(rows)
    assert _pop(env, 64, rows, heads) is None


def test_indirect_mid_chain_is_walked_indirect_heads_followed(env):
    rows, heads = blk_rows(20, 64)
    ind_rows = [(DATA + 100, 16, NEXT, 1), (B1 + 8, 32, WRITE, 0)]
    rows[3 * 2 + 1] = (IND1, 32, IND, 0)  # a direct chain ending in an indirect table
    rows[3 * 4] = (IND1, 32, IND, 0)  # an indirect head
    rows[3 * 5] = (IND1, 32, IND | WRITE, 0)  # its WRITE flag is ignored
    batch = _pop(env, 64, rows, heads, indirect=True, ind_rows=ind_rows)
    assert batch is not None
    assert sorted(batch.walked) == [2]
    assert batch.chain(4).readable == ((DATA + 100, 16),)


def linux_rows(count, size, *, entries=3):
    """``count`` virtio-blk requests the way Linux posts them with INDIRECT_DESC: one ring
    descriptor each, pointing at a table of header, data, status."""
    rows = [(DATA, 16, 0, 0)] * size
    tables = []
    for i in range(count):
        gpa = IND1 + 16 * entries * i
        rows[i] = (gpa, 16 * entries, IND, 0)
        tables.append((gpa, (DATA + 32 * i, 16, NEXT, 1)))
        tables += [
            (gpa + 16 * k, (B1 + 64 * i + k, 64, NEXT | WRITE, k + 1))
            for k in range(1, entries - 1)
        ]
        tables.append((gpa + 16 * (entries - 1), (DATA + 0x1000 + i, 1, WRITE, 0)))
    return rows, list(range(count)), tables


def _pop_tables(env, size, rows, heads, tables, **kw):
    ram, _ = env
    _load(ram, size, rows, heads, 0)
    for gpa, row in tables:
        ram.write(gpa, np.array([row], dtype=DESC_DTYPE).tobytes())
    return _pop_loaded(env, size, heads, **kw)


@pytest.mark.parametrize("entries", [2, 3, 5])
def test_linux_indirect_batch_is_followed_and_uniform(env, entries):
    rows, heads, tables = linux_rows(20, 64, entries=entries)
    batch = _pop_tables(env, 64, rows, heads, tables, indirect=True)
    assert batch is not None
    assert not batch.walked
    assert batch.segments.uniform == entries


@pytest.mark.parametrize(
    "edit",
    [
        lambda rows, tables: rows.__setitem__(3, (rows[3][0], 40, IND, 0)),  # not a multiple
        lambda rows, tables: rows.__setitem__(3, (rows[3][0], 0, IND, 0)),  # empty table
        lambda rows, tables: rows.__setitem__(3, (END - 16, 48, IND, 0)),  # outside memory
        lambda rows, tables: rows.__setitem__(3, (B2 - 16, 48, IND, 0)),  # spans B1, B2
        lambda rows, tables: rows.__setitem__(3, (rows[3][0], 48, IND | NEXT, 4)),
        lambda rows, tables: tables.append((IND1 + 48 * 3 + 16, (B1, 64, NEXT | WRITE, 3))),
        lambda rows, tables: tables.append((IND1 + 48 * 3 + 16, (B1, 64, NEXT | WRITE, 1))),
        lambda rows, tables: tables.append((IND1 + 48 * 3 + 16, (B1, 64, IND, 0))),
        lambda rows, tables: tables.append((IND1 + 48 * 3 + 16, (B1, 64, NEXT, 2))),
        lambda rows, tables: tables.append((IND1 + 48 * 3, (DATA, 16, NEXT | IND, 1))),
        lambda rows, tables: tables.append((IND1 + 48 * 3 + 16, (B1, 0, NEXT | WRITE, 2))),
    ],
)
def test_odd_or_hostile_indirect_tables_match_walk_chain(env, edit):
    rows, heads, tables = linux_rows(20, 64)
    edit(rows, tables)
    _pop_tables(env, 64, rows, heads, tables, indirect=True)


def test_indirect_without_the_feature_raises(env):
    rows, heads, tables = linux_rows(20, 64)
    assert _pop_tables(env, 64, rows, heads, tables, indirect=False) is None


def test_mixed_direct_and_indirect_batch(env):
    rows, heads = blk_rows(20, 128)
    ind_rows, _, tables = linux_rows(20, 128)
    for i in range(0, 20, 3):  # every third request indirect, in ring slot 100 + i
        rows[100 + i] = ind_rows[i]
        heads[i] = 100 + i
    batch = _pop_tables(env, 128, rows, heads, tables, indirect=True)
    assert batch is not None
    assert not batch.walked


@pytest.mark.parametrize("length", [MAX_FOLLOW - 1, MAX_FOLLOW, MAX_FOLLOW + 1, 128])
def test_long_chains_at_the_follow_limit(env, length):
    size = 128
    rows = [(DATA, 16, 0, 0)] * size
    # one long chain of `length` descriptors, then short ones to make a batch
    for i in range(length):
        rows[i] = (DATA + 8 * i, 8, NEXT if i + 1 < length else 0, i + 1)
    heads = [0]
    for i in range(length, min(size, length + 8)):
        rows[i] = (DATA + 8 * i, 8, WRITE, 0)
        heads.append(i)
    batch = _pop(env, size, rows, heads)
    assert batch is not None
    assert (0 in batch.walked) == (length > MAX_FOLLOW)


def test_loop_as_long_as_the_ring(env):
    size = 8
    rows = [(DATA + 8 * i, 8, NEXT, (i + 1) % size) for i in range(size)]
    assert _pop(env, size, rows, list(range(size))) is None


def test_chains_over_2_to_the_32_bytes_in_a_followed_batch():
    """Followed chains whose buffers total more than 2^32 bytes are walked, and raise."""
    size = (1 << 32) + (1 << 20)  # sparse memfd: nothing is touched
    ram = GuestRam.create(size)
    table = MemoryTable.from_regions([ram.backend_region()])
    try:
        half = (1 << 31) + 1
        rows = [(1 << 20, 16, 0, 0)] * 32
        for i in range(0, 32, 2):  # chains of two buffers, each fine on its own
            rows[i] = (1 << 20, half if i == 6 else 512, NEXT, i + 1)
            rows[i + 1] = ((1 << 20) + half, half if i == 6 else 512, WRITE, 0)
        ram.write(0, np.array(rows, dtype=DESC_DTYPE).tobytes())
        avail = np.zeros(3 + 32, dtype="<u2")
        avail[1] = 16
        avail[2:18] = range(0, 32, 2)
        ram.write(0x1000, avail.tobytes())
        state = QueueState(size=32, desc_gpa=0, avail_gpa=0x1000, used_gpa=0x2000)
        queue = SplitQueue(table, state)
        with pytest.raises(VirtqueueError, match="2\\^32"):
            queue.pop_arrays(16)
        assert queue.next_avail == 0
        later = SplitQueue(table, dataclasses.replace(state, next_avail=4))
        batch = later.pop_arrays(16)
        assert batch.count == 12
        assert batch.segments.uniform == 2
        del queue, later, batch
    finally:
        table.close()
        ram.close()


def test_a_closed_region_under_indirect_tables_raises_virtqueue_error():
    """If a region were unmapped under a running queue, the batch path fails like the walk."""
    ram = GuestRam.create(END - GPA + 4 * K, gpa=GPA)
    table = MemoryTable.from_regions(
        [ram.backend_region(4 * K, 64 * K), ram.backend_region(72 * K, 16 * K)]
    )
    try:
        rows, heads, tables = linux_rows(20, 64)
        moved = B1 + 0x1000 - IND1  # the tables go to the region closed below
        rows = [(a + moved, n, f, x) if f & IND else (a, n, f, x) for a, n, f, x in rows]
        _load(ram, 64, rows, heads, 0)
        for gpa, row in tables:
            ram.write(gpa + moved, np.array([row], dtype=DESC_DTYPE).tobytes())
        queue = SplitQueue(table, _state(64, 0, indirect=True))
        assert SplitQueue(table, _state(64, 0, indirect=True)).pop_arrays(64).count == 20
        table.regions[1].close()
        with pytest.raises(VirtqueueError):
            queue.pop_arrays(64)
        assert queue.next_avail == 0
        del queue
    finally:
        table.close()
        ram.close()
