"""inline:, static: and texthash: tables and open_backend(), with real
``postmap -q`` / ``postmap -s`` as the oracle for every parse and lookup."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from pathlib import Path

import pytest

from memtable import clock, limits
from memtable.backends import (
    InlineTable,
    LmdbTable,
    StaticTable,
    TexthashTable,
    open_backend,
)
from memtable.cli import _byte_lines
from memtable.errors import (
    AccessError,
    ConfigError,
    SequenceUnsupportedError,
    UnsupportedTableError,
)
from memtable.syntax import balpar, extpar, readllines, split_qnameval, strtokq
from memtable.table import Table
from tests.postfixlab import COMMAND_TIMEOUT, POSTMAP, run_postmap

OLD = 1_500_000_000  # an mtime long past: no "hot file" re-read (ours or postmap's)


def pm_queries(cfg: Path, keys: list[str], spec: str, *flags: str) -> dict[str, str | None]:
    """``postmap -q - spec``: every key's value (None when not found), one run."""
    res = run_postmap(cfg, *flags, "-q", "-", spec, input="".join(k + "\n" for k in keys).encode())
    assert res.returncode in (0, 1), res.stderr
    assert b"fatal" not in res.stderr, res.stderr
    found: dict[str, str | None] = dict.fromkeys(keys)
    for line in res.stdout.decode().splitlines():
        key, value = line.split("\t", 1)
        found[key] = value
    return found


def pm_fatals(cfg: Path, specs: list[str]) -> dict[str, str]:
    """postmap's fatal message for each table that cannot be opened.  Run in
    parallel: Postfix pauses a second after every fatal error."""
    procs = {spec: subprocess.Popen([POSTMAP, "-c", str(cfg), "-q", "k", spec],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for spec in specs}
    out: dict[str, str] = {}
    for spec, proc in procs.items():
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        assert proc.returncode == 1
        lines = [ln for ln in err.decode().splitlines() if "fatal: " in ln]
        assert lines, err
        out[spec] = lines[-1].split("fatal: ", 1)[1]
    return out


def pm_sequence(cfg: Path, spec: str, *flags: str) -> list[tuple[str, str]]:
    res = run_postmap(cfg, *flags, "-s", spec)
    assert res.returncode == 0, res.stderr
    return [tuple(line.split("\t", 1)) for line in res.stdout.decode().splitlines()]  # type: ignore[misc]


def inline_name(spec: str) -> str:
    return spec.split(":", 1)[1]


# ---------------------------------------------------------------------------
# Postfix's string helpers (pure functions)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "key", "value"), [
    # split_qnameval.c's own test vectors.
    ("xx = yy", "xx", "yy"),
    ("xx=yy", "xx", "yy"),
    ("xx =", "xx", ""),
    ("xx=", "xx", ""),
    ('"xx " = yy', '"xx "', "yy"),
    ('"xx "= yy', '"xx "', "yy"),
    ('"xx " =', '"xx "', ""),
    ('"\\"xx " = yy', '"\\"xx "', "yy"),
    ("  k  =  v w  ", "k", "v w"),
])
def test_split_qnameval(text: str, key: str, value: str) -> None:
    assert split_qnameval(text) == (key, value)


@pytest.mark.parametrize(("text", "error"), [
    ("xx", "missing '=' after attribute name"),
    ('"xx "', "missing '=' after attribute name"),
    ('"xx ', "unbalanced '\"'"),
    ("   ", "no key found; expected format: key = value"),
])
def test_split_qnameval_errors(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("'", ".").replace('"', ".")):
        split_qnameval(text)


def test_balpar_extpar_strtokq() -> None:
    assert balpar("{a{b}c}d") == 7
    assert balpar("{a") == 0
    assert balpar("a}") == 0
    assert extpar("{  a b  }") == ("a b", None)
    assert extpar("{a}x")[1] == "syntax error after '}' in \"{a}x\""
    assert extpar("{a")[1] == "missing '}' in \"{a\""
    assert strtokq(" a=1,, {b = 2, c},\tx{y z}w ") == ["a=1", "{b = 2, c}", "x{y z}w"]
    assert strtokq(" ,\t ") == []


