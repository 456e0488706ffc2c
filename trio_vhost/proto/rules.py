"""The per-request rules of vhost-user: one table per channel.

:data:`FRONTEND_RULES` maps every :class:`~trio_vhost.proto.constants.FrontendReq` to a
:class:`Rule`: the body kind (hence its exact size), which fds it may carry, the feature
that gates it and the reply it owes. :data:`BACKEND_RULES` does the same for the back-end
channel (:class:`~trio_vhost.proto.constants.BackendReq`). A code missing from a table is
an unknown request. Like h11's ``_state.py``, every rule lives here;
:mod:`~trio_vhost.proto.codec` applies them and the connection objects
(:mod:`~trio_vhost.proto.connection`, :mod:`~trio_vhost.proto.frontend_codec`) only keep
the negotiation state.

The checks follow crosvm's ``BackendServer`` (``check_attached_files``,
``check_request_size``, ``handle_vring_fd_request``, the gates in ``process_message``) and
add the spec's own MUSTs where crosvm has none. Functions named ``_check_*`` validate a
received request and raise :class:`~trio_vhost.errors.RemoteProtocolError`; ``_reply_*``
validate a reply against its request and raise
:class:`~trio_vhost.errors.LocalProtocolError` (the receiving side re-raises as remote).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol, TypeVar, cast, final

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import (
    KNOWN_PROTOCOL_FEATURES,
    MAX_FDS,
    BackendReq,
    FrontendReq,
    ProtocolFeature,
    VirtioFeature,
)
from .messages import (
    U64,
    Body,
    ConfigSpace,
    CryptoSession,
    DeviceStateTransfer,
    Empty,
    Inflight,
    IotlbMsg,
    LogBase,
    MemoryTable,
    SharedMemoryRegions,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleMemRegion,
    Snapshot,
    Success,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)
from .wire import U8_MAX

__all__ = [
    "BACKEND_RULES",
    "FRONTEND_RULES",
    "MAX_QUEUE_SIZE",
    "OPAQUE",
    "BodyKind",
    "FdRule",
    "Negotiation",
    "Opaque",
    "Rule",
]

#: The largest split or packed virtqueue (virtio 1.x "Queue Size").
MAX_QUEUE_SIZE: Final = 32768

#: A body class: one of the :data:`~trio_vhost.proto.messages.Body` kinds.
BodyKind = type[Body]


@final
@dataclass(frozen=True, slots=True)
class Opaque:
    """Marker for an opaque body kept as ``bytes`` (crosvm RESTORE's snapshot data)."""


#: The one :class:`Opaque` marker.
OPAQUE: Final = Opaque()


class Negotiation(Protocol):
    """The feature state a rule is checked against (read-only view)."""

    @property
    def offered_features(self) -> int:
        """Virtio feature bits the back-end offered (GET_FEATURES)."""

    @property
    def offered_protocol_features(self) -> int:
        """Protocol feature bits the back-end offered (GET_PROTOCOL_FEATURES)."""

    @property
    def acked_features(self) -> int:
        """Virtio feature bits the frontend acked (SET_FEATURES)."""

    @property
    def acked_protocol_features(self) -> int:
        """Protocol feature bits the frontend acked (SET_PROTOCOL_FEATURES)."""


class FdRule(Enum):
    """How many fds a message carries in its ancillary data."""

    #: None (crosvm ``check_attached_files``: fds only on whitelisted requests).
    NONE = "no fd"
    #: Exactly one.
    ONE = "one fd"
    #: Zero or one (REM_MEM_REG: "the back-end MAY accept messages with one fd").
    MAYBE_ONE = "at most one fd"
    #: One unless the body's NOFD bit 8 is set, then none (SET_VRING_KICK/CALL/ERR).
    NOFD_BIT = "one fd unless NOFD is set"
    #: One unless the body's ``mmap_size`` is 0, then none (GET_INFLIGHT_FD's reply: a
    #: backend that cannot give a region answers size 0 without an fd, as QEMU accepts).
    UNLESS_EMPTY = "one fd unless mmap_size is 0"
    #: One per memory region, in region order (SET_MEM_TABLE).
    PER_REGION = "one fd per region"
    #: Up to MAX_FDS (crosvm RESTORE: the kick eventfds).
    ANY = "up to 8 fds"

    @property
    def bounds(self) -> tuple[int, int]:
        """The fd counts possible before the body is known: ``(min, max)``."""
        return _FD_BOUNDS[self]


_FD_BOUNDS: Final = {
    FdRule.NONE: (0, 0),
    FdRule.ONE: (1, 1),
    FdRule.MAYBE_ONE: (0, 1),
    FdRule.NOFD_BIT: (0, 1),
    FdRule.UNLESS_EMPTY: (0, 1),
    FdRule.PER_REGION: (1, MAX_FDS),
    FdRule.ANY: (0, MAX_FDS),
}

_Check = Callable[[Negotiation, object], None]
_ReplyCheck = Callable[[object, object], None]
_B = TypeVar("_B")
_R = TypeVar("_R")


def _check(fn: Callable[[Negotiation, _B], None]) -> _Check:
    # The table guarantees each check only sees its own rule's body kind.
    return cast(_Check, fn)


def _reply_check(fn: Callable[[_B, _R], None]) -> _ReplyCheck:
    return cast(_ReplyCheck, fn)


@final
@dataclass(frozen=True, slots=True)
class Rule:
    """Everything the protocol says about one request code.

    Attributes:
        body: The body kind; ``None`` for no body (size 0), :data:`OPAQUE` for raw bytes.
        fds: The fds the request carries.
        reply: The kinds accepted as the request's own reply (the first is the one
            decoded); ``None`` when the only reply is a REPLY_ACK u64.
        reply_fds: The fds that own reply carries.
        protocol: Protocol feature bits that must all be acked.
        virtio: Virtio feature bits that must all be acked.
        offered_virtio: Virtio feature bits the back-end must have offered.
        excluded: Protocol feature bits whose negotiation forbids the request.
        check: Extra validation of a received body against the negotiation.
        reply_check: Validation of a reply body against the request body.
    """

    body: BodyKind | Opaque | None
    fds: FdRule = FdRule.NONE
    reply: tuple[BodyKind, ...] | None = None
    reply_fds: FdRule = FdRule.NONE
    protocol: int = 0
    virtio: int = 0
    offered_virtio: int = 0
    excluded: int = 0
    check: _Check | None = None
    reply_check: _ReplyCheck | None = None


# -- checks of received requests --------------------------------------------------------


def _check_set_features(state: Negotiation, body: U64) -> None:
    # rust-vmm vhost-user-backend refuses acked bits that were never offered.
    extra = body.value & ~int(state.offered_features)
    if extra:
        raise RemoteProtocolError(f"SET_FEATURES acks bits {extra:#x} that were not offered")


def _check_set_protocol_features(state: Negotiation, body: U64) -> None:
    value = body.value
    if value & ~KNOWN_PROTOCOL_FEATURES:
        # crosvm rejects unknown bits; bit numbers have moved between drafts.
        raise RemoteProtocolError(f"unknown protocol feature bits {value:#x}")
    if value & ~int(state.offered_protocol_features):
        raise RemoteProtocolError(f"protocol features {value:#x} were not all offered")
    needs = {
        # Spec "In-band notifications": "the back-end should close the connection" when
        # INBAND_NOTIFICATIONS comes without BACKEND_REQ and REPLY_ACK.
        ProtocolFeature.INBAND_NOTIFICATIONS: ProtocolFeature.BACKEND_REQ
        | ProtocolFeature.REPLY_ACK,
        # Spec GET_VRING_BASE_SKIP_DRAIN: "must only be negotiated if both
        # GET_VRING_BASE_INFLIGHT and INFLIGHT_SHMFD are also negotiated".
        ProtocolFeature.GET_VRING_BASE_SKIP_DRAIN: ProtocolFeature.GET_VRING_BASE_INFLIGHT
        | ProtocolFeature.INFLIGHT_SHMFD,
    }
    for feature, required in needs.items():
        if value & feature and value & required != required:
            raise RemoteProtocolError(f"{feature.name} needs {required!r} as well")


def _split(state: Negotiation) -> bool:
    return not state.acked_features & VirtioFeature.RING_PACKED


def _check_vring_num(state: Negotiation, body: VringState) -> None:
    # Virtio "Queue Size": at most 32768. That a split ring's size is a power of 2 is a
    # property of the ring, not of the message: the session refuses other sizes with a
    # NACK, like a size above the device's maximum, and the connection stays up.
    num = body.num
    if not 1 <= num <= MAX_QUEUE_SIZE:
        raise RemoteProtocolError(f"invalid queue size {num} for vring {body.index}")


def _check_vring_base(state: Negotiation, body: VringState) -> None:
    # Spec "A vring descriptor index for split virtqueues": bits 16-31 are reserved.
    if _split(state) and body.num > 0xFFFF:
        raise RemoteProtocolError(f"split vring base {body.num:#x} has reserved bits set")


def _check_zero_or_one(state: Negotiation, body: VringState) -> None:
    # SET_VRING_ENABLE (crosvm: 0 or 1, else InvalidParam); SET_VRING_ENDIAN: "Other
    # values are invalid".
    if body.num not in (0, 1):
        raise RemoteProtocolError(f"vring {body.index}: num must be 0 or 1, not {body.num}")


def _check_num_reserved(state: Negotiation, body: VringState) -> None:
    # VRING_KICK / BACKEND_VRING_CALL/ERR: "The state.num field is currently reserved and
    # must be set to 0."
    if body.num:
        raise RemoteProtocolError(f"vring {body.index}: reserved num is {body.num}, not 0")


def _check_config_request(state: Negotiation, body: ConfigSpace) -> None:
    # crosvm VhostUserConfig::is_valid: a zero-size access is invalid.
    if body.size == 0:
        raise RemoteProtocolError("config access of size 0")


def _check_status(state: Negotiation, body: U64) -> None:
    # SET_STATUS carries the virtio device status, an 8-bit field.
    if body.value > U8_MAX:
        raise RemoteProtocolError(f"device status {body.value:#x} is wider than 8 bits")


def _check_iotlb_request(state: Negotiation, body: IotlbMsg) -> None:
    # Spec "IOMMU support": the front-end sends update (2) and invalidate (3) messages;
    # Linux vhost refuses an update of size 0.
    if body.type not in (IotlbMsg.UPDATE, IotlbMsg.INVALIDATE):
        raise RemoteProtocolError(f"frontend IOTLB message of type {body.type}")
    if body.type == IotlbMsg.UPDATE and body.size == 0:
        raise RemoteProtocolError("IOTLB update of size 0")


def _check_iotlb_backend(state: Negotiation, body: IotlbMsg) -> None:
    # Spec: the back-end sends miss (1) and access-fail (4) messages.
    if body.type not in (IotlbMsg.MISS, IotlbMsg.ACCESS_FAIL):
        raise RemoteProtocolError(f"back-end IOTLB message of type {body.type}")


# -- checks of replies against their request --------------------------------------------


def _reply_same_index(request: VringState, reply: VringState) -> None:
    if reply.index != request.index:
        raise LocalProtocolError(f"reply for vring {reply.index}, asked {request.index}")


def _reply_config(request: ConfigSpace, reply: ConfigSpace) -> None:
    # Spec GET_CONFIG: the reply "payload size MUST match the front-end's request", and
    # "zero length of payload" reports an error.
    if reply.size not in (0, request.size):
        raise LocalProtocolError(f"GET_CONFIG reply of {reply.size} bytes, {request.size} asked")


def _reply_same_layout(request: CryptoSession, reply: CryptoSession) -> None:
    if len(reply.data) != len(request.data):
        raise LocalProtocolError("crypto session reply changes the session layout")


def _reply_device_state(request: DeviceStateTransfer, reply: U64) -> None:
    # Spec SET_DEVICE_STATE_FD: bits 0-7 error code, bit 8 invalid-FD flag.
    if reply.value & ~0x1FF:
        raise LocalProtocolError(f"SET_DEVICE_STATE_FD reply {reply.value:#x} has reserved bits")


_F = FrontendReq
_P = ProtocolFeature
_PF = VirtioFeature.PROTOCOL_FEATURES
_U64 = (U64,)
_VRING = (VringState,)

#: Front-end requests. Sources: spec "Front-end message types" and "Communication"
#: (replies, fds); crosvm ``check_attached_files`` and the gates of ``process_message``.
FRONTEND_RULES: Final[Mapping[int, Rule]] = {
    _F.GET_FEATURES: Rule(None, reply=_U64),
    _F.SET_FEATURES: Rule(U64, check=_check(_check_set_features)),
    _F.SET_OWNER: Rule(None),
    _F.RESET_OWNER: Rule(None),
    _F.SET_MEM_TABLE: Rule(MemoryTable, FdRule.PER_REGION),
    # "SET_LOG_BASE (if LOG_SHMFD)" both needs a reply and carries the log fd; the legacy
    # fd-less u64 form predates LOG_SHMFD and is refused.
    _F.SET_LOG_BASE: Rule(LogBase, FdRule.ONE, reply=_U64, protocol=_P.LOG_SHMFD),
    _F.SET_LOG_FD: Rule(None, FdRule.ONE),
    _F.SET_VRING_NUM: Rule(VringState, check=_check(_check_vring_num)),
    _F.SET_VRING_ADDR: Rule(VringAddr),
    _F.SET_VRING_BASE: Rule(VringState, check=_check(_check_vring_base)),
    _F.GET_VRING_BASE: Rule(VringState, reply=_VRING, reply_check=_reply_check(_reply_same_index)),
    _F.SET_VRING_KICK: Rule(VringFile, FdRule.NOFD_BIT),
    _F.SET_VRING_CALL: Rule(VringFile, FdRule.NOFD_BIT),
    _F.SET_VRING_ERR: Rule(VringFile, FdRule.NOFD_BIT),
    # "Only legal if feature bit VHOST_USER_F_PROTOCOL_FEATURES is present in GET_FEATURES."
    _F.GET_PROTOCOL_FEATURES: Rule(None, reply=_U64, offered_virtio=_PF),
    _F.SET_PROTOCOL_FEATURES: Rule(
        U64, offered_virtio=_PF, check=_check(_check_set_protocol_features)
    ),
    _F.GET_QUEUE_NUM: Rule(None, reply=_U64, protocol=_P.MQ),
    # QEMU 7.2 sends SET_VRING_ENABLE before SET_FEATURES (lab/qemu net trace) whenever
    # bit 30 was offered, so the gate is the offer, not crosvm's ack.
    _F.SET_VRING_ENABLE: Rule(VringState, offered_virtio=_PF, check=_check(_check_zero_or_one)),
    _F.SEND_RARP: Rule(U64, protocol=_P.RARP),
    _F.NET_SET_MTU: Rule(U64, protocol=_P.MTU),
    _F.SET_BACKEND_REQ_FD: Rule(None, FdRule.ONE, protocol=_P.BACKEND_REQ),
    # "The back-end has to acknowledge the request with sending zero as u64 payload."
    _F.IOTLB_MSG: Rule(
        IotlbMsg,
        reply=_U64,
        virtio=VirtioFeature.ACCESS_PLATFORM,
        check=_check(_check_iotlb_request),
    ),
    _F.SET_VRING_ENDIAN: Rule(
        VringState, protocol=_P.CROSS_ENDIAN, check=_check(_check_zero_or_one)
    ),
    _F.GET_CONFIG: Rule(
        ConfigSpace,
        reply=(ConfigSpace,),
        protocol=_P.CONFIG,
        check=_check(_check_config_request),
        reply_check=_reply_check(_reply_config),
    ),
    _F.SET_CONFIG: Rule(ConfigSpace, protocol=_P.CONFIG, check=_check(_check_config_request)),
    _F.CREATE_CRYPTO_SESSION: Rule(
        CryptoSession,
        reply=(CryptoSession,),
        protocol=_P.CRYPTO_SESSION,
        reply_check=_reply_check(_reply_same_layout),
    ),
    _F.CLOSE_CRYPTO_SESSION: Rule(U64, protocol=_P.CRYPTO_SESSION),
    # Postcopy "MUST NOT be sent when CONFIGURE_MEM_SLOTS has been negotiated".
    _F.POSTCOPY_ADVISE: Rule(
        None,
        reply=(Empty,),
        reply_fds=FdRule.ONE,
        protocol=_P.PAGEFAULT,
        excluded=_P.CONFIGURE_MEM_SLOTS,
    ),
    _F.POSTCOPY_LISTEN: Rule(None, protocol=_P.PAGEFAULT, excluded=_P.CONFIGURE_MEM_SLOTS),
    _F.POSTCOPY_END: Rule(None, reply=_U64, protocol=_P.PAGEFAULT, excluded=_P.CONFIGURE_MEM_SLOTS),
    _F.GET_INFLIGHT_FD: Rule(
        Inflight, reply=(Inflight,), reply_fds=FdRule.UNLESS_EMPTY, protocol=_P.INFLIGHT_SHMFD
    ),
    _F.SET_INFLIGHT_FD: Rule(Inflight, FdRule.ONE, protocol=_P.INFLIGHT_SHMFD),
    _F.GPU_SET_SOCKET: Rule(None, FdRule.ONE),
    _F.RESET_DEVICE: Rule(None, protocol=_P.RESET_DEVICE),
    _F.VRING_KICK: Rule(
        VringState, protocol=_P.INBAND_NOTIFICATIONS, check=_check(_check_num_reserved)
    ),
    _F.GET_MAX_MEM_SLOTS: Rule(None, reply=_U64, protocol=_P.CONFIGURE_MEM_SLOTS),
    # The spec lists a region reply for ADD/REM_MEM_REG, but only postcopy sends one;
    # QEMU otherwise reads a REPLY_ACK, so these are acked like any other request.
    _F.ADD_MEM_REG: Rule(SingleMemRegion, FdRule.ONE, protocol=_P.CONFIGURE_MEM_SLOTS),
    _F.REM_MEM_REG: Rule(SingleMemRegion, FdRule.MAYBE_ONE, protocol=_P.CONFIGURE_MEM_SLOTS),
    _F.SET_STATUS: Rule(U64, protocol=_P.STATUS, check=_check(_check_status)),
    _F.GET_STATUS: Rule(None, reply=_U64, protocol=_P.STATUS),
    # The reply is a dma-buf fd; its body is the u64 result of SHARED_OBJECT_LOOKUP
    # (0: found, fd attached).
    _F.GET_SHARED_OBJECT: Rule(
        SharedObject, reply=_U64, reply_fds=FdRule.MAYBE_ONE, protocol=_P.SHARED_OBJECT
    ),
    _F.SET_DEVICE_STATE_FD: Rule(
        DeviceStateTransfer,
        FdRule.ONE,
        reply=_U64,
        reply_fds=FdRule.MAYBE_ONE,
        protocol=_P.DEVICE_STATE,
        reply_check=_reply_check(_reply_device_state),
    ),
    _F.CHECK_DEVICE_STATE: Rule(None, reply=_U64, protocol=_P.DEVICE_STATE),
    _F.GET_SHMEM_CONFIG: Rule(None, reply=(ShmemConfig,), protocol=_P.SHMEM),
    _F.GET_VRING_BASE_SKIP_DRAIN: Rule(
        VringState,
        reply=_VRING,
        protocol=_P.GET_VRING_BASE_SKIP_DRAIN,
        reply_check=_reply_check(_reply_same_index),
    ),
    # crosvm's extensions: ungated in the seed (only 1004 has a protocol bit).
    _F.SLEEP: Rule(None, reply=(Success,)),
    _F.WAKE: Rule(None, reply=(Success,)),
    # A failed SNAPSHOT is the bare success byte, which Success(False) encodes too.
    _F.SNAPSHOT: Rule(None, reply=(Snapshot, Success)),
    _F.RESTORE: Rule(OPAQUE, FdRule.ANY, reply=(Success,)),
    _F.GET_SHARED_MEMORY_REGIONS: Rule(
        None, reply=(SharedMemoryRegions,), protocol=_P.SHARED_MEMORY_REGIONS
    ),
}

_BR = BackendReq

#: Back-end requests (spec "Back-end message types"); the channel itself exists only once
#: BACKEND_REQ is acked, and fds travel on it only with BACKEND_SEND_FD.
BACKEND_RULES: Final[Mapping[int, Rule]] = {
    _BR.IOTLB_MSG: Rule(
        IotlbMsg, virtio=VirtioFeature.ACCESS_PLATFORM, check=_check(_check_iotlb_backend)
    ),
    _BR.CONFIG_CHANGE_MSG: Rule(None, protocol=_P.CONFIG),
    _BR.VRING_HOST_NOTIFIER_MSG: Rule(VringArea, FdRule.NOFD_BIT, protocol=_P.HOST_NOTIFIER),
    _BR.VRING_CALL: Rule(
        VringState, protocol=_P.INBAND_NOTIFICATIONS, check=_check(_check_num_reserved)
    ),
    _BR.VRING_ERR: Rule(
        VringState, protocol=_P.INBAND_NOTIFICATIONS, check=_check(_check_num_reserved)
    ),
    _BR.SHARED_OBJECT_ADD: Rule(SharedObject, protocol=_P.SHARED_OBJECT),
    _BR.SHARED_OBJECT_REMOVE: Rule(SharedObject, protocol=_P.SHARED_OBJECT),
    # "Frontend will reply passing the fd and a zero when the operation is successful."
    _BR.SHARED_OBJECT_LOOKUP: Rule(
        SharedObject, reply=_U64, reply_fds=FdRule.MAYBE_ONE, protocol=_P.SHARED_OBJECT
    ),
    _BR.SHMEM_MAP: Rule(ShmemMap, FdRule.ONE, protocol=_P.SHMEM),
    _BR.SHMEM_UNMAP: Rule(ShmemMap, protocol=_P.SHMEM),
}
