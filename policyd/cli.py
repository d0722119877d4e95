"""The ``policyd`` command.

    policyd [-c FILE] [-o NAME=VALUE ...] [--uvloop] [run]   run the server (default)
    policyd [-c FILE] --check-config        print the effective configuration, check
                                            what would break at run time

    policyd [-c FILE] report [--json] [--plot FILE.png]   figures and ttl advice
    policyd [-c FILE] cleanup [--dry-run]   delete expired records (daily)
    policyd [-c FILE] import-postgrey [--dry-run] DBDIR   carry postgrey's database over
    policyd --version

-c and -o may also follow the command (``policyd report -o max_age=40d``).

Subcommands live in ``_COMMANDS``.  Errors are one line on stderr and exit
status 1, never a traceback; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

from memtable.cf import decimal
from memtable.errors import ConfigError, MemtableError
from memtable.limits import CF_INT_MAX
from memtable.version import version
from policyd.config import DEFAULT_CONFIG_PATH, PolicydConfig
from policyd.errors import PolicydError
from policyd.logsetup import end_command_logging, error_line, setup_command_logging

log = logging.getLogger("policyd")
# Bits always added to the umask (see _restrict_umask).
UMASK_RESTRICT = 0o027


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd", description="Postfix SMTPD policy server (greylisting).",
        epilog="Manuals: policyd(8), policyd.cf(5).")
    parser.add_argument("--version", action="version", version=f"policyd {version()}")
    parser.add_argument("-c", "--config", metavar="FILE", default=DEFAULT_CONFIG_PATH,
                        help=f"policyd.cf to read (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-o", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="override a policyd.cf parameter (repeatable), as postconf -o")
    parser.add_argument("--check-config", action="store_true",
                        help="check FILE, print the effective configuration and exit")
    parser.add_argument("--uvloop", action="store_true",
                        help="use uvloop's event loop when it is installed")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the policy server (the default)")
    # report and cleanup are imported only when run (they pull in the policy).
    report = sub.add_parser("report", help="greylisting figures from the stores and "
                            "suggested greylist_delay / retry_window / max_age")
    cleanup = sub.add_parser("cleanup", help="delete expired and malformed records from "
                             "the stores (run daily)")
    import_postgrey = sub.add_parser(
        "import-postgrey", help="import postgrey's passed triplets and auto-whitelist "
        "(run before switching from postgrey)")
    for command in (run, report, cleanup, import_postgrey):
        # `policyd report -c FILE` as well as `policyd -c FILE report`.
        command.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                             help="policyd.cf to read")
        # -o after the command as well; its own dest, because a subcommand's
        # value would replace (not extend) the list given before it.
        command.add_argument("-o", dest="late_overrides", action="append",
                             default=argparse.SUPPRESS, metavar="NAME=VALUE",
                             help="override a policyd.cf parameter (repeatable)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--plot", metavar="FILE.png",
                        help="also write the retry-delay histogram as a PNG (matplotlib)")
    report.add_argument("--top", type=_number, default=10, metavar="N",
                        help="list the N clients with most passes (default 10)")
    report.add_argument("--max-entries", type=_number, default=None, metavar="N",
                        help="read at most N entries per table (default: the limit)")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="count what would be deleted, delete nothing")
    _import_postgrey_arguments(import_postgrey)
    return parser


def _import_postgrey_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dbdir", metavar="DBDIR", nargs="?",
                        help="postgrey's --dbdir (Debian: /var/lib/postgrey)")
    parser.add_argument("--dry-run", action="store_true",
                        help="report what would be imported, write nothing")
    parser.add_argument("--no-spf", action="store_true",
                        help="client_key = spf: do not evaluate the senders' SPF (their "
                        "triplets are then imported under spf_fallback_client_key only)")
    parser.add_argument("--spf-max-time", type=_positive_seconds, default=None, metavar="N",
                        help="client_key = spf: evaluate SPF for at most N seconds in all "
                        "(default 900)")
    group = parser.add_argument_group(
        "postgrey's options", "the ones postgrey runs with (Debian: POSTGREY_OPTS in "
        "/etc/default/postgrey); they decide what its records mean")
    # A string, checked by the command: a bad value is one line, not usage.
    group.add_argument("--delay", default="300", metavar="N",
                       help="postgrey's --delay in seconds (default 300)")
    lookup = group.add_mutually_exclusive_group()
    lookup.add_argument("--lookup-by-host", action="store_true",
                        help="postgrey keyed triplets by the client's address")
    lookup.add_argument("--lookup-by-subnet", action="store_true",
                        help="... by its network (postgrey's default)")
    group.add_argument("--ipv4cidr", type=_bounded(32), default=24, metavar="N",
                       help="postgrey's IPv4 network prefix (default 24)")
    group.add_argument("--ipv6cidr", type=_bounded(128), default=64, metavar="N",
                       help="postgrey's IPv6 network prefix (default 64)")
    group.add_argument("--dbdir", dest="dbdir_option", metavar="DIR",
                       help="the same as DBDIR")
    # postgrey 1.37's other options (its GetOptions list): accepted so that
    # POSTGREY_OPTS can be pasted whole, reported as not used.
    other = parser.add_argument_group(
        "postgrey's other options", "accepted and not used: they do not decide what "
        "postgrey's records mean (policyd.cf's parameters apply)")
    for names in POSTGREY_FLAGS:
        other.add_argument(*names, dest="postgrey_ignored", action=_Remember, nargs=0,
                           default=[], help=argparse.SUPPRESS)
    for names in POSTGREY_VALUED:
        other.add_argument(*names, dest="postgrey_ignored", action=_Remember,
                           default=[], metavar="VALUE", help=argparse.SUPPRESS)
    other.add_argument("--auto-whitelist-clients", dest="postgrey_ignored", action=_Remember,
                       nargs="?", default=[], help=argparse.SUPPRESS)


# postgrey 1.37's options that do not shape its database (from its
# GetOptions call); --help, --man, --version and --no-action are left out
# (postgrey does not run with them).
POSTGREY_FLAGS: tuple[tuple[str, ...], ...] = (
    ("-v", "--verbose"), ("-q", "--quiet"), ("-d", "--daemonize"), ("--privacy",), ("--exim",))
POSTGREY_VALUED: tuple[tuple[str, ...], ...] = (
    ("-u", "--unix"), ("-i", "--inet"), ("--socketmode",), ("--user",), ("--group",),
    ("--pidfile",), ("--max-age",), ("--retry-window",), ("--whitelist-clients",),
    ("--whitelist-recipients",), ("--syslogfacility", "--syslog-facility", "--facility"),
    ("--greylist-action",), ("--greylist-text",), ("--hostname",),
    ("--listen-queue-size",), ("--x-greylist-header",))


class _Remember(argparse.Action):
    """Remember a postgrey option as given (``--inet=10023``), in order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        seen = list(getattr(namespace, self.dest, None) or [])
        text = option_string or self.dest
        if isinstance(values, str):
            text += f"={values}"
        seen.append(text)
        setattr(namespace, self.dest, seen)


