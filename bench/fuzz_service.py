"""The long fuzz of the service: random bytes and random well-formed messages to every method of
kvstore.v1.EmbeddingStore through a real server, with the checks of tests/integration/test_fuzz.py
(no UNKNOWN or INTERNAL, server up, canary unchanged, the channel still serving). Unlike the test it
does not stop at the first problem: it counts them, opens a new channel when one stops serving, and
prints the status codes seen per method.

    python bench/fuzz_service.py --cases 100000 [--seed N] [--raw-share 0.3]
"""
from __future__ import annotations

import argparse
import random
import resource
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.conftest import ServerProcess  # noqa: E402
from tests.integration.fuzz_strategies import (  # noqa: E402
    METHODS,
    FuzzTarget,
    raw_requests,
    well_formed_requests,
)

ADDRESS_SPACE = 4 << 30
EXAMPLES_SHOWN = 5
BATCH_CASES = 5000        # one hypothesis run per batch (seed + batch number); the summary is printed after each


def cases(raw_share: float):
    from hypothesis import strategies as st

    def for_method(method: str):
        kind = st.sampled_from(["raw", "well-formed"]) if raw_share >= 1 else st.floats(0, 1).map(
            lambda x: "raw" if x < raw_share else "well-formed")
        return kind.flatmap(lambda k: st.tuples(st.just(method), st.just(k),
                                                raw_requests(method) if k == "raw" else well_formed_requests(method)))

    return st.sampled_from(METHODS).flatmap(for_method)


def run(target: FuzzTarget, count: int, seed: int, raw_share: float) -> tuple[Counter, list[str]]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed

    problems: Counter = Counter()
    examples: list[str] = []

    @with_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(case=cases(raw_share))
    def fuzz(case):
        method, kind, payloads = case
        found = target.send(method, payloads)
        problems.update(f"{kind}: {problem}" for problem in found)
        if found and len(examples) < EXAMPLES_SHOWN:
            examples.append(f"{found} after {method} {payloads!r:.200}")
        if "the channel stopped serving" in found:
            target.channel.close()
            target.channel = grpc.insecure_channel(target.client.address)

    fuzz()
    return problems, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random, printed)")
    parser.add_argument("--raw-share", type=float, default=0.3, help="fraction of cases that are random bytes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the server on the way out
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    from kvstore_client import KVStoreClient

    server = ServerProcess(Path(tempfile.mkdtemp(prefix="kvstore-fuzz-")) / "data").start()
    resource.prlimit(server.process.pid, resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    start = time.perf_counter()
    problems, examples, exit_code = Counter(), [], None
    try:
        with KVStoreClient(server.address, timeout=30) as client:
            target = FuzzTarget(server.alive, client, grpc.insecure_channel(server.address))
            target.prepare()
            for batch, first in enumerate(range(0, args.cases, BATCH_CASES)):
                found, shown = run(target, min(BATCH_CASES, args.cases - first), seed + batch, args.raw_share)
                problems.update(found)
                examples = (examples + shown)[:EXAMPLES_SHOWN]
                summarize(target, problems, examples, seed, args.raw_share, time.perf_counter() - start)
            target.channel.close()
    finally:
        exit_code = server.stop() if server.alive() else None
        print(f"server exit code on SIGTERM: {exit_code}", flush=True)
    sys.exit(1 if problems or exit_code != 0 else 0)


def summarize(target: FuzzTarget, problems: Counter, examples: list[str], seed: int, raw_share: float,
              seconds: float) -> None:
    print(f"fuzz: {sum(target.codes.values())} cases in {seconds:.0f} s, seeds {seed}+batch, raw share {raw_share}")
    by_code = Counter()
    for (method, code), n in sorted(target.codes.items()):
        by_code[code] += n
        print(f"  {method:16s} {code:20s} {n}")
    print("codes seen:", dict(by_code.most_common()))
    print("problems:", dict(problems) or "none")
    for example in examples:
        print("  e.g.", example)
    print(flush=True)

if __name__ == "__main__":
    main()
