"""gRPC over HTTP/2 as the gateway needs it: message framing, deadlines, statuses.

The gateway never decodes JSON payloads: it reads a request's protobuf only to learn where it
goes (the capability's name, an actor's type and id) and forwards the serialized bytes as they
came.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from urllib.parse import unquote

from packetflow.gateway.h2 import Headers

CONTENT_TYPE = b"application/grpc"
_PREFIX = struct.Struct(">BI")
# grpc-timeout units, in seconds.
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3,
                  ord("u"): 1e-6, ord("n"): 1e-9}
_MAX_TIMEOUT_DIGITS = 99_999_999


class WireError(Exception):
    """A request the gateway cannot read; answered with ``code`` (a gRPC status)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def frame_message(payload: bytes) -> bytes:
    """One uncompressed length-prefixed gRPC message."""
    return _PREFIX.pack(0, len(payload)) + payload


def single_message(body: bytes, encoding: bytes | None) -> bytes:
    """The one message of a unary request body, decompressed for reading.

    The body itself is forwarded unchanged; only the gateway's own view is decompressed.
    """
    if len(body) < 5:
        raise WireError(13, "the request holds no complete gRPC message")
    compressed, length = _PREFIX.unpack_from(body)
    if len(body) != 5 + length:
        raise WireError(12, "a unary request must hold exactly one message")
    payload = body[5:]
    if not compressed:
        return payload
    if encoding in (b"gzip", b"deflate"):
        try:
            return zlib.decompress(payload, 31 if encoding == b"gzip" else 15)
        except zlib.error as exc:
            raise WireError(13, f"the request does not decompress: {exc}") from None
    name = (encoding or b"identity").decode(errors="replace")
    raise WireError(12, f"grpc-encoding {name!r} is not supported by the gateway")


def first_message(body: bytes | bytearray) -> bytes | None:
    """The first complete message at the start of a stream's body, or None yet."""
    if len(body) < 5:
        return None
    compressed, length = _PREFIX.unpack_from(body)
    if compressed:
        raise WireError(12, "compressed streaming requests are not supported by the gateway")
    if len(body) < 5 + length:
        return None
    return bytes(body[5:5 + length])


def parse_timeout(value: bytes | None) -> float | None:
    """A ``grpc-timeout`` value in seconds (None: absent or malformed)."""
    if not value or len(value) < 2 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def format_timeout(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value (at most 8 digits, as the spec requires)."""
    micros = max(1, int(seconds * 1e6))
    if micros <= _MAX_TIMEOUT_DIGITS:
        return b"%du" % micros
    millis = int(seconds * 1e3)
    if millis <= _MAX_TIMEOUT_DIGITS:
        return b"%dm" % millis
    return b"%dS" % min(int(seconds), _MAX_TIMEOUT_DIGITS)


def status_trailers(code: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()
                    ) -> Headers:
    """Trailers ending a call with ``code`` and a percent-encoded ``message``."""
    trailers = [(b"grpc-status", b"%d" % code)]
    if message:
        trailers.append((b"grpc-message", _percent_encode(message)))
    trailers.extend(extra)
    return trailers


def trailers_only(code: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()
                  ) -> Headers:
    """A whole error response in one header block (gRPC's Trailers-Only)."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE),
            *status_trailers(code, message, extra)]


def _percent_encode(message: str) -> bytes:
    # gRPC's rule: printable ASCII but '%' as it is, every other byte as %XX.
    return b"".join(bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25
                    else b"%%%02X" % byte for byte in message.encode())


RESPONSE_HEADERS: Headers = [(b":status", b"200"), (b"content-type", CONTENT_TYPE)]


def status_of(trailers: Headers) -> tuple[int, str]:
    """The call's status code and message from its trailers (missing status: UNKNOWN)."""
    code: int | None = None
    message = ""
    for name, value in trailers:
        if name == b"grpc-status":
            code = int(value) if value.isdigit() else 2
        elif name == b"grpc-message":
            text = value.decode(errors="replace")
            message = unquote(text) if "%" in text else text
    if code is None:
        return 2, message or "the response carried no grpc-status"
    return code, message
