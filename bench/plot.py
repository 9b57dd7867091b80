"""`python -m bench plot --in DIR`: PNG plots from the JSON lines of `python -m bench run`.

Throughput against batch size and against table size per system, cost per row against batch
size, latency CDFs per method under the mixed suite, memory per row. Where several runs
measured the same case, the latest file wins.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

LINES = {"uniform": "-", "zipf": "--"}


def load_results(src: str | Path) -> tuple[list[dict], list[dict]]:
    """Result records (latest per suite, case and system) and the environments they came from."""
    latest: dict[tuple, dict] = {}
    envs = []
    for path in sorted(Path(src).glob("*.jsonl"), key=lambda p: p.name.split("-", 1)[-1]):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            if obj.get("type") == "env":
                envs.append(obj)
            elif obj.get("type") == "result":
                latest[(obj["suite"], json.dumps(obj["case"], sort_keys=True), obj["system"])] = obj
    return list(latest.values()), envs


def _figure(panels: int, title: str):
    """A figure of `panels` axes, at most three to a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols, nrows = min(panels, 3), -(-panels // 3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.6 * ncols, 7.0), 3.8 * nrows), squeeze=False)
    fig.suptitle(title, fontsize=10)
    flat = list(axes.ravel())
    for unused in flat[panels:]:
        unused.set_visible(False)
    return fig, flat[:panels]


def _color(system: str) -> str:
    """One colour per system across every plot."""
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return palette[SYSTEM_COLORS.setdefault(system, len(SYSTEM_COLORS)) % len(palette)]


SYSTEM_COLORS: dict[str, int] = {}


def _save(fig, out: Path, name: str) -> Path:
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _series(records: list[dict], x: str, keys: tuple[str, ...]) -> dict[tuple, list[tuple]]:
    lines = defaultdict(list)
    for r in records:
        lines[(r["system"], *(r["case"].get(k) for k in keys))].append((r["case"][x], r["value"]))
    return {k: sorted(v) for k, v in lines.items()}


def _short(x: float) -> str:
    """1M, 10M for table sizes; 4,096 for batches."""
    if x >= 1e6 and x % 1e6 == 0:
        return f"{x / 1e6:g}M"
    return f"{int(x):,}"


def _lines(ax, series: dict, label, style=lambda key: "-", marker=lambda key: "o") -> None:
    from matplotlib.ticker import NullFormatter

    xs = set()
    for key, points in sorted(series.items(), key=lambda kv: str(kv[0])):
        ax.plot(*zip(*points, strict=True), style(key), marker=marker(key), ms=4, label=label(key),
                color=_color(key[0]))
        xs.update(x for x, _ in points)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(xs), [_short(x) for x in sorted(xs)])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def plot_batches(records: list[dict], out: Path, stamp: str) -> Path | None:
    panels = [(p, c) for p, c in (("in-process", "all"), ("in-process", "95%"), ("in-process", "cold"),
                                  ("service", "all"), ("service", "cold"))
              if any(r["case"].get("path") == p and r["case"].get("cache") == c for r in records)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), f"lookup: throughput against batch size ({stamp})")
    for ax, (path, cache) in zip(axes, panels, strict=True):
        chosen = [r for r in records if r["case"].get("part") in ("matrix", "service")
                  and r["case"]["path"] == path and r["case"]["cache"] == cache]
        _lines(ax, _series(chosen, "batch", ("dist",)), lambda k: f"{k[0]}, {k[1]}", lambda k: LINES.get(k[1], "-"))
        ax.set_title(f"{path}, cache {cache}", fontsize=9)
        ax.set_xlabel("batch (ids)")
        ax.set_ylabel("rows/s")
    return _save(fig, out, "lookup-batch.png")


