"""``policyd cleanup``: delete expired and malformed records from the stores.

    policyd -c FILE cleanup [--dry-run]

memcached expires policyd's entries by their ttl; an lmdb backup never
does, so without this it only grows.  cleanup walks each table through its
backup (policyd.storewalk) and deletes, through the TABLE's delete (so
memcached and the backup agree), what the policy itself would ignore:

- triplets pending (not passed) for more than ``retry_window``,
- passed triplets unseen for more than ``max_age``,
- client records unseen for more than ``max_age``,
- malformed records of either kind (counted apart).

Operators run it daily from cron or the systemd timer
deploy/systemd/policyd-cleanup.timer (as the policyd user, with the same
policyd.cf).  It is safe while policyd runs: it only deletes what is
expired, keys are collected in bounded batches (limits.CLEANUP_BATCH_KEYS)
and each one is checked again and deleted in one step: in the lmdb backup
inside one exclusive transaction (Postfix's fcntl lock held), in memcached
with a cas-guarded delete, so a record policyd rewrote meanwhile is kept.
A run examines at most limits.CLEANUP_MAX_ENTRIES entries per table and
says when it stopped early; the next run starts over.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from memtable import clock
from memtable.table import Outcome
from policyd import limits
from policyd.config import PolicydConfig
from policyd.logsetup import error_line
from policyd.storewalk import (
    CLIENTS,
    TRIPLETS,
    Entry,
    WalkError,
    WalkTables,
    client_expired,
    triplet_expired,
)


class CleanupError(WalkError):
    """A store failed during cleanup; ``counts`` is what was done before."""

    def __init__(self, message: str, counts: dict[str, Counts]) -> None:
        super().__init__(message)
        self.counts = counts


@dataclass
class Counts:
    """One table's outcome; with a shared store, by record kind."""

    examined: int = 0
    expired_pending: int = 0  # triplets only
    expired_passed: int = 0  # passed triplets and client records
    malformed: int = 0
    deleted: int = 0
    kept_changed: int = 0  # rewritten or removed by someone else meanwhile
    backup_only: int = 0  # deleted from the backup; memcached holds a newer record
    capped: bool = False

    @property
    def to_delete(self) -> int:
        return self.expired_pending + self.expired_passed + self.malformed


def deletion_reason(entry: Entry, now: int, config: PolicydConfig) -> str | None:
    """Why ``entry`` goes (``malformed``, ``pending``, ``passed``, i.e.
    unseen for max_age), or None when the policy still uses it."""
    if entry.triplet is not None:
        if not triplet_expired(entry.triplet, now, config):
            return None
        return "passed" if entry.triplet.passed else "pending"
    if entry.client is not None:
        return "passed" if client_expired(entry.client, now, config) else None
    return "malformed"


def cleanup(stores: WalkTables, config: PolicydConfig, now: int, *, dry_run: bool = False,
            max_entries: int = limits.CLEANUP_MAX_ENTRIES,
            batch_keys: int = limits.CLEANUP_BATCH_KEYS) -> dict[str, Counts]:
    """Delete (unless dry_run) what is expired at ``now``; counts by table.
    WalkError on a store failure (what was deleted so far stays deleted);
    its counts hold only the tables the walk reached."""
    counts: dict[str, Counts] = {}
    try:
        _walk(stores, config, now, counts, dry_run=dry_run, max_entries=max_entries,
              batch_keys=batch_keys)
    except WalkError as exc:
        raise CleanupError(str(exc), counts) from None
    return counts


