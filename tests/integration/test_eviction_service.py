"""Eviction through the server: config on the wire, scores with updates and gradients,
Evict counts by reason, RestoreRows from the archive, counts as metrics."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from kvstore_client import FailedPreconditionError, InvalidArgumentError, NotFoundError

from .conftest import random_rows, small_table

# trigger_rows far above max_rows: only the test's Evict calls evict, never the background sweeper
# between its steps (which, once restored rows make 150 again, could evict them at any time)
EVICTION = {"max_rows": 100, "headroom": 0.0, "capacity_policy": "score", "samples": 64, "archive_seconds": 3600.0,
            "trigger_rows": 1 << 40}


def test_the_eviction_config_travels_and_is_kept(client):
    config = small_table(client, "ev_config", eviction={"ttl_seconds": 60.0, "max_rows": 1000})
    assert config["eviction"]["ttl_seconds"] == 60.0 and config["eviction"]["max_rows"] == 1000
    assert config["eviction"]["samples"] == 16                 # unset fields take the server default
    assert client.describe_table("ev_config")["eviction"] == config["eviction"]
    with pytest.raises(InvalidArgumentError, match="eviction.capacity_policy"):
        small_table(client, "ev_bad", eviction={"capacity_policy": "mru"})


def test_evict_by_score_then_restore_from_the_archive(client, server):
    small_table(client, "ev_score", eviction=EVICTION)
    ids = np.arange(150)
    weights = random_rows(150, 8)
    scores = np.arange(150, dtype=np.float32)                   # ids 0..49 score lowest
    client.update("ev_score", ids[:100], weights[:100], scores=scores[:100])
    client.apply_gradients("ev_score", ids[100:], np.zeros((50, 8), np.float32), scores=scores[100:])
    counts = client.evict("ev_score")
    assert counts["score"] == 50 and sum(counts.values()) == 50
    kept = client.lookup("ev_score", ids, on_miss="zeros").any(axis=1)
    assert kept.sum() == 100 and not kept[:30].any()           # the lowest scores left first
    gone = ids[~kept]
    assert client.restore_rows("ev_score", gone) == 50
    np.testing.assert_array_equal(client.lookup("ev_score", gone[gone < 100], on_miss="error"),
                                  weights[gone[gone < 100]])
    stats = client.stats("ev_score")
    assert stats["evicted_score"] == 50 and stats["rows_restored"] == 50
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'kvstore_evictions_total{reason="score",table="ev_score"} 50.0' in metrics


def test_eviction_errors_keep_their_status_codes(client):
    small_table(client, "ev_plain")
    with pytest.raises(NotFoundError):
        client.evict("ev_missing")
    with pytest.raises(FailedPreconditionError, match="archive"):
        client.restore_rows("ev_plain", [1])
    with pytest.raises(InvalidArgumentError, match="scores"):
        client.update("ev_plain", [1, 2], np.ones((2, 8), np.float32), scores=[1.0])
    assert client.evict("ev_plain") == {"ttl": 0, "norm": 0, "frequency": 0, "capacity": 0, "score": 0}


def test_the_server_config_sets_the_sweeper():
    from kvstore_server.config import ServerConfig

    from kvstore import InvalidArgument

    config = ServerConfig.from_dict({"sweeper": {"rows_per_second": 1000, "poll_seconds": 0.5}})
    assert config.sweeper.rows_per_second == 1000 and config.sweeper.poll_seconds == 0.5
    with pytest.raises(InvalidArgument, match="sweeper.rate"):
        ServerConfig.from_dict({"sweeper": {"rate": 5}})
