"""Same-host lookups over the server's doorbell (a Unix socket beside gRPC): the rows, codes and
metrics of the gRPC call; hostile frames answered with a code and the server unharmed; a gone
doorbell falls back to gRPC."""
from __future__ import annotations

import os
import socket
import struct
import threading

import grpc
import numpy as np
import pytest
from kvstore_client import DeadlineExceededError, InvalidArgumentError, KVStoreClient, NotFoundError
from kvstore_client.doorbell import DoorbellClient
from kvstore_proto.doorbell import HEADER, HELLO, MAX_PAYLOAD, SHARED_LOOKUP, frame, parse_error
from kvstore_proto.v1 import kvstore_pb2 as pb

from .conftest import random_rows, small_table
from .test_same_host import metric

DIM = 8
IDS = np.array([5, 1, 5, 9, -3, 1, 2**40, 7], dtype=np.int64)
TOKEN = "s3cret-token-of-32-characters-xx"


def _grpc_lookups_counted(client: KVStoreClient) -> list:
    """Calls of the client's gRPC SharedLookup from now on (the doorbell should take them)."""
    calls: list = []
    grpc_call = client.same_host._calls["SharedLookup"]

    def counted(*args, **kwargs):
        calls.append(args)
        return grpc_call(*args, **kwargs)

    client.same_host._calls["SharedLookup"] = counted
    return calls


def _lookups_recorded(server) -> float:
    """SharedLookup calls the server has recorded as answered OK."""
    try:
        return metric(server, "kvstore_rpc_duration_seconds_count", method="SharedLookup", code="OK")
    except AssertionError:                     # none yet
        return 0.0


def test_lookups_ring_the_doorbell_and_equal_the_network_path(server):
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        small_table(shm, "bell", DIM)
        shm.update("bell", IDS[:4], random_rows(4, DIM, seed=3))
        grpc_calls = _grpc_lookups_counted(shm)
        before = _lookups_recorded(server)
        for on_miss in ("zeros", "init", "init_insert"):
            assert np.array_equal(shm.lookup("bell", IDS, on_miss=on_miss), net.lookup("bell", IDS, on_miss=on_miss))
        assert shm.same_host.doorbell is not None and shm.same_host.doorbell.name.startswith("kvstore-doorbell-")
        assert not grpc_calls                                       # every lookup went over the doorbell
        assert _lookups_recorded(server) - before == 3             # counted as the gRPC calls are


def test_errors_over_the_doorbell_carry_the_grpc_calls_code_and_reason(server):
    with KVStoreClient(server.address, same_host=True) as shm:
        small_table(shm, "bell_errors", DIM)
        shm.lookup("bell_errors", IDS)
        grpc_calls = _grpc_lookups_counted(shm)
        with pytest.raises(NotFoundError) as missing_table:
            shm.lookup("no_such_table", IDS)
        assert missing_table.value.reason == "table_not_found"
        with pytest.raises(NotFoundError) as missing_rows:
            shm.lookup("bell_errors", [404, 405], on_miss="error")
        assert missing_rows.value.reason == "row_not_found"
        assert shm.lookup("bell_errors", IDS).shape == (len(IDS), DIM)
        assert not grpc_calls


