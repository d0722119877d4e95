"""Figures -> text: the console table, docs/benchmarks.md and its plot.

docs/benchmarks.md has hand-written sections (the method, the baseline) and
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

# The goals, checked in the report (never in tests: speed lives here).
# policyd against postgrey at the same point (policyd run as one process per
# core, the default): (connections, least req/s ratio, largest p99 ratio).
PEER_GOALS = ((1, 1.0, 1.0), (20, 3.0, 0.3), (100, 5.0, 0.25))
GOAL_MEMTABLE_SLOWDOWN = 0.15
GOAL_MANY_CONNECTIONS = 1000
# "Bounded memory": anonymous RSS growth over the second half of the run.
GOAL_GROWTH_KIB = 10 * 1024
# DNS on (warm cache) costs at most this share of policyd's throughput.
GOAL_DNS_COST = 0.10
GOAL_DNS_CONNECTIONS = (20, 100)
# policyd's own CPU per request is reported (no target) at these points.
CPU_CONNECTIONS = (1, 20, 100)
# Where policyd's time goes: policyd beside its variants without backups
# and with stores that cost nothing (bench.nostore), in this mix.
WHERE_TIME_GOES_MIX = "mixed"
VARIANTS = (("policyd-nostore", "stores that cost nothing"),
            ("policyd-nobackup", "memcached, no backups"))


@dataclass(frozen=True)
class Goal:
    """One row of the goals table."""

    goal: str
    met: bool | None  # None: not measured
    figures: str
    target: bool = True  # False: a figure reported, with nothing to meet

    @property
    def mark(self) -> str:
        if self.met is None:
            return "not measured"
        if not self.target:
            return "reported"
        return "yes" if self.met else "**no**"


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
    cpu = r.cpu_us_per_request
    return (f"{server:16} {r.mix:6} {r.connections:5} conn  {r.rps:9.0f} req/s  "
            f"p50 {r.p50_ms:8.2f}  p99 {r.p99_ms:8.2f}  max {r.max_ms:8.1f} ms  "
            f"errors {_errors(r)}  rss {rss_kib / 1024:.1f} MiB  cpu "
            + ("-" if cpu is None else f"{cpu:.0f}") + " us/req")


def load_table(report: Report, mix: str) -> list[str]:
    rows = ["| connections | server | req/s | p50 ms | p99 ms | max ms | errors | "
            "CPU per request | policyd/postgrey req/s | policyd/postgrey p99 |",
            "|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for c in report.connections():
        for server in report.servers():
            r = report.point(server, mix, c)
            if r is None:
                continue
            q = ratio(report, mix, c) if server == "policyd" else None
            rr = f"{q[0]:.2f}x" if q else ""
            pr = f"{q[1]:.2f}x" if q else ""
            cpu = r.cpu_us_per_request
            us = f"{cpu:,.0f} us" if cpu is not None else ""
            rows.append(f"| {c} | {server} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                        f"{r.max_ms:.1f} | {_errors(r)} | {us} | {rr} | {pr} |")
    return rows


def _connections(n: int) -> str:
    return f"{n:,} connection" + ("" if n == 1 else "s")


def _times(x: float) -> str:
    return f"{x:.1f}x" if x == int(x) else f"{x:g}x"  # 1.0x, 0.25x


def _figure(text: str, ok: bool) -> str:
    return text if ok else f"**{text}**"  # a miss stands out in the row


def _peer_goals(report: Report) -> list[Goal]:
    out: list[Goal] = []
    for c, least, most in PEER_GOALS:
        rps: list[tuple[str, bool]] = []
        p99: list[tuple[str, bool]] = []
        for m in report.mixes():
            ours, theirs = report.point("policyd", m, c), report.point("postgrey", m, c)
            q = ratio(report, m, c)
            if q is None or ours is None or theirs is None:
                continue
            rps.append((f"{m} {q[0]:.2f}x ({ours.rps:,.0f} vs {theirs.rps:,.0f}/s)",
                        q[0] >= least))
            variants = _variants_reached(report, m, c)
            if variants:
                rps.append((variants, True))  # for reference: no verdict, never bold
            p99.append((f"{m} {q[1]:.2f}x ({ours.p99_ms:.2f} vs {theirs.p99_ms:.2f} ms)",
                        q[1] <= most))
        worse = " (no worse)" if most == 1 else ""
        for text, got in ((f"policyd req/s >= {_times(least)} postgrey's", rps),
                          (f"policyd p99 <= {_times(most)} postgrey's{worse}", p99)):
            out.append(Goal(f"{_connections(c)}: {text}",
                            all(ok for _, ok in got) if got else None,
                            ", ".join(_figure(f, ok) for f, ok in got) or "not measured"))
    return out


def _variants_reached(report: Report, mix: str, connections: int) -> str:
    """What policyd's variants reached at the point, against postgrey
    (reference figures: the goal is policyd's)."""
    found = [f"{server} {q[0]:.2f}x" for server, _ in VARIANTS
             if (q := _ratio(report, mix, connections, server, "postgrey"))]
    return f"(for reference, {mix}: " + ", ".join(found) + ")" if found else ""


def where_time_goes(report: Report) -> list[str]:
    """policyd beside its variants, per connection count: req/s against
    postgrey's and CPU per request (empty when no variant was measured)."""
    mix = WHERE_TIME_GOES_MIX
    columns = (*VARIANTS, ("policyd", "memcached and backups"))
    measured = [(server, label) for server, label in columns
                if any(report.point(server, mix, c) for c in report.connections())]
    if len(measured) < 2:
        return []
    rows = ["| connections | postgrey | " + " | ".join(
                f"{server} ({label})" for server, label in measured) + " |",
            "|---:|---:|" + "---:|" * len(measured)]
    for c in report.connections():
        pg = report.point("postgrey", mix, c)
        cells = [f"{pg.rps:,.0f}/s" if pg else ""]
        for server, _ in measured:
            r = report.point(server, mix, c)
            if r is None:
                cells.append("")
                continue
            vs = f" ({r.rps / pg.rps:.2f}x)" if pg and pg.rps > 0 else ""
            cpu = r.cpu_us_per_request
            us = f", {cpu:,.0f} us/req" if cpu is not None else ""
            cells.append(f"{r.rps:,.0f}/s{vs}{us}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return rows


def _many_connections_goal(report: Report) -> Goal:
    goal = (f"{GOAL_MANY_CONNECTIONS:,} connections: no errors, bounded memory "
            f"(anonymous RSS growth over the second half of the request run "
            f"<= {GOAL_GROWTH_KIB // 1024} MiB)")
    figures: list[str] = []
    errs = 0
    errors_measured = False
    many = [(m, r) for m in report.mixes()
            for r in [report.point("policyd", m, GOAL_MANY_CONNECTIONS)] if r is not None]
    if many:
        errors_measured = True
        errs += sum(r.error_count for _, r in many)
        figures.append(f"errors at {GOAL_MANY_CONNECTIONS:,} connections: "
                       + ", ".join(_figure(f"{m} {_errors(r)}", not r.error_count)
                                   for m, r in many))
    idle = next((i for i in report.idle if i.server == "policyd"), None)
    if idle:
        errors_measured = errors_measured or idle.connections >= GOAL_MANY_CONNECTIONS
        errs += idle.errors
        figures.append(_figure(f"{idle.opened:,} of {idle.connections:,} idle connections "
                               f"open, {idle.errors} errors", not idle.errors)
                       + f", RSS {idle.rss_idle_kib / 1024:.1f} MiB")
    growth = report.growth
    if growth:
        grew = growth.second_half_growth_kib
        errs += growth.errors
        figures.append(_figure(f"{growth.requests:,} requests, {growth.errors} errors",
                               not growth.errors) + ", "
                       + _figure(f"anonymous RSS growth over the second half "
                                 f"{grew / 1024:+.1f} MiB", grew <= GOAL_GROWTH_KIB))
    else:
        figures.append("memory growth not measured")
    if errs:
        met: bool | None = False
    elif not errors_measured or growth is None:
        met = None  # part of the goal was not measured
    else:
        met = growth.second_half_growth_kib <= GOAL_GROWTH_KIB
    return Goal(goal, met, "; ".join(figures))


def _memtable_goals(report: Report) -> list[Goal]:
    out = []
    raw = {r.operation: r.per_second for r in report.memtable if r.client == "pymemcache (raw)"}
    for op in ("lookup", "update"):
        goal = f"memtable single {op}s within {GOAL_MEMTABLE_SLOWDOWN:.0%} of raw pymemcache"
        mt = next((r.per_second for r in report.memtable
                   if r.client == "memtable" and r.operation == op), None)
        if mt is None or not raw.get(op):
            out.append(Goal(goal, None, "not measured"))
            continue
        share = mt / raw[op]
        out.append(Goal(goal, share >= 1 - GOAL_MEMTABLE_SLOWDOWN,
                        f"{mt:,.0f}/s vs {raw[op]:,.0f}/s ({share:.0%})"))
    return out


def _dns_goal(report: Report) -> Goal:
    dns = {c: q for c in GOAL_DNS_CONNECTIONS if (q := dns_ratio(report, "pool", c))}
    return Goal(f"DNS on (warm cache) costs <= {GOAL_DNS_COST:.0%} of policyd's req/s at "
                + " and ".join(map(str, GOAL_DNS_CONNECTIONS)) + " connections (pool mix)",
                all(q[0] >= 1 - GOAL_DNS_COST for q in dns.values()) if dns else None,
                ", ".join(f"{c} conn {q[0]:.2f}x" for c, q in dns.items()) or "not measured")


def cpu_per_request(report: Report, server: str, mix: str, connections: int) -> float | None:
    """The server's CPU microseconds per request at a point (None: not measured)."""
    r = report.point(server, mix, connections)
    return r.cpu_us_per_request if r is not None else None


def _cpu_goal(report: Report) -> Goal:
    cells = []
    for m in report.mixes():
        us = [cpu_per_request(report, "policyd", m, c) for c in CPU_CONNECTIONS]
        if any(u is not None for u in us):
            cells.append(f"{m} " + " / ".join("-" if u is None else f"{u:,.0f}" for u in us)
                         + " us")
    return Goal("policyd's own CPU per request at " + ", ".join(map(str, CPU_CONNECTIONS))
                + " connections (user + system time of its processes / requests)",
                True if cells else None, ", ".join(cells) or "not measured", target=False)


def goals(report: Report) -> list[Goal]:
    """Every goal, met or not, with its figures, in the order they are listed."""
    return [*_peer_goals(report), _many_connections_goal(report), *_memtable_goals(report),
            _cpu_goal(report), _dns_goal(report)]


# --- plot -------------------------------------------------------------------------

_COLOURS = {"policyd": "tab:blue", "postgrey": "tab:red", "null": "tab:gray",
            "policyd-dns": "tab:purple", "policyd-nobackup": "tab:cyan",
            "policyd-nostore": "tab:olive"}
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
    lines += ["### Goals", "",
              "policyd against postgrey at the same point, per mix (policyd's figure vs "
              "postgrey's); figures in bold miss their goal.", "",
              "| goal | met | figures |", "|---|---|---|"]
    lines += [f"| {g.goal} | {g.mark} | {g.figures} |" for g in goals(report)]
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
    where = where_time_goes(report)
    if where:
        lines += ["### Where policyd's time goes", "",
                  f"The {WHERE_TIME_GOES_MIX} mix, policyd beside two variants of itself "
                  "(as many processes as policyd): policyd-nostore, its stores answered from "
                  "dicts in the process (bench/nostore.py: the server and the greylisting "
                  "policy with a store that costs nothing), and policyd-nobackup, its "
                  "memcache tables without their lmdb backups.  Measurement aids, not "
                  "configurations: without backups policyd's state is lost when memcached "
                  "restarts.  req/s (against postgrey's) and CPU per request.", "",
                  *where, ""]
    if report.mixes():
        lines += ["The servers one after the other at each point.  CPU per request: the "
                  "server's user + system time over the point (/proc/PID/stat of its "
                  "processes: all threads, and children), divided by the requests answered.",
                  ""]
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


# A new file gets only a title: the method and the baseline are written
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
    for g in goals(report):
        mark = {"yes": "MET ", "**no**": "MISS", "reported": "INFO"}.get(g.mark, "n/a ")
        yield f"[{mark}] {g.goal}: {g.figures.replace('**', '')}"