def lines_of(data: bytes) -> list[tuple[bytes, int, int]]:
    return [(ln.text, ln.first, ln.last) for ln in readllines(data, "f")]


def test_readllines_joins_continuations_without_separator() -> None:
    data = b"# c\n\nk1 a  \n  b\n\n# inner comment\n\tc\nk2 v\n"
    expected = [(b"k1 a    b\tc", 3, 7), (b"k2 v", 8, 8)]
    assert lines_of(data) == expected
    # Without the final newline, and with trailing text, the same lines.
    assert lines_of(data.rstrip(b"\n")) == expected
    assert lines_of(data + b"k3 w") == [*expected, (b"k3 w", 9, 9)]


@pytest.mark.parametrize("data", [
    b"# c\n\nk1 a  \n  b\n\n# inner comment\n\tc\nk2 v\n  lead\nk3 \x00w\nk4",
    b"  lead\n  more\n# \x00 in a comment\n\x00first\nk v\n\n",
    b"k\xff \xfe v\r\n  \tc\r\n",
    b"", b"\n\n", b"k", b"# only\n",
])
def test_readllines_reads_a_stream_as_it_reads_the_whole_file(
        data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    # memtable -i feeds lines one at a time; the logical lines, their line
    # numbers and the warnings must be the same as for the whole file.
    with caplog.at_level(logging.WARNING):
        whole = lines_of(data)
    warned, _ = caplog.messages, caplog.clear()
    # The reader memtable -i uses on standard input.
    stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape",
                             newline="\n")
    with caplog.at_level(logging.WARNING):
        streamed = [(ln.text, ln.first, ln.last) for ln in readllines(_byte_lines(stdin), "f")]
    assert streamed == whole
    assert caplog.messages == warned


