"""Figures -> text: the console table, docs/benchmarks.md and its plot.

docs/benchmarks.md has hand-written sections (method, profile notes) and
one generated section between GENERATED_BEGIN and GENERATED_END; a new run
replaces only that section, so notes written by hand survive.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.loadgen import LoadResult
from bench.memory import GrowthResult, IdleResult
from bench.memtable_bench import SLICE_OPS, OpResult

GENERATED_BEGIN = "<!-- bench:generated:begin (written by python -m bench.run) -->"
GENERATED_END = "<!-- bench:generated:end -->"

# Goals of the issue, checked in the report (never in tests).
GOAL_THROUGHPUT_RATIO = 5.0
GOAL_THROUGHPUT_CONNECTIONS = (20, 100)
GOAL_P99_FRACTION = 0.1
GOAL_P99_CONNECTIONS = 100
GOAL_MEMTABLE_SLOWDOWN = 0.15
GOAL_MANY_CONNECTIONS = 1000
# "Bounded memory": anonymous RSS growth over the second half of the run.
GOAL_GROWTH_KIB = 10 * 1024
# DNS on (warm cache) costs at most this share of policyd's throughput.
GOAL_DNS_COST = 0.10
GOAL_DNS_CONNECTIONS = (20, 100)


@dataclass
class Point:
    server: str
    result: LoadResult
    rss_kib: int


@dataclass
class Report:
    command: str
    quick: bool
    duration: float
    machine: dict[str, str]
    points: list[Point] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    memtable: list[OpResult] = field(default_factory=list)
    idle: list[IdleResult] = field(default_factory=list)
    growth: GrowthResult | None = None
    started: str = ""

    def point(self, server: str, mix: str, connections: int) -> LoadResult | None:
        for p in self.points:
            if (p.server, p.result.mix, p.result.connections) == (server, mix, connections):
                return p.result
        return None

    def mixes(self) -> list[str]:
        return list(dict.fromkeys(p.result.mix for p in self.points))

    def connections(self) -> list[int]:
        return sorted({p.result.connections for p in self.points})

    def servers(self) -> list[str]:
        return list(dict.fromkeys(p.server for p in self.points))


# --- machine ----------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    if not shutil.which(argv[0]) and not os.path.exists(argv[0]):
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                    break
    except OSError:
        pass
    return {
        "CPU": cpu,
        "Cores": str(os.cpu_count() or "unknown"),
        "Memory": mem,
        "Python": platform.python_version(),
        "Kernel": f"{platform.system()} {platform.release()}",
        "postgrey": _first_line(["/usr/sbin/postgrey", "--version"]),
        "memcached": _first_line(["memcached", "-V"]),
        "Postfix (postmap)": _first_line(["postconf", "-d", "-h", "mail_version"]),
        # Other processes on the machine skew every figure: shown, not hidden.
        "Load average at start": load_average(),
    }


# --- figures ------------------------------------------------------------------


def _errors(r: LoadResult) -> str:
    if not r.errors:
        return "0"
    return f"{r.error_count} (" + ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) + ")"


def ratio(report: Report, mix: str, connections: int) -> tuple[float, float] | None:
    """(policyd req/s / postgrey req/s, policyd p99 / postgrey p99)."""
    return _ratio(report, mix, connections, "policyd", "postgrey")


def dns_ratio(report: Report, mix: str, connections: int) -> tuple[float, float] | None:
    """(policyd-dns req/s / policyd req/s, policyd-dns p99 / policyd p99)."""
    return _ratio(report, mix, connections, "policyd-dns", "policyd")


def _ratio(report: Report, mix: str, connections: int, server: str,
           base: str) -> tuple[float, float] | None:
    """(server's req/s / base's, server's p99 / base's); None without both."""
    ours = report.point(server, mix, connections)
    theirs = report.point(base, mix, connections)
    if ours is None or theirs is None or theirs.rps <= 0 or theirs.p99_ms <= 0:
        return None
    return ours.rps / theirs.rps, ours.p99_ms / theirs.p99_ms


def console_line(server: str, r: LoadResult, rss_kib: int) -> str:
    return (f"{server:11} {r.mix:6} {r.connections:5} conn  {r.rps:9.0f} req/s  "
            f"p50 {r.p50_ms:8.2f}  p99 {r.p99_ms:8.2f}  max {r.max_ms:8.1f} ms  "
            f"errors {_errors(r)}  rss {rss_kib / 1024:.1f} MiB")


def load_table(report: Report, mix: str) -> list[str]:
    rows = ["| connections | server | req/s | p50 ms | p99 ms | max ms | errors | "
            "policyd/postgrey req/s | policyd/postgrey p99 |",
            "|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for c in report.connections():
        for server in report.servers():
            r = report.point(server, mix, c)
            if r is None:
                continue
            q = ratio(report, mix, c) if server == "policyd" else None
            rr = f"{q[0]:.2f}x" if q else ""
            pr = f"{q[1]:.3f}" if q else ""
            rows.append(f"| {c} | {server} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                        f"{r.max_ms:.1f} | {_errors(r)} | {rr} | {pr} |")
    return rows


def goals(report: Report) -> list[tuple[str, bool | None, str]]:
    """(goal, met (None: not measured), figures)."""
    out: list[tuple[str, bool | None, str]] = []
    for c in GOAL_THROUGHPUT_CONNECTIONS:
        qs = {m: ratio(report, m, c) for m in report.mixes()}
        got = {m: q for m, q in qs.items() if q}
        met = all(q[0] >= GOAL_THROUGHPUT_RATIO for q in got.values()) if got else None
        out.append((f"policyd >= {GOAL_THROUGHPUT_RATIO:g}x postgrey req/s at {c} connections",
                    met, ", ".join(f"{m} {q[0]:.2f}x" for m, q in got.items()) or "not measured"))
    qs = {m: ratio(report, m, GOAL_P99_CONNECTIONS) for m in report.mixes()}
    got = {m: q for m, q in qs.items() if q}
    out.append((f"policyd p99 <= {GOAL_P99_FRACTION:g} x postgrey p99 at "
                f"{GOAL_P99_CONNECTIONS} connections",
                all(q[1] <= GOAL_P99_FRACTION for q in got.values()) if got else None,
                ", ".join(f"{m} {q[1]:.3f}" for m, q in got.items()) or "not measured"))
    dns = {(m, c): q for m in report.mixes() for c in GOAL_DNS_CONNECTIONS
           if m == "pool" and (q := dns_ratio(report, m, c))}
    out.append((f"DNS on (warm cache) costs <= {GOAL_DNS_COST:.0%} of policyd's req/s at "
                + " and ".join(map(str, GOAL_DNS_CONNECTIONS)) + " connections (pool mix)",
                all(q[0] >= 1 - GOAL_DNS_COST for q in dns.values()) if dns else None,
                ", ".join(f"{c} conn {q[0]:.2f}x" for (_, c), q in dns.items())
                or "not measured"))
    raw = {r.operation: r.per_second for r in report.memtable if r.client == "pymemcache (raw)"}
    for op in ("lookup", "update"):
        mt = next((r.per_second for r in report.memtable
                   if r.client == "memtable" and r.operation == op), None)
        if mt is None or not raw.get(op):
            out.append((f"memtable {op} within 15% of raw pymemcache", None, "not measured"))
            continue
        share = mt / raw[op]
        out.append((f"memtable single {op}s within {GOAL_MEMTABLE_SLOWDOWN:.0%} of raw pymemcache",
                    share >= 1 - GOAL_MEMTABLE_SLOWDOWN,
                    f"{mt:,.0f}/s vs {raw[op]:,.0f}/s ({share:.0%})"))
    many = [r for p in report.points if p.server == "policyd"
            for r in [p.result] if r.connections == GOAL_MANY_CONNECTIONS]
    idle = next((i for i in report.idle if i.server == "policyd"), None)
    if many or idle or report.growth:
        errs = sum(r.error_count for r in many) + (idle.errors if idle else 0) + \
            (report.growth.errors if report.growth else 0)
        growth = report.growth.second_half_growth_kib if report.growth else None
        bounded = growth is not None and growth <= GOAL_GROWTH_KIB
        figures = [f"errors {errs}"]
        if idle:
            figures.append(f"RSS with {idle.connections} idle connections "
                           f"{idle.rss_idle_kib / 1024:.1f} MiB")
        if growth is not None and report.growth:
            figures.append(f"anonymous RSS growth over the second half of "
                           f"{report.growth.requests:,} requests {growth / 1024:+.1f} MiB")
        out.append((f"{GOAL_MANY_CONNECTIONS:,} connections: no errors, bounded memory "
                    f"(second-half growth <= {GOAL_GROWTH_KIB // 1024} MiB)",
                    errs == 0 and bounded, "; ".join(figures)))
    else:
        out.append((f"{GOAL_MANY_CONNECTIONS:,} connections: no errors, bounded memory", None,
                    "policyd not measured"))
    return out


# --- plot -------------------------------------------------------------------------

_COLOURS = {"policyd": "tab:blue", "postgrey": "tab:red", "null": "tab:gray",
            "policyd-dns": "tab:purple"}
_STYLES = {"mixed": "-", "new": "--", "hot": ":", "pool": "-."}
# Line styles alone are hard to tell apart at this size: a marker per mix too.
_MARKERS = {"mixed": "o", "new": "s", "hot": "^"}


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in report.servers():
        for mix in report.mixes():
            pts = [(c, r) for c in report.connections()
                   for r in [report.point(server, mix, c)] if r is not None]
            if not pts:
                continue
            xs = [c for c, _ in pts]
            label = f"{server} ({mix})" if server != "null" else f"do-nothing ({mix})"
            kw = {"color": _COLOURS.get(server, "tab:green"), "linestyle": _STYLES.get(mix, "-"),
                  "marker": _MARKERS.get(mix, "o"), "markersize": 4, "label": label}
            ax1.plot(xs, [r.rps for _, r in pts], **kw)
            ax2.plot(xs, [max(r.p99_ms, 0.001) for _, r in pts], **kw)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("connections")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("requests/s")
    ax1.set_title("Throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 latency")
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- markdown ---------------------------------------------------------------------


def generated_section(report: Report, png_name: str | None) -> str:
    lines = [GENERATED_BEGIN, "", f"## Results ({'quick run' if report.quick else 'full run'})",
             "", f"Run {report.started}: `{report.command}`, {report.duration:g} s per point.", ""]
    lines += ["### Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report.machine.items()]
    lines.append("")
    if report.unavailable:
        lines += ["Not measured:", ""]
        lines += [f"- **{k}**: {v}" for k, v in report.unavailable.items()]
        lines.append("")
    lines += ["### Goals", "", "| goal | met | figures |", "|---|---|---|"]
    for goal, met, figures in goals(report):
        mark = "not measured" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {goal} | {mark} | {figures} |")
    lines.append("")
    if "null" in report.servers():
        lines += ["### Load generator ceiling", "",
                  "The do-nothing server (answers `action=DUNNO` at once) driven the same way: "
                  "no server can be measured faster than this on this machine.", "",
                  "| connections | " + " | ".join(report.mixes()) + " |",
                  "|---:|" + "---:|" * len(report.mixes())]
        for c in report.connections():
            cells = []
            for m in report.mixes():
                r = report.point("null", m, c)
                cells.append(f"{r.rps:,.0f}/s (p99 {r.p99_ms:.2f} ms)" if r else "")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    for mix in report.mixes():
        lines += [f"### Mix: {mix}", "", *load_table(report, mix), ""]
    acts = _actions_summary(report)
    if acts:
        lines += ["Replies seen (all points): " + acts, ""]
    if png_name:
        lines += [f"![throughput and p99 against connections]({png_name})", ""]
    if report.memtable:
        raw = {r.operation: r.per_second for r in report.memtable
               if r.client == "pymemcache (raw)"}
        lines += ["### memtable", "", f"{report.memtable[0].ops:,} keys, one operation at a "
                  f"time; the clients take turns in slices of {SLICE_OPS} keys, each figure the "
                  "median rate of its slices, with this process and memcached pinned to "
                  "different CPUs (bench/memtable_bench.py).  Commands: whole process, best "
                  "of several runs.", "",
                  "| client | operation | ops/s | vs raw pymemcache | note |",
                  "|---|---|---:|---:|---|"]
        for op in report.memtable:
            vs = f"{op.per_second / raw[op.operation]:.0%}" if raw.get(op.operation) else ""
            lines.append(f"| {op.client} | {op.operation} | {op.per_second:,.0f} | {vs} | "
                         f"{op.note} |")
        lines.append("")
    if report.idle or report.growth:
        lines += ["### Memory", ""]
    if report.idle:
        lines += ["RSS is VmRSS; \"anonymous\" is RssAnon (heap and stacks, without "
                  "mapped files such as the lmdb backups).", "",
                  "| server | idle connections | opened | errors | RSS before | RSS idle | "
                  "RSS after close | anonymous before | anonymous idle |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i in report.idle:
            lines.append(f"| {i.server} | {i.connections:,} | {i.opened:,} | {i.errors} | "
                         f"{i.rss_before_kib / 1024:.1f} MiB | {i.rss_idle_kib / 1024:.1f} MiB | "
                         f"{i.rss_after_close_kib / 1024:.1f} MiB | "
                         f"{i.anon_before_kib / 1024:.1f} MiB | "
                         f"{i.anon_idle_kib / 1024:.1f} MiB |")
        lines.append("")
    if report.growth:
        g = report.growth
        lines += [f"{g.server}: {g.requests:,} requests (100 connections, mixed), "
                  f"{g.errors} errors; RSS at start {g.rss_start_kib / 1024:.1f} MiB "
                  f"(anonymous {g.anon_start_kib / 1024:.1f} MiB), then:", "",
                  "| requests so far | RSS | anonymous RSS | req/s of the chunk |",
                  "|---:|---:|---:|---:|"]
        for (n, rss, anon), run in zip(g.points, g.runs, strict=False):
            lines.append(f"| {n:,} | {rss / 1024:.1f} MiB | {anon / 1024:.1f} MiB | "
                         f"{run.rps:,.0f} |")
        lines.append("")
    lines.append(GENERATED_END)
    return "\n".join(lines) + "\n"


def _actions_summary(report: Report) -> str:
    parts = []
    for server in report.servers():
        total: dict[str, int] = {}
        for p in report.points:
            if p.server == server:
                for k, v in p.result.actions.items():
                    total[k] = total.get(k, 0) + v
        if total:
            parts.append(f"{server}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(total.items())))
    return "; ".join(parts)


# A new file gets only a title: the method and the profile notes are written
# by hand in the project's docs/benchmarks.md, in one place.
HAND_WRITTEN_HEAD = """# Benchmarks

Written by `python -m bench.run` (`./dev bench`); the method is described
in the project's docs/benchmarks.md.

"""

def write_markdown(path: Path, section: str) -> None:
    """Replace the generated section of path (or write the whole file)."""
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(GENERATED_BEGIN) + ".*?" + re.escape(GENERATED_END) +
                             r"\n?", re.S)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: section, text, count=1))
            return
    path.write_text(HAND_WRITTEN_HEAD + section)


def summary_lines(report: Report) -> Iterable[str]:
    """Ratios and goals for the console."""
    for mix in report.mixes():
        for c in report.connections():
            q = ratio(report, mix, c)
            if q:
                yield (f"policyd/postgrey {mix:6} {c:5} conn: req/s x{q[0]:.2f}, "
                       f"p99 x{q[1]:.3f}")
            d = dns_ratio(report, mix, c)
            if d:
                yield (f"policyd-dns/policyd {mix:6} {c:5} conn: req/s x{d[0]:.2f}, "
                       f"p99 x{d[1]:.3f}")
    for goal, met, figures in goals(report):
        mark = "n/a " if met is None else ("MET " if met else "MISS")
        yield f"[{mark}] {goal}: {figures}"
