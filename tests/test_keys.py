"""memtable.keys: key_format, key_digest, the final key check and their order.

Expected values follow Postfix's db_common.c / dict_memcache.c; the label
and '@' cases were checked against postmap 3.7 (see the module docstring).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from memtable.cf import split_list
from memtable.domainlist import DomainFilter
from memtable.errors import AccessError
from memtable.keys import (
    SKIP_CONTROLS,
    SKIP_DOMAIN,
    SKIP_EMPTY_KEY,
    SKIP_EXPANSION,
    SKIP_MALFORMED,
    KeyFormat,
    KeyPipeline,
    PreparedKey,
    digest_key,
    key_problem,
    resolve_digest,
)
from memtable.limits import MEMCACHED_MAX_KEY_BYTES
from tests.conftest import Memcached
from tests.dict_table import DictTable
from tests.postfixlab import postmap_config, run_postmap  # noqa: F401


def expand(fmt: str, key: str) -> str | None:
    return KeyFormat.compile(fmt).expand(key)


# ---------------------------------------------------------------- key_format


@pytest.mark.parametrize(("fmt", "key", "expected"), [
    ("%s", "User@Mail.Example.COM", "User@Mail.Example.COM"),
    ("%S", "a@b.c", "a@b.c"),
    ("p:%s", "a@b.c", "p:a@b.c"),
    ("%u", "joe@example.com", "joe"),
    ("%U", "joe@example.com", "joe"),
    ("%d", "joe@example.com", "example.com"),
    ("%D", "joe@example.com", "example.com"),
    ("%1", "u@mail.example.com", "com"),
    ("%2", "u@mail.example.com", "example"),
    ("%3", "u@mail.example.com", "mail"),
    ("%3.%2.%1", "u@mail.example.com", "mail.example.com"),
    ("%9", "u@a.b.c.d.e.f.g.h.i", "a"),
    ("%%", "x", "%"),
    ("100%%:%s", "x", "100%:x"),
    ("%%s", "x", "%s"),
    ("%u+%d|%s", "a@b", "a+b|a@b"),
    ("X-%U-%D-%S-%%-%s", "a@b.c", "X-a-b.c-a@b.c-%-a@b.c"),
    ("const", "anything", "const"),
    ("", "anything", ""),
])
def test_expansions(fmt: str, key: str, expected: str) -> None:
    assert expand(fmt, key) == expected


def test_domain_part_starts_after_the_last_at() -> None:
    # Postfix uses strrchr(): checked with postmap (a@b@com -> %u=a@b).
    assert expand("%u", "a@b@com") == "a@b"
    assert expand("%d", "a@b@com") == "com"
    assert expand("%1", "a@b@com") == "com"


def test_user_without_at_is_the_whole_key() -> None:
    assert expand("%u", "joe") == "joe"
    assert expand("%U:x", "joe") == "joe:x"


@pytest.mark.parametrize("fmt", ["%d", "%D", "%1", "%u@%d", "x%9"])
@pytest.mark.parametrize("key", ["joe", "joe@", "@"])
def test_domain_needed_but_missing_or_empty(fmt: str, key: str) -> None:
    assert expand(fmt, key) is None


@pytest.mark.parametrize("fmt", ["%u", "%U", "%u@%d"])
def test_empty_local_part_with_user_expansion(fmt: str) -> None:
    assert expand(fmt, "@example.com") is None


def test_empty_local_part_is_fine_without_user_expansion() -> None:
    # Only %u/%U need the local part (postmap: "@com" with %1 -> com).
    assert expand("%d", "@example.com") == "example.com"
    assert expand("%1", "@com") == "com"
    assert expand("%s", "@example.com") == "@example.com"


def test_user_expansion_with_empty_domain_keeps_the_local_part() -> None:
    assert expand("%u", "joe@") == "joe"


def test_too_few_labels() -> None:
    assert expand("%2", "u@com") is None
    assert expand("%3", "u@example.com") is None
    assert expand("%1", "u@com") == "com"
    # The highest %N decides, wherever it appears.
    assert expand("%1-%3", "u@example.com") is None


@pytest.mark.parametrize(("key", "expected"), [
    ("u@mail..example.com", "mail.example.com"),
    ("u@mail.example.com.", "mail.example.com"),
    ("u@.mail.example.com", "mail.example.com"),
    ("u@..mail...example..com..", "mail.example.com"),
])
def test_empty_labels_are_skipped_like_argv_split(key: str, expected: str) -> None:
    # Postfix splits with argv_split(), which drops empty labels; postmap 3.7
    # answers u@mail..example.com with %3 = mail.
    assert expand("%3.%2.%1", key) == expected


def test_only_dots_have_no_labels() -> None:
    assert expand("%1", "u@...") is None


def test_empty_key_is_impossible() -> None:
    assert expand("%s", "") is None
    assert expand("x%s", "") is None


def test_unicode_keys() -> None:
    assert expand("%u|%d|%1", "jöe@bücher.example") == "jöe|bücher.example|example"


@pytest.mark.parametrize(("fmt", "bad"), [
    ("%x", "%x"), ("a%sb%q", "%q"), ("%0", "%0"), ("%Z", "%Z"), ("%-", "%-"), ("% ", "% "),
])
def test_invalid_expansion(fmt: str, bad: str) -> None:
    with pytest.raises(ValueError, match=f'invalid expansion "{bad}"'):
        KeyFormat.compile(fmt)


@pytest.mark.parametrize("fmt", ["%", "abc%", "%s%", "%%%"])
def test_trailing_lone_percent(fmt: str) -> None:
    with pytest.raises(ValueError, match='lone "%" at the end'):
        KeyFormat.compile(fmt)


def test_properties() -> None:
    assert KeyFormat.compile("%s").is_identity
    assert not KeyFormat.compile("%S").is_identity
    assert not KeyFormat.compile("p:%s").is_identity
    fmt = KeyFormat.compile("%u:%2")
    assert (fmt.uses_user, fmt.uses_domain, fmt.labels) == (True, True, 2)
    fmt = KeyFormat.compile("%s%%")
    assert (fmt.uses_user, fmt.uses_domain, fmt.labels) == (False, False, 0)
    assert KeyFormat.compile("%D").uses_domain and KeyFormat.compile("%D").labels == 0
    assert KeyFormat.compile("%U").uses_user


def test_key_format_is_immutable() -> None:
    fmt = KeyFormat.compile("%s")
    with pytest.raises(AttributeError):
        fmt.source = "%u"  # type: ignore[misc]


# ---------------------------------------------------------------- key_digest


@pytest.mark.parametrize("algorithm", ["sha256", "SHA256", "md5", "sha1", "sha512", "sha3_256"])
def test_digest_matches_hashlib(algorithm: str) -> None:
    key = "postscreen:192.0.2.1 ünï"
    expected = hashlib.new(algorithm.lower(), key.encode("utf-8")).hexdigest()
    assert digest_key(algorithm, key) == expected
    assert expected == expected.lower()


def test_digest_accepts_openssl_dash_names() -> None:
    assert digest_key("sha3-256", "k") == hashlib.sha3_256(b"k").hexdigest()


@pytest.mark.parametrize("algorithm", ["nope", "", "shake_128", "shake-256"])
def test_digest_unknown(algorithm: str) -> None:
    with pytest.raises(ValueError):
        resolve_digest(algorithm)


# ---------------------------------------------------------------- final check


def test_key_problem_ok() -> None:
    assert key_problem(b"a") is None
    assert key_problem("ünïcode@bücher".encode()) is None
    assert key_problem(b"\x80\xff") is None  # non-ASCII bytes are not controls


@pytest.mark.parametrize("char", [" ", "\t", "\n", "\r", "\v", "\f", "\x00", "\x01",
                                  "\x1b", "\x1f", "\x7f"])
def test_key_problem_space_and_controls(char: str) -> None:
    assert key_problem(f"a{char}b".encode()) == SKIP_CONTROLS
    assert key_problem(char.encode()) == SKIP_CONTROLS


def test_key_problem_empty() -> None:
    assert key_problem(b"") == SKIP_EXPANSION


def test_key_problem_length_boundary() -> None:
    assert MEMCACHED_MAX_KEY_BYTES == 250
    assert key_problem(b"k" * 250) is None
    reason = key_problem(b"k" * 251)
    assert reason == ("key is 251 bytes, over memcached's 250-byte limit "
                      "(set key_digest = sha256)")


def test_key_problem_counts_utf8_bytes() -> None:
    # 125 two-byte characters = 250 bytes; one more = 252.
    assert key_problem(("é" * 125).encode()) is None
    assert key_problem(("é" * 126).encode()) is not None


def test_controls_reported_before_length() -> None:
    assert key_problem(b" " * 300) == SKIP_CONTROLS


# ---------------------------------------------------------------- pipeline


def pipeline(fmt: str = "%s", digest: str = "", domain: tuple[str, ...] = (),
             utf8: bool = True) -> KeyPipeline:
    dom = DomainFilter.build(domain, DictTable)
    return KeyPipeline(KeyFormat.compile(fmt), digest, dom, utf8=utf8)


def test_identity_pipeline() -> None:
    assert pipeline().prepare("a@b.c", fold=False) == PreparedKey(b"a@b.c", None)


def test_fold() -> None:
    p = pipeline()
    assert p.prepare("Joe@Example.COM", fold=True).key == b"joe@example.com"
    assert p.prepare("Joe@Example.COM", fold=False).key == b"Joe@Example.COM"


def test_fold_utf8_is_full_casefold_and_ascii_mode_is_ascii_only() -> None:
    # postmap 3.7 with smtputf8_enable=yes answers STRAßE@X from strasse@x,
    # and with smtputf8_enable=no from straße@x.
    assert pipeline().prepare("STRAßE@X", fold=True).key == b"strasse@x"
    assert pipeline(utf8=False).prepare("STRAßE@X", fold=True).key == "straße@x".encode()
    assert pipeline(utf8=False).prepare("ÉA@X", fold=True).key == "Éa@x".encode()


def test_format_and_fold() -> None:
    p = pipeline("aliases:%u")
    assert p.prepare("Joe@Example.com", fold=True).key == b"aliases:joe"


def test_empty_name() -> None:
    assert pipeline().prepare("", fold=True) == PreparedKey(None, SKIP_EMPTY_KEY)
    assert pipeline(domain=("x.com",)).prepare("", fold=True).skip_reason == SKIP_EMPTY_KEY


def test_domain_mismatch() -> None:
    p = pipeline(domain=("example.com",))
    assert p.prepare("joe@example.com", fold=True).key == b"joe@example.com"
    assert p.prepare("joe@EXAMPLE.com", fold=False).key == b"joe@EXAMPLE.com"
    for name in ("joe@other.com", "joe", "@example.com", "joe@", "joe@sub.example.com"):
        assert p.prepare(name, fold=True) == PreparedKey(None, SKIP_DOMAIN), name


def test_expansion_impossible() -> None:
    p = pipeline("%d")
    assert p.prepare("joe", fold=True) == PreparedKey(None, SKIP_EXPANSION)
    assert pipeline("").prepare("joe", fold=True) == PreparedKey(None, SKIP_EXPANSION)


def test_digest_in_pipeline() -> None:
    p = pipeline("pfx:%s", "sha256")
    expected = hashlib.sha256(b"pfx:joe@x").hexdigest().encode()
    assert p.prepare("Joe@X", fold=True).key == expected


def test_digest_cures_spaces_and_length() -> None:
    long_name = "x" * 400
    assert pipeline().prepare(long_name, fold=False).skip_reason is not None
    assert pipeline(digest="sha256").prepare(long_name, fold=False).key == \
        hashlib.sha256(long_name.encode()).hexdigest().encode()
    assert pipeline(digest="sha256").prepare("a b", fold=False).key == \
        hashlib.sha256(b"a b").hexdigest().encode()


def test_controls_and_length_in_pipeline() -> None:
    assert pipeline().prepare("a b", fold=True) == PreparedKey(None, SKIP_CONTROLS)
    assert pipeline().prepare("a\x7f", fold=True).skip_reason == SKIP_CONTROLS
    assert pipeline("p%s").prepare("k" * 249, fold=True).key == b"p" + b"k" * 249
    reason = pipeline("p%s").prepare("k" * 250, fold=True).skip_reason
    assert reason is not None and "251 bytes" in reason


def test_space_in_format_literal_is_caught() -> None:
    assert pipeline("a %s").prepare("x", fold=True).skip_reason == SKIP_CONTROLS


def test_malformed_unicode() -> None:
    assert pipeline().prepare("a\udc80@b", fold=True) == PreparedKey(None, SKIP_MALFORMED)


def test_order_of_checks() -> None:
    # Each case fails two checks; the earlier one (Postfix's order) is reported.
    dom = ("example.com",)
    # empty before domain
    assert pipeline("%d", domain=dom).prepare("", fold=True).skip_reason == SKIP_EMPTY_KEY
    # domain before expansion: "joe" fails both the domain list and %d.
    assert pipeline("%d", domain=dom).prepare("joe", fold=True).skip_reason == SKIP_DOMAIN
    # domain before controls
    assert pipeline(domain=dom).prepare("a b@other.com", fold=True).skip_reason == SKIP_DOMAIN
    # expansion before controls: the literal space never gets a key.
    assert pipeline("a %d").prepare("joe", fold=True).skip_reason == SKIP_EXPANSION
    # fold after the domain check, before expansion: both see the same key.
    p = pipeline("%u", domain=dom)
    assert p.prepare("JOE@EXAMPLE.COM", fold=True).key == b"joe"


def test_domain_table_sees_folded_domain_and_errors_propagate() -> None:
    from memtable.errors import TemporaryError

    class Broken(DictTable):
        def lookup(self, key: str) -> str | None:
            raise TemporaryError("down")

    dom = DomainFilter.build(("test:broken",), lambda spec: Broken(spec))
    p = KeyPipeline(KeyFormat.compile("%s"), "", dom)
    with pytest.raises(TemporaryError):
        p.prepare("a@b", fold=True)

    class Refusing(DictTable):
        def lookup(self, key: str) -> str | None:
            raise AccessError("no")

    dom = DomainFilter.build(("test:refusing",), lambda spec: Refusing(spec))
    p = KeyPipeline(KeyFormat.compile("%s"), "", dom)
    with pytest.raises(TemporaryError, match="table lookup problem"):
        p.prepare("a@b", fold=True)


def test_unknown_digest_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        KeyPipeline(KeyFormat.compile("%s"), "nope")


_ALPHABET = "aZ@.%é ß\t\n\x00\x7f€-_:" + "\udc80"


@pytest.mark.parametrize("fmt", ["%s", "x:%u", "%d", "%3.%1", "%U-%D-%9", "%S%%"])
@pytest.mark.parametrize("digest", ["", "sha256"])
def test_random_keys_never_raise(fmt: str, digest: str) -> None:
    rng = random.Random(f"{fmt}/{digest}")
    p = pipeline(fmt, digest, domain=("a.z", "!b", "é"))
    plain = pipeline(fmt, digest)
    for _ in range(400):
        name = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.05:
            name *= 40
        for pl in (p, plain):
            for fold in (False, True):
                result = pl.prepare(name, fold)
                assert (result.key is None) != (result.skip_reason is None)
                if result.key is not None:
                    assert 0 < len(result.key) <= MEMCACHED_MAX_KEY_BYTES
                    assert key_problem(result.key) is None


# ---------------------------------------------------------------- postmap oracle

ORACLE_NAMES = [
    "joe@example.com", "Joe@Example.COM", "a@b@example.com", "joe", "@example.com",
    "joe@", "u@mail.example.com", "u@mail..example.com.", "u@com", "STRAßE@Bücher.example",
    "x@sub.example.com", "x@other.org", "y@BÜCHER.example", "100%@example.com",
]
ORACLE_CASES = [
    ("%s", ""), ("pfx:%s", ""), ("%u", ""), ("%d", ""), ("%U|%D|%S|%%", ""),
    ("%3.%2.%1", ""), ("L%1", ""), ("%s", "example.com, Other.ORG"),
    ("%u:%d", "!a.example.com, example.com"),
    ("%s", "!x@, {file} other.org"),
]


@pytest.mark.postfix
@pytest.mark.parametrize(("fmt", "domain"), ORACLE_CASES)
@pytest.mark.parametrize("fold", [True, False])
def test_keys_agree_with_postmap(fmt: str, domain: str, fold: bool, memcached: Memcached,
                                 postmap_config: Path, tmp_path: Path) -> None:  # noqa: F811
    """Store a value under the key we compute for each name; postmap 3.7 must
    find exactly those values (and nothing for the names we skip)."""
    patterns = tmp_path / "domains"
    patterns.write_text("# pattern file\nEXAMPLE.com\n  !sub.example.com\nbücher.example\n")
    domain = domain.replace("{file}", str(patterns))
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nkey_format = {fmt}\n"
                  f"domain = {domain}\n")
    # Postfix waits up to a few seconds for a file whose mtime is "now" to
    # settle (load_file); age both files so postmap answers at once.
    past = time.time() - 60
    for path in (cf, postmap_config / "main.cf"):
        os.utime(path, (past, past))
    p = KeyPipeline(KeyFormat.compile(fmt), "",
                    DomainFilter.build(split_list(domain), DictTable))
    values: dict[bytes, str] = {}
    expected: dict[str, str] = {}
    for name in ORACLE_NAMES:
        prepared = p.prepare(name, fold)
        if prepared.key is None:
            continue
        value = values.setdefault(prepared.key, f"v{len(values)}")
        assert memcached.raw(b"set %s 0 0 %d\r\n%s\r\n" % (
            prepared.key, len(value), value.encode())) == b"STORED\r\n"
        expected[name] = value
    args = ["-q", "-", f"memcache:{cf}"] if fold else ["-f", "-q", "-", f"memcache:{cf}"]
    result = run_postmap(postmap_config, *args, input="\n".join(ORACLE_NAMES).encode() + b"\n")
    found = dict(line.split("\t", 1) for line in result.stdout.decode().splitlines())
    assert found == expected, result.stderr.decode()


@pytest.mark.parametrize("fmt", ["pre:%s", "%s:%S", "%%x%s%%", "lit", "%S"])
@pytest.mark.parametrize("name", ["a", "user@example.com", "%s %d", "Ünï@x"])
def test_whole_key_formats_expand_like_key_format(fmt: str, name: str) -> None:
    # KeyPipeline expands %s-only formats by %-formatting; it must agree
    # with KeyFormat.expand, literal "%" included.
    expected = KeyFormat.compile(fmt).expand(name)
    assert expected is not None
    prepared = KeyPipeline(KeyFormat.compile(fmt)).prepare(name, False)
    want = expected.encode()
    if key_problem(want) is None:
        assert prepared == PreparedKey(want, None)
    else:  # the space in "%s %d"
        assert prepared.key is None
