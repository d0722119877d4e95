"""The installed version of memtable and policyd (one distribution,
memtable-policyd), for ``--version``."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "memtable-policyd"


def version() -> str:
    """The version pip installed (pyproject.toml's), or "unknown" when run
    from a tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