def _positive_seconds(text: str) -> int:
    value = _number(text)
    if not 0 < value <= CF_INT_MAX:
        raise argparse.ArgumentTypeError(f"{text}: not a positive number of seconds")
    return value


def _bounded(top: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _number(text)
        if not 0 <= value <= top:
            raise argparse.ArgumentTypeError(f"{text}: not between 0 and {top}")
        return value
    return parse


def _number(text: str) -> int:
    """A decimal argument, read as configuration numbers are (memtable.cf.decimal)."""
    number = decimal(text)
    if number is None:
        raise argparse.ArgumentTypeError("bad numerical value")
    return number


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    umask = _restrict_umask()
    # Warnings while the configuration is read (a parameter set twice, an
    # unknown one in a table .cf) carry "policyd: warning:" as Postfix's do.
    setup_command_logging()
    try:
        return _main(args)
    finally:
        end_command_logging()
        os.umask(umask)  # main() called in a longer-lived process (tests)


def _restrict_umask() -> int:
    """Files policyd creates (the lmdb backups hold addresses, the report's
    plot) are not world-readable, whoever starts it: add 027 to the umask
    (the units set UMask=0027; by hand it is often 022 or 0).  lmdb files
    are then 0640 (0644 minus the umask, as Postfix creates them).
    Returns the umask before."""
    previous = os.umask(UMASK_RESTRICT)
    os.umask(previous | UMASK_RESTRICT)
    return previous


def _main(args: argparse.Namespace) -> int:
    try:
        # Given before and after the command: in command-line order, later wins.
        overrides = args.overrides + getattr(args, "late_overrides", [])
        config = PolicydConfig.from_file(args.config, overrides)
    except ConfigError as exc:
        print(error_line(f"policyd: {exc}"), file=sys.stderr)
        return 1
    if args.check_config:
        return _check_config(config)
    command: Callable[[PolicydConfig, argparse.Namespace], int] = _COMMANDS[
        args.command or "run"]
    return command(config, args)


def _check_config(config: PolicydConfig) -> int:
    """Print the effective configuration, then check what would break at
    run time (policyd.preflight): one line per problem, exit status 1.
    Nothing is created or changed; memcached is asked once (a warning when
    it does not answer)."""
    from policyd import preflight
    from policyd.logsetup import command_logging

    sys.stdout.write(config.render())
    sys.stdout.flush()
    with command_logging():
        problems = preflight.errors(config) + preflight.probe(config)
    for problem in problems:
        print(error_line(f"policyd: {problem}"), file=sys.stderr)
    return 1 if problems else 0


def _run_daemon(config: PolicydConfig, args: argparse.Namespace) -> int:
    from policyd import preflight
    from policyd.logsetup import setup_logging

    # SIGHUP's and SIGTERM's default actions end the process at once: while
    # policyd starts (reading large whitelists takes a while, and the
    # listening socket takes connections before the server's own handlers
    # are installed), they are remembered instead: a reload is done once the
    # server runs, a stop stops it as soon as it has started.
    _early_signals.clear()
    previous = {signum: signal.signal(signum, _early_signal)
                for signum in (signal.SIGHUP, signal.SIGTERM)}
    try:
        setup_logging(config)
        # What would fail later, or silently misbehave, stops the start now.
        problems = preflight.errors(config)
        for problem in problems:
            log.critical("%s", problem)
        if problems:
            return 1
        loop_factory = _uvloop_factory() if args.uvloop else None
        try:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(_serve(config))
        except (MemtableError, PolicydError, OSError, ImportError) as exc:
            log.critical("%s", exc)
            return 1
        except KeyboardInterrupt:  # SIGINT before the handlers were installed
            return 1
        return 0
    finally:
        for signum, handler in previous.items():
            # None: the handler was not set from Python; the default is what was.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


_early_signals: list[int] = []


def _early_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


async def _serve(config: PolicydConfig) -> None:
    # Imported here: the policy factory is optional for --check-config and
    # the server module pulls in the whole asyncio stack.
    from policyd import limits, sdnotify
    from policyd.greylist import build_policy
    from policyd.metrics import metrics_for
    from policyd.server import PolicyServer

    metrics = metrics_for(config.metrics_listen)
    try:
        policy = build_policy(config, metrics)
    except BaseException:
        metrics.close()
        raise
    try:
        server = PolicyServer(config, policy, metrics=metrics)
        await server.start()
        server.install_signal_handlers()
        log.info("policyd started (%s)", config.path)
        sdnotify.ready(server.status(), wait=limits.SD_NOTIFY_TIMEOUT_SECONDS)
        if signal.SIGTERM in _early_signals:
            log.info("SIGTERM received while starting: shutting down")
        elif signal.SIGHUP in _early_signals:
            server.reload()  # asked for while starting
        try:
            if signal.SIGTERM not in _early_signals:
                await server.serve_forever()
        finally:
            await server.shutdown()
            server.remove_signal_handlers()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: nothing to reload
    finally:
        await policy.aclose()
        metrics.close()


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        log.warning("--uvloop: uvloop is not installed; using asyncio's event loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _report(config: PolicydConfig, args: argparse.Namespace) -> int:
    from policyd.report import command

    return command(config, args)


def _cleanup(config: PolicydConfig, args: argparse.Namespace) -> int:
    from policyd.cleanup import command

    return command(config, args)


def _import_postgrey(config: PolicydConfig, args: argparse.Namespace) -> int:
    from policyd.postgrey import command

    return command(config, args)


_COMMANDS: dict[str, Callable[[PolicydConfig, argparse.Namespace], int]] = {
    "run": _run_daemon, "report": _report, "cleanup": _cleanup, "import-postgrey": _import_postgrey}