def _ring(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect("\0" + name)
    return sock


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while len(data) < HEADER.size:
        chunk = sock.recv(HEADER.size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    size, kind = HEADER.unpack(data)
    payload = b""
    while len(payload) < size:
        payload += sock.recv(size - len(payload))
    return kind, payload


def _closed(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


def test_hostile_frames_get_a_code_and_the_server_keeps_serving(server):
    with KVStoreClient(server.address, same_host=True) as shm:
        small_table(shm, "bell_hostile", DIM)
        expected = shm.lookup("bell_hostile", IDS)
        name = shm.same_host.doorbell.name
        with _ring(name) as sock:                                   # a call before the hello
            sock.sendall(frame(SHARED_LOOKUP, b""))
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.UNAUTHENTICATED.value[0] and "hello" in parse_error(payload)[1]
            assert _closed(sock)
        with _ring(name) as sock:
            sock.sendall(frame(HELLO))
            assert _answer(sock) == (0, b"")
            sock.sendall(frame(SHARED_LOOKUP, b"\xff\xff\xff"))      # not a message
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "SharedLookupRequest" in payload.decode()
            request = pb.SharedLookupRequest(table="bell_hostile", segment="kvstore-" + "0" * 32)
            sock.sendall(frame(SHARED_LOOKUP, request.SerializeToString()))   # a segment never attached
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.INVALID_ARGUMENT.value[0] and parse_error(payload)[1].startswith("segment")
            sock.sendall(frame(7, b"x"))                            # not a call: answered, then closed
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "frame kind 7" in payload.decode()
            assert _closed(sock)
        with _ring(name) as sock:
            sock.sendall(frame(HELLO))
            _answer(sock)
            sock.sendall(struct.pack("<IB", MAX_PAYLOAD + 1, SHARED_LOOKUP))     # a length past the bound
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.INVALID_ARGUMENT.value[0] and str(MAX_PAYLOAD) in payload.decode()
            assert _closed(sock)
        assert np.array_equal(shm.lookup("bell_hostile", IDS), expected)       # served, rows unchanged


def test_a_guarded_server_rings_only_for_its_token(start_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    guarded = start_server("--auth-token-file", str(token_file))
    with KVStoreClient(guarded.address, token=TOKEN, same_host=True) as allowed:
        small_table(allowed, "bell_guarded", DIM)
        grpc_calls = _grpc_lookups_counted(allowed)
        assert allowed.lookup("bell_guarded", IDS).shape == (len(IDS), DIM)
        assert not grpc_calls
        name = allowed.same_host.doorbell.name
    for hello in (frame(HELLO), frame(HELLO, b"wrong-token")):
        with _ring(name) as sock:
            sock.sendall(hello)
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.UNAUTHENTICATED.value[0] and "bearer token" in payload.decode()
            assert _closed(sock)


def test_a_doorbell_nobody_answers_falls_back_to_grpc(server):
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        small_table(shm, "bell_gone", DIM)
        shm.lookup("bell_gone", IDS)
        shm.same_host.doorbell = DoorbellClient("kvstore-doorbell-" + "0" * 32, None)    # as after a restart
        grpc_calls = _grpc_lookups_counted(shm)
        assert np.array_equal(shm.lookup("bell_gone", IDS), net.lookup("bell_gone", IDS))
        assert len(grpc_calls) == 1 and shm.same_host.doorbell is None


def test_a_doorbell_that_never_answers_is_deadline_exceeded_and_the_region_is_retired(server):
    """A server that took the call but did not answer in time may still write the rows: the
    caller gets DEADLINE_EXCEEDED and never reuses that segment."""
    name = f"kvstore-doorbell-test-{threading.get_ident()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    taken = threading.Event()

    def answer_the_hello_only():
        connection, _ = listener.accept()
        _answer(connection)
        connection.sendall(frame(0))
        _answer(connection)                     # the call: never answered
        taken.set()
        connection.recv(1)                      # until the client gives up

    threading.Thread(target=answer_the_hello_only, daemon=True).start()
    with KVStoreClient(server.address, same_host=True) as shm:
        small_table(shm, "bell_silent", DIM)
        shm.lookup("bell_silent", IDS, out=np.empty((len(IDS), DIM), np.float32))    # a segment back in the pool
        silent = DoorbellClient(name, None)
        silent._connection(30)                       # the hello answered, however busy the machine
        shm.same_host.doorbell = silent
        shm.same_host.timeout = 0.5                  # only the silent call waits on it: no server call follows
        used, take = [], shm.same_host.pool.take
        shm.same_host.pool.take = lambda nbytes: used.append(take(nbytes)) or used[-1]
        with pytest.raises(DeadlineExceededError):
            shm.lookup("bell_silent", IDS)
        shm.same_host.timeout = 30.0                 # close() detaches its segments with it
        assert taken.is_set()
        assert len(used) == 1 and not os.path.exists(f"/dev/shm/{used[0].name}")     # retired, never reused
    listener.close()


def test_a_region_outside_the_segment_is_invalid_argument_over_the_doorbell(server):
    with KVStoreClient(server.address, same_host=True) as shm:
        small_table(shm, "bell_region", DIM)
        shm.lookup("bell_region", IDS)
        segment = shm.same_host.pool.take(1 << 12)                # attached, as a call's would be
        request = pb.SharedLookupRequest(
            table="bell_region", segment=segment.name,
            ids=pb.SharedArray(dtype="int64", shape=[4], offset=0),
            weights=pb.SharedArray(dtype="float32", shape=[4, DIM], offset=segment.size))     # past the end
        with pytest.raises(InvalidArgumentError, match="weights"):
            shm.same_host.doorbell(request, 30)
        shm.same_host.pool.give(segment)


def test_a_repeated_request_is_checked_again_once_its_table_or_segment_changed(server):
    """The connection keeps what a request was checked into while its segment and table stay the
    same: the same request bytes after the table was created again with another dim are
    INVALID_ARGUMENT naming the weights, and after the segment was detached and unlinked
    INVALID_ARGUMENT naming it (no rows written into a segment the client gave up); the rows are
    right throughout."""
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as net:
        small_table(shm, "bell_plan", DIM)
        shm.update("bell_plan", IDS[:4], random_rows(4, DIM, seed=4))
        shm.lookup("bell_plan", IDS)                               # attaches a segment, opens the connection
        segment = shm.same_host.pool.take(1 << 12)
        ids, _ = segment.array((4,), "int64")
        ids[:] = IDS[:4]
        rows, spec = segment.array((4, DIM), "float32")
        request = pb.SharedLookupRequest(table="bell_plan", segment=segment.name, on_miss=pb.ON_MISS_ZEROS,
                                         ids=pb.SharedArray(dtype="int64", shape=[4], offset=0), weights=spec)
        for _ in range(2):                                          # checked once, then kept
            assert shm.same_host.doorbell(request, 30).rows == 4
            assert np.array_equal(rows, net.lookup("bell_plan", IDS[:4]))
        net.drop_table("bell_plan")
        small_table(net, "bell_plan", 2 * DIM)
        with pytest.raises(InvalidArgumentError, match="weights.shape"):
            shm.same_host.doorbell(request, 30)
        net.drop_table("bell_plan")
        small_table(net, "bell_plan", DIM)
        net.update("bell_plan", IDS[:4], random_rows(4, DIM, seed=5))
        assert shm.same_host.doorbell(request, 30).rows == 4
        assert np.array_equal(rows, net.lookup("bell_plan", IDS[:4]))
        shm.same_host.pool.retire(segment)                          # detached and unlinked
        with pytest.raises(InvalidArgumentError, match="segment: no segment"):
            shm.same_host.doorbell(request, 30)
        assert np.array_equal(shm.lookup("bell_plan", IDS[:4]), net.lookup("bell_plan", IDS[:4]))


def test_random_requests_get_a_mapped_code_and_never_unknown_or_internal(server):
    """Random bytes and random well-formed requests (tables, segments, regions, dtypes) on one
    connection: every answer is OK or a mapped code, and the server keeps serving."""
    allowed = {code.value[0] for code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
                                          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                                          grpc.StatusCode.RESOURCE_EXHAUSTED)}
    rng = np.random.default_rng(11)
    with KVStoreClient(server.address, same_host=True) as shm:
        small_table(shm, "bell_random", DIM)
        expected = shm.lookup("bell_random", IDS)
        segment = shm.same_host.pool.take(1 << 12)
        with _ring(shm.same_host.doorbell.name) as sock:
            sock.sendall(frame(HELLO))
            assert _answer(sock) == (0, b"")
            ids = np.frombuffer(segment.shm.buf, np.int64, 16, offset=64)     # past the attach token
            ids[:] = rng.integers(0, 1 << 20, 16)                    # the ids the well-formed requests name
            del ids
            codes = set()
            for case in range(300):
                if case % 3 == 0:
                    payload = rng.bytes(int(rng.integers(0, 200)))
                elif case % 3 == 1:                                 # well formed: tables, miss modes, sizes vary
                    n = int(rng.integers(0, 16))
                    payload = pb.SharedLookupRequest(
                        table=str(rng.choice(["bell_random", "nope"])), segment=segment.name,
                        on_miss=int(rng.integers(0, 5)),
                        ids=pb.SharedArray(dtype="int64", shape=[n], offset=64),
                        weights=pb.SharedArray(dtype="float32", shape=[n, DIM], offset=1024)).SerializeToString()
                else:
                    n = int(rng.integers(-2, 40))
                    payload = pb.SharedLookupRequest(
                        table=str(rng.choice(["bell_random", "", "nope", "x" * 300])),
                        segment=str(rng.choice([segment.name, "kvstore-" + "f" * 32, "../etc", ""])),
                        on_miss=int(rng.integers(0, 6)),
                        ids=pb.SharedArray(dtype=str(rng.choice(["int64", "int32", "float32", "bogus"])),
                                           shape=[n] if case % 5 else [n, 2],
                                           offset=int(rng.choice([0, 8, 3, segment.size - 8, 2**63]))),
                        weights=pb.SharedArray(dtype=str(rng.choice(["float32", "float16", "int8"])),
                                               shape=[max(n, 0), int(rng.choice([DIM, 3, -1]))],
                                               offset=int(rng.choice([64, 1024, segment.size, 7]))),
                    ).SerializeToString()
                sock.sendall(frame(SHARED_LOOKUP, payload))
                kind, answer = _answer(sock)
                assert kind in allowed, (case, kind, answer)
                codes.add(kind)
        shm.same_host.pool.give(segment)
        assert len(codes) >= 3                                      # the requests reached past the parse
        assert np.array_equal(shm.lookup("bell_random", IDS), expected)


def test_a_forked_child_rings_on_a_connection_of_its_own():
    """A child forked after its parent rang must not write into the parent's connection: both
    would read each other's answers."""
    name = f"kvstore-doorbell-fork-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(4)
    connections: list[int] = []

    def serve(connection: socket.socket) -> None:
        with connection:
            _answer(connection)                                        # hello
            connection.sendall(frame(0))
            while True:
                try:
                    _answer(connection)
                except (ConnectionError, OSError):
                    return
                connection.sendall(frame(0, pb.SharedLookupResponse(rows=len(connections)).SerializeToString()))

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    bell = DoorbellClient(name, None)
    assert bell(pb.SharedLookupRequest(), 30).rows == 1              # the parent's connection
    child = os.fork()
    if child == 0:                                                     # pragma: no cover - the child
        os._exit(0 if bell(pb.SharedLookupRequest(), 30).rows == 2 else 1)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0 and len(connections) == 2
    assert bell(pb.SharedLookupRequest(), 30).rows == 2               # the parent's still answers it
    bell.close()
    listener.close()


def test_many_connections_at_once_get_their_rows_while_a_writer_updates_them(server):
    """Each calling thread rings on a connection of its own, served by a thread of its own in the
    server: eight threads started together by a barrier, each looking up random cached rows while
    a writer rewrites every row with its own value, each get exactly the rows' values."""
    rows = 256
    values = np.repeat(np.arange(rows, dtype=np.float32)[:, None], DIM, axis=1)      # row i holds i
    threads, rounds = 8, 40
    start = threading.Barrier(threads + 1)
    wrong: list = []
    with KVStoreClient(server.address, same_host=True) as shm, KVStoreClient(server.address) as writer:
        small_table(shm, "bell_many", DIM, cache={"rows": 1024, "ways": 8})
        writer.update("bell_many", np.arange(rows), values)
        grpc_calls = _grpc_lookups_counted(shm)

        def look(seed: int) -> None:
            rng = np.random.default_rng(seed)
            start.wait()
            for _ in range(rounds):
                ids = rng.integers(0, rows, 64)
                got = shm.lookup("bell_many", ids)
                if not np.array_equal(got, values[ids]):
                    wrong.append(seed)

        lookers = [threading.Thread(target=look, args=(seed,)) for seed in range(threads)]
        for thread in lookers:
            thread.start()
        start.wait()
        for _ in range(rounds):
            writer.update("bell_many", np.arange(rows), values)
        for thread in lookers:
            thread.join()
        assert not wrong and not grpc_calls
        assert len(shm.same_host.doorbell._sockets) == threads              # a connection each


def test_connections_past_the_limit_are_refused_and_their_client_takes_grpc(start_server):
    """A server holds at most `max_concurrent_rpcs` doorbell connections (a thread each); one more
    is answered RESOURCE_EXHAUSTED and closed, and a client refused so looks up over gRPC."""
    limited = start_server("--max-concurrent-rpcs", "2")
    with KVStoreClient(limited.address, same_host=True) as shm, KVStoreClient(limited.address) as net:
        small_table(net, "bell_full", DIM)
        expected = net.lookup("bell_full", IDS)
        assert shm.same_host.usable()                                  # attached: the doorbell named, not rung
        name = shm.same_host.doorbell.name
        held = [_ring(name), _ring(name)]
        for sock in held:
            sock.sendall(frame(HELLO))
            assert _answer(sock) == (0, b"")
        with _ring(name) as sock:
            kind, payload = _answer(sock)
            assert kind == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "max_concurrent_rpcs" in payload.decode()
            assert _closed(sock)
        grpc_calls = _grpc_lookups_counted(shm)
        assert np.array_equal(shm.lookup("bell_full", IDS), expected)
        assert len(grpc_calls) == 1 and shm.same_host.doorbell is None
        for sock in held:
            sock.close()


def test_a_stopping_server_ends_its_doorbell_connections(start_server):
    """SIGTERM: an idle connection is closed by the server (its thread ends), and the server exits 0."""
    stopping = start_server()
    with KVStoreClient(stopping.address, same_host=True) as shm:
        small_table(shm, "bell_stop", DIM)
        shm.lookup("bell_stop", IDS)
        with _ring(shm.same_host.doorbell.name) as sock:
            sock.sendall(frame(HELLO))
            assert _answer(sock) == (0, b"")
            assert stopping.stop() == 0
            assert _closed(sock)
