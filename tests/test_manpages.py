"""The manual pages (docs/man/) agree with the programs and with docs/, are
installed by the steps docs/operations.md gives, and the docs claim no
postmap option that postmap lacks."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from memtable import cf, ttlreport
from memtable import cli as memtable_cli
from policyd import cli as policyd_cli
from policyd.config import PARAMETERS, PolicydConfig
from tests import manpages
from tests.postfixcf import postfix_config_dir
from tests.postfixlab import POSTMAP, requires_postmap

ROOT = manpages.ROOT
MAN = manpages.MAN_DIR
PAGES = sorted(p for p in MAN.iterdir() if re.fullmatch(r"[\w.]+\.[158]", p.name))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *PAGES]
OPERATIONS = ROOT / "docs" / "operations.md"
GROFF = shutil.which("groff")
MAN_CMD = shutil.which("man")


def test_the_pages_are_the_three_the_docs_name() -> None:
    assert [p.name for p in PAGES] == ["memtable.1", "policyd.8", "policyd.cf.5"]


def test_policyd_cf_5_is_generated_from_docs_policyd_md() -> None:
    assert manpages.POLICYD_CF_5.read_text() == manpages.policyd_cf_5(), (
        "docs/policyd.md changed: run python3 -m tests.manpages")


def documented_defaults() -> dict[str, str]:
    """{parameter: default} from the tables of docs/policyd.md's
    configuration reference (a default in parentheses means empty)."""
    section = manpages.reference_section(manpages.POLICYD_MD.read_text())
    defaults = {}
    for row in re.findall(r"(?m)^\| `(\w+)` \| ([^|]*) \|", section):
        name, default = row
        default = default.strip()
        defaults[name] = "" if default.startswith("(") else default.strip("`")
    return defaults


def test_every_parameter_is_documented_with_its_default() -> None:
    """docs/policyd.md (and so policyd.cf(5)) lists every parameter once,
    with a default that policyd reads as its real default."""
    defaults = documented_defaults()
    assert sorted(defaults) == sorted(PARAMETERS)
    real = PolicydConfig()
    for name, text in defaults.items():
        parsed = PolicydConfig.from_entries("docs/policyd.md",
                                            cf.parse_overrides([f"{name}={text}"]))
        expected = getattr(real, name)
        if name == "hostname":
            expected = ""  # the default is worked out at start (postconf, FQDN)
        assert getattr(parsed, name) == expected, (name, text)
    page = manpages.POLICYD_CF_5.read_text()
    for name in PARAMETERS:
        assert re.search(rf"(?m)^\\fB{re.escape(name.replace('-', chr(92) + '-'))}\\fR "
                         r"\(default: ", page), name


def options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
            for sub in action.choices.values():
                found |= options(sub)
    return found


@pytest.mark.parametrize(("page", "parsers"), [
    ("policyd.8", [policyd_cli._parser()]),
    ("memtable.1", [memtable_cli._parser(), ttlreport.parser()]),
])
def test_man_page_lists_every_option(page: str, parsers: list[argparse.ArgumentParser]) -> None:
    text = (MAN / page).read_text().replace("\\-", "-")
    for parser in parsers:
        for option in options(parser):
            assert re.search(rf"\\fB{re.escape(option)}\\fR|^\.B[IR]? {re.escape(option)}\b",
                             text, re.M), (page, option)


@pytest.mark.skipif(GROFF is None, reason="groff not installed")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_pages_render_without_warnings(page: Path) -> None:
    assert GROFF is not None
    done = subprocess.run([GROFF, "-man", "-Tutf8", "-ww", "-z", str(page)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def install_steps() -> str:
    """The man page lines of docs/operations.md's install steps."""
    text = OPERATIONS.read_text()
    match = re.search(r"(?ms)^    # manual pages.*?\n(    for n in .*?\n    done\n)", text)
    assert match, "docs/operations.md no longer installs the manual pages"
    return "\n".join(line[4:] for line in match[1].splitlines()) + "\n"


@pytest.mark.skipif(MAN_CMD is None, reason="man not installed")
def test_the_install_steps_install_every_page_where_man_finds_it(tmp_path: Path) -> None:
    steps = install_steps()
    assert "/usr/local/share/man/" in steps
    prefix = tmp_path / "usr-local-share-man"
    script = steps.replace("/usr/local/share/man", str(prefix))
    subprocess.run(["sh", "-euc", script], env={"SRC": str(ROOT), "PATH": "/usr/bin:/bin"},
                   check=True, timeout=30)
    installed = sorted(p.relative_to(prefix).as_posix() for p in prefix.rglob("*.[158]"))
    assert installed == ["man1/memtable.1", "man5/policyd.cf.5", "man8/policyd.8"]
    assert MAN_CMD is not None
    for name, section in (("policyd", "8"), ("policyd.cf", "5"), ("memtable", "1")):
        done = subprocess.run([MAN_CMD, "-M", str(prefix), section, name],
                              env={"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat",
                                   "MANWIDTH": "80"},
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        assert f"{name.upper()}({section})" in done.stdout


@requires_postmap
def test_docs_claim_no_postmap_option_postmap_lacks(tmp_path: Path) -> None:
    """Each ``postmap -X`` the docs and pages mention is in the usage line
    of the postmap installed here (Debian 12's has no -j, for one)."""
    done = subprocess.run([POSTMAP, "-c", str(postfix_config_dir(tmp_path))],
                          capture_output=True, text=True, timeout=30, check=False)
    usage = re.search(r"usage: postmap \[-(\w+)\]", done.stderr)
    assert usage, done.stderr
    letters = set(usage[1]) | {"c", "d", "q"}  # given with an argument
    for doc in DOCS:
        text = doc.read_text().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")
        for letter in re.findall(r"postmap -([A-Za-z])\b", text):
            assert letter in letters, f"{doc.name}: postmap -{letter}"


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@pytest.mark.parametrize("module", ["policyd", "memtable.cli"])
def test_version(module: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--version"],
                          capture_output=True, text=True, timeout=30, check=False)
    name = module.split(".")[0]
    assert (done.returncode, done.stdout, done.stderr) == (
        0, f"{name} {project_version()}\n", "")


def test_memtable_help_lists_ttl_and_when_c_is_used() -> None:
    done = subprocess.run([sys.executable, "-m", "memtable.cli", "-h"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    assert "memtable ttl [-c DIR] memcache:FILE.cf" in done.stdout
    assert "-c DIR is used only there" in " ".join(done.stdout.split())
    assert "postmap -j" not in done.stdout


def test_memtable_ttl_help_is_plain_text() -> None:
    done = subprocess.run([sys.executable, "-m", "memtable.cli", "ttl", "-h"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    assert "memcache:FILE.cf" in done.stdout
    assert not re.search(r"``|:\w+:`|^\.\. ", done.stdout, re.M), done.stdout


def test_policyd_8_lists_every_reason_a_decision_line_can_give() -> None:
    """The reasons operators grep for: policyd(8)'s list is the metrics'."""
    from policyd.metrics import REASONS

    text = (MAN / "policyd.8").read_text().replace("\\-", "-")
    listed = text.split("Reasons:", 1)[1].split(".\n", 1)[0]
    assert set(re.findall(r"\\fB([a-z-]+)\\fR", listed)) == REASONS