def test_readllines_nul_bytes_end_the_text_as_in_c(caplog: pytest.LogCaptureFixture) -> None:
    # A line that starts with NUL is an empty logical line (its caller then
    # reports the missing key); a NUL in a comment line is warned about too.
    data = b"\x00lead v\n# c\x00\nk v\x00after\n  more\n"
    with caplog.at_level(logging.WARNING):
        assert lines_of(data) == [(b"", 1, 2), (b"k v", 3, 4)]
    assert caplog.messages == ["f, line 1-2: text after null byte may be ignored",
                               "f, line 3-4: text after null byte may be ignored"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert lines_of(b"# c\x00\nk v\n") == [(b"k v", 2, 2)]
    # As in Postfix: a comment before any text does not start the line range.
    assert caplog.messages == ["f, line 2: text after null byte may be ignored"]


def test_readllines_bounds_a_logical_line() -> None:
    long_line = b"k " + b"v" * 40 + b"\n" + b"  more\n" * 10
    assert lines_of(long_line)[0][0].startswith(b"k v")
    with pytest.raises(ConfigError, match=r"f, line 2: logical line longer than 50 bytes"):
        list(readllines(b"# c\n" + long_line, "f", max_bytes=50))


def test_readllines_bad_lines(caplog: pytest.LogCaptureFixture) -> None:
    data = b"  lead x\n  more\nk v\x00junk\nz 1"
    with caplog.at_level(logging.WARNING):
        assert lines_of(data) == [(b"k v", 3, 3), (b"z 1", 4, 4)]
    assert "must not start with whitespace" in caplog.text
    assert "text after null byte" in caplog.text


# ---------------------------------------------------------------------------
# inline:
# ---------------------------------------------------------------------------

INLINE_GOOD = [
    "inline:{a=1, b=2}",
    "inline:{ {key = value with spaces }, x=y }",
    "inline:{AB=x, ÄB=2, Straße=3}",
    "inline:{b=1,b=2}",
    'inline:{ "q"=1 }',
    "inline:{k=}",
    "inline:{x{a=1}}",
    "inline:{\ta=1\n,\rb=2}",
]
INLINE_KEYS = ["a", "b", "A", "key", "KEY", "x", "ab", "äb", "ÄB", "strasse", '"q"', "q",
               "k", "x{a", "missing"]


@pytest.mark.postfix
@pytest.mark.parametrize("spec", INLINE_GOOD)
@pytest.mark.parametrize("fold", [True, False])
def test_inline_lookup_matches_postmap(postmap_config: Path, spec: str, fold: bool) -> None:
    table = InlineTable(inline_name(spec), read_write=False, fold=fold)
    flags = () if fold else ("-f",)
    expected = pm_queries(postmap_config, INLINE_KEYS, spec, *flags)
    assert {key: table.lookup(key) for key in INLINE_KEYS} == expected
    assert sorted(table.sequence()) == sorted(pm_sequence(postmap_config, spec, *flags))


INLINE_BAD = [
    "inline:{}", "inline:{ }", "inline:{a}", "inline:{{a=1}x}", "inline:{{a=1}",
    "inline:{a=1}}", "inline:a=1", 'inline:{ "x y" = 1 }', "inline:{a=1, b = 2}",
    "inline:{a=1, {b=2}", "inline:{{ }}",
]
STATIC_BAD = ["static:{a}x", "static:{a", "static:{a}}"]


@pytest.mark.postfix
def test_inline_and_static_errors_match_postmap(postmap_config: Path) -> None:
    expected = pm_fatals(postmap_config, INLINE_BAD + STATIC_BAD)
    for spec in INLINE_BAD + STATIC_BAD:
        cls = InlineTable if spec.startswith("inline:") else StaticTable
        with pytest.raises(ConfigError) as info:
            cls(spec.split(":", 1)[1], read_write=False, fold=True)
        assert str(info.value) == expected[spec]


def test_inline_is_read_only() -> None:
    with pytest.raises(AccessError, match="requires O_RDONLY"):
        InlineTable("{a=1}", read_write=True, fold=True)
    table = InlineTable("{a=1}", read_write=False, fold=True)
    with pytest.raises(AccessError):
        table.update("a", "2")
    with pytest.raises(AccessError):
        table.delete("a")
    assert table.lookup("a") == "1"


# ---------------------------------------------------------------------------
# static:
# ---------------------------------------------------------------------------

@pytest.mark.postfix
@pytest.mark.parametrize("spec", ["static:foo", "static:{ a b }", "static:{}", "static:{a {b} c}",
                                  "static:a b", "static:{x}"])
def test_static_matches_postmap(postmap_config: Path, spec: str) -> None:
    table = StaticTable(spec.split(":", 1)[1], read_write=False, fold=True)
    keys = ["k", "OTHER", "user@example.com"]
    assert {key: table.lookup(key) for key in keys} == pm_queries(postmap_config, keys, spec)


def test_static_opens_read_write_but_cannot_update() -> None:
    # dict_static_open() has no O_RDONLY check; updates fail like Postfix's.
    table = StaticTable("v", read_write=True, fold=True)
    with pytest.raises(AccessError):
        table.update("k", "w")
    with pytest.raises(SequenceUnsupportedError):
        list(table.sequence())


# ---------------------------------------------------------------------------
# texthash:
# ---------------------------------------------------------------------------

TEXTHASH_SOURCE = (
    "# a comment\n"
    "ÄB 1\n"
    "Straße 2\n"
    "DUP a\n"
    "dup b\n"
    "key   multi  word  value  \n"
    "  cont\n"
    "\n"
    "  # indented comment\n"
    "\tmore\n"
    "x\n"
    '"q k" v\n'
    'bad"q v\n'
    'span"q\n'  # a warning names a logical line's first line
    "  v\n"
    "alias: target\n"
    "esc\\ aped value\n"
    "crlf value\r\n"
    "last line"
).encode() + b"\nbad\xffutf8 v\nnul v\x00after\n"

TEXTHASH_KEYS = ["äb", "ÄB", "strasse", "STRASSE", "dup", "DUP", "key", '"q k"', '"q', "x",
                 "bad\"q", "alias:", "esc\\", "esc\\ aped", "crlf", "last", "nul", "missing"]


def write_old(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))


