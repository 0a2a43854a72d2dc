"""A small HTTP/2 endpoint (RFC 9113) for the gateway's data plane; HPACK from ``hpack``.

Why not ``grpc.aio`` for forwarding: measured on the 2-core machines (per-process CPU time and
py-spy), a grpc.aio proxy spends about 500 us of CPU per forwarded unary call, mostly in
system calls (a send and a cross-thread wake-up per message and direction), more than the
runtime it forwards to. This endpoint parses frames in Python but writes everything one event
loop iteration produced with one system call, and the gateway costs about a third of that
(``python -m bench gateway``). It speaks exactly what gRPC needs: both connection roles,
streams in both directions, flow control on both sides, SETTINGS, PING, GOAWAY and RST_STREAM.

Flow control: each side advertises :data:`STREAM_WINDOW` per stream and
:data:`CONNECTION_WINDOW` per connection. Connection credit is returned as soon as bytes
arrive; stream credit only when the stream's consumer calls :meth:`Stream.consumed` (a unary
call after buffering, a relay after forwarding), so one slow stream can hold back only itself.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import struct
from collections.abc import Callable
from typing import Protocol

from hpack import Decoder
from hpack.exceptions import HPACKError
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

log = logging.getLogger("packetflow.gateway.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
# Flags.
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
# Not an HTTP/2 code: the connection ended under the stream.
CONNECTION_LOST = 0x100
# Settings.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 2**24 - 1
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 1 << 26
# Trailers may carry a composition's execution trace (up to 4 MiB, see packetflow.client).
MAX_HEADER_LIST = 8 << 20

Headers = list[tuple[bytes, bytes]]

_HEAD = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")


class HeaderEncoder:
    """HPACK without a dynamic table or Huffman coding: each field is a static-table index
    or a literal that is never indexed, so a field always encodes to the same bytes, which
    are cached. Blocks are larger than a stateful encoder's; encoding is a few dict lookups.
    """

    CACHE_LIMIT = 2048  # per-call values (trace ids, timeouts) would grow it without end

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, bytes], bytes] = {}
        self._announce = True  # tell the peer's decoder our table size: 0

    def table_size_changed(self) -> None:
        """The peer changed SETTINGS_HEADER_TABLE_SIZE: the next block says ours again."""
        self._announce = True

    def encode(self, headers: Headers) -> bytes:
        """One header block."""
        cache = self._cache
        parts = [cache.get(field) or self._field(field) for field in headers]
        if self._announce:
            self._announce = False
            parts.insert(0, b"\x20")  # dynamic table size update: 0
        return b"".join(parts)

    def _field(self, field: tuple[bytes, bytes]) -> bytes:
        name, value = field
        static = HeaderTable.STATIC_TABLE_MAPPING.get(name)
        if static is not None and value in static[1]:
            encoded = bytes(_prefixed(static[1][value], 7, 0x80))
        else:
            head = _prefixed(static[0], 4, 0x00) if static is not None \
                else b"\x00" + _prefixed(len(name), 7, 0x00) + name
            encoded = bytes(head) + _prefixed(len(value), 7, 0x00) + value
        if len(self._cache) >= self.CACHE_LIMIT:
            self._cache.clear()
        self._cache[field] = encoded
        return encoded


def _prefixed(value: int, prefix_bits: int, pattern: int) -> bytes:
    """An HPACK integer with ``pattern`` in the first byte's high bits."""
    if value < (1 << prefix_bits) - 1:  # fits the prefix (most lengths): one byte
        return bytes((pattern | value,))
    encoded = encode_integer(value, prefix_bits)
    encoded[0] |= pattern
    return bytes(encoded)


