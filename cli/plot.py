"""Line charts, drawn in the terminal with Unicode braille (2 x 4 dots per character) or written as SVG.

Both take the same `Chart`s, so `lm info --plot` and `lm info --save FILE.svg` show the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from xml.sax.saxutils import escape

from rich.text import Text

# (terminal colour, SVG colour) per series, in order.
PALETTE = (("cyan", "#0097b2"), ("magenta", "#b8338f"), ("yellow", "#b58900"), ("green", "#2e8b3d"),
           ("blue", "#3366cc"), ("red", "#cc3b2f"), ("bright_white", "#555555"))
# Bit of each dot in a braille character (U+2800 + bits), by (column, row) within the 2 x 4 cell.
BRAILLE_BITS = {(0, 0): 0x01, (0, 1): 0x02, (0, 2): 0x04, (0, 3): 0x40,
                (1, 0): 0x08, (1, 1): 0x10, (1, 2): 0x20, (1, 3): 0x80}
Y_LABEL_WIDTH = 7


@dataclass
class Series:
    name: str
    x: list[float]
    y: list[float]


@dataclass
class Chart:
    title: str
    x_label: str
    series: list[Series]
    x_format: Callable[[float], str]

    def bounds(self) -> tuple[float, float, float, float]:
        """x and y ranges holding every point (x from 0, y a little wider than the data, never empty)."""
        xs = [x for s in self.series for x in s.x]
        ys = [y for s in self.series for y in s.y]
        x0, x1 = (min(0.0, *xs), max(xs)) if xs else (0.0, 1.0)  # from 0: where every run starts
        y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if x1 == x0:
            x1 = x0 + 1.0
        margin = (y1 - y0) * 0.05 or max(abs(y0) * 0.05, 0.05)
        return x0, x1, y0 - margin, y1 + margin

    @property
    def empty(self) -> bool:
        return not any(s.x for s in self.series)


def colour(index: int, svg: bool = False) -> str:
    return PALETTE[index % len(PALETTE)][1 if svg else 0]


def duration(seconds: float) -> str:
    """45 -> '45s', 150 -> '2.5m', 7200 -> '2.0h'."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def count(value: float) -> str:
    """1234567 -> '1.2M'."""
    for limit, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{unit}"
    return f"{value:.0f}"


# In the terminal -----------------------------------------------------------------------------------


