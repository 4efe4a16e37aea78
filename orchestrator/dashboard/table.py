"""A plain, fast table renderable for rich: column widths from the cells, then segments.

rich's ``Table`` measures and wraps every cell, which takes seconds for a thousand
rows; a dashboard row never wraps, so this one computes widths once, drops the least
useful columns when the terminal is narrow (``Col.drop``: higher goes first, 0 never)
and truncates the one ``flex`` column to what is left.
"""
from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style

Cell = tuple[tuple[str, str], ...]   # (text, style) pieces
GAP = 2
_FLEX_MIN = 12


@dataclass(frozen=True)
class Col:
    """A column: header, drop order when narrow (0: never dropped), alignment, flexible width."""

    name: str
    drop: int
    right: bool = False
    flex: bool = False


def _width(text: str) -> int:
    return len(text) if text.isascii() else cell_len(text)


class Banner(str):
    """A row that is one line across the table (a group's head line, issue 19), cut to the width."""


class FastTable:
    """Rows of cells under a bold header; see the module docstring. A :class:`Banner` row is one line."""

    def __init__(self, cols: list[Col], rows: list[list[Cell] | Banner], footer: str | None = None):
        self.cols, self.rows, self.footer = cols, rows, footer
        self.cell_widths = [[0] * len(cols) if isinstance(row, Banner) else
                            [_width(cell[0][0]) if len(cell) == 1 else sum(_width(t) for t, _ in cell)
                             for cell in row] for row in rows]
        self.widths = [max([_width(c.name)] + [w[i] for w in self.cell_widths]) for i, c in enumerate(cols)]

    def layout(self, max_width: int) -> list[tuple[int, int]]:
        """``(column index, width)`` of the columns shown within ``max_width``."""
        keep = [i for i, c in enumerate(self.cols) if not c.flex or any(w[i] for w in self.cell_widths)]

        def need(cols: list[int]) -> int:
            return sum(_FLEX_MIN if self.cols[i].flex else self.widths[i] for i in cols) + GAP * (len(cols) - 1)

        for i in sorted((i for i in keep if self.cols[i].drop), key=lambda i: -self.cols[i].drop):
            if need(keep) <= max_width:
                break
            keep.remove(i)
        fixed = sum(self.widths[i] for i in keep if not self.cols[i].flex) + GAP * (len(keep) - 1)
        return [(i, min(self.widths[i], max_width - fixed) if self.cols[i].flex else self.widths[i]) for i in keep]

    def _line(self, cells: list[Cell], widths: list[int], shown: list[tuple[int, int]], plain: bool) -> list[Segment]:
        """One row as few segments as possible (runs of one style merged; one segment when plain)."""
        pieces: list[tuple[str, str]] = []
        last = len(shown) - 1
        for k, (i, width) in enumerate(shown):
            cell, text_w, right = cells[i], widths[i], self.cols[i].right
            if k:
                pieces.append(("  ", ""))
            if text_w > width:   # only the flex column is ever cut
                cell = ((set_cell_size("".join(t for t, _ in cell), width - 1) + "…", cell[0][1]),)
                text_w = width
            if right:
                pieces.append((" " * (width - text_w), ""))
            pieces.extend(cell)
            if not right and k < last:
                pieces.append((" " * (width - text_w), ""))
        if plain:
            return [Segment("".join(t for t, _ in pieces)), Segment.line()]
        segs: list[Segment] = []
        run: list[str] = []
        run_style = ""
        for text, style in pieces:
            if style != run_style and run:
                segs.append(Segment("".join(run), Style.parse(run_style) if run_style else None))
                run = []
            run_style = style
            run.append(text)
        if run:
            segs.append(Segment("".join(run), Style.parse(run_style) if run_style else None))
        segs.append(Segment.line())
        return segs

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        shown = self.layout(options.max_width)
        plain = console.no_color or not console.is_terminal
        header = [((c.name, "bold"),) for c in self.cols]
        yield from self._line(header, [_width(c.name) for c in self.cols], shown, plain)
        for row, widths in zip(self.rows, self.cell_widths):
            if isinstance(row, Banner):
                width = max(2, options.max_width)
                text = row if _width(row) <= width else set_cell_size(row, width - 1) + "…"
                yield Segment(text, None if plain else Style.parse("bold blue"))
                yield Segment.line()
                continue
            yield from self._line(row, widths, shown, plain)
        if self.footer:
            yield Segment(self.footer, None if plain else Style.parse("dim"))
            yield Segment.line()

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        shown = self.layout(options.max_width)
        return Measurement(min(options.max_width, sum(w for _, w in shown) + GAP * (len(shown) - 1)),
                           options.max_width)
