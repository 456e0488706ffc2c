"""BackendProtocol: the back-end's side of a vhost-user connection, without any I/O.

Bytes and fds go in, typed :class:`Request` values and reply bytes come out. The caller
owns the socket and every fd; the order of work follows crosvm's ``BackendServer``:

1. read the 12-byte header with its fds and call :meth:`BackendProtocol.receive_header`,
   which refuses what the header alone betrays (version, REPLY bit, reserved flags,
   unknown code, a body size impossible for the code, fds the code cannot carry, a closed
   feature gate) before the body is read;
2. read exactly ``header.size`` bytes and call :meth:`BackendProtocol.receive`, which
   validates the whole message and records SET_FEATURES / SET_PROTOCOL_FEATURES;
3. apply the request, then send :meth:`BackendProtocol.reply` (a request with its own
   reply) or :meth:`BackendProtocol.ack` (REPLY_ACK, when negotiated and asked for).

Error handling: every violation raises :class:`~trio_vhost.errors.RemoteProtocolError`
and the error is sticky, as in h11: the connection must be closed, and any later call to
``receive_header``/``receive`` raises again. Encoding something invalid raises
:class:`~trio_vhost.errors.LocalProtocolError`.

Resource handling: fds passed to ``receive`` become the returned request's ``fds``; on
error they stay the caller's to close. Nothing here closes or keeps an fd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar, cast, final

from .._fd import OwnedFd
from ..errors import LocalProtocolError, RemoteProtocolError
from .codec import (
    REPLY_FLAGS,
    check_fd_count,
    check_fds_match,
    check_gate,
    check_request_header,
    decode_reply_body,
    decode_request_body,
    encode_frame,
    encode_reply_body,
    encode_request_body,
)
from .constants import (
    KNOWN_PROTOCOL_FEATURES,
    VERSION,
    BackendReq,
    FrontendReq,
    HeaderFlag,
    ProtocolFeature,
    VirtioFeature,
)
from .messages import U64, Body
from .messages_ext import MAX_SNAPSHOT_SIZE
from .rules import BACKEND_RULES, FRONTEND_RULES, Rule
from .wire import U64_MAX, Header, check_uint

__all__ = ["BackendProtocol", "Request", "has_own_reply"]

T = TypeVar("T", bound="Body | bytes")

#: Request codes whose body the protocol records, and the attribute it goes to.
_RECORDED: Final = {
    FrontendReq.SET_FEATURES: "acked_features",
    FrontendReq.SET_PROTOCOL_FEATURES: "acked_protocol_features",
}


def has_own_reply(code: FrontendReq) -> bool:
    """Return whether ``code`` always gets a reply of its own (so never a REPLY_ACK).

    Spec "Communication" lists GET_FEATURES, GET_PROTOCOL_FEATURES, GET_VRING_BASE(_SKIP_
    DRAIN), SET_LOG_BASE (with LOG_SHMFD) and GET_INFLIGHT_FD; the message table adds every
    request whose "reply payload" is not N/A (GET_QUEUE_NUM, GET_CONFIG, IOTLB_MSG,
    GET_MAX_MEM_SLOTS, GET_STATUS, POSTCOPY_ADVISE/END, CREATE_CRYPTO_SESSION,
    GET_SHARED_OBJECT, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE, GET_SHMEM_CONFIG) and crosvm
    its extensions 1000-1004. "For the message types that already solicit a reply ... the
    need_reply bit being set brings no behavioural change."
    """
    return FRONTEND_RULES[code].reply is not None


@final
@dataclass(frozen=True, slots=True)
class Request:
    """One validated front-end request.

    Attributes:
        code: The request code.
        flags: The header flags (version 1, maybe NEED_REPLY).
        body: The decoded body: a :mod:`~trio_vhost.proto.messages` value, ``bytes`` for
            RESTORE's opaque snapshot, ``None`` for requests without a body.
        fds: The fds that came with the header, in order; the receiver of the request
            owns them.
    """

    code: FrontendReq
    flags: int
    body: Body | bytes | None
    fds: tuple[OwnedFd, ...]

    @property
    def need_reply(self) -> bool:
        """Whether the NEED_REPLY flag was set."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    def expect(self, kind: type[T]) -> T:
        """Return the body as ``kind``.

        Raises:
            LocalProtocolError: The body is not a ``kind`` (a dispatch bug).
        """
        if not isinstance(self.body, kind):
            raise LocalProtocolError(f"{self.code.name} carries {self.body!r}, not {kind}")
        return self.body