def _walk(stores: WalkTables, config: PolicydConfig, now: int, counts: dict[str, Counts], *,
          dry_run: bool, max_entries: int, batch_keys: int) -> None:
    shared = len(stores.kinds()) == 1
    for kind in stores.kinds():
        for name in (TRIPLETS, CLIENTS) if shared else (kind,):
            counts[name] = Counts()
        batch: list[Entry] = []
        for entry in stores.walk(kind, max_entries):
            count = counts[entry.kind]
            count.examined += 1
            reason = deletion_reason(entry, now, config)
            if reason is None:
                continue
            if reason == "malformed":
                count.malformed += 1
            elif reason == "pending":
                count.expired_pending += 1
            else:
                count.expired_passed += 1
            if not dry_run:
                batch.append(entry)
                if len(batch) >= batch_keys:
                    delete_batch(stores, config, now, batch, counts)
                    batch = []
        if batch:
            delete_batch(stores, config, now, batch, counts)
        if stores.stats[kind].capped:
            for name in (TRIPLETS, CLIENTS) if shared else (kind,):
                counts[name].capped = True


def delete_batch(stores: WalkTables, config: PolicydConfig, now: int, batch: list[Entry],
                 counts: dict[str, Counts]) -> None:
    """Delete the entries of ``batch`` that are still to be deleted (the
    same value, or a new value that is expired or malformed too), each
    checked and deleted in one step (WalkTables.delete_if), so that a record
    policyd rewrites meanwhile is never deleted."""
    for entry in batch:
        count = counts[entry.kind]

        def still_deletable(stored: Entry, walked: Entry = entry) -> bool:
            return (stored.value == walked.value
                    or deletion_reason(stored, now, config) is not None)

        stored, cached = stores.delete_if(entry, still_deletable)
        if stored is not Outcome.DELETED:
            count.kept_changed += 1
            continue
        count.deleted += 1
        if cached is Outcome.KEPT:
            # memcached holds a live record this backup does not have (another
            # host sharing memcached wrote it, or policyd is writing it right
            # now): only the backup's stale copy went.
            count.backup_only += 1


def render(config: PolicydConfig, counts: dict[str, Counts], *, dry_run: bool,
           shared: bool) -> str:
    lines = []
    for kind, spec in ((TRIPLETS, config.triplet_table), (CLIENTS, config.client_table)):
        c = counts.get(kind)
        if c is None:
            continue  # not reached: the walk failed before it
        if kind == TRIPLETS:
            expired = (f"{c.expired_pending + c.expired_passed} expired "
                       f"({c.expired_pending} pending past retry_window, "
                       f"{c.expired_passed} passed but unseen for max_age)")
        else:
            expired = f"{c.expired_passed} expired (unseen for max_age)"
        done = (f"{c.to_delete} would be deleted (dry run: nothing deleted)" if dry_run
                else f"{c.deleted} deleted")
        if c.backup_only:
            done += (f" ({c.backup_only} from the backup only: memcached holds a newer "
                     "record, from another host or written meanwhile)")
        if c.kept_changed:
            done += f", {c.kept_changed} left (changed or gone meanwhile)"
        lines.append(f"policyd cleanup: {kind} ({spec}): {c.examined} examined, "
                     f"{expired}, {c.malformed} malformed: {done}")
        if c.capped:
            lines.append(f"policyd cleanup: {kind}: stopped at the limit of "
                         f"{limits.CLEANUP_MAX_ENTRIES} entries per run; entries beyond it "
                         "were not examined")
    if shared:
        lines.append("policyd cleanup: triplets and client records share one store; "
                     "told apart by shape")
    return "\n".join(lines) + "\n"


def command(config: PolicydConfig, args: argparse.Namespace) -> int:
    now = int(clock.now())
    try:
        with WalkTables.open(config, read_write=not args.dry_run) as stores:
            shared = stores.shared
            try:
                counts = cleanup(stores, config, now, dry_run=args.dry_run)
            except CleanupError as exc:
                # What was done before the failure, then the failure.
                sys.stdout.write(render(config, exc.counts, dry_run=args.dry_run,
                                        shared=shared))
                raise
    except WalkError as exc:
        print(error_line(f"policyd: cleanup: {exc}"), file=sys.stderr)
        return 1
    sys.stdout.write(render(config, counts, dry_run=args.dry_run, shared=shared))
    return 0