@pytest.mark.postfix
@pytest.mark.parametrize("fold", [True, False])
def test_texthash_matches_postmap(postmap_config: Path, tmp_path: Path, fold: bool,
                                  caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "th"
    write_old(src, TEXTHASH_SOURCE)
    spec = f"texthash:{src}"
    flags = () if fold else ("-f",)
    with caplog.at_level(logging.WARNING):
        table = TexthashTable(str(src), read_write=False, fold=fold)
    expected = pm_queries(postmap_config, TEXTHASH_KEYS, spec, *flags)
    assert {key: table.lookup(key) for key in TEXTHASH_KEYS} == expected
    assert sorted(table.sequence()) == sorted(pm_sequence(postmap_config, spec, *flags))
    # Postfix's warnings, with its line numbers.
    res = run_postmap(postmap_config, *flags, "-s", spec)
    for line in res.stderr.decode().splitlines():
        warning = line.split("warning: ", 1)[1]
        if "non-UTF-8" in warning:
            assert "non-UTF-8 input" in caplog.text
        else:
            assert warning in caplog.text, warning


def test_texthash_rereads_a_hot_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "hot"
    src.write_text("k first\n")  # mtime: now -> Postfix reads it again
    pauses: list[float] = []

    def fake_sleep(seconds: float) -> None:
        pauses.append(seconds)
        write_old(src, b"k second\n")  # the writer finished meanwhile

    monkeypatch.setattr(clock, "sleep", fake_sleep)
    table = TexthashTable(str(src), read_write=False, fold=True)
    assert table.lookup("k") == "second"
    assert pauses == [limits.TEXTHASH_HOT_PAUSE_SECONDS]


def test_texthash_hot_rereads_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "hot"
    src.write_text("k v\n")
    pauses: list[float] = []
    monkeypatch.setattr(clock, "sleep", pauses.append)
    with caplog.at_level(logging.WARNING):
        table = TexthashTable(str(src), read_write=False, fold=True)
    assert table.lookup("k") == "v"
    assert len(pauses) == limits.TEXTHASH_HOT_RETRIES + 1
    assert "keeps changing" in caplog.text


def test_texthash_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=f"open database {missing}: No such file"):
        TexthashTable(str(missing), read_write=False, fold=True)
    with pytest.raises(ConfigError, match=r"open database .*: Is a directory"):
        TexthashTable(str(tmp_path), read_write=False, fold=True)
    src = tmp_path / "big"
    write_old(src, b"k " + b"v" * 100 + b"\n")
    with pytest.raises(ConfigError, match="larger than 50 bytes"):
        TexthashTable(str(src), read_write=False, fold=True, max_bytes=50)
    with pytest.raises(AccessError, match="requires O_RDONLY"):
        TexthashTable(str(src), read_write=True, fold=True)


# ---------------------------------------------------------------------------
# open_backend
# ---------------------------------------------------------------------------

def test_open_backend_dispatch(tmp_path: Path) -> None:
    src = tmp_path / "th"
    write_old(src, b"k v\n")
    cases: list[tuple[str, str, type[Table]]] = [
        ("inline", "{k=v}", InlineTable),
        ("static", "v", StaticTable),
        ("texthash", str(src), TexthashTable),
        ("LMDB", str(tmp_path / "db"), LmdbTable),
    ]
    for type_, name, cls in cases:
        table = open_backend(type_, name, read_write=type_ == "LMDB", fold=True)
        try:
            assert isinstance(table, cls)
            assert table.spec.lower().startswith(type_.lower() + ":")
            if type_ == "LMDB":
                table.update("K", "v")
            assert table.lookup("K") == "v"
        finally:
            table.close()


