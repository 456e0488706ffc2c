"""Request codes, header flags and feature bits of the vhost-user protocol.

Names follow QEMU's ``docs/interop/vhost-user.rst`` without the ``VHOST_USER_`` prefix.
Protocol feature bits live in one declarative table (:data:`PROTOCOL_FEATURE_BITS`):
bit numbers have moved between drafts (SHMEM went 17 -> 20 -> 21 -> 22), so a bit that is
not in the table is never assumed free and is refused in SET_PROTOCOL_FEATURES.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

__all__ = [
    "HEADER_KNOWN_FLAGS",
    "HEADER_SIZE",
    "HEADER_VERSION_MASK",
    "KNOWN_PROTOCOL_FEATURES",
    "MAX_FDS",
    "PROTOCOL_FEATURE_BITS",
    "VERSION",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendReq",
    "FrontendReq",
    "HeaderFlag",
    "ProtocolFeature",
    "VirtioFeature",
    "VringAddrFlag",
]

#: Size of the message header: u32 request, u32 flags, u32 size.
HEADER_SIZE: Final = 12
#: The only protocol version there is (header flags bits 0-1).
VERSION: Final = 1
#: The most fds one message may carry: SET_MEM_TABLE with 8 regions.
MAX_FDS: Final = 8
#: Vring index bits of the u64 payload of SET_VRING_KICK/CALL/ERR.
VRING_IDX_MASK: Final = 0xFF
#: "No fd attached" bit of the u64 payload of SET_VRING_KICK/CALL/ERR.
VRING_NOFD_MASK: Final = 0x100


class FrontendReq(IntEnum):
    """Requests a frontend sends to a backend (the front-end message codes)."""

    #: Ask for the backend's virtio feature bits; reply u64.
    GET_FEATURES = 1
    #: Ack virtio feature bits (u64).
    SET_FEATURES = 2
    #: Claim the backend for this frontend.
    SET_OWNER = 3
    #: Deprecated: drop ownership and reset.
    RESET_OWNER = 4
    #: Replace the guest memory table; one fd per region.
    SET_MEM_TABLE = 5
    #: Dirty-log region (LOG_SHMFD); reply required.
    SET_LOG_BASE = 6
    #: Eventfd signalled after a dirty-log update.
    SET_LOG_FD = 7
    #: Queue size of one vring.
    SET_VRING_NUM = 8
    #: Descriptor/avail/used addresses of one vring (frontend virtual addresses).
    SET_VRING_ADDR = 9
    #: Next avail index of one vring.
    SET_VRING_BASE = 10
    #: Stop one vring; reply with its next avail index.
    GET_VRING_BASE = 11
    #: Kick eventfd of one vring; starts the ring.
    SET_VRING_KICK = 12
    #: Call eventfd of one vring.
    SET_VRING_CALL = 13
    #: Error eventfd of one vring.
    SET_VRING_ERR = 14
    #: Ask for protocol feature bits; reply u64.
    GET_PROTOCOL_FEATURES = 15
    #: Ack protocol feature bits (u64).
    SET_PROTOCOL_FEATURES = 16
    #: Ask how many queues the backend supports (MQ); reply u64.
    GET_QUEUE_NUM = 17
    #: Enable or disable one vring.
    SET_VRING_ENABLE = 18
    #: Announce a guest MAC after migration (RARP).
    SEND_RARP = 19
    #: Tell a net backend the MTU (NET_MTU).
    NET_SET_MTU = 20
    #: Socket for backend-initiated requests (BACKEND_REQ).
    SET_BACKEND_REQ_FD = 21
    #: IOTLB update or invalidation (IOMMU_PLATFORM).
    IOTLB_MSG = 22
    #: Endianness of a legacy vring (CROSS_ENDIAN).
    SET_VRING_ENDIAN = 23
    #: Read device config space (CONFIG).
    GET_CONFIG = 24
    #: Write device config space (CONFIG).
    SET_CONFIG = 25
    #: Create a crypto session (CRYPTO_SESSION).
    CREATE_CRYPTO_SESSION = 26
    #: Close a crypto session (CRYPTO_SESSION).
    CLOSE_CRYPTO_SESSION = 27
    #: Postcopy: open a userfaultfd (PAGEFAULT).
    POSTCOPY_ADVISE = 28
    #: Postcopy: start listening (PAGEFAULT).
    POSTCOPY_LISTEN = 29
    #: Postcopy: end (PAGEFAULT).
    POSTCOPY_END = 30
    #: Allocate the shared in-flight region (INFLIGHT_SHMFD).
    GET_INFLIGHT_FD = 31
    #: Hand back the in-flight region after reconnect (INFLIGHT_SHMFD).
    SET_INFLIGHT_FD = 32
    #: vhost-user-gpu socket.
    GPU_SET_SOCKET = 33
    #: Reset the device (RESET_DEVICE).
    RESET_DEVICE = 34
    #: In-band kick (INBAND_NOTIFICATIONS).
    VRING_KICK = 35
    #: Ask how many memory slots (CONFIGURE_MEM_SLOTS); reply u64.
    GET_MAX_MEM_SLOTS = 36
    #: Add one memory region (CONFIGURE_MEM_SLOTS).
    ADD_MEM_REG = 37
    #: Remove one memory region (CONFIGURE_MEM_SLOTS).
    REM_MEM_REG = 38
    #: Set the virtio device status byte (STATUS).
    SET_STATUS = 39
    #: Get the virtio device status byte (STATUS); reply u64.
    GET_STATUS = 40
    #: Look up a shared object by UUID (SHARED_OBJECT).
    GET_SHARED_OBJECT = 41
    #: Open a device state transfer pipe (DEVICE_STATE).
    SET_DEVICE_STATE_FD = 42
    #: Check the last device state transfer (DEVICE_STATE).
    CHECK_DEVICE_STATE = 43
    #: Ask for the shared memory regions (SHMEM).
    GET_SHMEM_CONFIG = 44
    #: Proposed: stop a vring without draining (GET_VRING_BASE_SKIP_DRAIN).
    GET_VRING_BASE_SKIP_DRAIN = 45
    #: crosvm extension: stop all workers; reply i8 success.
    SLEEP = 1000
    #: crosvm extension: restart the workers; reply i8 success.
    WAKE = 1001
    #: crosvm extension: reply i8 success + snapshot bytes.
    SNAPSHOT = 1002
    #: crosvm extension: restore snapshot bytes, kick fds attached; reply i8 success.
    RESTORE = 1003
    #: crosvm extension (protocol bit 31): list shared memory regions.
    GET_SHARED_MEMORY_REGIONS = 1004


class BackendReq(IntEnum):
    """Requests a backend sends to the frontend on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class HeaderFlag(IntFlag):
    """Bits of the header's flags word."""

    #: Protocol version 1 (bits 0-1).
    VERSION = 0x1
    #: This message is a reply.
    REPLY = 0x4
    #: The sender wants a u64 ack (REPLY_ACK).
    NEED_REPLY = 0x8


