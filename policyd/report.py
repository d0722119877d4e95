"""``policyd report``: what the stores say about greylisting, and TTL advice.

    policyd -c FILE report [--json] [--plot FILE.png] [--top N] [--max-entries N]

Reads every triplet and client record (through the backup of a memcache
table, see policyd.storewalk; memcached is not contacted) and prints:
triplets by state, the distribution of retry delays (passed_at - first_seen:
how long real senders took to come back), passes per client, and suggested
greylist_delay / retry_window / max_age with the reasoning.  With fewer
than MIN_PASSES known delays it says the data is too thin and keeps the
current settings.  With ``privacy = yes`` keys are hashes: no client is
named.  Reading is bounded (limits.REPORT_MAX_ENTRIES per table); a capped
report says so.  docs/ttl-tuning.md explains how to read it.

The analysis (Analyser, Report) is pure: entries in, figures out.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from memtable import clock
from policyd import limits
from policyd.config import PolicydConfig
from policyd.logsetup import error_line
from policyd.storewalk import (
    CLIENTS,
    TRIPLETS,
    Entry,
    WalkError,
    WalkStats,
    WalkTables,
    client_expired,
    triplet_expired,
)

MINUTE, HOUR, DAY = 60, 3600, 86400

# Retry-delay histogram: (label, upper bound exclusive; None = open).
DELAY_BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("0-5m", 5 * MINUTE), ("5-10m", 10 * MINUTE), ("10-30m", 30 * MINUTE),
    ("30m-1h", HOUR), ("1-2h", 2 * HOUR), ("2-6h", 6 * HOUR), ("6-24h", DAY),
    ("1-2d", 2 * DAY), (">2d", None))
PERCENTILES = (10, 50, 90, 99)
# Distribution of passes per client: (label, lowest, highest; None = open).
PASS_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("0", 0, 0), ("1", 1, 1), ("2-4", 2, 4), ("5-9", 5, 9), ("10-99", 10, 99),
    ("100+", 100, None))
DEFAULT_TOP = 10
HISTOGRAM_WIDTH = 40

# --- the advice -------------------------------------------------------------
# Below this many known delays the figures say little: keep the settings.
MIN_PASSES = 50
# greylist_delay is never suggested below postgrey's 5 minutes, and raised
# at most to this (a longer delay only holds mail back; the gain, time for
# DNS blocklists to list a spam run, is mostly had within minutes).
MIN_GREYLIST_DELAY = 5 * MINUTE
GREYLIST_DELAY_SUGGEST_MAX = 15 * MINUTE
# retry_window covers this many times the p99 delay, at most RFC 5321's
# 4-5 days after which senders give up anyway.
RETRY_WINDOW_MARGIN = 2
RETRY_WINDOW_SUGGEST_MAX = 5 * DAY


def duration(seconds: int) -> str:
    """``45s``, ``5m 12s``, ``2h 5m``, ``3d 4h``: the two largest units."""
    if seconds < MINUTE:
        return f"{seconds}s"
    for unit, name, sub, sub_name in ((DAY, "d", HOUR, "h"), (HOUR, "h", MINUTE, "m"),
                                      (MINUTE, "m", 1, "s")):
        if seconds >= unit:
            whole, rest = divmod(seconds, unit)
            part = rest // sub
            return f"{whole}{name} {part}{sub_name}" if part else f"{whole}{name}"
    raise AssertionError("unreachable")


def percentile(ordered: list[int], p: int) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = -(-p * len(ordered) // 100)  # ceil(p/100 * n)
    return ordered[max(rank, 1) - 1]


def delay_bucket(delay: int) -> int:
    """Index in DELAY_BUCKETS of a delay."""
    for i, (_, upper) in enumerate(DELAY_BUCKETS):
        if upper is None or delay < upper:
            return i
    raise AssertionError("unreachable")


def pass_bucket(passed: int) -> int:
    for i, (_, low, high) in enumerate(PASS_BUCKETS):
        if passed >= low and (high is None or passed <= high):
            return i
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Suggestion:
    name: str
    current: int
    suggested: int
    reason: str


@dataclass
class TableFigures:
    """What was read of one table, whatever its records."""

    table: str = ""
    read: int = 0
    capped: bool = False  # stopped at the bound on entries read
    malformed: int = 0


@dataclass
class TripletFigures(TableFigures):
    pending: int = 0
    passed: int = 0
    expired_pending: int = 0
    expired_passed: int = 0
    unknown_delay: int = 0  # passes imported from postgrey: no passed_at

    @property
    def expired(self) -> int:
        return self.expired_pending + self.expired_passed


@dataclass
class ClientFigures(TableFigures):
    live: int = 0
    expired: int = 0
    auto_whitelisted: int = 0
    pass_counts: list[int] = field(default_factory=lambda: [0] * len(PASS_BUCKETS))
    top: list[tuple[int, str | None]] = field(default_factory=list)  # (passes, key)


@dataclass
class Report:
    config: PolicydConfig
    now: int
    triplets: TripletFigures
    clients: ClientFigures
    delays: list[int]  # sorted
    suggestions: list[Suggestion]
    notes: list[str]

    @property
    def thin(self) -> bool:
        return len(self.delays) < MIN_PASSES

    @property
    def percentiles(self) -> dict[str, int] | None:
        if not self.delays:
            return None
        out = {f"p{p}": percentile(self.delays, p) for p in PERCENTILES}
        out["max"] = self.delays[-1]
        return out

    @property
    def histogram(self) -> list[tuple[str, int]]:
        counts = [0] * len(DELAY_BUCKETS)
        for delay in self.delays:
            counts[delay_bucket(delay)] += 1
        return [(label, n) for (label, _), n in zip(DELAY_BUCKETS, counts, strict=True)]

    # --- output -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        t, c, cfg = self.triplets, self.clients, self.config
        return {
            "generated_at": self.now,
            "config": {"path": cfg.path, "greylist_delay": cfg.greylist_delay,
                       "greylist_delay_listed": cfg.greylist_delay_listed,
                       "retry_window": cfg.retry_window, "max_age": cfg.max_age,
                       "auto_whitelist_clients": cfg.auto_whitelist_clients,
                       "privacy": cfg.privacy,
                       "greylist_delay_spf_pass": cfg.greylist_delay_spf_pass},
            "triplets": {"table": t.table, "read": t.read, "capped": t.capped,
                         "pending": t.pending, "passed": t.passed, "expired": t.expired,
                         "expired_pending": t.expired_pending,
                         "expired_passed": t.expired_passed, "malformed": t.malformed,
                         "unknown_delay": t.unknown_delay},
            "delays": {"count": len(self.delays), "percentiles": self.percentiles,
                       "histogram": [{"bucket": label, "count": n}
                                     for label, n in self.histogram]},
            "clients": {"table": c.table, "read": c.read, "capped": c.capped,
                        "live": c.live, "expired": c.expired, "malformed": c.malformed,
                        "auto_whitelisted": c.auto_whitelisted,
                        "passes": [{"passes": label, "clients": n} for (label, _, _), n
                                   in zip(PASS_BUCKETS, c.pass_counts, strict=True)],
                        "top": [{"client": key, "passed": n} for n, key in c.top]},
            "thin": self.thin,
            "suggestions": [{"name": s.name, "current": s.current, "suggested": s.suggested,
                             "reason": s.reason} for s in self.suggestions],
            "notes": self.notes,
        }

    def render(self) -> str:
        t, c, cfg = self.triplets, self.clients, self.config
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.now))
        out = [f"policyd report for {cfg.path} at {stamp}",
               f"settings: greylist_delay = {duration(cfg.greylist_delay)}, "
               + ("" if cfg.greylist_delay_spf_pass is None else
                  f"greylist_delay_spf_pass = {duration(cfg.greylist_delay_spf_pass)}, ")
               + (f"greylist_delay_listed = {duration(cfg.greylist_delay_listed)}, "
                  if cfg.greylist_delay_listed is not None else "")
               + f"retry_window = {duration(cfg.retry_window)}, "
               f"max_age = {duration(cfg.max_age)}", ""]
        out += [f"Triplets ({t.table}: {t.read} read)",
                f"  pending    {t.pending:8d}  not passed yet, within retry_window",
                f"  passed     {t.passed:8d}  seen within max_age",
                f"  expired    {t.expired:8d}  {t.expired_pending} never retried within "
                f"retry_window, {t.expired_passed} passed but unseen for max_age",
                f"  malformed  {t.malformed:8d}", ""]
        out.append(f"Retry delays (passed_at - first_seen) of {len(self.delays)} passes")
        if t.unknown_delay:
            out.append(f"  ({t.unknown_delay} passed triplets imported from postgrey: "
                       "delay unknown)")
        pct = self.percentiles
        if pct is None:
            out.append("  no passes with a known delay yet")
        else:
            out.append("  " + "  ".join(f"{name} {duration(v)}" for name, v in pct.items()))
            biggest = max(n for _, n in self.histogram)
            for label, n in self.histogram:
                bar = "#" * (max(1, n * HISTOGRAM_WIDTH // biggest) if n else 0)
                out.append(f"  {label:>7} {n:8d} {bar}")
        out += ["", f"Clients ({c.table}: {c.read} read)",
                f"  live {c.live}, expired {c.expired}, malformed {c.malformed}, "
                f"auto-whitelisted (>= {cfg.auto_whitelist_clients} passes) "
                f"{c.auto_whitelisted}",
                "  passes per client: " + ", ".join(
                    f"{label}: {n}" for (label, _, _), n
                    in zip(PASS_BUCKETS, c.pass_counts, strict=True))]
        if c.top:
            out.append(f"  top {len(c.top)} clients by passes:")
            for n, key in c.top:
                out.append(f"    {n:8d}  {key if key is not None else '(hashed key)'}")
        out += ["", "Suggested settings"]
        if self.thin:
            out.append(f"  only {len(self.delays)} passes with a known delay (fewer than "
                       f"{MIN_PASSES}): the data is too thin to tune from; keep the current "
                       "settings (defaults: greylist_delay = 5m, retry_window = 2d, "
                       "max_age = 35d)")
        for s in self.suggestions:
            change = "keep" if s.suggested == s.current else f"now {duration(s.current)}"
            out.append(f"  {s.name} = {duration(s.suggested)}  ({change})")
            out.append(f"      {s.reason}")
        if self.notes:
            out += ["", *(f"note: {n}" for n in self.notes)]
        return "\n".join(out) + "\n"


class Analyser:
    """Feed it entries (policyd.storewalk.Entry), then finish() a Report."""

    def __init__(self, config: PolicydConfig, now: int, top: int = DEFAULT_TOP) -> None:
        self.config = config
        self.now = now
        self.top = top
        self.triplets = TripletFigures(table=config.triplet_table)
        self.clients = ClientFigures(table=config.client_table)
        self.delays: list[int] = []
        # min-heap of (passes, -order, key): ties keep the first seen.
        self._heap: list[tuple[int, int, str | None]] = []
        self._order = itertools.count()

    def add(self, entry: Entry) -> None:
        if entry.kind == TRIPLETS:
            self._add_triplet(entry)
        else:
            self._add_client(entry)

    def _add_triplet(self, entry: Entry) -> None:
        t, record = self.triplets, entry.triplet
        if record is None:
            t.malformed += 1
            return
        expired = triplet_expired(record, self.now, self.config)
        if record.passed:
            if expired:
                t.expired_passed += 1
            else:
                t.passed += 1
            # Expired passes still tell how long their senders took.
            delay = record.delay
            if delay is None:
                t.unknown_delay += 1
            else:
                self.delays.append(delay)
        elif expired:
            t.expired_pending += 1
        else:
            t.pending += 1

    def _add_client(self, entry: Entry) -> None:
        c, record = self.clients, entry.client
        if record is None:
            c.malformed += 1
            return
        if client_expired(record, self.now, self.config):
            c.expired += 1
            return
        c.live += 1
        c.pass_counts[pass_bucket(record.passed)] += 1
        if record.auto_whitelisted(self.config.auto_whitelist_clients):
            c.auto_whitelisted += 1
        if record.passed > 0 and self.top > 0:
            key = None if self.config.privacy else entry.key
            item = (record.passed, -next(self._order), key)
            if len(self._heap) < self.top:
                heapq.heappush(self._heap, item)
            elif item[0] > self._heap[0][0]:
                heapq.heapreplace(self._heap, item)

    def finish(self, stats: dict[str, WalkStats] | None = None) -> Report:
        t, c = self.triplets, self.clients
        t.read = t.pending + t.passed + t.expired + t.malformed
        c.read = c.live + c.expired + c.malformed
        notes: list[str] = []
        shared = stats is not None and CLIENTS not in stats
        for kind, figures in ((TRIPLETS, t), (CLIENTS, c)):
            walked = (stats or {}).get(TRIPLETS if shared else kind)
            if walked is not None and walked.capped:
                figures.capped = True
                if shared and kind == CLIENTS:
                    continue  # one walk, one note
                notes.append(f"stopped after {walked.read} entries of {figures.table}: "
                             "the figures cover only those (--max-entries)")
        if shared:
            notes.append("triplets and client records share one store; told apart by shape")
        if self.config.privacy:
            notes.append("privacy = yes: keys are HMAC hashes, no client is named")
        notes += _dns_notes(self.config)
        self.clients.top = [(n, key) for n, _, key in sorted(self._heap, reverse=True)]
        self.delays.sort()
        report = Report(self.config, self.now, self.triplets, self.clients, self.delays,
                        [], notes)
        report.suggestions = suggest(report)
        return report


def _dns_notes(cfg: PolicydConfig) -> list[str]:
    """Which clients the retry delays are of, when DNS settings chose
    (policyd.greylist): the triplet record keeps no score nor SPF result."""
    notes = []
    listed = cfg.greylist_delay_listed
    if cfg.greylist_delay_spf_pass is not None:
        notes.append(
            "senders whose SPF passed waited greylist_delay_spf_pass "
            f"({duration(cfg.greylist_delay_spf_pass)}) instead of greylist_delay: "
            "their delays are among the retry delays (a delay under greylist_delay is "
            "one of theirs)"
            + ("" if listed is None else "; a listed client waited greylist_delay_listed "
               "even then"))
    threshold = cfg.dnsbl_greylist_threshold
    if threshold is not None:
        if listed is None:
            waited = "both waited greylist_delay"
        else:
            waited = (f"the listed ones greylist_delay_listed ({duration(listed)}), the "
                      "others greylist_delay; the records do not say which applied")
        notes.append(
            f"dnsbl_greylist_threshold = {threshold}: only clients whose DNSBL score "
            "reached it, and clients whose score was unknown because DNS failed, were "
            f"greylisted ({waited}); unlisted clients were let through and left no record")
    return notes


def _ceil_to(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def suggest(report: Report) -> list[Suggestion]:
    """greylist_delay, retry_window and max_age, each with its reasoning."""
    cfg = report.config
    pct = report.percentiles
    if report.thin or pct is None:
        why = (f"only {len(report.delays)} passes with a known delay; at least {MIN_PASSES} "
               "are needed to tune from: keep it")
        return [Suggestion("greylist_delay", cfg.greylist_delay, cfg.greylist_delay, why),
                Suggestion("retry_window", cfg.retry_window, cfg.retry_window, why),
                Suggestion("max_age", cfg.max_age, cfg.max_age, why)]
    return [_suggest_delay(cfg, pct), _suggest_window(cfg, pct, report.triplets),
            _suggest_max_age(cfg)]


def _suggest_delay(cfg: PolicydConfig, pct: dict[str, int]) -> Suggestion:
    base = max(cfg.greylist_delay, MIN_GREYLIST_DELAY)
    p10 = pct["p10"]
    candidate = min(p10 // MINUTE * MINUTE, GREYLIST_DELAY_SUGGEST_MAX)
    if candidate >= base + MINUTE:
        return Suggestion(
            "greylist_delay", cfg.greylist_delay, candidate,
            f"90% of senders took {duration(p10)} or longer to come back: a delay of "
            f"{duration(candidate)} would not have held them any longer, and gives DNS "
            "blocklists more time to list a spam run")
    if cfg.greylist_delay < MIN_GREYLIST_DELAY:
        return Suggestion(
            "greylist_delay", cfg.greylist_delay, base,
            f"below {duration(MIN_GREYLIST_DELAY)} greylisting stops little (spam software "
            "retries quickly too); 5 minutes is postgrey's proven default")
    return Suggestion(
        "greylist_delay", cfg.greylist_delay, cfg.greylist_delay,
        f"senders come back soon after the delay (p10 {duration(p10)}, p50 "
        f"{duration(pct['p50'])}): a longer one would hold real mail back; keep it")


def _suggest_window(cfg: PolicydConfig, pct: dict[str, int],
                    triplets: TripletFigures) -> Suggestion:
    p99 = pct["p99"]
    wanted = min(_ceil_to(p99 * RETRY_WINDOW_MARGIN, HOUR), RETRY_WINDOW_SUGGEST_MAX)
    never = (f"; {triplets.expired_pending} triplets were never retried within it "
             "(mostly spam, which does not retry)") if triplets.expired_pending else ""
    if wanted > cfg.retry_window:
        return Suggestion(
            "retry_window", cfg.retry_window, wanted,
            f"1% of passes took {duration(p99)} or longer; retries later than the current "
            f"{duration(cfg.retry_window)} start over as new triplets (and are never seen "
            f"here), so cover {RETRY_WINDOW_MARGIN} x p99, at most "
            f"{duration(RETRY_WINDOW_SUGGEST_MAX)}{never}")
    return Suggestion(
        "retry_window", cfg.retry_window, cfg.retry_window,
        f"the current {duration(cfg.retry_window)} covers {RETRY_WINDOW_MARGIN} x the "
        f"p99 delay ({duration(p99)}); a shorter one saves little store{never}")


def _suggest_max_age(cfg: PolicydConfig) -> Suggestion:
    return Suggestion(
        "max_age", cfg.max_age, cfg.max_age,
        "not derivable: a record keeps only when it was last seen, not the gaps between "
        "visits, so how long after last seen senders come back is unknown; keep "
        f"{duration(cfg.max_age)} (over a month catches monthly senders)")


def collect(config: PolicydConfig, *, now: int | None = None, top: int = DEFAULT_TOP,
            max_entries: int = limits.REPORT_MAX_ENTRIES) -> Report:
    """Walk the configured stores (read-only) into a Report; WalkError when
    a store cannot be opened or walked."""
    when = int(clock.now()) if now is None else now
    analyser = Analyser(config, when, top)
    with WalkTables.open(config, read_write=False) as stores:
        for kind in stores.kinds():
            for entry in stores.walk(kind, max_entries):
                analyser.add(entry)
        return analyser.finish(stores.stats)


def write_plot(report: Report, path: str) -> None:
    """The retry-delay histogram as a PNG (matplotlib, Agg; no pyplot state).
    ImportError without matplotlib, OSError when path cannot be written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [label for label, _ in report.histogram]
    counts = [n for _, n in report.histogram]
    ax.bar(labels, counts, color="#4477aa")
    pct = report.percentiles
    summary = ("no passes with a known delay" if pct is None else
               "  ".join(f"{k} {duration(v)}" for k, v in pct.items()))
    ax.set_title(f"policyd retry delays: {len(report.delays)} passes\n{summary}",
                 fontsize=10)
    ax.set_xlabel("delay until the retry that passed (passed_at - first_seen)")
    ax.set_ylabel("triplets")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --- the command ------------------------------------------------------------

