"""Property-based fuzz through a real server: random bytes and random well-formed messages to every
method. Whatever arrives, the call ends with a mapped code (never UNKNOWN or INTERNAL), the server
stays up, the canary table keeps its rows and the same channel goes on serving.

CI runs a fixed set of cases (derandomized, so a failure reproduces); `python bench/fuzz_service.py
--cases 100000` runs the long version with a random seed and prints the codes seen.
"""
from __future__ import annotations

import resource
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from kvstore_client import KVStoreClient

from .fuzz_strategies import METHODS, FuzzTarget, call, raw_requests, well_formed_requests

CASES_PER_METHOD = 100
RAW_CASES = 1000
SERVER_ADDRESS_SPACE = 4 << 30     # a fuzzed giant allocation fails in the server, not on the machine


def fuzz_settings(cases: int):
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate),        # no shrinking: a poisoned channel is slow
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(start_server):
    """A server of its own (the fuzz may poison connections), held to SERVER_ADDRESS_SPACE bytes."""
    server = start_server()
    resource.prlimit(server.process.pid, resource.RLIMIT_AS, (SERVER_ADDRESS_SPACE, SERVER_ADDRESS_SPACE))
    with KVStoreClient(server.address, timeout=30) as client, grpc.insecure_channel(server.address) as channel:
        target = FuzzTarget(server.alive, client, channel)
        target.prepare()
        yield target
    codes = Counter()
    for (_, code), n in target.codes.items():
        codes[code] += n
    print(f"\nfuzz: {sum(codes.values())} calls, codes seen {dict(codes.most_common())}")


def check_case(target: FuzzTarget, method: str, payloads: list[bytes]) -> None:
    problems = target.send(method, payloads)
    assert problems == [], f"{problems} after {method} {payloads!r:.300}"


def method_params():
    for method in METHODS:
        yield pytest.param(method, id=method)


@pytest.mark.parametrize("method", method_params())
def test_well_formed_messages_get_a_mapped_code_and_leave_the_canary(fuzzed, method):
    @fuzz_settings(CASES_PER_METHOD)
    @given(payloads=well_formed_requests(method))
    def run(payloads):
        check_case(fuzzed, method, payloads)

    run()


def test_random_bytes_get_a_mapped_code_and_leave_the_connection_usable(fuzzed):
    from hypothesis import strategies as st

    @fuzz_settings(RAW_CASES)
    @given(case=st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), raw_requests(m))))
    def run(case):
        check_case(fuzzed, *case)

    run()


@pytest.mark.parametrize("method", ["Update", "CreateTable", "Lookup"])
def test_a_hundred_undecodable_requests_leave_the_channel_serving(fuzzed, method):
    with grpc.insecure_channel(fuzzed.client.address) as channel:
        codes = Counter(call(channel, method, [b"\x8b"]).name for _ in range(100))
        serving = call(channel, "ListTables", [b""])
    assert serving == grpc.StatusCode.OK, f"the channel stopped serving after {dict(codes)}"
    assert codes == {"INVALID_ARGUMENT": 100}