#: Bits 0-1 hold the version; everything above NEED_REPLY is reserved.
HEADER_VERSION_MASK: Final = 0x3
HEADER_KNOWN_FLAGS: Final[int] = 0x3 | 0x4 | 0x8


class ProtocolFeature(IntFlag):
    """Protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23
    #: crosvm's non-standard bit for GET_SHARED_MEMORY_REGIONS (1004).
    SHARED_MEMORY_REGIONS = 1 << 31


#: The declarative bit table: bit number -> feature. Anything not here is unknown.
PROTOCOL_FEATURE_BITS: Final[dict[int, ProtocolFeature]] = {
    member.value.bit_length() - 1: member for member in ProtocolFeature
}
#: Every protocol bit this library knows the meaning of.
KNOWN_PROTOCOL_FEATURES: Final = sum(int(m) for m in ProtocolFeature)


class VirtioFeature(IntFlag):
    """Device-independent virtio feature bits the vhost-user transport cares about."""

    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    #: Also VHOST_F_LOG_ALL's neighbour: bit 26 is LOG_ALL.
    LOG_ALL = 1 << 26
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    #: VHOST_USER_F_PROTOCOL_FEATURES: protocol features exist, rings start disabled.
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40


class VringAddrFlag(IntFlag):
    """Flags of SET_VRING_ADDR."""

    #: Log used-ring writes at ``log_guest_addr`` (dirty logging).
    LOG = 0x1
