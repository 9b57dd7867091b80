"""Tables in a store: lifecycle, persisted configs, validation of configs."""
from __future__ import annotations

import pytest

from kvstore import (
    CacheConfig,
    InitializerConfig,
    InvalidArgument,
    OptimizerConfig,
    RowNotFound,
    Store,
    StoreClosed,
    TableConfig,
    TableExists,
    TableNotFound,
)

from .conftest import table_config


def test_create_describe_list_and_drop(store):
    config = table_config("users", dim=16)
    assert store.create_table(config) == config
    store.create_table(table_config("items"))
    assert store.describe_table("users") == config
    assert store.list_tables() == ["items", "users"]
    store.drop_table("users")
    assert store.list_tables() == ["items"]
    with pytest.raises(TableNotFound, match="users"):
        store.describe_table("users")
    with pytest.raises(TableNotFound):
        store.lookup("users", [1])


def test_creating_an_existing_table_is_table_exists_and_keeps_the_original(store):
    store.create_table(table_config(dim=8))
    with pytest.raises(TableExists, match="name"):
        store.create_table(table_config(dim=4))
    assert store.describe_table("t").dim == 8


def test_drop_removes_the_rows(store):
    store.create_table(table_config())
    store.update("t", [1], [[1.0] * 8])
    store.flush()
    store.drop_table("t")
    store.create_table(table_config())
    with pytest.raises(RowNotFound):
        store.lookup("t", [1], on_miss="error")


def test_configs_persist_across_reopen(data_dir):
    config = TableConfig(
        name="emb", dim=12, dtype="bfloat16",
        optimizer=OptimizerConfig(name="adam", lr=0.5, beta1=0.8),
        initializer=InitializerConfig(kind="normal", scale=0.2, seed=7),
        cache=CacheConfig(rows=96, ways=8, policy="lfu", write="write_through"),
        allow_nonfinite=True,
    )
    with Store(data_dir) as store:
        store.create_table(config)
        store.create_table(table_config("dropped"))
        store.drop_table("dropped")
    with Store(data_dir) as store:
        assert store.list_tables() == ["emb"]
        assert store.describe_table("emb") == config


def test_closed_store_refuses_calls(data_dir):
    store = Store(data_dir)
    store.create_table(table_config())
    store.close()
    store.close()                                    # idempotent
    with pytest.raises(StoreClosed):
        store.lookup("t", [1])


@pytest.mark.parametrize(("build", "field"), [
    (lambda: TableConfig(name="t", dim=0), "dim"),
    (lambda: TableConfig(name="t", dim=10**7), "dim"),
    (lambda: TableConfig(name="t", dim=True), "dim"),
    (lambda: TableConfig(name="t", dim=4, dtype="int8"), "dtype"),
    (lambda: TableConfig(name="../x", dim=4), "name"),
    (lambda: TableConfig(name="", dim=4), "name"),
    (lambda: TableConfig(name="t", dim=4, optimizer=OptimizerConfig(name="lion")), "optimizer.name"),
    (lambda: OptimizerConfig(lr=-1.0), "optimizer.lr"),
    (lambda: OptimizerConfig(beta2=1.0), "optimizer.beta2"),
    (lambda: InitializerConfig(kind="xavier"), "initializer.kind"),
    (lambda: CacheConfig(rows=100, ways=32), "cache.rows"),
    (lambda: CacheConfig(ways=0), "cache.ways"),
    (lambda: CacheConfig(policy="fifo"), "cache.policy"),
    (lambda: TableConfig.from_dict({"name": "t", "dim": 4, "colour": "red"}), "colour"),
    (lambda: TableConfig.from_dict({"name": "t", "dim": 4, "cache": {"size": 8}}), "cache.size"),
    (lambda: TableConfig.from_dict({"name": "t"}), "dim"),
])
def test_invalid_config_raises_invalid_argument_naming_the_field(build, field):
    with pytest.raises(InvalidArgument) as caught:
        build()
    assert field in str(caught.value)


def test_from_dict_round_trips_to_dict():
    config = table_config(dim=5, policy="lfu", optimizer=OptimizerConfig(name="adagrad"))
    assert TableConfig.from_dict(config.to_dict()) == config


def test_invalid_table_name_in_a_call_is_invalid_argument(store):
    with pytest.raises(InvalidArgument, match="table"):
        store.lookup("../x", [1])
