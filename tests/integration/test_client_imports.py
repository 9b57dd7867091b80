"""The thin client installs and imports without the store or its heavy dependencies."""
from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ["kvstore", "kvstore_server", "rocksdict", "cupy", "torch", "prometheus_client"]


def test_importing_the_client_loads_no_store_no_rocksdict_no_cupy_no_torch():
    code = (
        "import json, sys\n"
        "import kvstore_client\n"
        "client = kvstore_client.KVStoreClient('127.0.0.1:1')\n"
        "client.close()\n"
        f"print(json.dumps(sorted(m for m in {FORBIDDEN!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