class HeaderDecoder:
    """``hpack``'s decoder, skipped for a block that holds only indexed fields and was seen
    since the dynamic table last changed: such a block decodes the same way again (a
    backend's answers are like that once its table is warm); and skipped for a block that
    cannot change the table and has no Huffman string (what :class:`HeaderEncoder` writes,
    with per-call values such as trace ids): such a block is read here in one pass."""

    CACHE_LIMIT = 256

    def __init__(self) -> None:
        self._decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._cache: dict[bytes, Headers] = {}

    def decode(self, block: bytes) -> Headers:
        """The header list of one block (HPACKError when it is malformed)."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        plain = _plain_block(block, self._decoder.header_table)
        if plain is not None:
            headers, indexed = plain
            if indexed and len(self._cache) < self.CACHE_LIMIT:
                self._cache[block] = headers
            return headers
        headers = [(bytes(name), bytes(value))
                   for name, value in self._decoder.decode(block, raw=True)]
        if not _only_indexed(block):
            self._cache.clear()  # the block may have changed the dynamic table
        elif len(self._cache) < self.CACHE_LIMIT:
            self._cache[block] = headers
        return headers


def _integer(block: bytes, position: int, mask: int) -> tuple[int, int]:
    """An HPACK integer whose prefix is ``block[position] & mask``; (value, next position)."""
    value = block[position] & mask
    position += 1
    if value == mask:
        shift = 0
        while True:
            byte = block[position]
            position += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return value, position


def _plain_block(block: bytes, table: HeaderTable) -> tuple[Headers, bool] | None:
    """The header list of a block made only of indexed fields and literals not indexed
    (RFC 7541 6.1, 6.2.2, 6.2.3) without Huffman coding, and whether it held indexed fields
    only; None for any other block (left to ``hpack``, with nothing consumed: these fields
    never change the dynamic table)."""
    headers: Headers = []
    indexed = True
    position, size = 0, len(block)
    try:
        while position < size:
            first = block[position]
            if first & 0x80:
                index, position = _integer(block, position, 0x7F)
                headers.append(table.get_by_index(index))
                continue
            if first & 0xE0:  # incremental indexing or a table size update
                return None
            indexed = False
            index, position = _integer(block, position, 0x0F)
            if index:
                name = table.get_by_index(index)[0]
            else:
                if block[position] & 0x80:
                    return None
                length, position = _integer(block, position, 0x7F)
                name = block[position:position + length]
                position += length
            if block[position] & 0x80:
                return None
            length, position = _integer(block, position, 0x7F)
            value = block[position:position + length]
            position += length
            if position > size:
                return None
            headers.append((name, value))
    except (IndexError, HPACKError):
        return None  # malformed: hpack says how
    return headers, indexed


def _only_indexed(block: bytes) -> bool:
    """Whether every field of a block is an indexed field (RFC 7541 6.1)."""
    position, size = 0, len(block)
    while position < size:
        first = block[position]
        if not first & 0x80:
            return False
        position += 1
        if first & 0x7F == 0x7F:  # the index continues in 7-bit groups
            while position < size and block[position] & 0x80:
                position += 1
            position += 1
    return True


class StreamHandler(Protocol):
    """What receives a stream's events."""

    def on_headers(self, headers: Headers, end_stream: bool) -> None:
        """Response headers or trailers (client side), trailers (server side)."""

    def on_data(self, data: bytes, end_stream: bool) -> None:
        """Bytes of the body; call :meth:`Stream.consumed` once they are dealt with."""

    def on_reset(self, code: int, refused: bool) -> None:
        """The stream ended abnormally: RST_STREAM, GOAWAY or the connection closed.

        ``refused`` is true when the peer guarantees it did not process the stream.
        """


