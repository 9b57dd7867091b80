"""examples/train_recsys.py against a real server: what it prints, and that it keeps existing tables
unless told to reset them."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_recsys.py"
SMALL = ("--samples", "2000", "--batch", "512", "--users", "300", "--items", "200", "--epochs", "2")


def train(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLE), "--address", server.address, *SMALL, *args],
                          capture_output=True, text=True, timeout=300)


def test_example_prints_epoch_time_and_steps_and_keeps_tables_unless_reset(start_server):
    pytest.importorskip("torch")
    server = start_server()
    first = train(server)
    assert first.returncode == 0, first.stderr
    epochs = re.findall(r"^epoch (\d): train loss [\d.]+  held-out AUC [\d.]+  [\d.]+ s, [\d.]+ steps/s$",
                        first.stdout, re.M)
    assert epochs == ["0", "1"] and "dropped" not in first.stdout
    again = train(server, "--epochs", "1")
    assert again.returncode == 0 and again.stdout.count("further (from an earlier run") == 2
    reset = train(server, "--dim", "8", "--reset")
    assert reset.returncode == 0 and reset.stdout.count("dropped table") == 2

