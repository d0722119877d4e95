"""The ``policyd`` command.

    policyd [-c FILE] [-o NAME=VALUE ...] [--uvloop] [run]   run the server (default)
    policyd [-c FILE] --check-config        print the effective configuration

    policyd [-c FILE] report [--json] [--plot FILE.png]   figures and ttl advice
    policyd [-c FILE] cleanup [--dry-run]   delete expired records (daily)

-c and -o may also follow the command (``policyd report -o max_age=40d``).

Subcommands live in ``_COMMANDS``.  Errors are one line on stderr and exit
status 1, never a traceback; argparse usage errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from memtable.cf import decimal
from memtable.errors import ConfigError, MemtableError
from policyd.config import DEFAULT_CONFIG_PATH, PolicydConfig
from policyd.errors import PolicydError
from policyd.logsetup import error_line

log = logging.getLogger("policyd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd", description="Postfix SMTPD policy server (greylisting).")
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
    for command in (run, report, cleanup):
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
    return parser


def _number(text: str) -> int:
    """A decimal argument, read as configuration numbers are (memtable.cf.decimal)."""
    number = decimal(text)
    if number is None:
        raise argparse.ArgumentTypeError("bad numerical value")
    return number


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    """Print the effective configuration, then open what it names (table
    .cf files, backups, whitelist files) so their errors show now rather
    than at start.  memcached itself is not contacted."""
    from policyd.greylist import build_policy

    sys.stdout.write(config.render())
    try:
        policy = build_policy(config)
    except (MemtableError, OSError) as exc:
        print(error_line(f"policyd: {exc}"), file=sys.stderr)
        return 1
    asyncio.run(policy.aclose())
    return 0


def _run(config: PolicydConfig, args: argparse.Namespace) -> int:
    from policyd.logsetup import setup_logging

    # SIGHUP's default action ends the process: a reload asked for while
    # policyd starts (reading large whitelists takes a while) is remembered
    # and done once the server runs, instead.
    _hangups.clear()
    previous = signal.signal(signal.SIGHUP, _early_hangup)
    try:
        setup_logging(config)
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
        # None: the handler was not set from Python; the default is what was.
        signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)


_hangups: list[int] = []


def _early_hangup(signum: int, frame: object) -> None:
    _hangups.append(signum)


async def _serve(config: PolicydConfig) -> None:
    # Imported here: the policy factory is optional for --check-config and
    # the server module pulls in the whole asyncio stack.
    from policyd import sdnotify
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
        sdnotify.ready(server.status(), wait=True)
        if _hangups:
            server.reload()  # asked for while starting
        try:
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


_COMMANDS: dict[str, Callable[[PolicydConfig, argparse.Namespace], int]] = {
    "run": _run, "report": _report, "cleanup": _cleanup}
