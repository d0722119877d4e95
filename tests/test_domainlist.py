"""memtable.domainlist: the `domain` list, matched as Postfix's string_list.

The file/negation/comment cases mirror a run of postmap 3.7 against a
memcache table with `domain = !bad.example, Example.COM /FILE lmdb:T # ...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from memtable.domainlist import DomainFilter, is_table_pattern
from memtable.errors import ConfigError, TemporaryError, UnsupportedTableError
from memtable.limits import DOMAIN_LIST_MAX_FILE_DEPTH, LOOKUP_FILE_MAX_BYTES
from memtable.table import Table, fold_case
from tests.dict_table import DictTable


class Opener:
    def __init__(self, tables: dict[str, dict[str, str]] | None = None):
        self.tables = tables or {}
        self.opened: dict[str, DictTable] = {}

    def __call__(self, spec: str) -> Table:
        if spec not in self.tables:
            raise UnsupportedTableError(f"unsupported table type: {spec}")
        table = DictTable(spec, self.tables[spec])
        self.opened[spec] = table
        return table


def build(*items: str, opener: Opener | None = None) -> DomainFilter:
    dom = DomainFilter.build(items, opener or Opener())
    assert dom is not None
    return dom


def test_empty_list_is_none() -> None:
    assert DomainFilter.build((), Opener()) is None


def test_names_match_whole_domain_case_insensitively() -> None:
    dom = build("example.com", "Other.ORG")
    assert dom.check("joe@example.com")
    assert dom.check("joe@EXAMPLE.Com")
    assert dom.check("joe@other.org")
    assert not dom.check("joe@sub.example.com")  # string list: no subdomains
    assert not dom.check("joe@example.com.evil")
    assert not dom.check("joe@xample.com")
    assert not dom.check("joe@unrelated.net")


def test_keys_without_usable_parts_are_skipped() -> None:
    dom = build("example.com")
    for key in ("example.com", "@example.com", "joe@", "@", "", "joe"):
        assert not dom.check(key), key


def test_domain_is_after_the_last_at() -> None:
    dom = build("example.com")
    assert dom.check("a@b@example.com")
    assert not dom.check("a@example.com@b")


def test_negation_first_match_wins() -> None:
    dom = build("!bad.example.com", "bad.example.com", "example.com")
    assert not dom.check("u@bad.example.com")
    assert dom.check("u@example.com")
    dom = build("bad.example.com", "!bad.example.com")
    assert dom.check("u@bad.example.com")


def test_negation_alone_matches_nothing() -> None:
    dom = build("!bad.example")
    assert not dom.check("u@bad.example")
    assert not dom.check("u@good.example")


def test_double_negation() -> None:
    assert build("!!x.example").check("u@x.example")


def test_bare_bang_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no pattern after"):
        build("example.com", "!")


def test_unicode_names_are_casefolded() -> None:
    dom = build("BÜCHER.example", "STRAßE.de")
    assert dom.check("u@bücher.EXAMPLE")
    assert dom.check("u@strasse.de")
    assert dom.check("u@STRASSE.DE")


def test_ascii_mode_folds_ascii_only() -> None:
    dom = DomainFilter.build(("BÜCHER.example",), Opener(), utf8=False)
    assert dom is not None
    assert dom.check("u@BÜCHER.example")
    assert not dom.check("u@bücher.example")
    assert fold_case("ÀB", utf8=False) == "Àb"


def test_file_patterns(tmp_path: Path) -> None:
    # Same file as the postmap run: comment lines vanish, a line that starts
    # with white space continues the line before it.
    patterns = tmp_path / "doms"
    patterns.write_text("good.example\n# comment\n  !neg.example more.example\n"
                        "!!dbl.example\n\n   \nlast.example, also.example\n")
    dom = build("!bad.example", "Example.COM", str(patterns))
    for domain in ("example.com", "good.example", "more.example", "dbl.example",
                   "last.example", "also.example", "GOOD.example"):
        assert dom.check(f"u@{domain}"), domain
    for domain in ("bad.example", "neg.example", "sub.good.example", "comment"):
        assert not dom.check(f"u@{domain}"), domain


def test_negated_file_negates_each_pattern(tmp_path: Path) -> None:
    patterns = tmp_path / "doms"
    patterns.write_text("a.example\n!b.example\n")
    dom = build(f"!{patterns}", "a.example", "b.example", "c.example")
    assert not dom.check("u@a.example")
    assert dom.check("u@b.example")
    assert dom.check("u@c.example")


def test_nested_files(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.write_text("inner.example\n")
    outer = tmp_path / "outer"
    outer.write_text(f"outer.example {inner}\n")
    dom = build(str(outer))
    assert dom.check("u@inner.example")
    assert dom.check("u@outer.example")


def test_self_including_file_is_bounded(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.write_text(f"x.example\n{loop}\n")
    with pytest.raises(ConfigError, match=f"deeper than {DOMAIN_LIST_MAX_FILE_DEPTH}"):
        build(str(loop))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="cannot read pattern file") as info:
        build(str(missing))
    assert info.value.path == str(missing)


def test_oversized_file(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as fh:
        fh.truncate(LOOKUP_FILE_MAX_BYTES + 1)
    with pytest.raises(ConfigError, match="larger than"):
        build(str(big))


def test_non_utf8_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"ok.example\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        build(str(bad))


def test_comment_word_ends_the_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Postfix: "#comment after other text is not allowed"; the rest is ignored.
    patterns = tmp_path / "doms"
    patterns.write_text("a.example # b.example\nc.example\n")
    with caplog.at_level(logging.WARNING, logger="memtable.domainlist"):
        dom = build(str(patterns), "d.example", "#", "e.example")
    assert dom.check("u@a.example")
    assert not dom.check("u@b.example")
    assert dom.check("u@c.example")
    assert dom.check("u@d.example")
    assert not dom.check("u@e.example")
    assert len([r for r in caplog.records if "#comment" in r.getMessage()]) == 2


def test_continuation_without_text_is_ignored(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    patterns = tmp_path / "doms"
    patterns.write_text("  lost.example\nkept.example\n")
    with caplog.at_level(logging.WARNING, logger="memtable.domainlist"):
        dom = build(str(patterns))
    assert not dom.check("u@lost.example")
    assert dom.check("u@kept.example")
    assert any("logical line must not start with whitespace" in r.getMessage()
               for r in caplog.records)


def test_table_pattern_any_value_matches_and_key_is_folded_domain() -> None:
    opener = Opener({"test:t": {"x.example": "OK", "empty.example": "", "neg.example": "x"}})
    dom = build("test:t", opener=opener)
    assert dom.check("u@X.Example")
    assert dom.check("u@empty.example")  # any value, even an empty one
    assert not dom.check("u@y.example")
    assert opener.opened["test:t"].queries[:3] == ["x.example", "empty.example", "y.example"]


def test_negated_table() -> None:
    opener = Opener({"test:t": {"bad.example": "1"}})
    dom = build("!test:t", "bad.example", "good.example", opener=opener)
    assert not dom.check("u@bad.example")
    assert dom.check("u@good.example")


def test_order_between_names_and_tables() -> None:
    opener = Opener({"test:t": {"a.example": "1"}})
    dom = build("!a.example", "test:t", opener=opener)
    assert not dom.check("u@a.example")
    assert opener.opened["test:t"].queries == []  # the name decided first


def test_table_errors_are_temporary() -> None:
    class Broken(DictTable):
        def lookup(self, key: str) -> str | None:
            raise TemporaryError("backend down")

    dom = DomainFilter.build(("a.example", "test:broken"), lambda spec: Broken(spec))
    assert dom is not None
    assert dom.check("u@a.example")  # decided before the table
    with pytest.raises(TemporaryError, match="backend down"):
        dom.check("u@b.example")


def test_open_errors_propagate() -> None:
    with pytest.raises(UnsupportedTableError):
        build("nosuch:thing")


def test_same_table_opened_once_and_closed() -> None:
    opener = Opener({"test:t": {}})
    dom = build("test:t", "!test:t", opener=opener)
    assert len(dom.tables) == 1
    dom.close()
    assert opener.opened["test:t"].closed


@pytest.mark.parametrize(("item", "is_table"), [
    ("hash:/etc/x", True), ("inline:{a=1}", True), ("example.com", False),
    ("[::1]", False), ("[a:b]", False),
])
def test_table_pattern_detection(item: str, is_table: bool) -> None:
    assert is_table_pattern(item) is is_table
