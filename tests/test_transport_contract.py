"""Every grpclib 0.4 and h2 assumption ``longlived._transport`` makes, pinned.

The transport is the one module that reaches into grpclib's and h2's internals. Each test
here states one thing it relies on, so an upgrade that changes it fails here first, with
a name that says what broke, rather than as a hang somewhere else.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from typing import Any

import grpclib
import grpclib.client
import grpclib.events
import grpclib.protocol
import grpclib.server
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from grpclib.config import Configuration
from grpclib.protocol import Buffer, Connection, EventsProcessor, H2Protocol

from longlived._transport import (
    WRITE_CAP,
    _Bucket,
    _Connection,
    _Drained,
    _Handler,
    _Values,
    data_frame,
)


def test_grpclib_is_0_4() -> None:
    assert grpclib.__version__.startswith("0.4."), grpclib.__version__


def test_keepalive_lives_in_private_configuration_fields() -> None:
    fields: dict[str, Any] = {
        "_keepalive_time": 30.0,
        "_keepalive_timeout": 10.0,
        "_keepalive_permit_without_calls": True,
        "_http2_max_pings_without_data": 0,
        "_http2_min_sent_ping_interval_without_data": 30.0,
    }
    base = Configuration(**fields)
    for config in (base.__for_server__(), base.__for_client__()):
        assert {name: getattr(config, name) for name in fields} == fields


async def test_server_protocol_factory_ingredients() -> None:
    """``GrpcServer._protocol_factory`` rebuilds grpclib's from these parts."""
    server = grpclib.server.Server([])
    for name in ("_mapping", "_codec", "_status_details_codec", "_handlers", "_config"):
        assert hasattr(server, name), name
    assert isinstance(server.__dispatch__, grpclib.events._DispatchServerEvents)
    assert callable(server.__gc_step__)
    assert isinstance(server._h2_config, h2.config.H2Configuration)
    assert server._server is None  # the asyncio server, once started
    handler = grpclib.server.Handler(
        server._mapping, server._codec, server._status_details_codec, server.__dispatch__
    )
    assert list(inspect.signature(handler.accept).parameters) == [
        "stream",
        "headers",
        "release_stream",
    ]
    assert list(inspect.signature(handler.cancel).parameters) == ["stream"]
    assert handler.closing is False
    assert list(inspect.signature(H2Protocol).parameters) == ["handler", "config", "h2_config"]


def test_a_peer_reset_reaches_the_handlers_cancel() -> None:
    """Rapid-reset accounting counts ``Handler.cancel``, which grpclib calls on RST_STREAM."""
    source = inspect.getsource(EventsProcessor.process_stream_reset)
    assert "self.handler.cancel(stream)" in source


def test_dispatch_is_a_no_op_in_the_instance_dict_until_someone_listens() -> None:
    """``StreamCall`` decodes messages for ``SendMessage`` only when this says someone listens."""
    dispatch = grpclib.events._DispatchServerEvents()
    assert "send_message" in dispatch.__dict__
    assert "recv_message" in dispatch.__dict__

    async def callback(event: grpclib.events.SendMessage) -> None:
        pass

    dispatch.add_listener(grpclib.events.SendMessage, callback)  # type: ignore[arg-type]  # grpclib's callback type
    assert "send_message" not in dispatch.__dict__
    assert "recv_message" in dispatch.__dict__


async def test_a_request_buffer_asserts_when_the_stream_ends_short_and_marks_eof() -> None:
    buffer = Buffer(lambda size: None)
    buffer.add(b"abc", 3)
    buffer.eof()
    assert buffer._eof  # read by the pending-streams bound
    with pytest.raises(AssertionError):
        await buffer.read(5)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def write(self, data: Any) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True


def test_connection_close_deletes_the_transport_and_ours_survives_it() -> None:
    """grpclib's ``Connection.close()`` deletes ``_transport``: a flush or abort after it
    must not raise (grpclib's own would, with ``AttributeError``)."""
    h2_conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    transport = _Transport()
    conn = Connection(h2_conn, transport, config=Configuration().__for_server__())
    conn.__class__ = _Connection
    conn.close()
    assert not hasattr(conn, "_transport")
    assert conn.is_closing()
    assert isinstance(conn, _Connection)
    conn.flush()
    conn.abort()
    assert conn.buffered() == 0


def test_protocol_stream_attributes_the_writer_uses() -> None:
    h2_conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn = Connection(h2_conn, _Transport(), config=Configuration().__for_server__())
    stream = conn.create_stream(stream_id=1)
    assert stream.id == 1
    assert isinstance(stream.window_updated, asyncio.Event)
    assert isinstance(stream.buffer, Buffer)
    assert stream._h2_connection is h2_conn
    assert stream._transport is conn._transport
    assert stream.data_sent == 0
    assert isinstance(conn.write_ready, asyncio.Event)


