"""The ``trio-vhost`` command line: serve an example device, or check the install."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import trio

from .devices.blk import BlkDevice
from .devices.blk_threaded import ThreadedBlkDevice
from .devices.net import NetPort
from .devices.net_spec import parse_mac
from .devices.net_switch import Switch
from .devices.tap import TapDevice, open_tap
from .errors import VhostUserError
from .server import serve, serve_client

__all__ = ["main"]

LOGGER = logging.getLogger("trio_vhost.cli")

_SIZE: Final = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class CliError(Exception):
    """A user error: printed as one line, exit status 1."""


def parse_size(text: str) -> int:
    """Parse ``128M``/``1G``/``4096`` into bytes; a multiple of 512 and at least 512."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise CliError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 512 or size % 512:
        raise CliError(f"bad size {text!r}: must be a positive multiple of 512 bytes")
    return size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-vhost", description="vhost-user backends written in Python on trio."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    blk = commands.add_parser("blk", help="serve a virtio-blk device backed by a raw image")
    blk.add_argument("--socket", required=True, help="unix socket path to listen on")
    _add_client_flag(blk)
    blk.add_argument(
        "--image",
        required=True,
        help="raw image file (grown or shrunk while serving: send SIGHUP to announce it)",
    )
    blk.add_argument("--read-only", action="store_true", help="refuse guest writes")
    blk.add_argument(
        "--queues",
        type=int,
        default=max(os.cpu_count() or 1, 2),
        help="request queues offered (default: at least the CPU count)",
    )
    blk.add_argument("--serial", default="trio-vhost", help="device ID string (<= 20 bytes)")
    blk.add_argument(
        "--io",
        choices=("inline", "thread"),
        default="inline",
        help="do disk I/O in the ring's task (fastest from the page cache) or in a thread "
        "(a slow disk then stalls only its own ring)",
    )
    blk.add_argument(
        "--create",
        metavar="SIZE",
        help="create the image (sparse) with this size if it does not exist",
    )

    net = commands.add_parser(
        "net", help="serve virtio-net ports joined by an L2 learning switch (one per socket)"
    )
    net.add_argument(
        "--socket",
        required=True,
        action="append",
        dest="sockets",
        help="unix socket path of one port (repeat for more ports)",
    )
    _add_client_flag(net)
    net.add_argument("--tap", metavar="IFNAME", help="also switch to this TAP interface")
    net.add_argument("--queues", type=int, default=1, help="queue pairs per port (MQ)")
    net.add_argument(
        "--mac",
        action="append",
        default=[],
        help="MAC of each port, in --socket order (default: random)",
    )

    commands.add_parser(
        "selfcheck", help="serve the example devices and drive them with the built-in frontend"
    )
    return parser


def _add_client_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--client",
        action="store_true",
        help="connect to the socket instead of listening on it (the frontend listens: QEMU "
        "server=on, DPDK virtio_user server=1); connect again after every disconnect",
    )


def _configure_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG if verbosity > 0 else logging.CRITICAL
    )
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _open_image(path: str, *, read_only: bool, create: str | None) -> int:
    if create is not None:
        size = parse_size(create)
        if not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)
            os.close(fd)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CliError(f"cannot open image {path}: {exc.strerror}") from exc
    if os.fstat(fd).st_size < 512:
        os.close(fd)
        raise CliError(f"image {path} is smaller than one 512-byte sector")
    return fd


async def _serve_until_signal(device: BlkDevice, path: str, client: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            if client:
                # Connecting may wait for the frontend: do not hold up the signal handling.
                nursery.start_soon(serve_client, device, path)
                LOGGER.info("serving virtio-blk to the frontend listening on %s", path)
            else:
                await nursery.start(serve, device, path)
                LOGGER.info("serving virtio-blk on %s", path)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    # Its own task: the frontend answers only after a GET_CONFIG of ours.
                    nursery.start_soon(_announce_resize, device)
                    continue
                LOGGER.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _announce_resize(device: BlkDevice) -> None:
    """SIGHUP: the image may have been resized; tell the frontend if it was."""
    try:
        told = await device.resized()
    except (OSError, VhostUserError) as exc:
        LOGGER.warning("SIGHUP: could not announce the image size: %s", exc)
        return
    LOGGER.info(
        "SIGHUP: %d sectors; %s",
        device.capacity,
        "the frontend was told" if told else "no frontend was told",
    )


def _run_reporting_os_errors(fn: Callable[..., Awaitable[None]], *args: object) -> None:
    """trio.run ``fn``; an OSError from setting up a listener becomes a one-line error."""
    try:
        trio.run(fn, *args)
    except* OSError as group:
        exc = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        assert isinstance(exc, OSError)
        where = exc.filename or "the socket"
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"{where} is already in use by a live server") from None
        raise CliError(f"cannot serve on {where}: {exc.strerror or exc}") from None


def _run_blk(args: argparse.Namespace) -> int:
    if args.queues < 1:
        raise CliError("--queues must be at least 1")
    fd = _open_image(args.image, read_only=args.read_only, create=args.create)
    try:
        device_class = ThreadedBlkDevice if args.io == "thread" else BlkDevice
        device = device_class(
            fd, read_only=args.read_only, num_queues=args.queues, serial=args.serial
        )
    except ValueError as exc:
        os.close(fd)
        raise CliError(str(exc)) from exc
    try:
        _run_reporting_os_errors(_serve_until_signal, device, args.socket, args.client)
    finally:
        if not args.read_only:
            os.fdatasync(fd)
        os.close(fd)
    return 0


def _run_net(args: argparse.Namespace) -> int:
    if args.queues < 1:
        raise CliError("--queues must be at least 1")
    if len(args.mac) > len(args.sockets):
        raise CliError("more --mac than --socket")
    if len(set(args.sockets)) != len(args.sockets):
        raise CliError("the same --socket path is given twice")
    try:
        macs = [parse_mac(text) for text in args.mac]
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    switch = Switch()
    ports = [
        NetPort(switch, f"port{i}", pairs=args.queues, mac=macs[i] if i < len(macs) else None)
        for i in range(len(args.sockets))
    ]
    tap = None
    if args.tap is not None:
        try:
            tap = open_tap(args.tap)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot open tap {args.tap}: {exc}") from exc
        switch.add_port(tap)
    try:
        _run_reporting_os_errors(_serve_ports_until_signal, ports, args.sockets, tap, args.client)
    finally:
        if tap is not None:
            tap.close()
    return 0


async def _serve_ports_until_signal(
    ports: list[NetPort], paths: list[str], tap: TapDevice | None, client: bool
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for port, path in zip(ports, paths, strict=True):
                if client:
                    nursery.start_soon(serve_client, port, path)
                    LOGGER.info("serving virtio-net port %s to %s", port.port.name, path)
                else:
                    await nursery.start(serve, port, path)
                    LOGGER.info("serving virtio-net port %s on %s", port.port.name, path)
            if tap is not None:
                nursery.start_soon(tap.run, ports[0].switch)
                LOGGER.info("switching to tap %s", tap.ifname)
            async for signum in signals:
                LOGGER.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _run_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return trio.run(run_selfcheck)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    _configure_logging(args.verbose - args.quiet)
    runners = {"blk": _run_blk, "net": _run_net, "selfcheck": _run_selfcheck}
    try:
        return runners[args.command](args)
    except CliError as exc:
        print(f"trio-vhost: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