@final
class BackendProtocol:
    """The negotiation state and validation of one connection, seen from the back-end.

    Attributes:
        offered_features: Virtio feature bits the back-end offers (GET_FEATURES).
        offered_protocol_features: Protocol feature bits it offers (GET_PROTOCOL_FEATURES).
        acked_features: Bits of the last SET_FEATURES; 0 before one.
        acked_protocol_features: Bits of the last SET_PROTOCOL_FEATURES; 0 before one.
        max_restore_size: The largest RESTORE body accepted.
    """

    __slots__ = (
        "_error",
        "acked_features",
        "acked_protocol_features",
        "max_restore_size",
        "offered_features",
        "offered_protocol_features",
    )

    def __init__(
        self, *, features: int, protocol_features: int, max_restore_size: int = MAX_SNAPSHOT_SIZE
    ) -> None:
        """Start a connection offering ``features`` and ``protocol_features``.

        Raises:
            LocalProtocolError: A value is not a u64, or an offered protocol bit is unknown
                (bit numbers have moved between drafts; offer only what is implemented).
        """
        check_uint("features", features, U64_MAX)
        check_uint("protocol_features", protocol_features, U64_MAX)
        if protocol_features & ~KNOWN_PROTOCOL_FEATURES:
            raise LocalProtocolError(f"unknown protocol feature bits {protocol_features:#x}")
        self.offered_features = int(features)
        self.offered_protocol_features = int(protocol_features)
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.max_restore_size = max_restore_size
        self._error: RemoteProtocolError | None = None

    @property
    def reply_ack_enabled(self) -> bool:
        """Whether REPLY_ACK is in force (crosvm ``update_reply_ack_flag``).

        Virtio bit 30 offered, REPLY_ACK offered and REPLY_ACK acked.
        """
        return bool(
            self.offered_features & VirtioFeature.PROTOCOL_FEATURES
            and self.offered_protocol_features & ProtocolFeature.REPLY_ACK
            and self.acked_protocol_features & ProtocolFeature.REPLY_ACK
        )

    def _check_alive(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(f"connection already failed: {self._error}")

    def receive_header(self, data: bytes, nfds: int) -> Header:
        """Validate a header and its fd count before the body is read.

        Args:
            data: The 12 header bytes.
            nfds: How many fds arrived with them.

        Returns:
            The header; read exactly ``header.size`` body bytes next.

        Raises:
            RemoteProtocolError: The header is invalid (sticky: see the module docstring).
        """
        self._check_alive()
        try:
            header = Header.decode(data)
            self._check_header(header, nfds)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return header

    def _check_header(self, header: Header, nfds: int) -> tuple[FrontendReq, Rule]:
        return check_request_header(
            FRONTEND_RULES, FrontendReq, header, nfds, self, opaque_max=self.max_restore_size
        )

    def receive(self, header: Header, body: bytes, fds: Sequence[OwnedFd]) -> Request:
        """Validate a whole request and return it.

        The header is checked again, so a caller may skip :meth:`receive_header`. On
        success SET_FEATURES and SET_PROTOCOL_FEATURES are recorded.

        Args:
            header: The decoded header.
            body: Exactly ``header.size`` bytes.
            fds: The fds that arrived with the header; the returned request owns them.

        Raises:
            RemoteProtocolError: The request is invalid (sticky). ``fds`` are untouched.
        """
        self._check_alive()
        try:
            code, rule = self._check_header(header, len(fds))
            value = decode_request_body(rule, header, body, len(fds), self)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        attr = _RECORDED.get(code)
        if attr is not None:
            setattr(self, attr, cast(U64, value).value)
        return Request(code, header.flags, value, tuple(fds))

    def reply(self, request: Request, body: Body | bytes) -> bytes:
        """Encode the own reply of ``request``: flags exactly VERSION|REPLY, echoed code.

        Raises:
            LocalProtocolError: ``request`` has no own reply (use :meth:`ack`), ``body`` is
                not its reply kind, or it contradicts the request (GET_CONFIG size,
                GET_VRING_BASE index).
        """
        rule = FRONTEND_RULES[request.code]
        payload = encode_reply_body(request.code.name, rule, request.body, body)
        return encode_frame(request.code, REPLY_FLAGS, payload)

    def ack(self, request: Request, ok: bool) -> bytes | None:
        """Return the REPLY_ACK u64 for ``request``, or ``None`` when none is owed.

        Spec "REPLY_ACK": with the extension negotiated and NEED_REPLY set, "the back-end
        MUST respond with a Payload VhostUserMsg indicating success or failure" (0 success,
        1 failure here), "unless the message already has an explicit reply body".
        """
        if has_own_reply(request.code) or not (self.reply_ack_enabled and request.need_reply):
            return None
        return encode_frame(request.code, REPLY_FLAGS, U64(0 if ok else 1).encode())

    # -- the back-end channel (SET_BACKEND_REQ_FD): requests out, replies in --------------

    def backend_request(
        self,
        code: BackendReq,
        body: Body | None = None,
        *,
        need_reply: bool = False,
        nfds: int = 0,
    ) -> bytes:
        """Encode a back-end request, checking it is allowed on this connection.

        Args:
            code: The back-end request.
            body: Its body, of the kind the spec gives it.
            need_reply: Ask for a REPLY_ACK (only answered once REPLY_ACK is negotiated).
            nfds: How many fds will be sent with it (needs BACKEND_SEND_FD).

        Raises:
            LocalProtocolError: The channel, the request's feature or fd passing was not
                negotiated, or the body or fd count does not fit the request.
        """
        rule = BACKEND_RULES[code]
        try:
            if not self.acked_protocol_features & ProtocolFeature.BACKEND_REQ:
                raise RemoteProtocolError("no back-end channel: BACKEND_REQ was not acked")
            if nfds and not self.acked_protocol_features & ProtocolFeature.BACKEND_SEND_FD:
                raise RemoteProtocolError("fds on the back-end channel need BACKEND_SEND_FD")
            check_gate(code.name, rule, self)
            check_fd_count(code.name, rule.fds, nfds)
            payload = encode_request_body(code.name, rule, body)
            check_fds_match(rule, body, nfds)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from exc
        flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
        return encode_frame(code, flags, payload)

    def backend_expects_reply(self, code: BackendReq, *, need_reply: bool) -> bool:
        """Whether the frontend will answer ``code`` (own reply, or a requested ack)."""
        return BACKEND_RULES[code].reply is not None or (need_reply and self.reply_ack_enabled)

    def backend_reply(
        self, code: BackendReq, header: Header, body: bytes, *, nfds: int | None = None
    ) -> Body:
        """Decode the frontend's reply to the back-end request ``code``.

        Raises:
            RemoteProtocolError: Flags are not exactly VERSION|REPLY, the code is not
                echoed, or the size, body or fd count is wrong.
        """
        return decode_reply_body(BACKEND_RULES[code], code, header, body, nfds=nfds)
