"""docs/man/policyd.cf.5 is generated from docs/policyd.md, so the manual
and the docs cannot drift apart: the "Configuration reference" section
(every parameter, its default and meaning) becomes the page's PARAMETERS.

    python3 -m tests.manpages        # rewrite docs/man/policyd.cf.5

tests/test_manpages.py checks that the committed page is what this makes.
Only the Markdown that section uses is understood: paragraphs, indented
code blocks, ``### `` headings, tables (``| `name` | default | meaning |``),
inline code, links and ``**bold**``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICYD_MD = ROOT / "docs" / "policyd.md"
MAN_DIR = ROOT / "docs" / "man"
POLICYD_CF_5 = MAN_DIR / "policyd.cf.5"
SECTION = "## Configuration reference"

HEAD = r""".\" Generated from docs/policyd.md by "python3 -m tests.manpages"; edit that.
.TH POLICYD.CF 5 "" "memtable-policyd" "File Formats"
.SH NAME
policyd.cf \- policyd configuration parameters
.SH SYNOPSIS
.B /etc/policyd/policyd.cf
.PP
.B policyd \-\-check\-config \-c /etc/policyd/policyd.cf
.SH DESCRIPTION
"""

TAIL = r""".SH FILES
.TP
.I /etc/policyd/policyd.cf
this file
.TP
.I /etc/policyd/triplets.cf\fR, \fI/etc/policyd/clients.cf
memcache_table(5) files of the stores
.SH SEE ALSO
.BR policyd (8),
.BR memtable (1),
.BR memcache_table (5),
.BR postconf (5)
"""


def roff_escape(text: str) -> str:
    """Plain text for roff: backslashes and hyphens escaped (a leading dot
    or quote is _line's business)."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def inline(text: str) -> str:
    """One Markdown line's inline markup as roff fonts."""
    out: list[str] = []
    pos = 0
    for match in re.finditer(r"`([^`]*)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)]+)\)", text):
        out.append(roff_escape(text[pos:match.start()]))
        code, bold, link_text, _target = match.groups()
        if code is not None:
            out.append(f"\\fB{roff_escape(code)}\\fR")
        elif bold is not None:
            out.append(f"\\fB{roff_escape(bold)}\\fR")
        else:
            out.append(inline(link_text))
        pos = match.end()
    out.append(roff_escape(text[pos:]))
    return "".join(out)


def _line(text: str) -> str:
    """A text line that roff will not read as a request."""
    return f"\\&{text}" if text.startswith((".", "'")) else text


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def convert(markdown: str) -> str:
    """The roff body for the Markdown of the configuration reference."""
    out: list[str] = []
    paragraph: list[str] = []
    code: list[str] = []

    def flush_paragraph() -> None:
        if paragraph:
            out.append(".PP")
            out.append(_line(inline(" ".join(paragraph))))
            paragraph.clear()

    def flush_code() -> None:
        if code:
            out.extend([".PP", ".RS", ".nf"])
            out.extend(_line(roff_escape(line)) for line in code)
            out.extend([".fi", ".RE"])
            code.clear()

    for raw in markdown.splitlines():
        if raw.startswith("    ") and not paragraph:
            code.append(raw[4:])
            continue
        flush_code()
        line = raw.strip()
        if not line:
            flush_paragraph()
        elif line.startswith("### "):
            flush_paragraph()
            out.append(f".SH {roff_escape(line[4:]).upper()} PARAMETERS")
        elif line.startswith("|"):
            flush_paragraph()
            cells = _cells(line)
            if cells[0] in ("parameter",) or set(cells[0]) <= set("-: "):
                continue  # header and rule rows
            name, default, meaning = cells[0], cells[1], cells[2]
            out.append(".TP")
            out.append(f"{inline(name)} (default: {inline(default)})")
            out.append(_line(inline(meaning)))
        else:
            paragraph.append(line)
    flush_paragraph()
    flush_code()
    return "\n".join(out) + "\n"


def reference_section(text: str) -> str:
    """The Markdown of the configuration reference: after its heading, up
    to the next ``## `` heading."""
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else len(text)]


def policyd_cf_5() -> str:
    return HEAD + convert(reference_section(POLICYD_MD.read_text())) + TAIL


def main() -> int:
    POLICYD_CF_5.write_text(policyd_cf_5())
    print(f"wrote {POLICYD_CF_5.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