def braille_chart(chart: Chart, width: int, height: int) -> Text:
    """`chart` in `width` x (`height` + 3) character cells: title, plot with a y axis, x axis, x labels."""
    plot_width = max(4, width - Y_LABEL_WIDTH - 1)
    dots_x, dots_y = plot_width * 2, height * 4
    x0, x1, y0, y1 = chart.bounds()
    bits = [[0] * plot_width for _ in range(height)]
    owner: list[list[int | None]] = [[None] * plot_width for _ in range(height)]

    def dot(px: int, py: int, index: int) -> None:
        if 0 <= px < dots_x and 0 <= py < dots_y:
            bits[py // 4][px // 2] |= BRAILLE_BITS[(px % 2, py % 4)]
            owner[py // 4][px // 2] = index  # a cell shows one colour: the series drawn last there

    for index, series in enumerate(chart.series):
        points = [(round((x - x0) / (x1 - x0) * (dots_x - 1)), round((y1 - y) / (y1 - y0) * (dots_y - 1)))
                  for x, y in zip(series.x, series.y, strict=True)]
        for (ax, ay), (bx, by) in zip(points, points[1:] or points, strict=False):
            steps = max(abs(bx - ax), abs(by - ay), 1)
            for step in range(steps + 1):
                dot(round(ax + (bx - ax) * step / steps), round(ay + (by - ay) * step / steps), index)

    text = Text(chart.title + "\n", style="bold")
    labelled = {0: y1, height // 2: (y0 + y1) / 2, height - 1: y0}
    for row in range(height):
        label = f"{labelled[row]:.2f}" if row in labelled else ""
        text.append(f"{label:>{Y_LABEL_WIDTH}}{'┤' if row in labelled else '│'}", style="dim")
        for column in range(plot_width):
            index = owner[row][column]
            text.append(chr(0x2800 + bits[row][column]), style=colour(index) if index is not None else "")
        text.append("\n")
    text.append(" " * Y_LABEL_WIDTH + "└" + "─" * plot_width + "\n", style="dim")
    left, middle, right = chart.x_format(x0), chart.x_format((x0 + x1) / 2), chart.x_format(x1)
    axis = list(" " * (plot_width + 1))
    for position, label in ((0, left), ((plot_width - len(middle)) // 2, middle), (plot_width + 1 - len(right), right)):
        axis[max(0, position):max(0, position) + len(label)] = label
    text.append(" " * Y_LABEL_WIDTH + "".join(axis)[:plot_width + 1] + f"\n{chart.x_label:^{width}}", style="dim")
    return text


def legend(names: list[str]) -> Text:
    text = Text()
    for index, name in enumerate(names):
        text.append("⣿⣿ ", style=colour(index))
        text.append(name + "   ")
    return text


# As SVG --------------------------------------------------------------------------------------------

PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 470, 300, 60, 20, 34, 46


def svg_charts(charts: list[Chart], names: list[str], columns: int = 2) -> str:
    """The charts on a grid of `columns`, with a legend, as one standalone SVG document."""
    rows = math.ceil(len(charts) / columns)
    legend_h = 24 * math.ceil(len(names) / 3) + 16
    width, height = columns * PANEL_W, rows * PANEL_H + legend_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for number, chart in enumerate(charts):
        parts.append(_svg_panel(chart, (number % columns) * PANEL_W, (number // columns) * PANEL_H))
    for index, name in enumerate(names):
        x, y = 20 + (index % 3) * (width - 40) // 3, rows * PANEL_H + 20 + 24 * (index // 3)
        parts.append(f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{colour(index, True)}" '
                     f'stroke-width="3"/><text x="{x + 30}" y="{y + 4}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_panel(chart: Chart, left: int, top: int) -> str:
    x0, x1, y0, y1 = chart.bounds()
    inner_w, inner_h = PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B
    ox, oy = left + MARGIN_L, top + MARGIN_T

    def to_x(x: float) -> float:
        return round(ox + (x - x0) / (x1 - x0) * inner_w, 1)

    def to_y(y: float) -> float:
        return round(oy + (y1 - y) / (y1 - y0) * inner_h, 1)

    parts = [f'<text x="{left + PANEL_W / 2}" y="{top + 20}" text-anchor="middle" font-weight="bold">'
             f'{escape(chart.title)}</text>',
             f'<rect x="{ox}" y="{oy}" width="{inner_w}" height="{inner_h}" fill="none" stroke="#999"/>']
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        y, x = y0 + (y1 - y0) * fraction, x0 + (x1 - x0) * fraction
        parts.append(f'<line x1="{ox}" x2="{ox + inner_w}" y1="{to_y(y)}" y2="{to_y(y)}" stroke="#eee"/>'
                     f'<text x="{ox - 6}" y="{to_y(y) + 4}" text-anchor="end" fill="#555">{y:.2f}</text>'
                     f'<text x="{to_x(x)}" y="{oy + inner_h + 16}" text-anchor="middle" fill="#555">'
                     f'{escape(chart.x_format(x))}</text>')
    parts.append(f'<text x="{ox + inner_w / 2}" y="{top + PANEL_H - 8}" text-anchor="middle" fill="#555">'
                 f'{escape(chart.x_label)}</text>')
    if chart.empty:
        parts.append(f'<text x="{ox + inner_w / 2}" y="{oy + inner_h / 2}" text-anchor="middle" fill="#999">'
                     "nothing logged yet</text>")
    for index, series in enumerate(chart.series):
        points = [(to_x(x), to_y(y)) for x, y in zip(series.x, series.y, strict=True)]
        stroke = colour(index, True)
        if len(points) == 1:
            parts.append(f'<circle cx="{points[0][0]}" cy="{points[0][1]}" r="3" fill="{stroke}"/>')
        elif points:
            joined = " ".join(f"{x},{y}" for x, y in points)
            parts.append(f'<polyline points="{joined}" fill="none" stroke="{stroke}" stroke-width="1.8"/>')
    return "\n".join(parts)
