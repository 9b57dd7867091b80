"""The client's prefetch-lock lease: granted on first use, kept alive in the background, revoked on close.

The server releases a lease's locked rows when it lapses, so a client that dies
loses its locks after the lease's TTL, and no connection has to stay open. A
daemon thread renews it at a third of its TTL; if the server says it lapsed
anyway (a long pause), the next lock takes a fresh lease.
"""
from __future__ import annotations

import threading

import grpc
from kvstore_proto.v1 import kvstore_pb2 as pb

from .errors import rpc_errors as _rpc

RENEWALS_PER_TTL = 3
LAPSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)


class LeaseKeeper:
    def __init__(self, stub, timeout: float):
        self._stub = stub
        self._timeout = timeout
        self._lock = threading.Lock()
        self._lease = ""
        self._stop: threading.Event | None = None

    @property
    def current(self) -> str:
        """The lease held now, or "" (never grants one)."""
        return self._lease

    def acquire(self) -> str:
        """This client's lease, granted (and its renewal started) on first use."""
        with self._lock:
            if not self._lease:
                with _rpc():
                    granted = self._stub.GrantLease(pb.GrantLeaseRequest(), timeout=self._timeout)
                self._lease, self._stop = granted.lease, threading.Event()
                interval = max(granted.ttl_seconds / RENEWALS_PER_TTL, 0.01)
                threading.Thread(target=self._renew, args=(granted.lease, self._stop, interval),
                                 name="kvstore-lease", daemon=True).start()
            return self._lease

    def _renew(self, lease: str, stop: threading.Event, interval: float) -> None:
        while not stop.wait(interval):
            try:
                self._stub.KeepAlive(pb.KeepAliveRequest(lease=lease), timeout=max(interval, 1.0))
            except grpc.RpcError as error:
                if error.code() in LAPSED:
                    self._forget(lease)
                    return
            except ValueError:                 # the channel was closed under us
                return

    def _forget(self, lease: str) -> None:
        with self._lock:
            if self._lease == lease:
                self._lease = ""

    def close(self) -> None:
        """Stop renewing and give the lease back: the server releases its locks now."""
        with self._lock:
            lease, self._lease = self._lease, ""
            if self._stop is not None:
                self._stop.set()
        if lease:
            try:
                self._stub.RevokeLease(pb.RevokeLeaseRequest(lease=lease), timeout=min(self._timeout, 5.0))
            except grpc.RpcError:
                pass                           # it lapses on its own
