"""The data directory's disk budget (`max_data_bytes`) and the row limits imports count against
(`eviction.max_rows`, `default_max_rows`): past them, calls that add rows end RESOURCE_EXHAUSTED
naming the limit and change nothing; reads, deletes and other tables keep working."""
from __future__ import annotations

import numpy as np
import pytest
from kvstore_client import KVStoreClient, NotFoundError, ResourceExhaustedError
from kvstore_client.training_stream import TrainingStream

from .conftest import free_port, scrape, value, wait_until

DIM = 64
BUDGET = 1_000_000
FILLED = 5000                 # rows of about 300 bytes: 1.5 MB, over the budget


@pytest.fixture(scope="module")
def full_server(start_server):
    server = start_server("--max-data-bytes", str(BUDGET), metrics_port=free_port())
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("full", DIM, cache={"rows": 256, "ways": 8})
        client.update("full", np.arange(FILLED), np.ones((FILLED, DIM), np.float32))
    assert wait_until(lambda: value(scrape(server), "kvstore_database_bytes") > BUDGET, 30)
    return server


@pytest.fixture(scope="module")
def client(full_server):
    with KVStoreClient(full_server.address, timeout=60) as opened:
        yield opened


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(ResourceExhaustedError) as refused:
        call(*args, **kwargs)
    return refused.value.message


def test_updates_past_the_disk_budget_are_refused_naming_it_and_change_nothing(client):
    message = _refused(client.update, "full", [FILLED + 1, 3], np.full((2, DIM), 9, np.float32))
    assert message.startswith("max_data_bytes")
    np.testing.assert_array_equal(client.lookup("full", [FILLED + 1, 3], on_miss="zeros"), [[0] * DIM, [1] * DIM])


def test_lookups_past_the_budget_serve_present_rows_and_refuse_to_create_rows(client):
    np.testing.assert_array_equal(client.lookup("full", [1, 2]), np.ones((2, DIM), np.float32))   # init_insert
    assert _refused(client.lookup, "full", [1, FILLED + 7]).startswith("max_data_bytes")
    assert not client.lookup("full", [FILLED + 7], on_miss="zeros").any()
    with pytest.raises(NotFoundError):
        client.lookup("full", [FILLED + 7], on_miss="error")          # still not stored


def test_gradient_steps_past_the_budget_run_on_present_rows_only(client):
    assert client.apply_gradients("full", [5], np.ones((1, DIM), np.float32)) == 1
    before = client.lookup("full", [6])
    assert _refused(client.apply_gradients, "full", [6, FILLED + 9], np.ones((2, DIM), np.float32)) \
        .startswith("max_data_bytes")
    np.testing.assert_array_equal(client.lookup("full", [6]), before)
    with pytest.raises(NotFoundError):
        client.lookup("full", [FILLED + 9], on_miss="error")


def test_prefetches_past_the_budget_warm_present_rows_only(client):
    assert client.prefetch("full", [7, 8]) == 2
    assert _refused(client.prefetch, "full", [7, FILLED + 11]).startswith("max_data_bytes")
    with pytest.raises(NotFoundError):
        client.lookup("full", [FILLED + 11], on_miss="error")


def test_training_steps_past_the_budget_refuse_to_create_rows_and_change_nothing(client):
    stream = TrainingStream(client)
    try:
        assert stream.send({"full": ([10], np.ones((1, DIM), np.float32))}, {"full": [10]}).result()[0] == {"full": 1}
        before = client.lookup("full", [11])
        step = stream.send({"full": ([11], np.ones((1, DIM), np.float32))}, {"full": [FILLED + 13]})
        with pytest.raises(ResourceExhaustedError) as refused:
            step.result()
        assert refused.value.message.startswith("max_data_bytes")
    finally:
        stream.close()
    np.testing.assert_array_equal(client.lookup("full", [11]), before)        # the step's gradient not applied
    with pytest.raises(NotFoundError):
        client.lookup("full", [FILLED + 13], on_miss="error")


def test_imports_past_the_budget_are_refused_and_reads_and_deletes_keep_working(client):
    assert _refused(client.import_table, "full", [FILLED + 20], np.ones((1, DIM), np.float32)) \
        .startswith("max_data_bytes")
    assert _refused(client.import_table, "other", [1], np.ones((1, 4), np.float32),
                    config={"name": "other", "dim": 4}).startswith("max_data_bytes")
    assert "other" not in client.list_tables()
    assert client.delete("full", [0, 1]) == 2
    assert client.export_table("full").ids.size == FILLED - 2


def test_import_larger_than_budget_room_is_refused_before_anything_is_applied(start_server):
    server = start_server("--max-data-bytes", "200000")
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("roomy", DIM, cache={"rows": 256, "ways": 8})
        message = _refused(client.import_table, "roomy", np.arange(1000), np.ones((1000, DIM), np.float32))
        assert message.startswith("max_data_bytes") and "import" in message
        assert client.export_table("roomy").ids.size == 0
        assert client.import_table("roomy", np.arange(100), np.ones((100, DIM), np.float32)) == 100


@pytest.fixture(scope="module")
def rows_server(start_server):
    server = start_server("--default-max-rows", "100", "--max-tables", "3")
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("defaulted", 4)
        client.create_table("own", 4, eviction={"max_rows": 500})
    return server


def test_tables_without_max_rows_get_the_server_default(rows_server):
    with KVStoreClient(rows_server.address, timeout=60) as client:
        assert client.describe_table("defaulted")["eviction"]["max_rows"] == 100
        assert client.describe_table("own")["eviction"]["max_rows"] == 500


def test_an_import_over_the_tables_max_rows_is_refused_before_anything_is_applied(rows_server):
    with KVStoreClient(rows_server.address, timeout=60) as client:
        message = _refused(client.import_table, "defaulted", np.arange(150), np.ones((150, 4), np.float32))
        assert message.startswith("eviction.max_rows")
        assert client.export_table("defaulted").ids.size == 0
        assert client.import_table("defaulted", np.arange(80), np.ones((80, 4), np.float32)) == 80


def test_an_import_creating_a_table_gets_the_default_and_counts_against_max_tables(rows_server):
    with KVStoreClient(rows_server.address, timeout=60) as client:
        config = {"name": "imported", "dim": 4}
        assert _refused(client.import_table, "imported", np.arange(150), np.ones((150, 4), np.float32),
                        config=config).startswith("eviction.max_rows")
        assert "imported" not in client.list_tables()
        assert client.import_table("imported", np.arange(50), np.ones((50, 4), np.float32), config=config) == 50
        assert client.describe_table("imported")["eviction"]["max_rows"] == 100
        assert _refused(client.import_table, "fourth", [1], np.ones((1, 4), np.float32),
                        config={"name": "fourth", "dim": 4}).startswith("max_tables")
        assert sorted(client.list_tables()) == ["defaulted", "imported", "own"]
