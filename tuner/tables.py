"""Every table tuner prints or writes: a header and rows of cells (str), in one of two forms.

text_table: for the terminal (`tuner compare`, `tuner estimate`, `tuner quality`), drawn by rich, a dependency
already. rich measures and aligns the cells (wide characters such as → included); the width is the table's own,
never the terminal's, so a CI log or a pipe gets whole cells, never a wrapped or truncated config label.

markdown_table: GitHub markdown with alignment colons (`--:`), which rich does not draw: `tuner bench` (llama-bench's
layout, which users put beside llama-bench's own), `tuner selftest`, tuner compare's step summary, report.md.
Cells are written as given: a caller with free text escapes what markdown would read (`|`).
"""

from __future__ import annotations

import io
from typing import Iterable

from rich import box
from rich.console import Console
from rich.table import Table


def text_table(
    head: list[str], rows: list[list[str]], right: set[int] | frozenset[int] = frozenset(), rule: bool = True
) -> str:
    """Plain text (no colour, no markup): a header, a rule (unless rule=False), one line per row; columns two
    spaces apart, those in `right` right-aligned, no trailing spaces."""
    t = Table(box=box.SIMPLE_HEAD if rule else None, show_edge=False, pad_edge=False, highlight=False)
    for i, h in enumerate(head):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=1 << 16, color_system=None, highlight=False, emoji=False, markup=False).print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def markdown_table(
    head: list[str], rows: Iterable[list[str]], right: set[int] | frozenset[int] = frozenset(), pad: bool = True
) -> str:
    """GitHub markdown: the header, the delimiter row, one line per row; columns in `right` right-aligned.

    pad: each column as wide as its widest cell, as llama-bench prints it (the text reads as a table too); a
    right-aligned delimiter is at least `--:` (a hyphen besides the colon). pad=False: the cells as they are,
    `---` delimiters (a long table in a file stays small; a markdown viewer aligns it)."""
    rows = list(rows)
    if not pad:
        return "\n".join(
            [
                "| " + " | ".join(head) + " |",
                "|" + "|".join("--:" if i in right else "---" for i in range(len(head))) + "|",
            ]
            + ["| " + " | ".join(r) + " |" for r in rows]
        )
    widths = [max([len(h), 3 if i in right else 1] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return (
            "| "
            + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    delim = ["-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(head), "| " + " | ".join(delim) + " |"] + [line(r) for r in rows])
