"""The ``memtable`` command: postmap -q/-d/-s for memcache tables, plus -i.

Output and exit status follow postmap: 0 when the requested information was
found, 1 when not (and on configuration or usage errors, as postmap's fatal
errors).  Where postmap also exits 1 on a temporary failure, memtable exits
75 (EX_TEMPFAIL) with the reason on standard error, so scripts can tell
"not found" from "try again".  A corrupt lmdb file is no temporary failure:
it stays until rebuilt, so it exits 1, as postmap's fatal error does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO, NoReturn

from memtable import registry
from memtable.errors import (
    AccessError,
    ConfigError,
    CorruptError,
    DamagedError,
    KeySkippedError,
    MemtableError,
    SequenceUnsupportedError,
    TemporaryError,
    ValueTooLongError,
    clip,
)
from memtable.limits import CF_MAX_LOGICAL_LINE_BYTES, CLI_MAX_INPUT_LINE_BYTES
from memtable.logline import CommandFormatter
from memtable.syntax import parse_key_value, readllines
from memtable.table import Table
from memtable.version import version

EX_OK = 0
EX_NOTFOUND = 1
EX_TEMPFAIL = 75

PROG = "memtable"


class _Fatal(Exception):
    """A postmap-style fatal error: message to stderr, exit status."""

    def __init__(self, message: str, status: int = EX_NOTFOUND):
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _Fatal(message)


USAGE = """\
memtable [-fjv] -q KEY|- TABLE...
       memtable [-fv] -d KEY|- TABLE...
       memtable [-fjv] -s TABLE
       memtable [-fv] -i TABLE... <lines
       memtable ttl [-c DIR] memcache:FILE.cf
       memtable --version"""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage=USAGE,
        description="Query and update Postfix memcache: tables (and their backups) "
                    "exactly as Postfix does.  'memtable ttl [-c DIR] TABLE' explains "
                    "a memcache table's ttl and checks it against the postscreen and "
                    "verify ttls of the Postfix configuration in DIR (default: postconf's); "
                    "-c DIR is used only there (see 'memtable ttl -h').",
        epilog="Exit status: 0 found, 1 not found or error, 75 temporary failure.  "
               "Manual: memtable(1).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("-q", metavar="KEY", dest="query",
                      help='look KEY up; "-" reads keys from standard input')
    mode.add_argument("-d", metavar="KEY", dest="delete",
                      help='delete KEY; "-" reads keys from standard input')
    mode.add_argument("-s", action="store_true", dest="sequence",
                      help="print every key and value (memcache: needs a backup table)")
    mode.add_argument("-i", action="store_true", dest="insert",
                      help='read "key value" lines from standard input and store them')
    p.add_argument("-f", action="store_true", dest="no_fold",
                   help="do not fold keys to lower case")
    p.add_argument("-j", action="store_true", dest="json",
                   help='JSON output: one {"key": "value"} object a line')
    p.add_argument("-v", action="count", default=0, help="verbose logging")
    p.add_argument("-c", metavar="DIR", dest="config_dir",
                   help="accepted and ignored, as postmap -c, so postmap command lines work; "
                        "'memtable ttl -c DIR' reads Postfix's configuration from DIR")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    p.add_argument("tables", nargs="+", metavar="TABLE",
                   help="type:name, e.g. memcache:/etc/postfix/cache.cf or lmdb:/path")
    return p


def _setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(CommandFormatter(PROG))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _read_lines(stream: IO[str]) -> Iterator[str]:
    """Lines without their newline, each bounded in length (see _byte_lines)."""
    return (line.decode("utf-8", "surrogateescape") for line in _byte_lines(stream))


def _byte_lines(stream: IO[str]) -> Iterator[bytes]:
    """The input's lines as the bytes read, without their newline, each
    bounded in length: postmap reads bytes, whatever the locale.  A stream
    without a binary buffer (tests' StringIO) is encoded back."""
    binary = getattr(stream, "buffer", None)
    while True:
        line = (binary.readline(CLI_MAX_INPUT_LINE_BYTES + 1) if binary is not None else
                stream.readline(CLI_MAX_INPUT_LINE_BYTES + 1).encode("utf-8", "surrogateescape"))
        if not line:
            return
        if len(line) > CLI_MAX_INPUT_LINE_BYTES and not line.endswith(b"\n"):
            raise _Fatal(f"input line longer than {CLI_MAX_INPUT_LINE_BYTES} bytes")
        yield line[:-1] if line.endswith(b"\n") else line


def _emit(out: IO[str], key: str, value: str, as_json: bool) -> None:
    if as_json:
        out.write(json.dumps({key: value}, ensure_ascii=False) + "\n")
    else:
        out.write(f"{key}\t{value}\n")


class _Tables:
    """Opens tables lazily, as postmap does, and closes them at the end."""

    def __init__(self, specs: list[str], read_write: bool, fold: bool,
                 open_table: Callable[..., Table]):
        self.specs = specs
        self.open_table = open_table
        self.read_write = read_write
        self.fold = fold
        self.opened: dict[str, Table] = {}

    def get(self, spec: str) -> Table:
        if spec not in self.opened:
            table = self.open_table(spec, read_write=self.read_write, fold=self.fold)
            self.opened[spec] = table
            if self.read_write:
                # LMDB may abort the process on its first write to a damaged
                # file: check it first (-d, -i), as policyd does at start.
                table.verify()
        return self.opened[spec]

    def close(self) -> None:
        for table in self.opened.values():
            table.close()


def _query(tables: _Tables, key: str) -> str | None:
    for spec in tables.specs:
        value = tables.get(spec).lookup(key)
        if value is not None:
            if value == "":
                logging.warning("table %s: key %s: empty string result is not allowed",
                                spec, key)
            return value
    return None


def _run_command(args: argparse.Namespace, out: IO[str], inp: IO[str],
                 open_table: Callable[..., Table]) -> int:
    """Do what the command line asks (query, delete, sequence, update from
    input, ttl): the exit status.  Errors raise (see main)."""
    fold = not args.no_fold
    if args.query is not None:
        tables = _Tables(args.tables, read_write=False, fold=fold, open_table=open_table)
        try:
            if args.query == "-":
                found = False
                for key in _read_lines(inp):
                    value = _query(tables, key)
                    if value is not None:
                        _emit(out, key, value, args.json)
                        found = True
                return EX_OK if found else EX_NOTFOUND
            value = _query(tables, args.query)
            if value is None:
                return EX_NOTFOUND
            out.write(json.dumps({args.query: value}, ensure_ascii=False) + "\n"
                      if args.json else value + "\n")
            return EX_OK
        finally:
            tables.close()
    if args.delete is not None:
        tables = _Tables(args.tables, read_write=True, fold=fold, open_table=open_table)
        try:
            keys = _read_lines(inp) if args.delete == "-" else iter([args.delete])
            found = False
            for key in keys:
                for spec in args.tables:
                    found |= tables.get(spec).delete(key)
            return EX_OK if found else EX_NOTFOUND
        finally:
            tables.close()
    if args.sequence:
        spec = args.tables[0]
        table = open_table(spec, read_write=False, fold=fold)
        try:
            # The walk reads the whole file: check it first, so that damage is
            # named in the check's words (CorruptError) before LMDB trips on it.
            table.verify()
            for key, value in table.sequence():
                _emit(out, key, value, args.json)
        except SequenceUnsupportedError:
            pass  # warned already; postmap prints nothing and exits 0
        finally:
            table.close()
        return EX_OK
    with _permissions_of(inp):
        return _insert(args, inp, fold, open_table)


@contextlib.contextmanager
def _permissions_of(inp: IO[str]) -> Iterator[None]:
    """As postmap -i: a file created meanwhile (an lmdb table, a memcache
    table's backup) gets no group or other permission that standard input
    lacks when it is a regular file: `memtable -i lmdb:/var/lib/policyd/
    triplets < dump` with a 0600 dump gives a 0600 file, not one any user
    can read.  (postmap also forces umask 022; memtable keeps a stricter
    umask.)  An existing file keeps its mode: LMDB writes it in place."""
    try:
        mode = os.fstat(inp.fileno()).st_mode
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        mode = 0  # no file behind it (a test's StringIO)
    if not stat.S_ISREG(mode):
        yield
        return
    previous = os.umask(0o077)
    os.umask(previous | (~mode & 0o077))
    try:
        yield
    finally:
        os.umask(previous)


def _insert(args: argparse.Namespace, inp: IO[str], fold: bool,
            open_table: Callable[..., Table]) -> int:
    tables = _Tables(args.tables, read_write=True, fold=fold, open_table=open_table)
    status = EX_OK
    try:
        for spec in args.tables:
            tables.get(spec)  # opened (and checked) before any input is read, as postmap -i
        for logical in readllines(_byte_lines(inp), "stdin",
                                  max_bytes=CF_MAX_LOGICAL_LINE_BYTES):
            record = parse_key_value(logical, "stdin")
            if record is None:
                status = EX_NOTFOUND  # warned, as postmap -i does
                continue
            key, value = record
            for spec in args.tables:
                try:
                    tables.get(spec).update(key, value)
                except (KeySkippedError, ValueTooLongError):
                    status = EX_NOTFOUND  # the table has logged why
                except MemtableError:
                    # Stops here: say where, so the rest can be fed again.
                    logging.error("stdin, line %d: key \"%s\" not stored in %s; "
                                  "the lines before it were", logical.first, clip(key), spec)
                    raise
        return status
    finally:
        tables.close()


def main(argv: list[str] | None = None, out: IO[str] | None = None,
         inp: IO[str] | None = None,
         open_table: Callable[..., Table] = registry.open_table) -> int:
    """The command; ``open_table`` opens every table it names (tests run
    it on each way memtable can run a memcache table)."""
    out = out or sys.stdout
    inp = inp or sys.stdin
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ttl"]:
        from memtable import ttlreport

        _setup_logging(0)  # the .cf file's warnings: "memtable: warning: ..."
        return ttlreport.main(argv[1:])
    try:
        args = _parser().parse_args(argv)
        _setup_logging(args.v)
        status = _run_command(args, out, inp, open_table)
        out.flush()
        return status
    except _Fatal as exc:
        print(f"{PROG}: fatal: {exc}", file=sys.stderr)
        return exc.status
    except DamagedError:
        return EX_NOTFOUND  # the table has said so, as an error, when it found it
    except CorruptError as exc:
        from memtable.backends.lmdb_table import CORRUPT_ADVICE

        print(f"{PROG}: fatal: {exc}: {CORRUPT_ADVICE}", file=sys.stderr)
        return EX_NOTFOUND
    except TemporaryError as exc:
        print(f"{PROG}: temporary failure: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except (ConfigError, AccessError, MemtableError) as exc:
        print(f"{PROG}: fatal: {exc}", file=sys.stderr)
        return EX_NOTFOUND
    except BrokenPipeError:
        return EX_NOTFOUND
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
