"""BackendProtocol: byte-level tests for every request code, negotiation, replies, acks."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from _proto_helpers import (
    ACKED,
    ALL_PF,
    CATALOG,
    NEED_REPLY,
    OFFERED,
    PF,
    POSTCOPY_PF,
    REPLY,
    FdPool,
    negotiated,
    resized,
    split,
    with_code,
    with_flags,
    without,
)

from trio_vhost.errors import LocalProtocolError, RemoteProtocolError
from trio_vhost.proto.connection import BackendProtocol, Request, has_own_reply
from trio_vhost.proto.constants import (
    KNOWN_PROTOCOL_FEATURES,
    MAX_FDS,
    VERSION,
    FrontendReq,
    ProtocolFeature,
    VirtioFeature,
)
from trio_vhost.proto.frontend_codec import decode_reply, encode_request
from trio_vhost.proto.messages import (
    U64,
    ConfigSpace,
    CryptoSession,
    DeviceStateTransfer,
    IotlbMsg,
    MemoryTable,
    SingleMemRegion,
    Snapshot,
    Success,
    VringFile,
    VringState,
)
from trio_vhost.proto.rules import FRONTEND_RULES, FdRule
from trio_vhost.proto.wire import Header

CODES = list(FrontendReq)
#: RESTORE's body is opaque: any size up to the limit is valid.
SIZED = [c for c in CODES if c is not FrontendReq.RESTORE]
WITH_BODY = [c for c in SIZED if CATALOG[c].body is not None]
FD_FREE = [c for c in CODES if FRONTEND_RULES[c].fds is FdRule.NONE]
GATED = [c for c in CODES if (r := FRONTEND_RULES[c]).protocol or r.virtio or r.offered_virtio]


def over(codes: Sequence[FrontendReq]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("code", codes, ids=lambda c: c.name)


ids = over(CODES)


def feed(proto: BackendProtocol, data: bytes, fds: tuple[object, ...] = ()) -> Request:
    """Run a frame through receive_header and receive, as the server does."""
    header = proto.receive_header(data[:12], len(fds))
    return proto.receive(header, data[12:], fds)  # type: ignore[arg-type]


def refused(proto: BackendProtocol, data: bytes, fds: tuple[object, ...] = ()) -> None:
    """Assert both entry points refuse the frame, each on a fresh protocol state."""
    with pytest.raises(RemoteProtocolError):
        feed(proto, data, fds)
    # receive() alone (a caller that skipped receive_header) refuses it too.
    fresh = negotiated(proto.acked_protocol_features, acked=proto.acked_features)
    with pytest.raises(RemoteProtocolError):
        fresh.receive(Header.decode(data[:12]), data[12:], fds)  # type: ignore[arg-type]


# -- every code: valid, sizes, fds, gates, header bits -------------------------------------


@ids
def test_valid(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    proto = negotiated(example.protocol_features)
    fds = fd_pool.take(example.nfds)
    request = feed(proto, example.frame(code), fds)
    assert request.code is code
    assert request.body == example.body
    assert request.fds == fds
    assert not request.need_reply
    assert all(not fd.closed for fd in fds)


@ids
def test_valid_with_need_reply(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    proto = negotiated(example.protocol_features)
    data = with_flags(example.frame(code), VERSION | NEED_REPLY)
    assert feed(proto, data, fd_pool.take(example.nfds)).need_reply


@over(SIZED)
def test_one_byte_long(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    data = resized(example.frame(code), 1)
    refused(negotiated(example.protocol_features), data, fd_pool.take(example.nfds))


@over(WITH_BODY)
def test_one_byte_short(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    data = resized(example.frame(code), -1)
    refused(negotiated(example.protocol_features), data, fd_pool.take(example.nfds))


@ids
def test_body_shorter_than_header_says(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    data = example.frame(code)
    header = Header.decode(data[:12])
    proto = negotiated(example.protocol_features)
    fds = fd_pool.take(example.nfds)
    body = data[12:-1] if header.size else b"\x00"
    with pytest.raises(RemoteProtocolError, match="header says"):
        proto.receive(header, body, fds)


@ids
def test_wrong_fd_count(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    rule = FRONTEND_RULES[code]
    low, high = rule.fds.bounds
    counts = {example.nfds + 1, example.nfds - 1} - set(range(low, high + 1))
    if rule.fds in (FdRule.NOFD_BIT, FdRule.PER_REGION):
        counts = {example.nfds + 1, example.nfds - 1}  # the body fixes the count
    counts.add(high + 1)
    for count in sorted(c for c in counts if c >= 0):
        refused(negotiated(example.protocol_features), example.frame(code), fd_pool.take(count))


@over(FD_FREE)
def test_fd_where_none_belongs(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    proto = negotiated(example.protocol_features)
    with pytest.raises(RemoteProtocolError, match="carries 1 fds"):
        proto.receive_header(example.frame(code)[:12], 1)


@over(GATED)
def test_ungated(code: FrontendReq, fd_pool: FdPool) -> None:
    example = CATALOG[code]
    rule = FRONTEND_RULES[code]
    if rule.protocol:
        proto = negotiated(without(example.protocol_features, rule.protocol))
    elif rule.virtio:
        proto = negotiated(example.protocol_features, acked=ACKED & ~rule.virtio)
    else:
        proto = BackendProtocol(features=OFFERED & ~PF, protocol_features=0)
    with pytest.raises(RemoteProtocolError, match=r"needs|illegal"):
        feed(proto, example.frame(code), fd_pool.take(example.nfds))


@ids
def test_reply_bit_set(code: FrontendReq) -> None:
    data = with_flags(CATALOG[code].frame(code), VERSION | REPLY)
    with pytest.raises(RemoteProtocolError, match="REPLY flag"):
        negotiated().receive_header(data[:12], 0)


@ids
@pytest.mark.parametrize("version", [0, 2, 3])
def test_wrong_version(code: FrontendReq, version: int) -> None:
    data = with_flags(CATALOG[code].frame(code), version)
    with pytest.raises(RemoteProtocolError, match="version"):
        negotiated().receive_header(data[:12], 0)


@ids
@pytest.mark.parametrize("bit", [0x10, 0x100, 1 << 31])
def test_unknown_flag_bits(code: FrontendReq, bit: int) -> None:
    data = with_flags(CATALOG[code].frame(code), VERSION | bit)
    with pytest.raises(RemoteProtocolError, match="reserved header flag"):
        negotiated().receive_header(data[:12], 0)


@pytest.mark.parametrize("request_code", [0, 46, 999, 1005, 2**32 - 1])
def test_unknown_code(request_code: int) -> None:
    data = with_code(encode_request(FrontendReq.SET_OWNER), request_code)
    with pytest.raises(RemoteProtocolError, match="unknown request code"):
        negotiated().receive_header(data[:12], 0)


@pytest.mark.parametrize(
    "code", [FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL, FrontendReq.SET_VRING_ERR]
)
def test_nofd_bit_must_match_the_fd(code: FrontendReq, fd_pool: FdPool) -> None:
    with_nofd = encode_request(code, VringFile(2, True))
    assert feed(negotiated(), with_nofd).body == VringFile(2, True)
    refused(negotiated(), with_nofd, fd_pool.take(1))
    refused(negotiated(), encode_request(code, VringFile(2, False)))


# -- counts tied to the body ---------------------------------------------------------------


def test_mem_table_needs_one_fd_per_region(fd_pool: FdPool) -> None:
    data = CATALOG[FrontendReq.SET_MEM_TABLE].frame(FrontendReq.SET_MEM_TABLE)
    for count in (1, 3):
        refused(negotiated(), data, fd_pool.take(count))


def test_rem_mem_reg_may_carry_one_fd(fd_pool: FdPool) -> None:
    data = CATALOG[FrontendReq.REM_MEM_REG].frame(FrontendReq.REM_MEM_REG)
    fds = fd_pool.take(1)
    assert feed(negotiated(), data, fds).fds == fds


def test_restore_takes_any_fd_count_up_to_max(fd_pool: FdPool) -> None:
    data = encode_request(FrontendReq.RESTORE, b"")
    assert feed(negotiated(), data, fd_pool.take(MAX_FDS)).body == b""
    big = encode_request(FrontendReq.RESTORE, bytes(64))
    proto = BackendProtocol(features=OFFERED, protocol_features=0, max_restore_size=63)
    with pytest.raises(RemoteProtocolError, match="body of 64"):
        proto.receive_header(big[:12], 0)


# -- per-request semantics ------------------------------------------------------------------


def test_set_features_records_and_refuses_unoffered_bits() -> None:
    proto = BackendProtocol(features=OFFERED, protocol_features=0)
    feed(proto, encode_request(FrontendReq.SET_FEATURES, U64(PF)))
    assert proto.acked_features == PF
    feed(proto, encode_request(FrontendReq.SET_FEATURES, U64(ACKED)))  # QEMU resends it
    assert proto.acked_features == ACKED
    with pytest.raises(RemoteProtocolError, match="not offered"):
        feed(proto, encode_request(FrontendReq.SET_FEATURES, U64(1 << 50)))


@pytest.mark.parametrize(
    ("offered", "acked", "match"),
    [
        (KNOWN_PROTOCOL_FEATURES, 1 << 30, "unknown protocol feature"),
        (int(ProtocolFeature.MQ), int(ProtocolFeature.CONFIG), "not all offered"),
        (
            KNOWN_PROTOCOL_FEATURES,
            ProtocolFeature.INBAND_NOTIFICATIONS | ProtocolFeature.BACKEND_REQ,
            "INBAND_NOTIFICATIONS needs",
        ),
        (
            KNOWN_PROTOCOL_FEATURES,
            ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN | ProtocolFeature.INFLIGHT_SHMFD,
            "GET_VRING_BASE_SKIP_DRAIN needs",
        ),
    ],
)
def test_set_protocol_features_refused(offered: int, acked: int, match: str) -> None:
    proto = BackendProtocol(features=OFFERED, protocol_features=offered)
    with pytest.raises(RemoteProtocolError, match=match):
        feed(proto, encode_request(FrontendReq.SET_PROTOCOL_FEATURES, U64(acked)))


def test_protocol_features_can_be_set_again() -> None:
    proto = negotiated(ALL_PF)
    feed(proto, encode_request(FrontendReq.SET_PROTOCOL_FEATURES, U64(POSTCOPY_PF)))
    assert proto.acked_protocol_features == POSTCOPY_PF


def test_get_protocol_features_needs_bit_30_offered_not_acked() -> None:
    proto = BackendProtocol(features=OFFERED, protocol_features=0)
    assert feed(proto, encode_request(FrontendReq.GET_PROTOCOL_FEATURES)).body is None


def test_set_vring_enable_before_set_features() -> None:
    # QEMU 7.2 net sends it right after SET_VRING_CALL, long before SET_FEATURES.
    proto = BackendProtocol(features=OFFERED, protocol_features=0)
    request = feed(proto, encode_request(FrontendReq.SET_VRING_ENABLE, VringState(1, 1)))
    assert request.expect(VringState) == VringState(1, 1)


@pytest.mark.parametrize(
    ("code", "body", "match"),
    [
        (FrontendReq.SET_VRING_ENABLE, VringState(0, 2), "0 or 1"),
        (FrontendReq.SET_VRING_ENDIAN, VringState(0, 2), "0 or 1"),
        (FrontendReq.VRING_KICK, VringState(0, 1), "reserved"),
        (FrontendReq.SET_VRING_NUM, VringState(0, 0), "queue size"),
        (FrontendReq.SET_VRING_NUM, VringState(0, 32768 * 2), "queue size"),
        (FrontendReq.SET_VRING_BASE, VringState(0, 0x10000), "reserved bits"),
        (FrontendReq.GET_CONFIG, ConfigSpace(0, 0, 0, b""), "size 0"),
        (FrontendReq.SET_CONFIG, ConfigSpace(0, 0, 1, b""), "size 0"),
        (FrontendReq.SET_STATUS, U64(0x100), "8 bits"),
        (FrontendReq.IOTLB_MSG, IotlbMsg(0, 0, 0, 0, IotlbMsg.MISS), "type 1"),
        (FrontendReq.IOTLB_MSG, IotlbMsg(0, 0, 0, 3, IotlbMsg.UPDATE), "size 0"),
    ],
)
def test_semantic_checks(code: FrontendReq, body: object, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        feed(negotiated(), encode_request(code, body))  # type: ignore[arg-type]


def test_invalidate_of_size_0_is_fine() -> None:
    body = IotlbMsg(0x1000, 0, 0, 0, IotlbMsg.INVALIDATE)
    assert feed(negotiated(), encode_request(FrontendReq.IOTLB_MSG, body)).body == body


def test_non_power_of_2_split_size_is_left_to_the_session() -> None:
    # Not a framing error: the session NACKs it (tests/protocol) and the connection stays.
    request = feed(negotiated(), encode_request(FrontendReq.SET_VRING_NUM, VringState(0, 100)))
    assert request.expect(VringState) == VringState(0, 100)


def test_packed_rings_relax_queue_size_and_base() -> None:
    proto = negotiated(acked=ACKED | VirtioFeature.RING_PACKED)
    feed(proto, encode_request(FrontendReq.SET_VRING_NUM, VringState(0, 100)))
    feed(proto, encode_request(FrontendReq.SET_VRING_BASE, VringState(0, 0x8001_8001)))


@pytest.mark.parametrize(
    "code", [FrontendReq.POSTCOPY_ADVISE, FrontendReq.POSTCOPY_LISTEN, FrontendReq.POSTCOPY_END]
)
def test_postcopy_is_forbidden_with_mem_slots(code: FrontendReq) -> None:
    proto = negotiated(KNOWN_PROTOCOL_FEATURES)
    with pytest.raises(RemoteProtocolError, match="forbidden once CONFIGURE_MEM_SLOTS"):
        feed(proto, encode_request(code))


def test_errors_are_sticky() -> None:
    proto = negotiated()
    with pytest.raises(RemoteProtocolError):
        proto.receive_header(b"short", 0)
    good = encode_request(FrontendReq.GET_FEATURES)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        proto.receive_header(good[:12], 0)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        proto.receive(Header.decode(good[:12]), b"", ())
    proto = negotiated()
    with pytest.raises(RemoteProtocolError):
        proto.receive(Header.decode(good[:12]), b"x", ())
    with pytest.raises(RemoteProtocolError, match="already failed"):
        proto.receive_header(good[:12], 0)


def test_constructor_validates_the_offer() -> None:
    with pytest.raises(LocalProtocolError):
        BackendProtocol(features=2**64, protocol_features=0)
    with pytest.raises(LocalProtocolError, match="unknown protocol"):
        BackendProtocol(features=PF, protocol_features=1 << 40)


# -- replies and acks -----------------------------------------------------------------------


def test_has_own_reply_table() -> None:
    own = {code for code in FrontendReq if has_own_reply(code)}
    assert own == {
        FrontendReq.GET_FEATURES,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.GET_VRING_BASE,
        FrontendReq.GET_VRING_BASE_SKIP_DRAIN,
        FrontendReq.SET_LOG_BASE,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.IOTLB_MSG,
        FrontendReq.GET_CONFIG,
        FrontendReq.CREATE_CRYPTO_SESSION,
        FrontendReq.POSTCOPY_ADVISE,
        FrontendReq.POSTCOPY_END,
        FrontendReq.GET_INFLIGHT_FD,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.GET_STATUS,
        FrontendReq.GET_SHARED_OBJECT,
        FrontendReq.SET_DEVICE_STATE_FD,
        FrontendReq.CHECK_DEVICE_STATE,
        FrontendReq.GET_SHMEM_CONFIG,
        FrontendReq.SLEEP,
        FrontendReq.WAKE,
        FrontendReq.SNAPSHOT,
        FrontendReq.RESTORE,
        FrontendReq.GET_SHARED_MEMORY_REGIONS,
    }


def test_reply_header_is_exactly_version_reply() -> None:
    proto = negotiated()
    request = feed(proto, encode_request(FrontendReq.GET_FEATURES))
    data = proto.reply(request, U64(OFFERED))
    assert data[:12] == Header(FrontendReq.GET_FEATURES, 0x5, 8).encode()
    header, body = split(data)
    assert decode_reply(FrontendReq.GET_FEATURES, header, body) == U64(OFFERED)


def test_reply_refuses_wrong_kinds() -> None:
    proto = negotiated()
    owner = feed(proto, encode_request(FrontendReq.SET_OWNER))
    with pytest.raises(LocalProtocolError, match="no reply of its own"):
        proto.reply(owner, U64(0))
    features = feed(proto, encode_request(FrontendReq.GET_FEATURES))
    with pytest.raises(LocalProtocolError, match="replies with a U64"):
        proto.reply(features, Success(True))
    with pytest.raises(LocalProtocolError):
        proto.reply(features, b"raw")


def test_get_config_reply_size_must_match_or_be_zero() -> None:
    proto = negotiated()
    request = feed(proto, encode_request(FrontendReq.GET_CONFIG, ConfigSpace(0, 4, 0, bytes(4))))
    assert len(proto.reply(request, ConfigSpace(0, 4, 0, b"abcd"))) == 12 + 16
    assert len(proto.reply(request, ConfigSpace(0, 0, 0, b""))) == 12 + 12
    with pytest.raises(LocalProtocolError, match="4 asked"):
        proto.reply(request, ConfigSpace(0, 3, 0, b"abc"))


@pytest.mark.parametrize(
    "code", [FrontendReq.GET_VRING_BASE, FrontendReq.GET_VRING_BASE_SKIP_DRAIN]
)
def test_vring_base_reply_echoes_the_index(code: FrontendReq) -> None:
    proto = negotiated()
    request = feed(proto, encode_request(code, VringState(3, 0)))
    assert proto.reply(request, VringState(3, 907))[12:] == VringState(3, 907).encode()
    with pytest.raises(LocalProtocolError, match="vring 2"):
        proto.reply(request, VringState(2, 907))


def test_crypto_reply_keeps_the_layout() -> None:
    proto = negotiated()
    legacy = CryptoSession(bytes(CryptoSession.LEGACY_SIZE))
    request = feed(proto, encode_request(FrontendReq.CREATE_CRYPTO_SESSION, legacy))
    assert proto.reply(request, legacy.with_session_id(7))[12:20] == (7).to_bytes(8, "little")
    with pytest.raises(LocalProtocolError, match="layout"):
        proto.reply(request, CryptoSession(bytes(CryptoSession.SIZE)))


def test_device_state_reply_bits(fd_pool: FdPool) -> None:
    proto = negotiated()
    data = encode_request(FrontendReq.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0))
    request = feed(proto, data, fd_pool.take(1))
    assert proto.reply(request, U64(0x100))[12:] == U64(0x100).encode()
    with pytest.raises(LocalProtocolError, match="reserved"):
        proto.reply(request, U64(0x200))


def test_snapshot_reply_accepts_success_or_snapshot() -> None:
    proto = negotiated()
    request = feed(proto, encode_request(FrontendReq.SNAPSHOT))
    assert proto.reply(request, Success(False)) == proto.reply(request, Snapshot(False))
    assert proto.reply(request, Snapshot(True, b"state"))[12:] == b"\x01state"


@pytest.mark.parametrize("ok", [True, False])
def test_ack_when_reply_ack_negotiated(ok: bool) -> None:
    proto = negotiated()
    assert proto.reply_ack_enabled
    data = with_flags(encode_request(FrontendReq.SET_OWNER), VERSION | NEED_REPLY)
    ack = proto.ack(feed(proto, data), ok)
    assert ack == Header(FrontendReq.SET_OWNER, 0x5, 8).encode() + U64(0 if ok else 1).encode()


def test_no_ack_without_need_reply_or_negotiation_or_for_own_replies() -> None:
    proto = negotiated()
    assert proto.ack(feed(proto, encode_request(FrontendReq.SET_OWNER)), True) is None
    get = with_flags(encode_request(FrontendReq.GET_FEATURES), VERSION | NEED_REPLY)
    assert proto.ack(feed(proto, get), True) is None
    no_ack = negotiated(without(ALL_PF, ProtocolFeature.REPLY_ACK))
    assert not no_ack.reply_ack_enabled
    owner = with_flags(encode_request(FrontendReq.SET_OWNER), VERSION | NEED_REPLY)
    assert no_ack.ack(feed(no_ack, owner), False) is None


def test_reply_ack_needs_bit_30_offered() -> None:
    proto = BackendProtocol(features=0, protocol_features=ProtocolFeature.REPLY_ACK)
    proto.acked_protocol_features = ProtocolFeature.REPLY_ACK  # forced: the offer lacks bit 30
    assert not proto.reply_ack_enabled


def test_set_protocol_features_enabling_reply_ack_is_acked_itself() -> None:
    proto = BackendProtocol(features=OFFERED, protocol_features=KNOWN_PROTOCOL_FEATURES)
    data = encode_request(
        FrontendReq.SET_PROTOCOL_FEATURES, U64(ProtocolFeature.REPLY_ACK), need_reply=True
    )
    request = feed(proto, data)
    assert proto.ack(request, True) is not None  # as crosvm: state updated before the ack


def test_request_expect() -> None:
    request = feed(negotiated(), encode_request(FrontendReq.SET_VRING_NUM, VringState(0, 8)))
    assert request.expect(VringState).num == 8
    with pytest.raises(LocalProtocolError, match="not"):
        request.expect(MemoryTable)
    restore = feed(negotiated(), encode_request(FrontendReq.RESTORE, b"abc"))
    assert restore.expect(bytes) == b"abc"
    region = CATALOG[FrontendReq.REM_MEM_REG].body
    rem = feed(negotiated(), encode_request(FrontendReq.REM_MEM_REG, region))
    assert rem.expect(SingleMemRegion) == region


# -- QEMU 7.2 traces (lab/qemu/examples/*.sniff.log), replayed --------------------------------


def _replay(
    proto: BackendProtocol, pool: FdPool, script: list[tuple[FrontendReq, object, int, bool]]
) -> None:
    for code, body, nfds, need_reply in script:
        data = encode_request(code, body, need_reply=need_reply)  # type: ignore[arg-type]
        request = feed(proto, data, pool.take(nfds))
        if need_reply and not has_own_reply(code):
            assert proto.ack(request, True) is not None


BLK_OFFER = 0x175007E46
BLK_PROTOCOL = 0x8F2B


def test_qemu_72_blk_handshake(fd_pool: FdPool) -> None:
    proto = BackendProtocol(features=BLK_OFFER, protocol_features=BLK_PROTOCOL)
    F = FrontendReq
    region = SingleMemRegion(CATALOG[F.ADD_MEM_REG].body.region)  # type: ignore[union-attr]
    _replay(
        proto,
        fd_pool,
        [
            (F.GET_FEATURES, None, 0, False),
            (F.GET_PROTOCOL_FEATURES, None, 0, False),
            (F.SET_PROTOCOL_FEATURES, U64(BLK_PROTOCOL), 0, False),
            (F.GET_QUEUE_NUM, None, 0, False),
            (F.GET_MAX_MEM_SLOTS, None, 0, False),
            (F.SET_BACKEND_REQ_FD, None, 1, True),
            (F.SET_OWNER, None, 0, False),
            (F.SET_VRING_CALL, VringFile(0, False), 1, False),
            (F.SET_VRING_ERR, VringFile(0, False), 1, False),
            (F.GET_CONFIG, ConfigSpace(0, 57, 0, bytes(57)), 0, False),
            (F.SET_FEATURES, U64(0x140000046), 0, False),
            (F.ADD_MEM_REG, region, 1, True),
            (F.SET_VRING_NUM, VringState(0, 128), 0, False),
            (F.SET_VRING_BASE, VringState(0, 0), 0, False),
            (F.SET_VRING_KICK, VringFile(0, False), 1, False),
            (F.SET_VRING_ENABLE, VringState(0, 1), 0, False),
            (F.SET_VRING_ENABLE, VringState(0, 0), 0, False),
            (F.GET_VRING_BASE, VringState(0, 0), 0, False),
            (F.SET_FEATURES, U64(0x170006E46), 0, False),
        ],
    )
    assert proto.acked_features == 0x170006E46


def test_qemu_72_net_handshake_with_early_vring_enable(fd_pool: FdPool) -> None:
    proto = BackendProtocol(features=0xD7C66E7CB, protocol_features=0x10CBF)
    F = FrontendReq
    table = CATALOG[F.SET_MEM_TABLE].body
    assert isinstance(table, MemoryTable)
    one_region = MemoryTable(table.regions[:1])
    _replay(
        proto,
        fd_pool,
        [
            (F.GET_FEATURES, None, 0, False),
            (F.GET_PROTOCOL_FEATURES, None, 0, False),
            (F.SET_PROTOCOL_FEATURES, U64(0x10CBF), 0, False),
            (F.GET_QUEUE_NUM, None, 0, False),
            (F.SET_BACKEND_REQ_FD, None, 1, True),
            (F.SET_OWNER, None, 0, False),
            (F.SET_VRING_CALL, VringFile(0, False), 1, False),
            (F.SET_VRING_ERR, VringFile(1, False), 1, False),
            (F.SET_VRING_ENABLE, VringState(0, 1), 0, False),
            (F.SET_VRING_ENABLE, VringState(1, 1), 0, False),
            (F.SET_FEATURES, U64(0x17020E783), 0, False),
            (F.GET_STATUS, None, 0, False),
            (F.SET_STATUS, U64(0x8), 0, False),
            (F.SET_MEM_TABLE, one_region, 1, True),
            (F.SET_VRING_NUM, VringState(0, 256), 0, False),
            (F.SET_VRING_BASE, VringState(0, 0), 0, False),
            (F.SET_VRING_KICK, VringFile(0, False), 1, False),
            (F.SET_STATUS, U64(0xF), 0, False),
            (F.GET_VRING_BASE, VringState(1, 0), 0, False),
        ],
    )
