"""Symbolic links planted in the data directory that lead out of it are never followed: the server
refuses to start on such a directory (one line naming the link), and snapshot, restore and import
calls end FAILED_PRECONDITION naming it, leaving the outside untouched; the server keeps serving."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from kvstore_client import FailedPreconditionError, KVStoreClient

from .conftest import run_cli


@pytest.fixture()
def planted(start_server, tmp_path):
    """A running server with one table and one snapshot, and a directory outside its data directory."""
    server = start_server(data_dir=tmp_path / "data")
    outside = tmp_path / "outside"
    outside.mkdir()
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("rows", 4)
        client.update("rows", [1], np.ones((1, 4), np.float32))
        client.create_snapshot("real")
        yield server, client, outside


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(FailedPreconditionError) as refused:
        call(*args, **kwargs)
    return refused.value.message


def test_restoring_a_snapshot_planted_as_a_link_outside_is_refused(planted):
    server, client, outside = planted
    shutil.copytree(server.data_dir / "snapshots" / "real", outside / "evil")
    os.symlink(outside / "evil", server.data_dir / "snapshots" / "evil")
    message = _refused(client.restore_snapshot, "evil")
    assert message.startswith("data_dir") and "snapshots/evil" in message and "symbolic link" in message
    client.update("rows", [2], np.ones((1, 4), np.float32))          # still serving, on its own data
    assert client.lookup("rows", [2], on_miss="error").shape == (1, 4)


def test_a_link_inside_a_snapshot_leading_outside_is_refused(planted):
    server, client, outside = planted
    (outside / "secret").write_text("not for the server")
    os.symlink(outside / "secret", server.data_dir / "snapshots" / "real" / "planted")
    assert "snapshots/real/planted" in _refused(client.restore_snapshot, "real")
    assert "snapshots/real/planted" in _refused(client.delete_snapshot, "real")
    assert (outside / "secret").read_text() == "not for the server"


def test_a_snapshots_directory_leading_outside_is_neither_written_nor_listed(planted):
    server, client, outside = planted
    snapshots = server.data_dir / "snapshots"
    snapshots.rename(server.data_dir / "moved")
    os.symlink(outside, snapshots)
    assert _refused(client.create_snapshot, "next").startswith("data_dir")
    assert _refused(client.list_snapshots).startswith("data_dir")
    assert os.listdir(outside) == []


def test_an_import_with_its_staging_directory_leading_outside_is_refused(planted):
    server, client, outside = planted
    os.symlink(outside, server.data_dir / "staging")
    assert "staging" in _refused(client.import_table, "rows", [5], np.ones((1, 4), np.float32))
    assert os.listdir(outside) == []
    assert not client.lookup("rows", [5], on_miss="zeros").any()


def test_the_server_refuses_to_start_on_a_data_dir_with_a_link_leading_outside(tmp_path):
    data_dir, outside = tmp_path / "data", tmp_path / "outside"
    (data_dir / "snapshots").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, data_dir / "snapshots" / "elsewhere")
    result = run_cli("kvstore_server", "--data-dir", str(data_dir), "--port", "0")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "snapshots/elsewhere" in lines[0] and "symbolic link" in lines[0]


def test_a_data_dir_that_is_itself_a_link_is_served(start_server, tmp_path):
    real = tmp_path / "disk"
    real.mkdir()
    os.symlink(real, tmp_path / "data")
    server = start_server(data_dir=tmp_path / "data")
    with KVStoreClient(server.address, timeout=60) as client:
        client.create_table("linked", 4)
        client.create_snapshot("fine")
        assert [s["name"] for s in client.list_snapshots()] == ["fine"]
