"""virtio-net wire definitions: feature bit numbers, the header codec, config space layout."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_vhost.devices.net_spec import (
    CONFIG_SIZE,
    HASH_REPORT_HEADER_SIZE,
    HEADER_SIZE,
    LEGACY_HEADER_SIZE,
    NUM_BUFFERS_OFFSET,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
    GsoType,
    NetConfig,
    NetFeature,
    NetHeaderFlag,
    NetStatus,
    VirtioNetHeader,
    format_mac,
    header_size,
    is_rx_queue,
    pair_of,
    parse_mac,
    random_mac,
    rx_header,
    rx_queue,
    tx_queue,
)
from trio_vhost.proto.constants import VirtioFeature

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@pytest.mark.parametrize(
    ("feature", "bit"),
    [
        (NetFeature.CSUM, 0),
        (NetFeature.GUEST_CSUM, 1),
        (NetFeature.CTRL_GUEST_OFFLOADS, 2),
        (NetFeature.MTU, 3),
        (NetFeature.MAC, 5),
        (NetFeature.GSO, 6),
        (NetFeature.GUEST_TSO4, 7),
        (NetFeature.HOST_UFO, 14),
        (NetFeature.MRG_RXBUF, 15),
        (NetFeature.STATUS, 16),
        (NetFeature.CTRL_VQ, 17),
        (NetFeature.GUEST_ANNOUNCE, 21),
        (NetFeature.MQ, 22),
        (NetFeature.CTRL_MAC_ADDR, 23),
        (NetFeature.GUEST_RSC4, 41),
        (NetFeature.HASH_REPORT, 57),
        (NetFeature.RSS, 60),
        (NetFeature.SPEED_DUPLEX, 63),
    ],
)
def test_feature_bit_numbers_follow_the_spec(feature: NetFeature, bit: int) -> None:
    assert int(feature) == 1 << bit


def test_features_fit_the_vhost_user_feature_word_and_avoid_transport_bits() -> None:
    every = 0
    for feature in NetFeature:
        every |= int(feature)
    assert every < 1 << 64
    # bits 24..40 are transport features (VERSION_1, EVENT_IDX, bit 30, ...)
    assert every & sum(1 << bit for bit in range(24, 41)) == 0


def test_status_and_header_flag_constants() -> None:
    assert VIRTIO_NET_S_LINK_UP == int(NetStatus.LINK_UP) == 1
    assert VIRTIO_NET_S_ANNOUNCE == int(NetStatus.ANNOUNCE) == 2
    assert int(NetHeaderFlag.NEEDS_CSUM) == 1
    assert int(NetHeaderFlag.DATA_VALID) == 2
    assert [int(g) for g in GsoType] == [0, 1, 3, 4, 5]


@pytest.mark.parametrize(
    ("features", "size"),
    [
        (0, 10),
        (int(NetFeature.MAC | NetFeature.MQ | NetFeature.STATUS), 10),
        (int(VirtioFeature.VERSION_1), 12),
        (int(NetFeature.MRG_RXBUF), 12),
        (int(VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF), 12),
        (int(VirtioFeature.VERSION_1 | NetFeature.HASH_REPORT), 20),
    ],
)
def test_header_size(features: int, size: int) -> None:
    assert header_size(features) == size


def test_header_layout_is_little_endian_with_num_buffers_at_10() -> None:
    header = VirtioNetHeader(
        flags=1,
        gso_type=4,
        hdr_len=0x0102,
        gso_size=0x0304,
        csum_start=0x0506,
        csum_offset=0x0708,
        num_buffers=0x090A,
    )
    assert header.encode() == bytes.fromhex("0104 0201 0403 0605 0807 0a09")
    assert header.encode()[NUM_BUFFERS_OFFSET:] == b"\x0a\x09"
    legacy = VirtioNetHeader(flags=1, gso_type=4, hdr_len=0x0102)
    assert legacy.encode(LEGACY_HEADER_SIZE) == bytes.fromhex("0104 0201 0000 0000 0000")


headers = st.builds(VirtioNetHeader, u8, u8, u16, u16, u16, u16, u16)


@given(headers, st.binary(max_size=32))
def test_header_round_trip(header: VirtioNetHeader, trailing: bytes) -> None:
    data = header.encode()
    assert len(data) == HEADER_SIZE
    assert VirtioNetHeader.decode(data) == header
    assert VirtioNetHeader.decode(data + trailing) == header
    assert VirtioNetHeader.decode(memoryview(bytearray(data + trailing))) == header


@given(st.builds(VirtioNetHeader, u8, u8, u16, u16, u16, u16), st.binary(max_size=8))
def test_legacy_header_round_trip(header: VirtioNetHeader, trailing: bytes) -> None:
    data = header.encode(LEGACY_HEADER_SIZE)
    assert len(data) == LEGACY_HEADER_SIZE
    assert VirtioNetHeader.decode(data + trailing, LEGACY_HEADER_SIZE) == header


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_any_12_bytes_decode_and_reencode_identically(data: bytes) -> None:
    assert VirtioNetHeader.decode(data).encode() == data


@pytest.mark.parametrize("size", [0, 9, 11, 20])
def test_header_rejects_unknown_forms(size: int) -> None:
    with pytest.raises(ValueError, match="form"):
        VirtioNetHeader().encode(size)
    with pytest.raises(ValueError, match="form"):
        VirtioNetHeader.decode(bytes(32), size)


def test_header_decode_needs_enough_bytes() -> None:
    with pytest.raises(ValueError, match="needs 12 bytes"):
        VirtioNetHeader.decode(bytes(11))
    with pytest.raises(ValueError, match="needs 10 bytes"):
        VirtioNetHeader.decode(bytes(9), LEGACY_HEADER_SIZE)


def test_legacy_form_cannot_carry_num_buffers() -> None:
    with pytest.raises(ValueError, match="num_buffers"):
        VirtioNetHeader(num_buffers=1).encode(LEGACY_HEADER_SIZE)


@pytest.mark.parametrize(
    "fields",
    [
        {"flags": 256},
        {"gso_type": -1},
        {"hdr_len": 0x10000},
        {"gso_size": -1},
        {"csum_start": 0x10000},
        {"csum_offset": 0x10000},
        {"num_buffers": 0x10000},
    ],
)
def test_header_fields_must_fit(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"range|u8"):
        VirtioNetHeader(**fields)


def test_header_is_plain() -> None:
    assert VirtioNetHeader(num_buffers=3).is_plain
    assert not VirtioNetHeader(flags=NetHeaderFlag.NEEDS_CSUM).is_plain
    assert not VirtioNetHeader(gso_type=GsoType.TCPV4).is_plain


def test_rx_header() -> None:
    assert rx_header(HEADER_SIZE) == bytes(10) + b"\x01\x00"
    assert rx_header(HEADER_SIZE) is rx_header(HEADER_SIZE)  # no allocation per frame
    assert rx_header(HEADER_SIZE, 3) == bytes(10) + b"\x03\x00"
    assert rx_header(LEGACY_HEADER_SIZE) == bytes(10)
    assert rx_header(HASH_REPORT_HEADER_SIZE) == bytes(10) + b"\x01" + bytes(9)
    assert rx_header(HASH_REPORT_HEADER_SIZE, 2) == bytes(10) + b"\x02" + bytes(9)
    assert VirtioNetHeader.decode(rx_header(HEADER_SIZE, 0xFFFF)).num_buffers == 0xFFFF


@pytest.mark.parametrize(
    ("size", "num_buffers"),
    [(LEGACY_HEADER_SIZE, 2), (HEADER_SIZE, 0), (HEADER_SIZE, 0x10000), (16, 1), (16, 2)],
)
def test_rx_header_rejects(size: int, num_buffers: int) -> None:
    with pytest.raises(ValueError, match=r"num_buffers|form"):
        rx_header(size, num_buffers)


def test_config_layout_offsets() -> None:
    config = NetConfig(
        mac=bytes.fromhex("525400123456"),
        status=VIRTIO_NET_S_LINK_UP,
        max_virtqueue_pairs=4,
        mtu=9000,
        speed=10000,
        duplex=1,
    )
    space = config.encode()
    assert len(space) == CONFIG_SIZE == 28
    assert space[0:6] == bytes.fromhex("525400123456")
    assert struct.unpack_from("<H", space, 6) == (1,)
    assert struct.unpack_from("<H", space, 8) == (4,)
    assert struct.unpack_from("<H", space, 10) == (9000,)
    assert struct.unpack_from("<I", space, 12) == (10000,)
    assert space[16] == 1
    assert space[17:] == bytes(11)  # RSS / hash fields: not offered


def test_config_defaults() -> None:
    space = NetConfig(mac=bytes(6)).encode()
    assert struct.unpack_from("<HHHIB", space, 6) == (1, 1, 1500, 0xFFFFFFFF, 0xFF)


@pytest.mark.parametrize(
    "fields",
    [
        {"mac": bytes(5)},
        {"mac": bytes(7)},
        {"status": 0x10000},
        {"max_virtqueue_pairs": 0},
        {"max_virtqueue_pairs": 0x8001},
        {"mtu": 67},
        {"mtu": 65536},
        {"speed": -1},
        {"duplex": 256},
    ],
)
def test_config_validation(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(NetConfig(mac=bytes(6)), **fields)


def test_config_accepts_the_spec_bounds() -> None:
    NetConfig(mac=bytes(6), max_virtqueue_pairs=0x8000, mtu=68)
    NetConfig(mac=bytes(6), mtu=65535)


def test_queue_numbering() -> None:
    assert [rx_queue(p) for p in range(3)] == [0, 2, 4]
    assert [tx_queue(p) for p in range(3)] == [1, 3, 5]
    assert [pair_of(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [is_rx_queue(i) for i in range(4)] == [True, False, True, False]


@given(st.binary(min_size=6, max_size=6))
def test_mac_round_trip(mac: bytes) -> None:
    assert parse_mac(format_mac(mac)) == mac
    assert parse_mac(format_mac(mac).upper().replace(":", "-")) == mac


def test_format_mac() -> None:
    assert format_mac(bytes.fromhex("525400abcdef")) == "52:54:00:ab:cd:ef"


@pytest.mark.parametrize(
    "text", ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "5:54:00:12:34:56", "zz:54:00:12:34:56"]
)
def test_parse_mac_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad MAC"):
        parse_mac(text)


def test_random_mac_is_local_unicast() -> None:
    for _ in range(64):
        mac = random_mac()
        assert len(mac) == 6
        assert mac[0] & 1 == 0
        assert mac[0] & 2 == 2
