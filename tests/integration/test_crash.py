"""kill -9 at random moments during acknowledged writes, restart, verify: every mode keeps its
promise (see crash.py) and no row is ever torn. `bench/crash_cycles.py` runs the same for longer."""
from __future__ import annotations

import pytest

from .crash import MODES, run_cycles

CYCLES = 6


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kill_9_keeps_every_acknowledged_write_as_its_mode_promises(start_server, tmp_path, mode):
    data_dir = tmp_path / "data"
    tally = run_cycles(lambda flags: start_server(*flags, data_dir=data_dir), mode, CYCLES, run_seconds=(0.05, 0.3))
    assert tally.cycles == CYCLES
    assert tally.verified > 0
    assert (tally.lost, tally.torn) == (0, 0), "\n".join(tally.problems[:10])
