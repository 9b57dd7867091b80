"""The server's event loop (`event_loop`): uvloop when installed, asyncio's own on request."""
from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
from kvstore_client import KVStoreClient
from kvstore_server.config import ServerConfig
from kvstore_server.event_loop import run_event_loop

from kvstore.errors import FailedPrecondition, InvalidArgument

uvloop = pytest.importorskip("uvloop")


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize("choice, module", [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_server_coroutine_runs_on_the_loop_the_config_names(choice, module):
    assert run_event_loop(_loop_module(), choice).split(".")[0] == module


def test_insisting_on_uvloop_without_it_installed_is_failed_precondition(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)           # import uvloop now raises ImportError
    with pytest.raises(FailedPrecondition, match="event_loop"):
        run_event_loop(_loop_module(), "uvloop")
    assert run_event_loop(_loop_module(), "auto").split(".")[0] == "asyncio"


def test_an_unknown_event_loop_is_invalid_argument_naming_the_key():
    with pytest.raises(InvalidArgument, match="event_loop"):
        ServerConfig(event_loop="trio")


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_a_server_on_either_loop_serves_lookups_and_stops_cleanly(start_server, choice):
    server = start_server("--event-loop", choice)
    with KVStoreClient(server.address) as client:
        client.create_table("loop", 4)
        client.update("loop", [1, 2], np.ones((2, 4), np.float32))
        np.testing.assert_array_equal(client.lookup("loop", [2, 1, 2], on_miss="error"), np.ones((3, 4)))