class ProtocolError(Exception):
    """The peer broke HTTP/2; the connection ends with GOAWAY and ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamRefused(Exception):
    """No new stream can be opened on this connection (closing, or at the peer's limit)."""


class Stream:
    """One HTTP/2 stream: send headers and data, give back receive credit, reset."""

    __slots__ = ("conn", "handler", "id", "local_closed", "queue", "recv_pending",
                 "recv_window", "remote_closed", "send_window")

    def __init__(self, conn: Connection, stream_id: int, handler: StreamHandler | None) -> None:
        self.conn = conn
        self.id = stream_id
        self.handler = handler
        self.send_window = conn.peer_initial_window
        self.recv_window = STREAM_WINDOW
        self.recv_pending = 0
        # Data (and the trailers after it) waiting for send window: (bytes | Headers, end,
        # on_sent callback).
        self.queue: collections.deque[tuple[bytes | Headers, bool,
                                            Callable[[int], None] | None]] = \
            collections.deque()
        self.local_closed = False
        self.remote_closed = False

    @property
    def open(self) -> bool:
        """Whether the stream still belongs to its connection."""
        return self.conn.streams.get(self.id) is self

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        """Send a header block (trailers when ``end_stream``), after any queued data."""
        if self.local_closed or not self.open:
            return
        if self.queue:
            self.queue.append((headers, end_stream, None))
            return
        self.conn.write_headers(self.id, headers, end_stream)
        if end_stream:
            self._close_local()

    def send_data(self, data: bytes, end_stream: bool = False,
                  on_sent: Callable[[int], None] | None = None) -> None:
        """Send body bytes as flow control allows; ``on_sent(n)`` as they leave."""
        if self.local_closed or not self.open:
            return
        if self.queue:
            self.queue.append((data, end_stream, on_sent))
            return
        rest = self.conn.write_data(self, data, end_stream, on_sent)
        if rest is not None:
            self.queue.append((rest, end_stream, on_sent))
            self.conn.blocked.add(self)
        elif end_stream:
            self._close_local()

    def consumed(self, count: int) -> None:
        """Give ``count`` received bytes of credit back to the peer (batched)."""
        self.recv_pending += count
        if self.recv_pending >= STREAM_WINDOW // 2 and not self.remote_closed and self.open:
            self.conn.write_frame(WINDOW_UPDATE, 0, self.id, _U32.pack(self.recv_pending))
            self.recv_window += self.recv_pending
            self.recv_pending = 0

    def reset(self, code: int = CANCEL) -> None:
        """End the stream now with RST_STREAM (no event reaches the handler)."""
        if self.open:
            self.conn.write_frame(RST_STREAM, 0, self.id, _U32.pack(code))
            self.conn.forget(self)

    def drain(self) -> None:
        """Send what the queue holds as far as the windows now allow."""
        while self.queue:
            item, end, on_sent = self.queue[0]
            if isinstance(item, list):
                self.queue.popleft()
                self.conn.write_headers(self.id, item, end)
                if end:
                    self._close_local()
                continue
            rest = self.conn.write_data(self, item, end, on_sent)
            if rest is not None:
                self.queue[0] = (rest, end, on_sent)
                self.conn.blocked.add(self)
                return
            self.queue.popleft()
            if end:
                self._close_local()

    def _close_local(self) -> None:
        self.local_closed = True
        if self.remote_closed:
            self.conn.forget(self)
        elif self.conn.server:
            # The response is complete while the client is still sending: tell it to stop.
            self.reset(NO_ERROR)

    def _close_remote(self) -> None:
        self.remote_closed = True
        if self.local_closed:
            self.conn.forget(self)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection, client or server side.

    A server calls ``on_request(stream, headers, end_stream)`` for each new stream and routes
    the stream's further events to the handler it returns; a client opens streams with
    :meth:`open_stream`.
    """

    def __init__(self, *, server: bool,
                 on_request: Callable[[Stream, Headers, bool], StreamHandler] | None = None,
                 max_concurrent_streams: int = 10_000) -> None:
        self.server = server
        self.on_request = on_request
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_event_loop()
        self.streams: dict[int, Stream] = {}
        self.blocked: set[Stream] = set()
        self.encoder = HeaderEncoder()
        self.decoder = HeaderDecoder()
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.peer_max_streams = 2**31 - 1
        self.max_concurrent_streams = max_concurrent_streams
        self.send_window = DEFAULT_WINDOW
        self.recv_window = CONNECTION_WINDOW
        self.recv_pending = 0
        self.next_stream_id = 1
        self.last_peer_stream = 0
        self.going_away = False  # GOAWAY sent or received: no new streams
        self.closed = self.loop.create_future()
        self._buffer = bytearray()
        self._preface_pending = server
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._header_block: list[object] | None = None  # [stream id, flags, bytearray]
        # Mutual TLS: the caller the connection's certificate proved (forwarded with every
        # call) and until when (epoch seconds), or why the connection proved nobody.
        self.caller: bytes | None = None
        self.caller_until = math.inf
        self.refusal: str | None = None

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface (client) and SETTINGS, and open the connection window."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        settings = [(SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                    (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)]
        if self.server:
            settings.append((SETTINGS_MAX_CONCURRENT_STREAMS, self.max_concurrent_streams))
        else:
            settings.append((SETTINGS_ENABLE_PUSH, 0))
            self._out.append(PREFACE)
        self.write_frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(*s) for s in settings))
        self.write_frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))

    def connection_lost(self, exc: Exception | None) -> None:
        """Every open stream learns the connection is gone."""
        self.going_away = True
        self.transport = None
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for stream in streams:
            if stream.handler is not None:
                stream.handler.on_reset(CONNECTION_LOST, False)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame received so far."""
        buffer = self._buffer
        buffer += data
        position = 0
        try:
            if self._preface_pending:
                if len(buffer) < len(PREFACE):
                    return
                if buffer[:len(PREFACE)] != PREFACE:
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                self._preface_pending = False
                position = len(PREFACE)
            size = len(buffer)
            while size - position >= 9 and self.transport is not None:
                head, flags, stream_id = _HEAD.unpack_from(buffer, position)
                length = head >> 8
                if length > DEFAULT_MAX_FRAME:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = position + 9 + length
                if end > size:
                    break
                payload = bytes(buffer[position + 9:end])
                position = end
                self._frame(head & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        except ProtocolError as exc:
            self.fail(exc.code, str(exc))
        finally:
            del buffer[:position]

    # ------------------------------------------------------------------ writing

    def write_frame(self, frame_type: int, flags: int, stream_id: int,
                    payload: bytes | memoryview = b"") -> None:
        """Queue one frame; everything queued in this loop iteration goes out in one write."""
        self._out.append(_HEAD.pack((len(payload) << 8) | frame_type, flags, stream_id))
        if payload:
            self._out.append(bytes(payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def write_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        """Encode a header block and send it as HEADERS plus CONTINUATION frames."""
        block = self.encoder.encode(headers)
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self.write_frame(HEADERS, flags | END_HEADERS, stream_id, block)
            return
        view = memoryview(block)
        self.write_frame(HEADERS, flags, stream_id, view[:limit])
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            self.write_frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                             view[start:start + limit])

    def write_data(self, stream: Stream, data: bytes, end_stream: bool,
                   on_sent: Callable[[int], None] | None) -> bytes | None:
        """Send as much of ``data`` as the windows allow; returns what is left (or None)."""
        total = len(data)
        if total == 0:
            self.write_frame(DATA, END_STREAM if end_stream else 0, stream.id)
            return None
        view = memoryview(data)
        offset = 0
        while offset < total:
            allowed = min(stream.send_window, self.send_window, self.peer_max_frame,
                          total - offset)
            if allowed <= 0:
                return bytes(view[offset:])
            last = offset + allowed == total
            self.write_frame(DATA, END_STREAM if last and end_stream else 0, stream.id,
                             view[offset:offset + allowed])
            stream.send_window -= allowed
            self.send_window -= allowed
            offset += allowed
            if on_sent is not None:
                on_sent(allowed)
        return None

    # ------------------------------------------------------------------ streams

    def open_stream(self, handler: StreamHandler) -> Stream:
        """A new client stream (headers not sent yet); StreamRefused when none can open."""
        if self.going_away or self.transport is None:
            raise StreamRefused("the connection is closing")
        if len(self.streams) >= self.peer_max_streams:
            raise StreamRefused(f"the peer allows {self.peer_max_streams} streams at once")
        stream = Stream(self, self.next_stream_id, handler)
        self.next_stream_id += 2
        self.streams[stream.id] = stream
        return stream

    def forget(self, stream: Stream) -> None:
        """Drop a finished stream; a closing connection ends when its last stream does."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self.blocked.discard(stream)
        stream.queue.clear()
        if self.going_away and not self.streams and self.transport is not None:
            self._flush()
            self.transport.close()

    @property
    def idle(self) -> bool:
        """No stream is open."""
        return not self.streams

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        """Refuse new streams; the connection closes once the open ones finish."""
        if self.transport is None:
            return
        if not self.going_away or code != NO_ERROR:
            last = self.last_peer_stream if self.server else 0
            self.write_frame(GOAWAY, 0, 0,
                             _U32.pack(last) + _U32.pack(code) + message.encode()[:256])
        self.going_away = True
        if not self.streams:
            self._flush()
            self.transport.close()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with ``code``, then close."""
        log.warning("HTTP/2 connection error %s: %s", code, message)
        if self.transport is not None:
            self.goaway(code, message)
            self._flush()
            self.transport.close()

    # ------------------------------------------------------------------ reading

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_block is not None and frame_type != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block was interrupted")
        if frame_type == DATA:
            self._data(flags, stream_id, payload)
        elif frame_type == HEADERS:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS on stream 0")
            if flags & PADDED:
                payload = _unpad(payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self._header_block = [stream_id, flags, bytearray(payload)]
            if flags & END_HEADERS:
                self._end_header_block()
        elif frame_type == CONTINUATION:
            block = self._header_block
            if block is None or block[0] != stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            fragment = block[2]
            assert isinstance(fragment, bytearray)
            fragment += payload
            if len(fragment) > MAX_HEADER_LIST:
                raise ProtocolError(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self._end_header_block()
        elif frame_type == RST_STREAM:
            if len(payload) != 4:
                raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.forget(stream)
                if stream.handler is not None:
                    code = _U32.unpack(payload)[0]
                    stream.handler.on_reset(code, code == REFUSED_STREAM)
        elif frame_type == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif frame_type == PING:
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & ACK:
                self.write_frame(PING, ACK, 0, payload)
        elif frame_type == GOAWAY:
            self._goaway(payload)
        elif frame_type == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif frame_type == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "server push is disabled")
        # PRIORITY and unknown frame types are ignored, as the RFC requires.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        self.recv_window -= length
        if self.recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "connection window exceeded")
        self.recv_pending += length
        if self.recv_pending >= CONNECTION_WINDOW // 2:
            self.write_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_pending))
            self.recv_window += self.recv_pending
            self.recv_pending = 0
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
            if stream is None and stream_id > self._highest_id():
                raise ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            self.write_frame(RST_STREAM, 0, stream_id, _U32.pack(STREAM_CLOSED))
            return
        if flags & PADDED:
            body = _unpad(payload)
            stream.consumed(length - len(body))
            payload = body
        stream.recv_window -= length
        if stream.recv_window < 0:
            stream.reset(FLOW_CONTROL_ERROR)
            if stream.handler is not None:
                stream.handler.on_reset(FLOW_CONTROL_ERROR, False)
            return
        end = bool(flags & END_STREAM)
        if end:
            stream._close_remote()
        if stream.handler is not None:
            stream.handler.on_data(payload, end)

    def _highest_id(self) -> int:
        return self.last_peer_stream if self.server else self.next_stream_id - 2

    def _end_header_block(self) -> None:
        block = self._header_block
        assert block is not None
        self._header_block = None
        stream_id, flags, fragment = block
        assert isinstance(stream_id, int) and isinstance(flags, int)
        assert isinstance(fragment, bytearray)
        try:
            headers = self.decoder.decode(bytes(fragment))
        except HPACKError as exc:
            raise ProtocolError(COMPRESSION_ERROR, f"bad header block: {exc}") from None
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if stream is None:
            if self.server and stream_id % 2 == 1 and stream_id > self.last_peer_stream:
                self._new_stream(stream_id, headers, end)
            elif stream_id > self._highest_id():
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS on an idle stream")
            return  # a stream this side already reset: the block only updated HPACK state
        if end:
            stream._close_remote()
        if stream.handler is not None:
            stream.handler.on_headers(headers, end)

    def _new_stream(self, stream_id: int, headers: Headers, end: bool) -> None:
        self.last_peer_stream = stream_id
        if self.going_away or len(self.streams) >= self.max_concurrent_streams:
            self.write_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM))
            return
        stream = Stream(self, stream_id, None)
        self.streams[stream_id] = stream
        if end:
            stream.remote_closed = True
        assert self.on_request is not None
        stream.handler = self.on_request(stream, headers, end)

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of the wrong size")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_HEADER_TABLE_SIZE:
                self.encoder.table_size_changed()
            elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_streams = value
            elif key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                if delta > 0:
                    self._unblock(list(self.streams.values()))
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise ProtocolError(PROTOCOL_ERROR, "bad SETTINGS_MAX_FRAME_SIZE")
                self.peer_max_frame = value
        self.write_frame(SETTINGS, ACK, 0)

    def _goaway(self, payload: bytes) -> None:
        if len(payload) < 8:
            raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY too short")
        last = _U32.unpack_from(payload, 0)[0] & 0x7FFFFFFF
        self.going_away = True
        if not self.server:
            # Streams past `last` were never processed: their callers may safely go elsewhere.
            for stream in [s for s in self.streams.values() if s.id > last]:
                self.forget(stream)
                if stream.handler is not None:
                    stream.handler.on_reset(REFUSED_STREAM, True)
        if not self.streams and self.transport is not None:
            self.transport.close()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of zero")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._unblock(list(self.blocked))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            stream.reset(PROTOCOL_ERROR if increment == 0 else FLOW_CONTROL_ERROR)
            if stream.handler is not None:
                stream.handler.on_reset(FLOW_CONTROL_ERROR, False)
            return
        stream.send_window += increment
        if stream in self.blocked:
            self._unblock([stream])

    def _unblock(self, streams: list[Stream]) -> None:
        for stream in streams:
            self.blocked.discard(stream)
            if stream.queue and stream.open:
                stream.drain()


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise ProtocolError(PROTOCOL_ERROR, "padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - pad]