def plot_sizes(records: list[dict], out: Path, stamp: str) -> Path | None:
    dims = {r["case"]["dim"] for r in records if r["case"].get("part") == "sizes"}
    chosen = [r for r in records if r["suite"] == "lookup" and r["case"].get("path") == "in-process"
              and r["case"]["dim"] in dims]      # the first size's cases may carry the matrix's part name
    batches = {r["case"]["batch"] for r in chosen if r["case"]["cache"] == "cold"}
    if not chosen or not batches:
        return None
    batch = max(batches)
    fig, axes = _figure(2, f"lookup: throughput against table size, batch {batch:,} ({stamp})")
    at_batch = [r for r in chosen if r["case"]["batch"] == batch]
    _lines(axes[0], _series(at_batch, "rows", ("cache", "dist")), lambda k: f"{k[0]}, cache {k[1]}, {k[2]}",
           lambda k: LINES.get(k[2], "-"), lambda k: "o" if k[1] == "all" else "x")
    axes[0].set_xlabel("table rows")
    axes[0].set_ylabel("rows/s")
    cost = [{**r, "value": 1e9 / r["value"]} for r in chosen if r["role"] == "subject"
            and r["case"]["cache"] == "all" and r["case"]["dist"] == "uniform"]
    _lines(axes[1], _series(cost, "batch", ("rows",)), lambda k: f"{k[0]}, {k[1]:,} rows",
           lambda k: "-" if k[1] == min(r["case"]["rows"] for r in cost) else "--")
    axes[1].set_title("kvstore cost per row, cached, uniform", fontsize=9)
    axes[1].set_xlabel("batch (ids)")
    axes[1].set_ylabel("ns per row")
    return _save(fig, out, "lookup-table-size.png")


def plot_latency_cdf(records: list[dict], out: Path, stamp: str) -> Path | None:
    chosen = [r for r in records if r["suite"] == "mixed" and r["latency_ms"].get("cdf")]
    if not chosen:
        return None
    fig, axes = _figure(1, f"mixed: latency per call ({stamp})")
    ax = axes[0]
    for r in sorted(chosen, key=lambda r: (r["case"]["method"], r["system"])):
        cdf = r["latency_ms"]["cdf"]
        ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))],
                "-" if r["case"]["method"] == "lookup" else "--", color=_color(r["system"]),
                label=f"{r['system']}, {r['case']['method']} ({r['case']['clients']} clients, batch "
                      f"{r['case']['batch']:,})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of calls")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, out, "mixed-latency-cdf.png")


def plot_memory(records: list[dict], out: Path, stamp: str) -> Path | None:
    chosen = [r for r in records if r["case"].get("part") == "memory"]
    if not chosen:
        return None
    fills = sorted({r["case"]["fill"] for r in chosen})
    systems = sorted({r["system"] for r in chosen})
    fig, axes = _figure(1, f"memory per cached row, dim {chosen[0]['case']['dim']} float32 ({stamp})")
    ax = axes[0]
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        values = [next((r["value"] for r in chosen if r["system"] == system and r["case"]["fill"] == f), 0)
                  for f in fills]
        ax.bar([j + i * width for j in range(len(fills))], values, width, label=system, color=_color(system))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fills))], [f"cache {f:.0%} full" for f in fills])
    ax.set_ylabel("bytes per row")
    ax.legend(fontsize=7)
    return _save(fig, out, "memory-per-row.png")


def plot_all(src: str, out: str) -> int:
    records, envs = load_results(src)
    if not records:
        print(f"no results in {src}")
        return 1
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    by_suite = {env.get("suite"): env for env in envs}           # the latest run of each suite
    for plot, suite in ((plot_batches, "lookup"), (plot_sizes, "lookup"), (plot_latency_cdf, "mixed"),
                        (plot_memory, "lookup")):
        env = by_suite.get(suite, envs[-1])
        stamp = f"{env['cores']} cores, load {env['load_avg'][0]}, {env['time_utc'][:10]}"
        path = plot(records, target, stamp)
        if path:
            print(f"wrote {path}")
    return 0