def test_server_stream_state_flags() -> None:
    for name in ("_send_initial_metadata_done", "_send_trailing_metadata_done", "_cancel_done"):
        assert getattr(grpclib.server.Stream, name) is False, name
    assert inspect.iscoroutinefunction(grpclib.server.Stream.recv_message)


def _pair(*, stream_window: int, connection_window: int) -> tuple[Any, Any, int]:
    """An h2 client and server that exchanged SETTINGS, and one open stream."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
    if connection_window > 65_535:
        client.increment_flow_control_window(connection_window - 65_535)
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "http"),
                            (":authority", "x")])  # fmt: skip
    server.receive_data(client.data_to_send())
    return client, server, 1


def test_h2_window_is_the_smaller_of_stream_and_connection() -> None:
    """A peer may grant a large stream window and keep the 64 KiB connection window."""
    _, server, stream_id = _pair(stream_window=1 << 20, connection_window=65_535)
    assert server.local_flow_control_window(stream_id) == 65_535
    _, server, stream_id = _pair(stream_window=1000, connection_window=1 << 20)
    assert server.local_flow_control_window(stream_id) == 1000


def test_h2_send_data_takes_memoryview_slices_and_frame_sized_pieces() -> None:
    _, server, stream_id = _pair(stream_window=1 << 20, connection_window=1 << 20)
    server.send_headers(stream_id, [(":status", "200")])
    data = memoryview(bytes(40_000))
    step = server.max_outbound_frame_size
    for start in range(0, len(data), step):
        server.send_data(stream_id, data[start : start + step])
    assert server.local_flow_control_window(stream_id) == (1 << 20) - 40_000


@pytest.mark.parametrize("end_request", [False, True], ids=["open", "half-closed-remote"])
def test_data_frame_is_what_h2_send_data_writes(end_request: bool) -> None:
    """``data_frame`` writes a DATA frame past h2; in the states it accepts, h2's
    ``send_data`` changes nothing but the two windows, and the bytes are the same."""
    ours, theirs = (_pair(stream_window=1000, connection_window=1 << 20) for _ in range(2))
    for client, server, stream_id in (ours, theirs):
        if end_request:
            client.send_data(stream_id, b"", end_stream=True)
            server.receive_data(client.data_to_send())
        server.send_headers(stream_id, [(":status", "200")])
        server.data_to_send()
        server.ping(b"12345678")  # held by h2 when the frame is made: it goes out first
    _, server, stream_id = ours
    stream = server.streams[stream_id]
    message = bytes(range(90))
    frames = []
    for _ in range(11):  # ten fit the window of 1000, the eleventh does not
        frames.append(data_frame(server, stream, b"\x00\x00" + stream_id.to_bytes(4, "big"),
                                 message))  # fmt: skip
    assert frames[10] is None
    _, peer, _ = theirs
    expected = []
    for _ in range(10):
        peer.send_data(stream_id, b"\x00" + len(message).to_bytes(4, "big") + message)
        expected.append(peer.data_to_send())
    assert frames[:10] == expected
    assert server.local_flow_control_window(stream_id) == peer.local_flow_control_window(stream_id)
    assert server.outbound_flow_control_window == peer.outbound_flow_control_window
    assert stream.state_machine.state == peer.streams[stream_id].state_machine.state


def test_data_frame_leaves_h2_alone_once_it_may_not_send() -> None:
    _, server, stream_id = _pair(stream_window=1 << 20, connection_window=1 << 20)
    server.send_headers(stream_id, [(":status", "200")])
    stream = server.streams[stream_id]
    tail = b"\x00\x00" + stream_id.to_bytes(4, "big")
    server.close_connection()  # GOAWAY sent: h2's send_data would raise
    window = server.outbound_flow_control_window
    assert data_frame(server, stream, tail, b"x") is None
    assert server.outbound_flow_control_window == window
    _, server2, stream_id2 = _pair(stream_window=1 << 20, connection_window=1 << 20)
    server2.send_headers(stream_id2, [(":status", "200")], end_stream=True)  # trailers out
    assert data_frame(server2, server2.streams[stream_id2], tail, b"x") is None
    _, server3, stream_id3 = _pair(stream_window=1 << 20, connection_window=1 << 20)
    server3.send_headers(stream_id3, [(":status", "200")])
    big = bytes(server3.max_outbound_frame_size)  # with its prefix, more than one frame
    assert data_frame(server3, server3.streams[stream_id3], tail, big) is None


def test_data_frame_leaves_a_message_over_the_write_cap_to_the_writer() -> None:
    """A peer may allow 16 MiB frames and windows: one direct write of a whole large event
    would let a peer that stops reading hold it all in our buffers."""
    client, server, stream_id = _pair(stream_window=1 << 24, connection_window=1 << 24)
    client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: (1 << 24) - 1})
    server.receive_data(client.data_to_send())
    server.send_headers(stream_id, [(":status", "200")])
    tail = b"\x00\x00" + stream_id.to_bytes(4, "big")
    assert server.max_outbound_frame_size > WRITE_CAP
    assert data_frame(server, server.streams[stream_id], tail, bytes(WRITE_CAP)) is None
    assert data_frame(server, server.streams[stream_id], tail, bytes(WRITE_CAP - 5))


def test_h2_settings_work_on_values_in_lists() -> None:
    """``_Protocol`` swaps the deques of h2's ``Settings`` for ``_Values`` lists."""
    client, server, _ = _pair(stream_window=65_535, connection_window=65_535)
    for settings in (server.local_settings, server.remote_settings):
        settings._settings = {code: _Values(v) for code, v in settings._settings.items()}
    code = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    server.update_settings({code: 1_000, h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 7})
    assert server.local_settings.initial_window_size == 65_535  # until the peer's ACK
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert server.local_settings.initial_window_size == 1_000
    assert server.local_settings.max_concurrent_streams == 7
    client.update_settings({code: 5_000})
    server.receive_data(client.data_to_send())
    assert server.remote_settings.initial_window_size == 5_000
    assert all(type(v) is _Values for v in server.local_settings._settings.values())


