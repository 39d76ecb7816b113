"""Text tables for the terminal (`tuner compare`, `tuner estimate`), drawn by rich, a dependency already.

rich measures and aligns the cells (wide characters such as → included); the width is the table's own, never
the terminal's, so a CI log or a pipe gets whole cells, never a wrapped or truncated config label.
Markdown tables stay hand-written (tuner bench's llama-bench layout, tuner compare's GitHub step summary):
rich draws boxes, not GitHub markdown with alignment colons.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table


def text_table(head: list[str], rows: list[list[str]], right: set[int] | frozenset[int] = frozenset()) -> str:
    """Plain text (no colour, no markup): a header, a rule, one line per row; columns in `right` right-aligned."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for i, h in enumerate(head):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=1 << 16, color_system=None, highlight=False, emoji=False, markup=False).print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())
