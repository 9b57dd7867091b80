"""The benchmark harness runs every suite and its comparators agree: `python -m bench run all --quick`.

Checks that each suite runs, records kvstore beside a limit (and Redis where it is installed),
and that a comparator returning other rows stops the run. Never checks timings.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import LIMIT, SUBJECT, Disagreement, Side, check_agreement, interleave  # noqa: E402
from bench.services import redis_missing  # noqa: E402
from bench.suites import SUITES  # noqa: E402

QUICK_TIMEOUT = 300      # generous for a loaded machine; an idle 2-core run takes well under a minute


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run([sys.executable, "-m", "bench", "run", "all", "--quick", "--out", str(out),
                           "--scratch", str(tmp_path_factory.mktemp("bench-scratch"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=QUICK_TIMEOUT)
    lines = {}
    for path in out.glob("*.jsonl"):
        lines[path.name.split("-", 1)[0]] = [json.loads(line) for line in path.read_text().splitlines()]
    return done, lines, out


def test_quick_run_of_every_suite_succeeds(quick_run):
    done, lines, _ = quick_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(lines) == sorted(SUITES)
    assert "| suite | case | kvstore | limits | peer |" in done.stdout


def test_every_suite_records_kvstore_beside_a_limit_with_the_machine_and_load(quick_run):
    _, lines, _ = quick_run
    for suite, records in lines.items():
        env = records[0]
        assert env["type"] == "env" and env["cores"] >= 1 and len(env["load_avg"]) == 3, suite
        results = [r for r in records if r["type"] == "result"]
        roles = {r["role"] for r in results}
        assert SUBJECT in roles, suite
        if suite != "mixed":                        # mixed compares with Redis only
            assert LIMIT in roles, suite
        assert all(r["value"] > 0 for r in results), suite
        assert all(r["ratio"] is None or r["ratio"] > 0 for r in results), suite


def test_redis_is_compared_when_installed_and_skipped_with_a_line_when_not(quick_run):
    done, lines, _ = quick_run
    missing = redis_missing()
    for suite, records in lines.items():
        peers = [r for r in records if r["type"] == "result" and r["role"] == "peer"]
        skipped = [r for r in records if r["type"] == "note" and "Redis peer skipped" in r["text"]]
        if missing is None:
            assert peers and not skipped, suite
        else:
            assert skipped and not peers, suite
    if missing is not None:
        assert "Redis peer skipped" in done.stdout


def test_lookup_scaling_and_memory_are_recorded(quick_run):
    _, lines, _ = quick_run
    lookup = lines["lookup"]
    notes = [r["text"] for r in lookup if r["type"] == "note"]
    assert any(text.startswith("scaling, cache all") for text in notes)
    sizes = {r["case"]["rows"] for r in lookup if r["type"] == "result" and r["case"].get("path") == "in-process"}
    assert len(sizes) == 2
    assert any(r["type"] == "result" and r["case"].get("part") == "memory" and r["unit"] == "bytes/row"
               for r in lookup)


def test_plot_draws_every_figure_from_the_results(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, out = quick_run
    subprocess.run([sys.executable, "-m", "bench", "plot", "--in", str(out), "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == ["lookup-batch.png", "lookup-table-size.png", "memory-per-row.png", "mixed-latency-cdf.png"]


def test_a_comparator_returning_other_rows_stops_the_comparison():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    sides = [Side("kvstore", SUBJECT, lambda ids: rows[ids]), Side("wrong", LIMIT, lambda ids: rows[ids] + 1)]
    with pytest.raises(Disagreement, match="wrong"):
        check_agreement(sides, np.array([0, 2]), rows[[0, 2]])


def test_a_transport_ceiling_is_held_to_the_same_bytes_not_values():
    rows = np.ones((2, 3), np.float32)
    check_agreement([Side("echo", LIMIT, lambda ids: np.zeros((2, 3), np.float32), check="shape")], [0, 1], rows)
    with pytest.raises(Disagreement):
        check_agreement([Side("echo", LIMIT, lambda ids: np.zeros((2, 2), np.float32), check="shape")], [0, 1], rows)


def test_sides_alternate_order_between_repetitions():
    calls = []
    sides = [Side(name, SUBJECT, lambda batch, name=name: calls.append(name)) for name in ("a", "b")]
    interleave(sides, [[1]], reps=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]


def _documented_scripts() -> list[str]:
    """Bench scripts whose docstring tells users to run them as `python bench/NAME.py`."""
    return sorted(path.stem for path in (ROOT / "bench").glob("*.py")
                  if f"python bench/{path.name}" in path.read_text())


# Each script's top level run as `python bench/NAME.py` runs it (sys.path[0] is bench/, the repository
# root is not on the path), in one process: `bench` is forgotten between scripts, so a script that
# imports it without putting the root on the path first fails here as it fails for a user.
_IMPORT_AS_SCRIPTS = """
import runpy, sys
folder, optional, failures = sys.argv[1], set(sys.argv[2].split(",")), []
sys.path[0] = folder
path = list(sys.path)
for script in sys.argv[3:]:
    for name in [name for name in sys.modules if name.split(".")[0] in ("bench", "grpc_bench")]:
        del sys.modules[name]
    sys.path[:] = path
    try:
        runpy.run_path(f"{folder}/{script}.py", run_name="imported_as_a_script")
    except ModuleNotFoundError as exc:
        if exc.name.split(".")[0] not in optional:
            failures.append(f"{script}: {exc!r}")
    except Exception as exc:
        failures.append(f"{script}: {exc!r}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_bench_script_starts_as_its_docstring_says_from_any_folder(tmp_path):
    scripts = _documented_scripts()
    assert len(scripts) > 10 and "same_host_bench" in scripts
    done = subprocess.run([sys.executable, "-c", _IMPORT_AS_SCRIPTS, str(ROOT / "bench"), "cupy,redis,torch,matplotlib",
                           *scripts], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
