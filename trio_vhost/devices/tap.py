"""A Linux TAP device as a switch port: the host's side of the virtual Ethernet.

:func:`open_tap` attaches to (or creates) a TAP interface through ``/dev/net/tun`` with
``IFF_TAP | IFF_NO_PI``: every read returns one whole Ethernet frame and every write sends
one, with no packet-info prefix and no virtio-net header. An interface that does not exist is
created and vanishes when the device is closed; a persistent one (``ip tuntap add NAME mode
tap``) survives us.

The kernel's side of the TAP never pushes back: a write either queues the frame or the kernel
drops it, and it fails with EIO while the link is down. So :meth:`TapDevice.deliver` never
blocks, and returns False on any write error.

Frames move in batches both ways, like the virtio ports': :meth:`TapDevice.run` reads up to a
batch of frames back to back into one buffer and hands them to the switch as one
:class:`~trio_vhost.devices.net_frames.Frames`; :meth:`TapDevice.deliver_frames` writes a
batch straight from the switch's buffer (one ``write`` per frame: a TAP takes one frame per
write), without copying a frame out first.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Final, final

import numpy as np
import trio

from .._fd import OwnedFd
from ..errors import DeviceError
from .net_frames import Frames

if TYPE_CHECKING:
    from types import TracebackType

    from .net_switch import Switch

__all__ = ["TapDevice", "TapError", "TapFailure", "open_tap"]

LOGGER = logging.getLogger(__name__)

#: The clone device every TUN/TAP interface is opened through.
TUN_PATH: Final = "/dev/net/tun"
#: ``_IOW('T', 202, int)``.
TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
#: ``IFNAMSIZ`` including the terminating NUL.
IFNAMSIZ: Final = 16
# struct ifreq as TUNSETIFF and SIOC[GS]IFFLAGS use it: char ifr_name[16]; short ifr_flags;
# the union pads the struct to 40 bytes on 64-bit Linux.
_IFREQ: Final = struct.Struct("16sH22x")
#: Largest read: a 65535-byte MTU plus Ethernet and VLAN headers, rounded up.
_READ_SIZE: Final = 65600
#: Frames read per wakeup before yielding to other tasks.
_BATCH: Final = 64
#: The read buffer: room for a whole batch of frames up to 2 KiB (a 1500-byte MTU), and
#: always for one more of the largest size; a batch also ends when less than that is left.
_BUFFER_SIZE: Final = _READ_SIZE + (_BATCH - 1) * 2048


class _Batch(enum.Enum):
    DRAINED = enum.auto()
    FULL = enum.auto()
    CLOSED = enum.auto()


class TapFailure(enum.Enum):
    """Why a TAP device could not be opened."""

    #: ``/dev/net/tun`` does not exist or the tun driver is not loaded.
    NO_TUN_DEVICE = "no /dev/net/tun"
    #: Not allowed: needs CAP_NET_ADMIN, or a persistent TAP owned by this user.
    PERMISSION = "permission denied"
    #: The interface is already attached to another file descriptor.
    BUSY = "busy"
    #: The name exists but is not a TAP interface (a TUN device, a physical NIC, ...).
    NOT_A_TAP = "not a tap"
    #: Anything else; see ``errno``.
    OTHER = "failed"


_HINTS: Final = {
    TapFailure.NO_TUN_DEVICE: (
        f"{TUN_PATH} is missing: load the tun module (modprobe tun), or in a container "
        "pass the device in (--device /dev/net/tun)"
    ),
    TapFailure.PERMISSION: (
        "needs CAP_NET_ADMIN, or a persistent tap this user owns "
        "(ip tuntap add {ifname} mode tap user $USER)"
    ),
    TapFailure.BUSY: "{ifname} is already attached to another process",
    TapFailure.NOT_A_TAP: "{ifname} exists and is not a tap interface",
    TapFailure.OTHER: "could not attach to {ifname}",
}


class TapError(DeviceError, OSError):
    """A TAP device could not be opened; an :class:`OSError` with ``errno`` and a reason.

    Attributes:
        reason: the :class:`TapFailure`.
    """

    def __init__(self, reason: TapFailure, err: int, ifname: str) -> None:
        message = _HINTS[reason].format(ifname=ifname)
        super().__init__(err, f"{message} ({os.strerror(err)})", ifname)
        self.reason = reason


def _failure(err: int, *, opening: bool) -> TapFailure:
    if err in (errno.EPERM, errno.EACCES):
        return TapFailure.PERMISSION
    if opening and err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return TapFailure.NO_TUN_DEVICE
    if err == errno.EBUSY:
        return TapFailure.BUSY
    if err == errno.EINVAL:
        return TapFailure.NOT_A_TAP
    return TapFailure.OTHER


def _check_ifname(ifname: str) -> bytes:
    # The kernel's dev_valid_name(): 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
    raw = ifname.encode()
    if (
        not 0 < len(raw) < IFNAMSIZ
        or ifname in (".", "..")
        or any(ch in "/:" or ch.isspace() for ch in ifname)
    ):
        raise ValueError(f"bad interface name {ifname!r}: 1-15 bytes, no '/', ':' or spaces")
    return raw


def open_tap(ifname: str) -> TapDevice:
    """Attach to the TAP interface ``ifname``, creating it if it does not exist.

    A name with ``%d`` (``tap%d``) lets the kernel pick the number; :attr:`TapDevice.ifname`
    holds the name it chose. The link state is left as it is (see
    :meth:`TapDevice.set_link_up`).

    Raises:
        ValueError: ``ifname`` is not a valid interface name.
        TapError: the kernel refused; ``reason`` says why.
    """
    raw = _check_ifname(ifname)
    try:
        fd = OwnedFd(os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError as exc:
        raise TapError(_failure(exc.errno or 0, opening=True), exc.errno or 0, ifname) from exc
    try:
        reply = fcntl.ioctl(fd.fd, TUNSETIFF, _IFREQ.pack(raw, IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        fd.close()
        raise TapError(_failure(exc.errno or 0, opening=False), exc.errno or 0, ifname) from exc
    except BaseException:
        fd.close()
        raise
    name = _IFREQ.unpack(reply)[0].rstrip(b"\0").decode()
    LOGGER.info("tap %s attached", name)
    return TapDevice(fd, name)


@final
class TapDevice:
    """An open TAP interface: a :class:`~trio_vhost.devices.net_switch.SwitchPort`.

    Made by :func:`open_tap`. :meth:`deliver` writes frames to the host; :meth:`run` reads
    the host's frames into a switch.

    Resource handling: the device owns its file descriptor; :meth:`close` (or leaving a
    ``with`` block) closes it once, waking a :meth:`run` parked on it first.
    """

    __slots__ = ("_fd", "_ifname", "_last_errno", "_running", "write_errors")

    def __init__(self, fd: OwnedFd, ifname: str) -> None:
        self._fd = fd
        self._ifname = ifname
        self._running = False
        self._last_errno = 0
        #: writes that failed (link down, no buffer space, closed)
        self.write_errors = 0

    @property
    def name(self) -> str:
        """The port name: ``tap:IFNAME``."""
        return f"tap:{self._ifname}"

    @property
    def ifname(self) -> str:
        """The interface name the kernel gave the device."""
        return self._ifname

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd.closed

    def fileno(self) -> int:
        """Return the file descriptor (``ValueError`` once closed)."""
        return self._fd.fd

    def deliver(self, frame: bytes) -> bool:
        """Send ``frame`` to the host (not a checkpoint, never blocks).

        Returns:
            False if the write failed: the link is down (EIO), the kernel is out of buffers,
            or the device is closed. The first of a run of failures is logged.
        """
        if self._fd.closed:
            return False
        return self._write(frame)

    def deliver_frames(self, frames: Frames) -> tuple[int, int]:
        """Send a batch of frames to the host, in order (not a checkpoint, never blocks).

        Returns:
            The frames and bytes written; a frame whose write fails is dropped alone (see
            :meth:`deliver`).
        """
        view = memoryview(frames.data)
        sent = sent_bytes = 0
        for begin, size in zip(frames.start.tolist(), frames.length.tolist(), strict=True):
            if self._fd.closed:
                break
            if self._write(view[begin : begin + size]):
                sent += 1
                sent_bytes += size
        return sent, sent_bytes

    def _write(self, frame: bytes | memoryview) -> bool:
        try:
            os.write(self._fd.fd, frame)
        except OSError as exc:
            self.write_errors += 1
            if exc.errno != self._last_errno:
                self._last_errno = exc.errno or 0
                LOGGER.warning("tap %s: dropping frames: %s", self._ifname, exc.strerror)
            return False
        if self._last_errno:
            self._last_errno = 0  # log the next failure again
        return True

    async def run(self, switch: Switch) -> None:
        """Read frames from the host and forward each into ``switch`` until closed.

        The device must be attached to ``switch`` (``switch.add_port(tap)``); frames from a
        port that is not attached are dropped and counted as ``unknown_source``.

        Always a checkpoint; yields after every batch of frames so a busy host cannot starve
        other tasks. Returns when the device is closed (by :meth:`close` from any task).
        Cancellation loses no frame that was read: each is forwarded before the next wait.

        Raises:
            trio.BusyResourceError: another task is already running this device.
            OSError: reading failed for another reason than the device being closed (for
                example EBADFD when the interface was deleted under us).
        """
        if self._running:
            raise trio.BusyResourceError("TapDevice.run is already running")
        self._running = True
        try:
            await trio.lowlevel.checkpoint()
            view = memoryview(bytearray(_BUFFER_SIZE))
            while True:
                state = self._read_batch(switch, view)
                if state is _Batch.CLOSED:
                    return
                if state is _Batch.FULL:
                    await trio.lowlevel.checkpoint()  # more may be waiting: just yield
                    continue
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:
                    return
        finally:
            self._running = False

    def _read_batch(self, switch: Switch, view: memoryview) -> _Batch:
        """Forward up to a batch of frames; say whether more may wait or the fd is closed."""
        sizes: list[int] = []
        end = 0
        state = _Batch.FULL
        while len(sizes) < _BATCH and len(view) - end >= _READ_SIZE:
            if self._fd.closed:  # closed before the run, or by a deliver() of the last batch
                state = _Batch.CLOSED
                break
            try:
                size = os.readv(self._fd.fd, (view[end : end + _READ_SIZE],))
            except BlockingIOError:
                state = _Batch.DRAINED
                break
            sizes.append(size)
            end += size
        if sizes:
            # one copy of the whole batch: the switch may keep it (RX backlogs)
            lengths = np.array(sizes, dtype=np.intp)
            switch.forward_frames(self, Frames.concatenated(bytes(view[:end]), lengths))
            if self._fd.closed:  # closed by a deliver() of this batch
                return _Batch.CLOSED
        return state

    def set_link_up(self, up: bool = True) -> None:
        """Set the interface administratively up (or down), like ``ip link set IFNAME up``.

        Raises:
            OSError: the kernel refused (needs CAP_NET_ADMIN).
        """
        name = self._ifname.encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock, SIOCGIFFLAGS, _IFREQ.pack(name, 0))
            flags = _IFREQ.unpack(reply)[1]
            flags = flags | IFF_UP if up else flags & ~IFF_UP
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(name, flags))

    def close(self) -> None:
        """Close the device (idempotent); a non-persistent interface disappears."""
        if not self._fd.closed:
            self._fd.close()
            LOGGER.info("tap %s closed", self._ifname)

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd.closed else f"fd={self._fd.fd}"
        return f"<TapDevice {self._ifname} {state}>"
