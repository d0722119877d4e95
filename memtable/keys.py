"""From a Postfix lookup key to the memcache key, exactly as dict_memcache does.

KeyFormat is db_common's key_format template (%s %u %d %S %U %D %1-%9 %%),
digest_key is Postfix 3.11's key_digest, key_problem is the final check of
the memcache key (Postfix 3.12 skips white space and controls; memtable also
skips keys over memcached's 250-byte limit), and KeyPipeline puts them in
Postfix's order (dict_memcache_valid_key): empty key, domain list, case fold,
key_format, key_digest, final check.  Everything here is pure: no I/O except
the domain list's own table lookups.

Read from Postfix's source and checked with postmap 3.7: the domain part
starts after the LAST '@'; %1-%9 count labels from the right and skip empty
ones (``a..b.`` has the labels a and b), so only too few labels make the
expansion impossible.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from memtable.domainlist import DomainFilter
from memtable.limits import MEMCACHED_MAX_KEY_BYTES
from memtable.table import fold_case

# Postfix's skip reasons (dict_memcache_valid_key), word for word.
SKIP_EMPTY_KEY = "empty lookup key"
SKIP_DOMAIN = "domain mismatch"
SKIP_EXPANSION = "empty lookup key expansion"
SKIP_CONTROLS = "name contains space or controls"
# dict_utf8's reason for a key that is not valid UTF-8 (lone surrogates).
SKIP_MALFORMED = "malformed UTF-8 or invalid codepoint"
# Postfix skips lookups and deletes for these reasons silently; any other
# reason (a key over memcached's limit) is a configuration problem to warn of.
SILENT_SKIPS = frozenset({SKIP_EMPTY_KEY, SKIP_DOMAIN, SKIP_EXPANSION, SKIP_CONTROLS,
                          SKIP_MALFORMED})

# Field numbers in a compiled format; %N is _LABEL0 + N.
_WHOLE, _USER, _DOMAIN, _LABEL0 = 0, 1, 2, 2
_CODES: dict[str, int] = {"s": _WHOLE, "S": _WHOLE, "u": _USER, "U": _USER,
                          "d": _DOMAIN, "D": _DOMAIN,
                          **{str(n): _LABEL0 + n for n in range(1, 10)}}
_VALID = "%%, %s, %u, %d, %S, %U, %D and %1 to %9"


@dataclass(frozen=True)
class KeyFormat:
    """A compiled key_format (parse once, expand per key)."""

    #: The format as written in the configuration.
    source: str
    #: Literal text (str) and fields (int codes), in order.
    parts: tuple[str | int, ...]
    #: Uses %u/%U: keys with an empty local part are impossible.
    uses_user: bool
    #: Uses %d/%D/%1-%9: keys without a non-empty domain are impossible.
    uses_domain: bool
    #: Highest %N used (0 when none): keys with fewer labels are impossible.
    labels: int

    @classmethod
    def compile(cls, fmt: str) -> KeyFormat:
        """Parse a key_format; ValueError names a bad ``%x`` or a lone ``%``."""
        parts: list[str | int] = []
        literal: list[str] = []
        uses_user = uses_domain = False
        labels = 0
        i, n = 0, len(fmt)
        while i < n:
            char = fmt[i]
            if char != "%":
                literal.append(char)
                i += 1
                continue
            if i + 1 >= n:
                raise ValueError(f'lone "%" at the end (write %% for a literal "%"; '
                                 f"valid expansions: {_VALID})")
            spec = fmt[i + 1]
            i += 2
            if spec == "%":
                literal.append("%")
                continue
            code = _CODES.get(spec)
            if code is None:
                raise ValueError(f'invalid expansion "%{spec}" at offset {i - 2} '
                                 f"(valid expansions: {_VALID})")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(code)
            if code == _USER:
                uses_user = True
            elif code >= _DOMAIN:
                uses_domain = True
                labels = max(labels, code - _LABEL0)
        if literal:
            parts.append("".join(literal))
        return cls(fmt, tuple(parts), uses_user, uses_domain, labels)

    @property
    def is_identity(self) -> bool:
        """True for the default ``%s``: Postfix then uses the key unexpanded."""
        return self.source == "%s"

    def expand(self, key: str) -> str | None:
        """The expanded key, or None when the expansion is impossible.

        Impossible (Postfix's db_common_expand returns 0): an empty key; %d,
        %D or %N without a non-empty domain; %u or %U with an empty local
        part; fewer non-empty domain labels than the highest %N.
        """
        if not key:
            return None
        if self.is_identity:
            return key
        user = domain = ""
        labels: list[str] = []
        if self.uses_user or self.uses_domain:
            at = key.rfind("@")
            if at < 0:
                if self.uses_domain:
                    return None
                user = key
            else:
                user, domain = key[:at], key[at + 1:]
                if (self.uses_domain and not domain) or (self.uses_user and not user):
                    return None
            if self.labels:
                # argv_split(): empty labels (leading, double, trailing dots) vanish.
                labels = [label for label in domain.split(".") if label]
                if len(labels) < self.labels:
                    return None
                labels.reverse()
        fields = (key, user, domain, *labels)
        return "".join([part if isinstance(part, str) else fields[part]
                        for part in self.parts])


class _Hash(Protocol):
    def hexdigest(self) -> str: ...


Digester = Callable[[bytes], _Hash]


@functools.lru_cache(maxsize=32)
def resolve_digest(algorithm: str) -> Digester:
    """The hashlib constructor for a key_digest name (``sha256``, ``SHA256``,
    ``sha3-256``, ...).  ValueError for unknown or variable-length digests."""
    name = algorithm.strip().lower()
    candidates = (name, name.replace("-", "_"))
    for candidate in candidates:
        if candidate.startswith("shake"):
            raise ValueError(f'variable-length digest "{algorithm}" is not supported')
        try:
            hashlib.new(candidate)
        except (ValueError, TypeError):
            continue
        direct = getattr(hashlib, candidate, None)
        if candidate in hashlib.algorithms_guaranteed and callable(direct):
            return direct  # type: ignore[no-any-return]
        return functools.partial(hashlib.new, candidate)
    raise ValueError(f'unknown digest "{algorithm}"')


def digest_key(algorithm: str, key: str) -> str:
    """Postfix 3.11's key_digest: the digest of the UTF-8 expanded key as
    lowercase hex.  ValueError for an unknown algorithm or a key that is not
    valid Unicode (lone surrogates)."""
    return resolve_digest(algorithm)(key.encode("utf-8")).hexdigest()


_BAD_BYTES = re.compile(rb"[\x00-\x20\x7f]")  # C-locale isspace() or iscntrl()


def key_problem(key: bytes) -> str | None:
    """Why memcache cannot use this final key, or None when it can."""
    if not key:
        return SKIP_EXPANSION
    if _BAD_BYTES.search(key) is not None:
        return SKIP_CONTROLS
    if len(key) > MEMCACHED_MAX_KEY_BYTES:
        return (f"key is {len(key)} bytes, over memcached's {MEMCACHED_MAX_KEY_BYTES}-byte "
                f"limit (set key_digest = sha256)")
    return None


class PreparedKey(NamedTuple):
    """The memcache key for one name, or why the name is skipped."""

    #: The memcache key; None when skipped.
    key: bytes | None
    #: Postfix's wording of why the name is skipped; None when not skipped.
    skip_reason: str | None


_SKIPPED = {reason: PreparedKey(None, reason)
            for reason in (SKIP_EMPTY_KEY, SKIP_DOMAIN, SKIP_EXPANSION, SKIP_CONTROLS,
                           SKIP_MALFORMED)}


class KeyPipeline:
    """The one place that turns a Postfix lookup key into a memcache key."""

    __slots__ = ("_digest", "_domain", "_format", "_identity", "_template", "_uses", "_utf8",
                 "digest", "domain", "key_format")

    def __init__(self, key_format: KeyFormat, digest: str = "",
                 domain: DomainFilter | None = None, *, utf8: bool = True):
        """``digest`` is key_digest ("" for none; ValueError when unknown).
        ``utf8`` selects Postfix's SMTPUTF8 case folding (full Unicode, the
        default) instead of ASCII-only folding."""
        self.key_format = key_format
        self.digest = digest
        self.domain = domain
        self._format = key_format
        self._identity = key_format.is_identity
        self._digest: Digester | None = resolve_digest(digest) if digest else None
        self._domain = domain
        self._utf8 = utf8
        # A format of literals and %s/%S only (``prefix:%s``) expands with
        # one %-formatting: same result as KeyFormat.expand for a non-empty key.
        self._template: str | None = None
        self._uses = 0
        if all(part == _WHOLE for part in key_format.parts if isinstance(part, int)):
            self._template = "".join(part.replace("%", "%%") if isinstance(part, str) else "%s"
                                     for part in key_format.parts)
            self._uses = sum(1 for part in key_format.parts if isinstance(part, int))

    def prepare(self, name: str, fold: bool) -> PreparedKey:
        """The memcache key for ``name``, in dict_memcache_valid_key's order.

        Never raises except TemporaryError from a domain-list table.
        """
        if not name:
            return _SKIPPED[SKIP_EMPTY_KEY]
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                return _SKIPPED[SKIP_MALFORMED]
        if self._domain is not None and not self._domain.check(name):
            return _SKIPPED[SKIP_DOMAIN]
        # Postfix folds in prepare_key, after the domain check (which folds
        # on its own anyway).
        if fold:
            name = fold_case(name, self._utf8)
        expanded: str | None
        if self._identity:
            expanded = name
        elif self._template is not None:
            expanded = self._template % ((name,) * self._uses)
        else:
            expanded = self._format.expand(name)
        if not expanded:
            return _SKIPPED[SKIP_EXPANSION]
        try:
            key = expanded.encode("utf-8")
        except UnicodeEncodeError:  # only from a format built outside a .cf file
            return _SKIPPED[SKIP_MALFORMED]
        if self._digest is not None:
            key = self._digest(key).hexdigest().encode("ascii")
        problem = key_problem(key)
        if problem is not None:
            return _SKIPPED.get(problem) or PreparedKey(None, problem)
        return PreparedKey(key, None)
