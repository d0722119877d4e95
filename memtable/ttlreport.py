"""``memtable ttl TABLE``: explain a memcache table's effective ttl.

Says what memtable and Postfix send for the table's ttl (the 30-day rule),
and, when Postfix's configuration uses the table as postscreen_cache_map or
address_verify_map, warns where the table would drop entries before the
postscreen or verify ttls they carry (the manual's ttl NOTE 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from memtable import ttl as ttl_rule
from memtable.cf import split_list, time_seconds
from memtable.config import MemcacheConfig
from memtable.errors import ConfigError
from memtable.limits import MEMCACHED_RELATIVE_TTL_MAX
from memtable.postconf import PostfixSettings, postfix_settings

# Postfix parameters that matter, with the unit Postfix assumes when none is given.
POSTSCREEN_TTLS = ("postscreen_greet_ttl", "postscreen_dnsbl_max_ttl",
                   "postscreen_pipelining_ttl", "postscreen_non_smtp_command_ttl",
                   "postscreen_bare_newline_ttl")
VERIFY_TTLS = ("address_verify_positive_expire_time", "address_verify_negative_expire_time")
CLEANUP = {"postscreen": "postscreen_cache_cleanup_interval",
           "verify": "address_verify_cache_cleanup_interval"}
MAPS = {"postscreen": "postscreen_cache_map", "verify": "address_verify_map"}
RETESTED = {"postscreen": "clients are tested again",
            "verify": "addresses are probed again"}


# `memtable ttl -h`: plain text (the module docstring is for programmers).
TTL_HELP = ("Explain a memcache table's ttl: what memtable and Postfix send to "
            "memcached for it (a ttl over 30 days is an absolute time to memcached). "
            "When Postfix's configuration uses the table as postscreen_cache_map or "
            "address_verify_map, warn where the ttl is shorter than the postscreen or "
            "verify ttls its entries carry, and when a cleanup interval is not 0.  "
            "The explanation goes to standard output, warnings to standard error.")


@dataclass(frozen=True)
class TtlReport:
    lines: list[str]
    warnings: list[str]

    def render(self) -> str:
        """The report for standard output (warnings go to standard error)."""
        return "\n".join(self.lines) + "\n"

    def render_warnings(self) -> str:
        """``memtable: warning: ...`` lines, as Postfix's programs warn."""
        return "".join(f"memtable: warning: {w}\n" for w in self.warnings)


def report(path: str, settings: PostfixSettings) -> TtlReport:
    config = MemcacheConfig.from_file(path)
    postfix = settings.values
    lines = [f"table: memcache:{path}",
             f"ttl = {config.ttl}: {ttl_rule.describe(config.ttl)}"]
    warnings: list[str] = []
    if config.ttl > MEMCACHED_RELATIVE_TTL_MAX:
        warnings.append(
            f"ttl {config.ttl} is over 30 days: harmless for a table only memtable and policyd "
            "write (they send an absolute time), but entries that Postfix itself writes "
            f"(postscreen, verify) expire at once; use ttl <= {MEMCACHED_RELATIVE_TTL_MAX} "
            "if Postfix writes this table")
    used_by = [role for role, param in MAPS.items()
               if _names_table(postfix.get(param, ""), path)]
    if postfix and settings.note:
        lines.append(f"postfix: {settings.note}")
    if not postfix:
        lines.append("postfix: postconf not available; postscreen/verify ttls not checked")
    elif not used_by:
        lines.append("postfix: not used as postscreen_cache_map or address_verify_map")
    for role in used_by:
        params = POSTSCREEN_TTLS if role == "postscreen" else VERIFY_TTLS
        ttls = {p: time_seconds(postfix.get(p, "")) for p in params}
        known = {p: s for p, s in ttls.items() if s is not None}
        lines.append(f"postfix: {MAPS[role]} uses this table; "
                     + ", ".join(f"{p} = {postfix.get(p)}" for p in known))
        if known:
            longest_param, longest = max(known.items(), key=lambda kv: kv[1])
            # Over 30 days the ttl cannot follow (next warning): only ask
            # for what a relative ttl can hold.
            wanted = min(longest, MEMCACHED_RELATIVE_TTL_MAX)
            if config.ttl != 0 and config.ttl < wanted:
                warnings.append(
                    f"ttl {config.ttl}s is shorter than {longest_param} ({longest}s): "
                    f"{role} entries vanish before they expire, so {RETESTED[role]}; "
                    f"set ttl = {wanted}")
            if longest > MEMCACHED_RELATIVE_TTL_MAX:
                warnings.append(
                    f"{longest_param} is over 30 days: the table ttl cannot cover it with "
                    "Postfix writing; lower it to 30d")
        cleanup = time_seconds(postfix.get(CLEANUP[role], "0"))
        if cleanup:
            warnings.append(f"{CLEANUP[role]} should be 0 with a memcache table "
                            "(except on the one host responsible for cleanup)")
    return TtlReport(lines, warnings)


def _names_table(value: str, path: str) -> bool:
    """True when a map parameter names memcache:PATH (possibly inside proxy:)."""
    for item in split_list(value):
        if item.startswith("proxy:"):
            item = item[len("proxy:"):]
        if item.startswith("memcache:") and os.path.realpath(item[9:]) == os.path.realpath(path):
            return True
    return False


def parser() -> argparse.ArgumentParser:
    """``memtable ttl``'s command line."""
    parser = argparse.ArgumentParser(
        prog="memtable ttl", description=TTL_HELP,
        epilog="Exit status: 0 (warnings too), 1 on an error.  Manual: memtable(1).")
    parser.add_argument("-c", metavar="DIR", dest="config_dir",
                        help="the Postfix configuration directory postconf reads (postconf -c "
                             "DIR); default: postconf's own (MAIL_CONFIG or /etc/postfix). "
                             "Without a main.cf there, Postfix's defaults are assumed")
    parser.add_argument("table", metavar="memcache:FILE.cf", help="the table to explain")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    type_, _, path = args.table.partition(":")
    if type_ != "memcache" or not path:
        print("memtable: fatal: ttl needs a memcache:/path/file.cf table", file=sys.stderr)
        return 1
    names = [*MAPS.values(), *POSTSCREEN_TTLS, *VERIFY_TTLS, *CLEANUP.values()]
    try:
        result = report(path, postfix_settings(names, args.config_dir))
    except ConfigError as exc:
        print(f"memtable: fatal: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(result.render())
    sys.stdout.flush()
    sys.stderr.write(result.render_warnings())
    return 0
