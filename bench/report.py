"""Where a run's figures go: JSON lines on disk, a Markdown table on stdout, both with the machine
and load they were taken under (figures from a loaded machine are not figures from an idle one)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from .harness import LIMIT, PEER, SUBJECT, Record

PACKAGES = ("numpy", "rocksdict", "grpcio", "protobuf", "redis", "hiredis", "matplotlib", "torch")
ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment(extra: dict | None = None) -> dict:
    """Machine, cores, load and versions, recorded with every run."""
    versions = {"python": platform.python_version(), "kvstore": commit()}
    versions.update({name: v for name in PACKAGES if (v := package_version(name))})
    return {"type": "env", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": f"{cpu_model()}, {platform.machine()}", "os": platform.system(),
            "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "memory_gib": round(_memory_bytes() / 2**30, 1), "versions": versions, **(extra or {})}


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class ResultLog:
    """Appends records of one run to `<out>/<suite>-<time>.jsonl` and keeps them for the table."""

    def __init__(self, out_dir: str | Path, suite: str, env: dict):
        self.path = Path(out_dir) / f"{suite}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.records: list[Record] = []
        self.notes: list[str] = []
        self._write(env)

    def _write(self, obj: dict) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(obj) + "\n")

    def add(self, records: list[Record]) -> None:
        for record in records:
            self.records.append(record)
            self._write(record.to_json())
        print_rows(records)

    def note(self, suite: str, text: str) -> None:
        """A line that belongs with the figures (a skipped comparator, a scaling check)."""
        self._write({"type": "note", "suite": suite, "text": text})
        self.notes.append(f"[{suite}] {text}")
        print(self.notes[-1], flush=True)

    def finish(self) -> None:
        self.env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        self._write({"type": "env_end", "load_avg": self.env["load_avg_end"]})
        print()
        print(environment_line(self.env) + "\n")
        print(markdown([r.to_json() for r in self.records]))
        for note in dict.fromkeys(self.notes):       # each line once, in order
            print(note)
        print(f"\nresults: {self.path}")


def describe_case(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def format_value(value: float, unit: str) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.3g} M {unit}"
    if value >= 1e3:
        return f"{value / 1e3:.3g} k {unit}"
    return f"{value:.3g} {unit}"


def print_rows(records: list[Record]) -> None:
    for r in records:
        ratio = "" if r.ratio is None else f"  kvstore x{r.ratio:.2f}"
        print(f"  {r.suite:8} {describe_case(r.case):52} {r.system:28} {format_value(r.value, r.unit):>20}"
              f"{ratio}  {r.note}", flush=True)


def environment_line(env: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"Machine: {env['machine']}, {env['cores']} cores, {env['memory_gib']} GiB; load average "
            f"{' / '.join(map(str, env['load_avg']))} at start, "
            f"{' / '.join(map(str, env.get('load_avg_end', [])))} at end; {env['time_utc']}\n"
            f"Versions: {versions}")


def markdown(records: list[dict]) -> str:
    """One row per case: kvstore's figures, then each comparator's with kvstore's ratio to it."""
    cases: dict[tuple, list[dict]] = {}
    for r in records:
        cases.setdefault((r["suite"], json.dumps(r["case"])), []).append(r)
    lines = ["| suite | case | kvstore | limits | peer |", "| --- | --- | --- | --- | --- |"]
    for (suite, case), group in cases.items():
        cells = {role: "; ".join(_cell(r) for r in group if r["role"] == role) for role in (SUBJECT, LIMIT, PEER)}
        lines.append(f"| {suite} | {describe_case(json.loads(case))} | {cells[SUBJECT]} | {cells[LIMIT]} | "
                     f"{cells[PEER]} |")
    lines.append("")
    lines.append("(x N): kvstore's figure over the comparator's for rates, the comparator's over kvstore's for "
                 "times and bytes; above 1, kvstore is better.")
    return "\n".join(lines)


def _cell(r: dict) -> str:
    ratio = "" if r["ratio"] is None else f" (x {r['ratio']:.2f})"
    note = f", {r['note']}" if r["note"] else ""
    return f"{r['system']}: {format_value(r['value'], r['unit'])}{ratio}{note}"


def python_env(root: str | Path = ROOT) -> dict:
    """Environment for child processes that run the packages of the checkout at `root` (this one
    by default): its packages first on the path, then the path this process was given (where
    packages installed outside the environment, such as carried wheels, are found)."""
    root = Path(root).resolve()
    paths = [str(root), str(root / "protos"), str(root / "server"), str(root / "client")]
    existing = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths + ([existing] if existing else [])),
            "PYTHONUNBUFFERED": "1"}