def command(config: PolicydConfig, args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(error_line(f"policyd: report: {message}"), file=sys.stderr)
        return 1

    if not 0 <= args.top <= limits.REPORT_MAX_TOP_CLIENTS:
        return fail(f"--top must be 0..{limits.REPORT_MAX_TOP_CLIENTS}")
    max_entries = limits.REPORT_MAX_ENTRIES if args.max_entries is None else args.max_entries
    if not 1 <= max_entries <= limits.REPORT_MAX_ENTRIES:
        return fail(f"--max-entries must be 1..{limits.REPORT_MAX_ENTRIES}")
    with _plot_cache_dirs() if args.plot else contextlib.nullcontext():
        if args.plot:
            try:  # before the walk, not after it
                import matplotlib  # noqa: F401
            except ImportError:
                return fail("--plot needs matplotlib, which is not installed "
                            "(pip install matplotlib)")
        try:
            report = collect(config, top=args.top, max_entries=max_entries)
        except WalkError as exc:
            return fail(str(exc))
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            sys.stdout.write(report.render())
        if args.plot:
            try:
                write_plot(report, args.plot)
            except OSError as exc:
                return fail(f"cannot write {args.plot}: {exc.strerror or exc}")
    return 0


@contextlib.contextmanager
def _plot_cache_dirs() -> Iterator[None]:
    """matplotlib writes its configuration and font cache under $HOME
    (MPLCONFIGDIR, else ~/.config and ~/.cache/matplotlib) and fontconfig
    under ~/.cache/fontconfig; the policyd user's home is its state
    directory, /var/lib/policyd.  Point them at a temporary directory,
    removed afterwards, unless the operator chose MPLCONFIGDIR."""
    if os.environ.get("MPLCONFIGDIR"):
        yield
        return
    saved = {name: os.environ.get(name) for name in ("MPLCONFIGDIR", "XDG_CACHE_HOME")}
    with tempfile.TemporaryDirectory(prefix="policyd-report-") as tmp:
        os.environ["MPLCONFIGDIR"] = tmp
        os.environ["XDG_CACHE_HOME"] = tmp
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
