"""Eviction rules alone: one contract every rule keeps, then each rule's own promise;
the admission sketch; the eviction config."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvstore import CacheConfig, EvictionConfig, InvalidArgument, SweeperConfig, TableConfig
from kvstore.eviction.admission import Admission, CountMinSketch
from kvstore.eviction.rules import TTL, Capacity, Frequency, NormBelow, RowMeta, build_rules, sample_worst
from kvstore.rows import decode_scores, encode_scores

NOW = 10_000.0


def random_meta(n: int = 500, seed: int = 0) -> RowMeta:
    rng = np.random.default_rng(seed)
    return RowMeta(
        ids=rng.permutation(n).astype(np.int64) * 7 - 100,
        last_access=rng.integers(int(NOW) - 1000, int(NOW), n).astype(np.uint32),
        count=rng.integers(0, 50, n).astype(np.uint32),
        score=rng.normal(size=n).astype(np.float32),
        norm=rng.uniform(0, 2, n).astype(np.float32),
    )


RULES = {
    "ttl": lambda: TTL(300),
    "norm": lambda: NormBelow(0.5),
    "frequency": lambda: Frequency(0.5, 10),
    "capacity_lru": lambda: Capacity(400, 350, "lru"),
    "capacity_lfu": lambda: Capacity(400, 350, "lfu"),
    "capacity_score": lambda: Capacity(400, 350, "score"),
}


# --- the contract every rule keeps ------------------------------------------------------


@pytest.fixture(params=sorted(RULES))
def rule(request):
    return RULES[request.param]()


def test_rule_selects_a_boolean_mask_over_the_rows(rule):
    meta = random_meta()
    rule.adjust(meta)
    mask = rule.select(meta, NOW)
    assert mask.dtype == bool and mask.shape == (len(meta),)
    assert 0 < mask.sum() < len(meta)        # the sample data has rows on both sides of every rule


def test_rule_select_leaves_the_metadata_alone(rule):
    meta = random_meta()
    before = dataclasses.replace(meta, **{f: getattr(meta, f).copy() for f in ("ids", "count", "last_access")})
    rule.select(meta, NOW)
    np.testing.assert_array_equal(meta.count, before.count)
    np.testing.assert_array_equal(meta.last_access, before.last_access)


def test_rule_on_no_rows_selects_nothing(rule):
    meta = random_meta(0)
    assert rule.select(meta, NOW).shape == (0,)
    assert rule.adjust(meta).shape == (0,)


def test_rule_has_a_reason_it_is_counted_under(rule):
    assert rule.reason in ("ttl", "norm", "frequency", "capacity", "score")


# --- each rule ----------------------------------------------------------------------------


def test_ttl_selects_exactly_rows_older_than_the_ttl():
    meta = random_meta()
    np.testing.assert_array_equal(TTL(300).select(meta, NOW), meta.last_access < NOW - 300)


def test_norm_selects_rows_below_the_threshold():
    meta = random_meta()
    np.testing.assert_array_equal(NormBelow(0.5).select(meta, NOW), meta.norm < 0.5)


def test_frequency_decays_counts_then_selects_those_under_the_threshold():
    meta = RowMeta.empty()
    meta.count = np.array([0, 1, 7, 40], dtype=np.uint32)
    rule = Frequency(0.5, 4)
    np.testing.assert_array_equal(rule.adjust(meta), [False, True, True, True])
    np.testing.assert_array_equal(meta.count, [0, 0, 3, 20])
    np.testing.assert_array_equal(rule.select(meta, NOW), [True, True, True, False])


def test_capacity_evicts_down_to_its_target_and_no_further():
    meta = random_meta(500)
    assert Capacity(400, 350).select(meta, NOW).sum() == 150
    assert Capacity(600, 500).select(meta, NOW).sum() == 0       # at the target: nothing to do
    meta.total = 1000                                             # rows the scan did not see count too
    assert Capacity(900, 800).select(meta, NOW).sum() == 200


@pytest.mark.parametrize("policy,field", [("lru", "last_access"), ("lfu", "count"), ("score", "score")])
def test_capacity_picks_mostly_the_worst_rows(policy, field):
    n = 20_000
    meta = random_meta(n, seed=3)
    meta.count = np.random.default_rng(4).permutation(n).astype(np.uint32)    # distinct, so ranks are clear
    meta.last_access = (np.random.default_rng(5).permutation(n) + int(NOW) - n).astype(np.uint32)
    chosen = Capacity(n, n - 2000, policy, samples=16).select(dataclasses.replace(meta, total=n + 1), NOW)
    assert chosen.sum() == 2001
    rank = np.argsort(np.argsort(getattr(meta, field)))         # 0 = worst
    assert (rank[chosen] < n * 0.3).mean() > 0.9


def test_sample_worst_returns_distinct_rows_even_when_asked_for_all():
    key = np.arange(100)
    rng = np.random.default_rng(0)
    for k in (1, 50, 100, 150):
        picked = sample_worst(key, k, 8, rng)
        assert len(picked) == len(np.unique(picked)) == min(k, 100)


def test_build_rules_switches_on_exactly_the_configured_rules():
    assert build_rules(EvictionConfig()) == []
    kinds = [type(r) for r in build_rules(EvictionConfig(ttl_seconds=5, min_norm=0.1, count_threshold=2,
                                                         max_rows=10))]
    assert kinds == [TTL, NormBelow, Frequency, Capacity]
    assert build_rules(EvictionConfig(max_rows=10, capacity_policy="score"))[0].reason == "score"


def test_scores_survive_the_header_encoding_to_three_digits():
    scores = np.array([0.0, 1.0, -2.5, 123.4, 1e20, 3e-9], dtype=np.float32)
    np.testing.assert_allclose(decode_scores(encode_scores(scores)), scores, rtol=4e-3)


# --- admission ----------------------------------------------------------------------------


def test_sketch_never_undercounts_and_stays_within_its_memory():
    sketch = CountMinSketch(1024)
    rng = np.random.default_rng(0)
    ids = rng.integers(-(1 << 60), 1 << 60, 3000)
    seen = rng.integers(1, 4, 3000)
    for times in (1, 2, 3):
        sketch.add(ids[seen >= times])
    assert (sketch.estimate(ids) >= seen).all()
    assert sketch.counters.nbytes == 4 * 1024 * 4


def test_sketch_halves_its_counters_after_ten_times_its_width():
    sketch = CountMinSketch(64)
    sketch.add(np.full(600, 7))
    assert sketch.estimate(np.array([7]))[0] == 600
    sketch.add(np.arange(100, 140))                         # crosses 640 sightings: every counter halves
    assert sketch.estimate(np.array([7]))[0] <= 320


def test_admission_admits_an_id_on_its_min_count_sighting():
    gate = Admission(3, 4096)
    ids = np.array([1, 2, 3])
    assert not gate.admit(ids).any()
    assert not gate.admitted(ids).any()
    assert not gate.admit(ids[:2]).any()
    np.testing.assert_array_equal(gate.admit(ids), [True, True, False])
    assert Admission(1, 4096).admit(ids).all()               # 0 and 1 switch admission off


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("ttl_seconds", -1), ("ttl_seconds", float("nan")), ("max_rows", -5), ("max_rows", 1.5),
    ("headroom", 1.0), ("capacity_policy", "mru"), ("samples", 0), ("min_norm", -0.1),
    ("min_count", -1), ("sketch_width", 8), ("decay_rate", 1.0), ("count_threshold", -1),
    ("archive_seconds", float("inf")), ("trigger_bytes", -1), ("touch_seconds", -1),
])
def test_invalid_eviction_config_is_invalid_argument_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=f"eviction.{field}"):
        EvictionConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("rows_per_second", 0), ("poll_seconds", 0), ("chunk_rows", 0)])
def test_invalid_sweeper_config_is_invalid_argument_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=f"sweeper.{field}"):
        SweeperConfig(**{field: value})


def test_eviction_config_round_trips_through_plain_data():
    config = TableConfig("t", 4, eviction=EvictionConfig(ttl_seconds=60, max_rows=1000, capacity_policy="lfu"))
    assert TableConfig.from_dict(config.to_dict()) == config
    with pytest.raises(InvalidArgument, match="eviction.ttl"):
        TableConfig.from_dict({"name": "t", "dim": 4, "eviction": {"ttl": 5}})


def test_row_trigger_sits_between_the_limit_and_the_target():
    config = EvictionConfig(max_rows=1000, headroom=0.1)
    assert config.target_rows == 900 and config.row_trigger == 950
    assert EvictionConfig(max_rows=1000, trigger_rows=1200).row_trigger == 1200
    assert EvictionConfig().row_trigger == 0


def test_store_eviction_and_admission_are_valid_on_a_gpu_cache():
    """The GPU tier keeps the same row headers, so its tables take every eviction rule."""
    TableConfig("t", 4, cache=CacheConfig(device="cuda"), eviction=EvictionConfig(ttl_seconds=5, min_count=2))