def test_a_server_stream_buffer_is_used_through_add_eof_unacked_size_and_read() -> None:
    """``StreamCall.start`` swaps a subscription's buffer for ``_Drained``, which has these."""
    source = inspect.getsource(grpclib.protocol)
    assert set(re.findall(r"\.buffer\.(\w+)", source)) == {"add", "eof", "unacked_size", "read"}
    assert "buffer._eof" in inspect.getsource(_Handler.accept)  # ours: the admission count
    drained = _Drained(eof=False, unacked=10)
    drained.add(b"more", 4)
    drained.eof()
    assert (drained._eof, drained.unacked_size(), drained.unacked_size()) == (True, 14, 0)


def test_h2_local_settings_can_be_raised_before_the_peer_acknowledges() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    conn.update_settings({code: 1024})
    assert conn.local_settings.max_concurrent_streams == 100  # h2 waits for the ACK
    conn.local_settings._settings[code][0] = 1024
    assert conn.local_settings.max_concurrent_streams == 1024
    conn.decoder.max_header_list_size = 1 << 20
    assert conn.decoder.max_header_list_size == 1 << 20


def test_h2_goaway_carries_an_error_code_and_reason() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, b"too many stream resets")
    events = client.receive_data(server.data_to_send())
    goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway[0].additional_data == b"too many stream resets"


async def test_channel_internals_the_resilient_channel_uses() -> None:
    channel = grpclib.client.Channel("127.0.0.1", 1)
    try:
        assert channel._protocol is None
        assert channel._connected is False
        assert inspect.iscoroutinefunction(channel.__connect__)
    finally:
        channel.close()


def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = _Bucket(rate=10, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.1  # one token's worth
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100
    assert sum(bucket.take() for _ in range(10)) == 3  # never more than the burst


def test_window_updates_wake_every_writer_that_may_send() -> None:
    """The writer waits on ``window_updated``: grpclib sets it for a stream's own
    WINDOW_UPDATE, for the connection's (every stream) and when INITIAL_WINDOW_SIZE changes."""
    updated = inspect.getsource(EventsProcessor.process_window_updated)
    assert "event.stream_id == 0" in updated
    assert updated.count("window_updated.set()") == 2
    settings = inspect.getsource(EventsProcessor.process_remote_settings_changed)
    assert "INITIAL_WINDOW_SIZE" in settings
    assert "window_updated.set()" in settings


def test_a_handler_always_releases_its_stream() -> None:
    """The pending-streams bound wraps ``release_stream``: grpclib calls it in a finally."""
    source = inspect.getsource(grpclib.server.request_handler)
    assert "finally:\n        release_stream()" in source


def test_a_new_stream_needs_the_connections_transport() -> None:
    """Why a connection dropped mid-read must stop processing what it already read."""
    assert "self._transport" in inspect.getsource(Connection.create_stream)
    assert "del self._transport" in inspect.getsource(Connection.close)


def test_a_client_stream_keeps_the_headers_a_reset_call_received() -> None:
    """``final_metadata`` reads a reset call's trailers where grpclib raises its status from."""
    source = inspect.getsource(grpclib.client.Stream._maybe_raise)
    assert "self._stream.trailers" in source
    assert "self._stream.headers" in source
