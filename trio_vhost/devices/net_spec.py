"""virtio-net wire definitions: feature bits, the packet header, config space, constants.

Pure data and codecs from the VIRTIO 1.4 network device chapter; no I/O. Everything here is
little-endian: the legacy interface would use the guest's native byte order, and this library
only serves little-endian guests.

Queue numbering (spec "Virtqueues"): the receive queue of pair k (from 0) is vring 2k, its
transmit queue vring 2k+1; a control queue would follow the last pair, but QEMU keeps it to
itself and never hands it to a vhost-user backend. With ``-netdev vhost-user,queues=N`` QEMU
opens one vhost device per pair on the same socket, so the backend sees vrings ``0 .. 2N-1``
on one connection.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from ..proto.constants import VirtioFeature

__all__ = [
    "CONFIG_SIZE",
    "DEFAULT_MTU",
    "ETH_ADDR_LEN",
    "ETH_HEADER_LEN",
    "GSO_ECN",
    "GSO_UDP_TUNNEL_IPV4",
    "GSO_UDP_TUNNEL_IPV6",
    "HASH_REPORT_HEADER_SIZE",
    "HEADER_SIZE",
    "LEGACY_HEADER_SIZE",
    "MAX_MTU",
    "MAX_QUEUE_PAIRS",
    "MIN_MTU",
    "NUM_BUFFERS_OFFSET",
    "DUPLEX_UNKNOWN",
    "SPEED_UNKNOWN",
    "VIRTIO_NET_S_ANNOUNCE",
    "VIRTIO_NET_S_LINK_UP",
    "GsoType",
    "NetConfig",
    "NetFeature",
    "NetHeaderFlag",
    "NetStatus",
    "VirtioNetHeader",
    "format_mac",
    "header_size",
    "is_rx_queue",
    "pair_of",
    "parse_mac",
    "random_mac",
    "rx_header",
    "rx_queue",
    "tx_queue",
]


class NetFeature(IntFlag):
    """virtio-net feature bits (spec "Feature bits"), numbered as the spec numbers them.

    Bits 64 and up (RSS_CONTEXT, the UDP tunnel GSO family, OUT_NET_HEADER, IPSEC) do not fit
    the 64-bit feature word of vhost-user's GET_FEATURES / SET_FEATURES and are left out.
    """

    #: Device handles packets with partial checksum offload.
    CSUM = 1 << 0
    #: Driver handles packets with partial checksum.
    GUEST_CSUM = 1 << 1
    #: Control channel offloads reconfiguration.
    CTRL_GUEST_OFFLOADS = 1 << 2
    #: Device reports its maximum MTU in config space.
    MTU = 1 << 3
    #: Device has given MAC address (config ``mac``).
    MAC = 1 << 5
    #: Legacy: device handles packets with any GSO type.
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    #: Driver can merge receive buffers (header gains ``num_buffers``).
    MRG_RXBUF = 1 << 15
    #: Config ``status`` is valid.
    STATUS = 1 << 16
    #: Control virtqueue is available.
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    #: Multiqueue with automatic receive steering; config ``max_virtqueue_pairs`` is valid.
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    #: Legacy: device coalesces TCP/IPv4 packets (Windows drivers depend on it).
    GUEST_RSC4 = 1 << 41
    #: Legacy: device coalesces TCP/IPv6 packets.
    GUEST_RSC6 = 1 << 42
    DEVICE_STATS = 1 << 50
    HASH_TUNNEL = 1 << 51
    VQ_NOTF_COAL = 1 << 52
    NOTF_COAL = 1 << 53
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    #: The header grows to 20 bytes (hash_value, hash_report, padding_reserved).
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    #: Config ``speed`` and ``duplex`` are valid.
    SPEED_DUPLEX = 1 << 63


class NetStatus(IntFlag):
    """Bits of config ``status`` (valid only with :attr:`NetFeature.STATUS`)."""

    LINK_UP = 1
    ANNOUNCE = 2


#: ``VIRTIO_NET_S_LINK_UP``: the link is up.
VIRTIO_NET_S_LINK_UP: Final = 1
#: ``VIRTIO_NET_S_ANNOUNCE``: the device asks the driver to send gratuitous packets.
VIRTIO_NET_S_ANNOUNCE: Final = 2


class NetHeaderFlag(IntFlag):
    """``virtio_net_hdr.flags``."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4
    UDP_TUNNEL_CSUM = 8
    SECURITY = 16
    SECURITY_ERR = 32
    SECURITY_SA_SOFT_EXPIRY_WARN = 64


