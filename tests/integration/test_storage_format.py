"""docs/storage-format.md is exact: a real server's snapshot, read with rocksdict, NumPy and that
page alone (its recipe runs as written), gives back the rows, state and headers that were written."""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "storage-format.md"


def doc_recipe() -> str:
    (code,) = re.findall(r"## Reading a snapshot with rocksdict alone\n\n```python\n(.*?)\n```", DOC.read_text(),
                         re.S)
    assert "import kvstore" not in code and "from kvstore" not in code
    return code


def run_recipe(snapshot_db: Path, table: str) -> dict:
    code = doc_recipe().replace('"kvstore-data/snapshots/nightly/db"', repr(str(snapshot_db)))
    code = code.replace('configs["items"]', f"configs[{table!r}]").replace(
        'db.get(b"family/items", b"items")', f"db.get({f'family/{table}'.encode()!r}, {table.encode()!r})")
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    return scope


@pytest.fixture(scope="module")
def snapshot(start_server):
    """A fresh server with two tables written, snapshotted; (snapshot db path, what was written, time window)."""
    from kvstore_client import KVStoreClient

    server = start_server()
    rng = np.random.default_rng(7)
    ids = np.array([5, -3, 1 << 40, -(1 << 62), 0, 17], np.int64)
    written = {"ids": ids, "weights": rng.standard_normal((6, 8)).astype(np.float32),
               "state": rng.random((6, 1)).astype(np.float32),
               "bf16_weights": rng.standard_normal((6, 4)).astype(ml_dtypes.bfloat16),
               "adam_state": rng.random((6, 8)).astype(np.float32)}
    before = math.floor(time.time())
    with KVStoreClient(server.address) as client:
        client.create_table("items", 8, optimizer={"name": "rowwise_adagrad", "lr": 0.05})
        client.update("items", ids, written["weights"], written["state"])
        client.create_table("half", 4, dtype="bfloat16", optimizer={"name": "adam"})
        client.update("half", ids, written["bf16_weights"], written["adam_state"])
        client.create_snapshot("nightly")
    after = math.ceil(time.time())
    return server.data_dir / "snapshots" / "nightly", written, (before, after)


def test_the_documented_recipe_reads_rows_state_and_headers(snapshot):
    path, written, (before, after) = snapshot
    read = run_recipe(path / "db", "items")
    order = np.argsort(written["ids"])
    assert read["ids"].tolist() == sorted(written["ids"].tolist())         # key order is numeric order
    assert read["weights"].tobytes() == written["weights"][order].tobytes()
    assert read["state"].tobytes() == written["state"][order].tobytes()
    header = read["header"]
    assert (header["version"] == 1).all() and (header["flags"] == 0).all() and (header["score"] == 0).all()
    assert ((before <= header["last_access"]) & (header["last_access"] <= after)).all()
    assert read["configs"]["items"]["optimizer"]["name"] == "rowwise_adagrad"
    assert "default" in read["families"]                                  # one family per table incarnation
    assert {f.split("@")[0] for f in read["families"] if "@" in f} >= {"items", "half"}
    assert read["family"] in read["families"] and read["family"].startswith("items@")


def test_bfloat16_weights_and_adam_state_follow_the_documented_layout(snapshot):
    path, written, _ = snapshot
    read = run_recipe(path / "db", "half")       # the recipe's layout variables for this table
    assert (read["dim"], read["itemsize"], read["state_dim"]) == (4, 2, 8)
    assert (read["state_offset"], read["row_bytes"]) == (32, 64)
    rows = read["rows"]
    bits = rows[:, 16:16 + 4 * 2].copy().view("<u2")
    widened = (bits.astype("<u4") << 16).view("<f4")                  # the page's bfloat16 rule
    order = np.argsort(written["ids"])
    assert widened.tobytes() == written["bf16_weights"][order].astype(np.float32).tobytes()
    state = rows[:, 32:32 + 8 * 4].copy().view("<f4")
    assert state.tobytes() == written["adam_state"][order].tobytes()      # first moment, then second
    assert (rows[:, 24:32] == 0).all()                                    # weights padded to 16 bytes


def test_snapshot_manifest_and_data_directory_are_as_documented(snapshot):
    path, written, (before, after) = snapshot
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["name"] == "nightly"
    assert before <= manifest["created_at"] <= after
    assert set(manifest["tables"]) == {"items", "half"} and manifest["tables"]["half"]["dtype"] == "bfloat16"
    assert {"rows", "pause_seconds", "duration_seconds"} <= set(manifest)
    data_dir = path.parent.parent
    live = (data_dir / "LIVE").read_text().strip() if (data_dir / "LIVE").exists() else "db"
    assert (data_dir / live / "CURRENT").is_file()