@pytest.mark.parametrize(("type_", "advice"), [
    ("hash", "postmap lmdb:/etc/postfix/x"),
    ("btree", "postmap lmdb:/etc/postfix/x"),
    ("cdb", "postmap lmdb:/etc/postfix/x"),
    ("dbm", "postmap lmdb:/etc/postfix/x"),
    ("proxy", "does not use proxymap"),
    ("pcre", "not supported"),
    ("mysql", "not supported"),
])
def test_open_backend_unsupported(type_: str, advice: str) -> None:
    with pytest.raises(UnsupportedTableError) as info:
        open_backend(type_, "/etc/postfix/x", read_write=False, fold=True)
    message = str(info.value)
    assert advice in message
    assert "lmdb:, inline:, static:, texthash:" in message


# ---------------------------------------------------------------------------
# lmdb: batches (one transaction, one lock); postmap reads the result
# ---------------------------------------------------------------------------

@pytest.mark.postfix
def test_lmdb_update_many_is_read_by_postmap(postmap_config: Path, tmp_path: Path) -> None:
    from memtable.errors import BackupError

    db = tmp_path / "batch"
    table = LmdbTable(str(db), read_write=True, fold=True)
    with table:
        results = table.update_many([("One", "1", None), ("bad\0key", "x", 60),
                                     ("two", "2", 600), ("one", "again", None),
                                     ("three", "no\0nul", None)])
        assert results[0] is None and results[2] is None and results[3] is None
        assert isinstance(results[1], BackupError) and "NUL" in str(results[1])
        assert isinstance(results[4], BackupError)
        assert table.update_many([]) == []
        # the same answers as one lookup at a time, in one transaction
        keys = ["ONE", "two", "three", "absent", "bad\0key"]
        assert table.lookup_many(keys) == {k: table.lookup(k) for k in keys}
        assert table.lookup_many(keys)["ONE"] == "again"  # the later item won
    found = pm_queries(postmap_config, ["one", "two", "three"], f"lmdb:{db}")
    assert found == {"one": "again", "two": "2", "three": None}


def test_lmdb_batches_on_read_only_and_closed_tables(tmp_path: Path) -> None:
    from memtable.errors import BackupError

    db = str(tmp_path / "db")
    LmdbTable(db, read_write=True, fold=False).close()
    ro = LmdbTable(db, read_write=False, fold=False)
    with ro, pytest.raises(AccessError):
        ro.update_many([("k", "v", None)])
    table = LmdbTable(db, read_write=True, fold=False)
    table.close()
    with pytest.raises(BackupError, match="closed"):
        table.update_many([("k", "v", None)])
    with pytest.raises(BackupError, match="closed"):
        table.lookup_many(["k"])


def test_lmdb_update_many_waits_for_the_exclusive_lock(tmp_path: Path) -> None:
    """The batch takes Postfix's exclusive fcntl lock like update(): held by
    another process, the batch gives up after the bound and stores nothing."""
    import sys

    from memtable.errors import BackupError

    db = tmp_path / "db"
    LmdbTable(str(db), read_write=True, fold=False).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.lockf(fd, fcntl.LOCK_SH); print('locked', flush=True); sys.stdin.read()",
         str(db) + ".lmdb"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        table = LmdbTable(str(db), read_write=True, fold=False, lock_wait=0.2)
        with table:
            with pytest.raises(BackupError, match="no exclusive lock"):
                table.update_many([("a", "1", None), ("b", "2", None)])
            assert table.lookup_many(["a", "b"]) == {"a": None, "b": None}  # shared: fine
    finally:
        holder.communicate(b"", timeout=COMMAND_TIMEOUT)
    table = LmdbTable(str(db), read_write=True, fold=False)
    with table:
        assert table.update_many([("a", "1", None)]) == [None]
        assert table.lookup("a") == "1"
