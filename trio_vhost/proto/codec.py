"""Applying the rules of :mod:`trio_vhost.proto.rules` to frames, in both directions.

Shared by :class:`~trio_vhost.proto.connection.BackendProtocol` (front-end requests in,
replies out; back-end requests out, replies in) and
:class:`~trio_vhost.proto.frontend_codec.FrontendCodec` (the mirror image). Validation of
received data raises :class:`~trio_vhost.errors.RemoteProtocolError`; encoding something
the rules forbid raises :class:`~trio_vhost.errors.LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Final, TypeVar, cast

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import (
    HEADER_KNOWN_FLAGS,
    HEADER_VERSION_MASK,
    VERSION,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
)
from .messages import U64, Body, Inflight, MemoryTable, VringArea, VringFile
from .rules import FdRule, Negotiation, Opaque, Rule
from .wire import Header, decoded

__all__ = [
    "REPLY_FLAGS",
    "check_fd_count",
    "check_fds_match",
    "check_gate",
    "check_request_header",
    "decode_reply_body",
    "decode_request_body",
    "encode_frame",
    "encode_reply_body",
    "encode_request_body",
    "reply_kinds",
]

#: The flags of every reply: exactly VERSION | REPLY (QEMU refuses anything else).
REPLY_FLAGS: Final = VERSION | HeaderFlag.REPLY

_E = TypeVar("_E", bound=IntEnum)
_ACK: Final = (U64,)


def _feature_names(bits: int) -> str:
    return "|".join(f"{f.name}" for f in ProtocolFeature if bits & f)


def _virtio_names(bits: int) -> str:
    return "|".join(f"{f.name}" for f in VirtioFeature if bits & f)


def check_gate(name: str, rule: Rule, state: Negotiation) -> None:
    """Refuse a request whose feature gate is closed.

    crosvm's ``process_message`` returns ``InvalidOperation`` for a request whose protocol
    feature was not acked; the spec adds the exclusions (postcopy vs. CONFIGURE_MEM_SLOTS).

    Raises:
        RemoteProtocolError: A required feature is missing or an excluding one acked.
    """
    # int(): an IntFlag's ``~`` only flips its own members' bits.
    missing = rule.protocol & ~int(state.acked_protocol_features)
    if missing:
        raise RemoteProtocolError(f"{name} needs protocol feature {_feature_names(missing)}")
    if rule.excluded & state.acked_protocol_features:
        raise RemoteProtocolError(f"{name} is forbidden once {_feature_names(rule.excluded)}")
    if rule.virtio & ~int(state.acked_features):
        raise RemoteProtocolError(f"{name} needs virtio feature {_virtio_names(rule.virtio)}")
    if rule.offered_virtio & ~int(state.offered_features):
        raise RemoteProtocolError(
            f"{name} is illegal unless {_virtio_names(rule.offered_virtio)} is offered"
        )


def _size_ok(rule: Rule, size: int, opaque_max: int) -> bool:
    if rule.body is None:
        return size == 0
    if isinstance(rule.body, Opaque):
        return size <= opaque_max
    return rule.body.size_ok(size)


def check_request_header(
    rules: Mapping[int, Rule],
    codes: type[_E],
    header: Header,
    nfds: int,
    state: Negotiation,
    *,
    opaque_max: int,
) -> tuple[_E, Rule]:
    """Validate what a request header alone tells, and return the request's rule.

    crosvm ``check_request_size`` / ``check_attached_files``: version 1, not a reply, no
    reserved flag bits, a known code, a body size possible for that code (so the caller
    never reads a huge body), an fd count the code allows, and the feature gate.

    Raises:
        RemoteProtocolError: The header breaks one of these rules.
    """
    flags = header.flags
    if flags & HEADER_VERSION_MASK != VERSION:
        raise RemoteProtocolError(f"unsupported protocol version {flags & HEADER_VERSION_MASK}")
    if flags & HeaderFlag.REPLY:
        raise RemoteProtocolError("request has the REPLY flag set")
    # int(): HEADER_KNOWN_FLAGS is a HeaderFlag, whose ``~`` stays within its members.
    reserved = flags & ~int(HEADER_KNOWN_FLAGS)
    if reserved:
        raise RemoteProtocolError(f"reserved header flag bits {reserved:#x}")
    rule = rules.get(header.request)
    if rule is None:
        raise RemoteProtocolError(f"unknown request code {header.request}")
    code = codes(header.request)
    name = code.name
    check_gate(name, rule, state)
    check_fd_count(name, rule.fds, nfds)
    if not _size_ok(rule, header.size, opaque_max):
        raise RemoteProtocolError(f"{name} with a body of {header.size} bytes")
    return code, rule


def check_fd_count(name: str, fds: FdRule, nfds: int) -> None:
    """Refuse an fd count the rule never allows (crosvm ``check_attached_files``).

    Raises:
        RemoteProtocolError: ``nfds`` is outside the rule's bounds.
    """
    low, high = fds.bounds
    if not low <= nfds <= high:
        raise RemoteProtocolError(f"{name} carries {nfds} fds; allowed: {fds.value}")


def check_fds_match(rule: Rule, value: Body | bytes | None, nfds: int) -> None:
    """Match the fd count to the body: one per region; one unless NOFD is set.

    crosvm ``set_mem_table`` ("number of fds matching number of memory regions") and
    ``handle_vring_fd_request`` ("If Bit 8 is unset, the data must contain a file
    descriptor").

    Raises:
        RemoteProtocolError: The count does not match the body.
    """
    if rule.fds is FdRule.NOFD_BIT:
        nofd = cast(VringFile | VringArea, value).nofd
        if nfds != (0 if nofd else 1):
            raise RemoteProtocolError(f"NOFD is {nofd} but {nfds} fds are attached")
    elif rule.fds is FdRule.PER_REGION:
        regions = cast(MemoryTable, value).regions
        if nfds != len(regions):
            raise RemoteProtocolError(f"{len(regions)} regions but {nfds} fds")


def decode_request_body(
    rule: Rule, header: Header, body: bytes, nfds: int, state: Negotiation
) -> Body | bytes | None:
    """Decode and validate a request body whose header passed :func:`check_request_header`.

    Checks the exact size, decodes the body, matches the fds to it (one per region; one
    unless NOFD, as crosvm ``handle_vring_fd_request``) and runs the rule's check.

    Raises:
        RemoteProtocolError: The body or its fds are invalid.
    """
    if len(body) != header.size:
        raise RemoteProtocolError(f"body of {len(body)} bytes, header says {header.size}")
    value: Body | bytes | None
    if rule.body is None:
        value = None
    elif isinstance(rule.body, Opaque):
        value = bytes(body)
    else:
        value = rule.body.decode(body)
    check_fds_match(rule, value, nfds)
    if rule.check is not None:
        rule.check(state, value)
    return value


def reply_kinds(rule: Rule) -> tuple[type[Body], ...]:
    """The kinds of reply a request gets: its own reply, else the REPLY_ACK u64."""
    return rule.reply if rule.reply is not None else _ACK


def encode_frame(code: int, flags: int, payload: bytes) -> bytes:
    """Return a header for ``payload`` followed by the payload."""
    return Header(code, flags, len(payload)).encode() + payload


def encode_request_body(name: str, rule: Rule, body: Body | bytes | None) -> bytes:
    """Encode a request body after checking it is the rule's kind.

    Raises:
        LocalProtocolError: ``body`` is not what the request carries.
    """
    if rule.body is None:
        if body is not None:
            raise LocalProtocolError(f"{name} has no body")
        return b""
    if isinstance(rule.body, Opaque):
        if not isinstance(body, bytes):
            raise LocalProtocolError(f"{name} carries opaque bytes")
        return body
    if not isinstance(body, rule.body):
        raise LocalProtocolError(f"{name} carries a {rule.body.__name__}")
    return body.encode()


def encode_reply_body(
    name: str, rule: Rule, request_body: Body | bytes | None, body: Body | bytes
) -> bytes:
    """Encode the own reply of a request after checking its kind and its consistency.

    Raises:
        LocalProtocolError: The request has no own reply, or ``body`` does not fit it.
    """
    if rule.reply is None:
        raise LocalProtocolError(f"{name} has no reply of its own; send an ack")
    if not isinstance(body, rule.reply):
        raise LocalProtocolError(f"{name} replies with a {rule.reply[0].__name__}")
    if rule.reply_check is not None:
        rule.reply_check(request_body, body)
    return body.encode()


def decode_reply_body(
    rule: Rule,
    code: IntEnum,
    header: Header,
    body: bytes,
    *,
    nfds: int | None = None,
    request_body: Body | bytes | None = None,
) -> Body:
    """Decode a reply: flags exactly VERSION|REPLY, the echoed code and the exact size.

    QEMU's ``vhost_user_read_header`` refuses any other flags; the kind is the request's
    own reply or, without one, the REPLY_ACK u64. With ``nfds`` the attached fd count is
    checked; with ``request_body`` the reply is checked against the request (GET_CONFIG
    size, echoed vring index).

    Raises:
        RemoteProtocolError: The reply does not match the request.
    """
    name = code.name
    if header.flags != REPLY_FLAGS:
        raise RemoteProtocolError(f"reply flags {header.flags:#x}, expected {REPLY_FLAGS:#x}")
    if header.request != code:
        raise RemoteProtocolError(f"reply to request {header.request}, expected {name}")
    if len(body) != header.size:
        raise RemoteProtocolError(f"reply body of {len(body)} bytes, header says {header.size}")
    if nfds is not None:
        check_fd_count(f"{name} reply", rule.reply_fds if rule.reply else FdRule.NONE, nfds)
    kind = reply_kinds(rule)[0]
    if not kind.size_ok(header.size):
        raise RemoteProtocolError(f"{name} reply of {header.size} bytes")
    value = kind.decode(body)
    if nfds is not None and rule.reply and rule.reply_fds is FdRule.UNLESS_EMPTY:
        empty = cast(Inflight, value).mmap_size == 0
        if nfds != (0 if empty else 1):
            raise RemoteProtocolError(f"{name} reply: mmap_size empty is {empty} but {nfds} fds")
    if request_body is not None and rule.reply_check is not None:
        decoded(rule.reply_check, request_body, value)
    return value
