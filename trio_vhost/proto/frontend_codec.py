"""The frontend's side of the protocol, without any I/O: the mirror of
:class:`~trio_vhost.proto.connection.BackendProtocol`.

Used by the Python frontend (tests, benchmarks, the CLI's self-check) to talk to any
back-end. :func:`encode_request` and :func:`decode_reply` are stateless;
:class:`FrontendCodec` keeps the negotiated features, matches each reply to the request
that asked for it, and validates back-end requests arriving on the back-end channel.

Replies are checked as strictly as QEMU checks them (``vhost_user_read_header``): flags
exactly VERSION|REPLY, the echoed request code and the exact size of the reply's kind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar, cast, final

from .._fd import OwnedFd
from ..errors import LocalProtocolError, RemoteProtocolError
from .codec import (
    REPLY_FLAGS,
    check_request_header,
    decode_reply_body,
    decode_request_body,
    encode_frame,
    encode_reply_body,
    encode_request_body,
)
from .constants import VERSION, BackendReq, FrontendReq, HeaderFlag, ProtocolFeature
from .messages import U64, Body
from .rules import BACKEND_RULES, FRONTEND_RULES
from .wire import Header

__all__ = ["BackendRequest", "FrontendCodec", "decode_reply", "encode_request"]

T = TypeVar("T", bound="Body | bytes")

#: Requests whose reply the codec records, and the attribute it goes to.
_OFFERS: Final = {
    FrontendReq.GET_FEATURES: "offered_features",
    FrontendReq.GET_PROTOCOL_FEATURES: "offered_protocol_features",
}
#: Requests whose body the codec records, and the attribute it goes to.
_ACKS: Final = {
    FrontendReq.SET_FEATURES: "acked_features",
    FrontendReq.SET_PROTOCOL_FEATURES: "acked_protocol_features",
}


def encode_request(
    code: FrontendReq, body: Body | bytes | None = None, *, need_reply: bool = False
) -> bytes:
    """Encode a front-end request: header (version 1, maybe NEED_REPLY) and body.

    Args:
        code: The request.
        body: Its body: the message kind the spec gives ``code``, ``bytes`` for RESTORE,
            ``None`` for requests without a body.
        need_reply: Set NEED_REPLY (answered only once REPLY_ACK is negotiated).

    Raises:
        LocalProtocolError: ``body`` is not what ``code`` carries.
    """
    payload = encode_request_body(code.name, FRONTEND_RULES[code], body)
    flags = VERSION | (HeaderFlag.NEED_REPLY if need_reply else 0)
    return encode_frame(code, flags, payload)


def decode_reply(
    request_code: FrontendReq,
    header: Header,
    body: bytes,
    *,
    nfds: int | None = None,
    request_body: Body | bytes | None = None,
) -> Body:
    """Decode the back-end's reply to ``request_code``.

    The reply kind is the request's own reply, or the REPLY_ACK :class:`U64`. With
    ``nfds``, the fd count is checked too (GET_INFLIGHT_FD and POSTCOPY_ADVISE carry one);
    with ``request_body``, the reply is checked against the request (GET_CONFIG: same size
    or 0 for an error; GET_VRING_BASE: same vring index).

    Raises:
        RemoteProtocolError: Flags other than exactly 0x5, another request code, a size
            other than the reply kind's, or an invalid body.
    """
    rule = FRONTEND_RULES[request_code]
    return decode_reply_body(rule, request_code, header, body, nfds=nfds, request_body=request_body)


@final
@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One validated back-end request, as the frontend receives it.

    Attributes:
        code: The back-end request code.
        flags: The header flags.
        body: The decoded body, or ``None``.
        fds: The fds that came with it; the receiver owns them.
    """

    code: BackendReq
    flags: int
    body: Body | None
    fds: tuple[OwnedFd, ...]

    @property
    def need_reply(self) -> bool:
        """Whether the NEED_REPLY flag was set."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)

    def expect(self, kind: type[T]) -> T:
        """Return the body as ``kind``.

        Raises:
            LocalProtocolError: The body is not a ``kind``.
        """
        if not isinstance(self.body, kind):
            raise LocalProtocolError(f"{self.code.name} carries {self.body!r}, not {kind}")
        return self.body


@final
@dataclass(frozen=True, slots=True)
class _Pending:
    code: FrontendReq
    body: Body | bytes | None


@final
class FrontendCodec:
    """The negotiation state of one connection, seen from the frontend.

    :meth:`request` encodes a request and, when an answer is due, queues it; :meth:`reply`
    decodes the next answer against the oldest queued request. Replies of GET_FEATURES and
    GET_PROTOCOL_FEATURES are recorded as the offers; SET_FEATURES and
    SET_PROTOCOL_FEATURES as the acks.

    Attributes:
        offered_features: The back-end's last GET_FEATURES reply.
        offered_protocol_features: Its last GET_PROTOCOL_FEATURES reply.
        acked_features: The last SET_FEATURES sent.
        acked_protocol_features: The last SET_PROTOCOL_FEATURES sent.
    """

    __slots__ = (
        "_pending",
        "acked_features",
        "acked_protocol_features",
        "offered_features",
        "offered_protocol_features",
    )

    def __init__(self) -> None:
        """Start with nothing negotiated and nothing pending."""
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.acked_features = 0
        self.acked_protocol_features = 0
        self._pending: deque[_Pending] = deque()

    @property
    def reply_ack_enabled(self) -> bool:
        """Whether REPLY_ACK was acked, so NEED_REPLY requests get an ack."""
        return bool(self.acked_protocol_features & ProtocolFeature.REPLY_ACK)

    @property
    def awaiting_reply(self) -> bool:
        """Whether a sent request still waits for its reply."""
        return bool(self._pending)

    def request(
        self, code: FrontendReq, body: Body | bytes | None = None, *, need_reply: bool = False
    ) -> bytes:
        """Encode a request (see :func:`encode_request`) and queue the reply it is owed.

        Raises:
            LocalProtocolError: ``body`` is not what ``code`` carries.
        """
        data = encode_request(code, body, need_reply=need_reply)
        attr = _ACKS.get(code)
        if attr is not None:
            setattr(self, attr, cast(U64, body).value)
        owed = FRONTEND_RULES[code].reply is not None or (need_reply and self.reply_ack_enabled)
        if owed:
            self._pending.append(_Pending(code, body))
        return data

    def reply(self, header: Header, body: bytes, *, nfds: int | None = None) -> Body:
        """Decode the reply to the oldest request still waiting for one.

        Raises:
            RemoteProtocolError: No request waits for a reply, or the reply is invalid
                for it (see :func:`decode_reply`).
        """
        if not self._pending:
            raise RemoteProtocolError(f"unsolicited reply to request {header.request}")
        pending = self._pending.popleft()
        value = decode_reply(pending.code, header, body, nfds=nfds, request_body=pending.body)
        attr = _OFFERS.get(pending.code)
        if attr is not None:
            setattr(self, attr, cast(U64, value).value)
        return value

    # -- the back-end channel: requests in, replies out ------------------------------------

    def receive_backend_request(
        self, header: Header, body: bytes, fds: Sequence[OwnedFd]
    ) -> BackendRequest:
        """Validate a request the back-end sent on the back-end channel.

        The channel needs BACKEND_REQ, fds on it need BACKEND_SEND_FD ("If
        BACKEND_SEND_FD protocol feature is negotiated, back-end can send file
        descriptors"), and each request needs its own feature.

        Raises:
            RemoteProtocolError: The request is invalid; ``fds`` stay the caller's.
        """
        acked = self.acked_protocol_features
        if not acked & ProtocolFeature.BACKEND_REQ:
            raise RemoteProtocolError("back-end request without BACKEND_REQ")
        if fds and not acked & ProtocolFeature.BACKEND_SEND_FD:
            raise RemoteProtocolError("back-end request with fds without BACKEND_SEND_FD")
        code, rule = check_request_header(
            BACKEND_RULES, BackendReq, header, len(fds), self, opaque_max=0
        )
        value = decode_request_body(rule, header, body, len(fds), self)
        return BackendRequest(code, header.flags, cast(Body | None, value), tuple(fds))

    def backend_reply(self, request: BackendRequest, body: Body) -> bytes:
        """Encode the own reply of a back-end request (SHARED_OBJECT_LOOKUP's u64).

        Raises:
            LocalProtocolError: ``request`` has no own reply or ``body`` is not its kind.
        """
        rule = BACKEND_RULES[request.code]
        payload = encode_reply_body(request.code.name, rule, request.body, body)
        return encode_frame(request.code, REPLY_FLAGS, payload)

    def backend_ack(self, request: BackendRequest, ok: bool) -> bytes | None:
        """Return the REPLY_ACK u64 a back-end request is owed, or ``None``.

        Spec, e.g. CONFIG_CHANGE_MSG: "If REPLY_ACK is negotiated, and the back-end sets
        the NEED_REPLY flag, the front-end must respond with zero when operation is
        successfully completed, or non-zero otherwise."
        """
        rule = BACKEND_RULES[request.code]
        if rule.reply is not None or not (self.reply_ack_enabled and request.need_reply):
            return None
        return encode_frame(request.code, REPLY_FLAGS, U64(0 if ok else 1).encode())