class GsoType(IntEnum):
    """The base values of ``virtio_net_hdr.gso_type`` (the high bits are modifiers)."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5


#: ``gso_type`` modifier: the GSO packet is UDP-tunnelled over IPv4.
GSO_UDP_TUNNEL_IPV4: Final = 0x20
#: ``gso_type`` modifier: the GSO packet is UDP-tunnelled over IPv6.
GSO_UDP_TUNNEL_IPV6: Final = 0x40
#: ``gso_type`` modifier: TCP segmentation with ECN.
GSO_ECN: Final = 0x80

# struct virtio_net_hdr, the part every negotiation has:
#   0 u8 flags      1 u8 gso_type     2 le16 hdr_len    4 le16 gso_size
#   6 le16 csum_start                 8 le16 csum_offset
#  10 le16 num_buffers   (only with VERSION_1 or MRG_RXBUF: the 12-byte form)
_HEADER: Final = struct.Struct("<BBHHHHH")
_LEGACY_HEADER: Final = struct.Struct("<BBHHHH")
#: The header with VERSION_1 or MRG_RXBUF negotiated.
HEADER_SIZE: Final = _HEADER.size
#: The legacy header without MRG_RXBUF (no ``num_buffers``).
LEGACY_HEADER_SIZE: Final = _LEGACY_HEADER.size
#: The header with HASH_REPORT negotiated (adds le32 hash_value, le16 hash_report, le16 pad).
HASH_REPORT_HEADER_SIZE: Final = 20
#: Byte offset of ``num_buffers``: the one field an RX path fills in with MRG_RXBUF.
NUM_BUFFERS_OFFSET: Final = 10

_U8: Final = 0xFF
_U16: Final = 0xFFFF


def header_size(acked_features: int) -> int:
    """Return the size of ``struct virtio_net_hdr`` for the negotiated features.

    The spec ("Legacy Interface: Device Operation", "Setting Up Receive Buffers"): 12 bytes
    when VERSION_1 or MRG_RXBUF is negotiated, 10 for a legacy driver without MRG_RXBUF, and
    20 once HASH_REPORT is negotiated.

    Args:
        acked_features: the virtio feature bits the driver acked (SET_FEATURES).

    Returns:
        The number of header bytes that precede every frame on both RX and TX.
    """
    if acked_features & NetFeature.HASH_REPORT:
        return HASH_REPORT_HEADER_SIZE
    if acked_features & (VirtioFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return HEADER_SIZE
    return LEGACY_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class VirtioNetHeader:
    """The fields of ``struct virtio_net_hdr`` in its 10- and 12-byte forms.

    Values are raw integers (an unknown ``gso_type`` still decodes); construction checks
    that each fits its field.
    """

    flags: int = 0
    gso_type: int = GsoType.NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    #: Buffers the received packet spans; the device sets it (1 without MRG_RXBUF), the
    #: driver sets 0 on TX. Absent from the 10-byte form.
    num_buffers: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.flags <= _U8 and 0 <= self.gso_type <= _U8):
            raise ValueError("flags and gso_type are u8 fields")
        for value in (
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ):
            if not 0 <= value <= _U16:
                raise ValueError(f"virtio_net_hdr field out of le16 range: {value}")

    def encode(self, size: int = HEADER_SIZE) -> bytes:
        """Lay the header out in ``size`` bytes (12, or 10 for the legacy form).

        Raises:
            ValueError: ``size`` is neither form, or the 10-byte form is asked for a header
                whose ``num_buffers`` is not 0 (it would be lost).
        """
        if size == HEADER_SIZE:
            return _HEADER.pack(
                self.flags,
                self.gso_type,
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
                self.num_buffers,
            )
        if size == LEGACY_HEADER_SIZE:
            if self.num_buffers:
                raise ValueError("the 10-byte header has no num_buffers field")
            return _LEGACY_HEADER.pack(
                self.flags,
                self.gso_type,
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
            )
        raise ValueError(f"no virtio_net_hdr form of {size} bytes (use 10 or 12)")

    @classmethod
    def decode(
        cls, data: bytes | bytearray | memoryview, size: int = HEADER_SIZE
    ) -> VirtioNetHeader:
        """Read a header from the first ``size`` bytes of ``data``; trailing bytes are ignored.

        Raises:
            ValueError: ``size`` is neither form, or ``data`` is shorter than ``size``.
        """
        if size == HEADER_SIZE:
            layout = _HEADER
        elif size == LEGACY_HEADER_SIZE:
            layout = _LEGACY_HEADER
        else:
            raise ValueError(f"no virtio_net_hdr form of {size} bytes (use 10 or 12)")
        if len(data) < size:
            raise ValueError(f"virtio_net_hdr needs {size} bytes, got {len(data)}")
        return cls(*layout.unpack_from(data))

    @property
    def is_plain(self) -> bool:
        """Whether the header asks for nothing: no checksum offload and no GSO."""
        return self.flags == 0 and self.gso_type == GsoType.NONE


_RX_ONE: Final = {
    HEADER_SIZE: _HEADER.pack(0, 0, 0, 0, 0, 0, 1),
    LEGACY_HEADER_SIZE: bytes(LEGACY_HEADER_SIZE),
    HASH_REPORT_HEADER_SIZE: _HEADER.pack(0, 0, 0, 0, 0, 0, 1).ljust(
        HASH_REPORT_HEADER_SIZE, b"\0"
    ),
}


def rx_header(size: int, num_buffers: int = 1) -> bytes:
    """Return the header of a received frame that needs no offload (flags 0, GSO_NONE).

    The common case (``num_buffers == 1``) returns a shared constant: no allocation per frame.
    A 20-byte HASH_REPORT header reports ``VIRTIO_NET_HASH_REPORT_NONE`` (all zero).

    Args:
        size: :func:`header_size` of the negotiated features (10, 12 or 20).
        num_buffers: buffers the frame spans (MRG_RXBUF); must be 1 for the 10-byte form.

    Raises:
        ValueError: an unknown size, or ``num_buffers`` out of range for the form.
    """
    if num_buffers == 1:
        try:
            return _RX_ONE[size]
        except KeyError:
            raise ValueError(f"no virtio_net_hdr form of {size} bytes") from None
    if size == LEGACY_HEADER_SIZE or not 1 <= num_buffers <= _U16:
        raise ValueError(f"num_buffers {num_buffers} impossible in a {size}-byte header")
    header = VirtioNetHeader(num_buffers=num_buffers).encode()
    if size == HASH_REPORT_HEADER_SIZE:
        return header.ljust(HASH_REPORT_HEADER_SIZE, b"\0")
    if size != HEADER_SIZE:
        raise ValueError(f"no virtio_net_hdr form of {size} bytes")
    return header


# -- config space ---------------------------------------------------------------------------

# struct virtio_net_config:
#   0 u8 mac[6]                6 le16 status             8 le16 max_virtqueue_pairs
#  10 le16 mtu                12 le32 speed             16 u8 duplex
#  17 u8 rss_max_key_size     18 le16 rss_max_indirection_table_length
#  20 le32 supported_hash_types                         24 le32 supported_tunnel_types
_CONFIG: Final = struct.Struct("<6sHHHIBBHII")
#: Bytes of config space this device exposes.
CONFIG_SIZE: Final = _CONFIG.size
#: Ethernet MAC address length.
ETH_ADDR_LEN: Final = 6
#: Destination MAC, source MAC, EtherType: the shortest frame a switch can handle.
ETH_HEADER_LEN: Final = 14
#: The usual Ethernet MTU.
DEFAULT_MTU: Final = 1500
#: The spec's bounds on config ``mtu`` when MTU is offered.
MIN_MTU: Final = 68
MAX_MTU: Final = 65535
#: The spec's bound on ``max_virtqueue_pairs`` when MQ is offered.
MAX_QUEUE_PAIRS: Final = 0x8000
#: ``speed`` value meaning "unknown".
SPEED_UNKNOWN: Final = 0xFFFFFFFF
#: ``duplex`` value meaning "unknown".
DUPLEX_UNKNOWN: Final = 0xFF


@dataclass(frozen=True, slots=True)
class NetConfig:
    """The values of the config space; :meth:`encode` lays them out.

    RSS and hash reporting are not offered, so their fields encode as 0.
    """

    mac: bytes
    status: int = VIRTIO_NET_S_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = DEFAULT_MTU
    speed: int = SPEED_UNKNOWN
    duplex: int = DUPLEX_UNKNOWN

    def __post_init__(self) -> None:
        if len(self.mac) != ETH_ADDR_LEN:
            raise ValueError(f"mac must be {ETH_ADDR_LEN} bytes, got {len(self.mac)}")
        if not 0 <= self.status <= _U16:
            raise ValueError(f"status out of le16 range: {self.status}")
        if not 1 <= self.max_virtqueue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"max_virtqueue_pairs must be 1..{MAX_QUEUE_PAIRS}")
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu must be {MIN_MTU}..{MAX_MTU}")
        if not 0 <= self.speed <= SPEED_UNKNOWN or not 0 <= self.duplex <= _U8:
            raise ValueError("speed is le32 and duplex u8")

    def encode(self) -> bytes:
        """Return the config space bytes, little-endian as the spec says."""
        return _CONFIG.pack(
            bytes(self.mac),
            self.status,
            self.max_virtqueue_pairs,
            self.mtu,
            self.speed,
            self.duplex,
            0,  # rss_max_key_size: RSS / HASH_REPORT not offered
            0,  # rss_max_indirection_table_length
            0,  # supported_hash_types
            0,  # supported_tunnel_types
        )


# -- queues -------------------------------------------------------------------------------


def rx_queue(pair: int) -> int:
    """Return the vring index of receiveq ``pair + 1`` (pairs count from 0)."""
    return 2 * pair


def tx_queue(pair: int) -> int:
    """Return the vring index of transmitq ``pair + 1`` (pairs count from 0)."""
    return 2 * pair + 1


def pair_of(vring_index: int) -> int:
    """Return the queue pair (from 0) a data vring belongs to."""
    return vring_index >> 1


def is_rx_queue(vring_index: int) -> bool:
    """Whether a data vring is a receive queue (even index) rather than a transmit queue."""
    return vring_index & 1 == 0


# -- MAC addresses ------------------------------------------------------------------------


def parse_mac(text: str) -> bytes:
    """Parse ``52:54:00:12:34:56`` (or with ``-``) into 6 bytes.

    Raises:
        ValueError: not six two-digit hex groups.
    """
    parts = text.replace("-", ":").split(":")
    if len(parts) != ETH_ADDR_LEN or any(len(part) != 2 for part in parts):
        raise ValueError(f"bad MAC address {text!r}: use six hex pairs like 52:54:00:12:34:56")
    try:
        return bytes(int(part, 16) for part in parts)
    except ValueError:
        raise ValueError(f"bad MAC address {text!r}: not hexadecimal") from None


def format_mac(mac: bytes) -> str:
    """Format 6 bytes as ``52:54:00:12:34:56``."""
    return mac.hex(":")


def random_mac() -> bytes:
    """Return a random locally administered unicast MAC address."""
    raw = bytearray(os.urandom(ETH_ADDR_LEN))
    raw[0] = (raw[0] & 0xFC) | 0x02  # unicast (bit 0 clear), locally administered (bit 1)
    return bytes(raw)
