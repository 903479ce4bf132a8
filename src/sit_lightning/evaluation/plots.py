"""Line plots as PNG files with Pillow alone: the training loss curve and the loss profile ``L_t``.

matplotlib is not a core dependency (it is in the ``notebook`` extra), and the CPU demo must draw its
figures on the core install; Pillow is core (PNG grids, image decoding). A plot is a white canvas with
a framed data area, grid lines and labels at "nice" ticks (1, 2 or 5 times a power of ten), a title,
the axis labels, and one line per :class:`Series` (dots on the data points when there are few).

The data-to-pixel map is :class:`PlotArea`, one affine map per axis: ``x`` from ``x_range`` onto the
columns ``left .. right``, ``y`` from ``y_range`` onto the rows ``bottom .. top`` (rows grow downwards).
Non-finite values are left out (the line breaks there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_atomically

if TYPE_CHECKING:  # Pillow is imported when a plot is drawn
    from PIL import Image

__all__ = [
    "LINE_COLORS",
    "PLOT_SIZE",
    "LinePlot",
    "PlotArea",
    "Series",
    "line_plot",
    "nice_ticks",
    "plot_area",
    "save_plot",
]

#: ``(width, height)`` of a plot in pixels.
PLOT_SIZE = (640, 400)
#: Pixels between the canvas edges and the data area: left (tick labels, y label), right, top
#: (title, legend), bottom (tick labels, x label).
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 78, 24, 40, 56
#: At most this many ticks per axis.
MAX_TICKS = 7
#: Share of the data's span added above and below the y values.
Y_PADDING = 0.05
#: The colour of series ``i`` (matplotlib's first two default colours).
LINE_COLORS = ((31, 119, 180), (255, 127, 14))
BACKGROUND = (255, 255, 255)
FOREGROUND = (0, 0, 0)
GRID_COLOR = (228, 228, 228)
LINE_WIDTH = 2
#: Dots of this radius mark the data points of a series with at most MAX_DOTTED points.
DOT_RADIUS = 2
MAX_DOTTED = 120
TICK_LENGTH = 4
_NICE_STEPS = (1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class Series:
    """One line: ``y[i]`` at ``x[i]``.

    Attributes:
        label: its name in the legend (shown when a plot has more than one series).
        x: abscissae.
        y: ordinates, as many as ``x``; non-finite ones are not drawn.
    """

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        x = tuple(float(v) for v in self.x)
        y = tuple(float(v) for v in self.y)
        if len(x) != len(y):
            raise ValueError(f"series {self.label!r}: {len(x)} x values but {len(y)} y values")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def finite_points(self) -> list[tuple[float, float]]:
        return [(a, b) for a, b in zip(self.x, self.y, strict=True) if math.isfinite(a) and math.isfinite(b)]


@dataclass(frozen=True)
class PlotArea:
    """The data area of a plot and its data-to-pixel map.

    Attributes:
        left, top, right, bottom: pixel columns / rows of the area's frame (``left < right``,
            ``top < bottom``).
        x_range: ``(x_lo, x_hi)`` shown from column ``left`` to column ``right``.
        y_range: ``(y_lo, y_hi)`` shown from row ``bottom`` up to row ``top``.
    """

    left: int
    top: int
    right: int
    bottom: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def __post_init__(self) -> None:
        if not (self.left < self.right and self.top < self.bottom):
            raise ValueError(f"the plot area must have left < right and top < bottom; got {self}")
        for name, (lo, hi) in (("x_range", self.x_range), ("y_range", self.y_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"{name} must be finite with lo < hi; got {(lo, hi)}")

    def to_pixel(self, x: float, y: float) -> tuple[int, int]:
        """``(column, row)`` of the data point ``(x, y)``, rounded to the nearest pixel."""
        (x_lo, x_hi), (y_lo, y_hi) = self.x_range, self.y_range
        column = self.left + (x - x_lo) / (x_hi - x_lo) * (self.right - self.left)
        row = self.bottom - (y - y_lo) / (y_hi - y_lo) * (self.bottom - self.top)
        return round(column), round(row)


@dataclass(frozen=True)
class LinePlot:
    """A drawn plot: the RGB ``image`` and the ``area`` its data were mapped with."""

    image: Image.Image
    area: PlotArea


def nice_ticks(lo: float, hi: float, max_ticks: int = MAX_TICKS) -> list[float]:
    """At most ``max_ticks`` evenly spaced values in ``[lo, hi]``, spaced 1, 2 or 5 times a power of ten."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or max_ticks < 2:
        raise ValueError(f"nice_ticks needs finite lo < hi and max_ticks >= 2; got {lo}, {hi}, {max_ticks}")
    power = 10.0 ** math.floor(math.log10((hi - lo) / (max_ticks - 1)))
    # the finest nice step that gives at most max_ticks ticks
    for step in (m * p for p in (power, 10 * power) for m in _NICE_STEPS[:-1]):
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        if last - first + 1 <= max_ticks:
            return [round(k * step, 12) + 0.0 for k in range(first, last + 1)]  # + 0.0: no "-0"
    raise AssertionError("unreachable: a step of 10 * power gives at most max_ticks ticks")


def _span(values: Sequence[float], pad: float) -> tuple[float, float]:
    """``(lo, hi)`` around finite ``values``, widened by ``pad`` of the span (or by 1 if it is 0)."""
    lo, hi = min(values), max(values)
    if hi == lo:
        half = max(abs(lo) * 0.1, 1e-12) if lo else 1.0
        return lo - half, hi + half
    extra = (hi - lo) * pad
    return lo - extra, hi + extra


def plot_area(
    series: Sequence[Series],
    size: tuple[int, int] = PLOT_SIZE,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> PlotArea:
    """The data area :func:`line_plot` maps ``series`` with: the canvas minus the margins, ``x_range``
    (default: the data's min to max) and ``y_range`` (default: the data's, widened by ``Y_PADDING``)."""
    points = [p for s in series for p in s.finite_points()]
    if not points and (x_range is None or y_range is None):
        raise ValueError("nothing to plot: the series hold no finite points")
    width, height = size
    if width <= MARGIN_LEFT + MARGIN_RIGHT or height <= MARGIN_TOP + MARGIN_BOTTOM:
        raise ValueError(
            f"a plot needs a size above {(MARGIN_LEFT + MARGIN_RIGHT, MARGIN_TOP + MARGIN_BOTTOM)}; got {size}"
        )
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return PlotArea(
        left=MARGIN_LEFT,
        top=MARGIN_TOP,
        right=width - 1 - MARGIN_RIGHT,
        bottom=height - 1 - MARGIN_BOTTOM,
        x_range=x_range if x_range is not None else _span(xs, 0.0),
        y_range=y_range if y_range is not None else _span(ys, Y_PADDING),
    )


def _label(value: float) -> str:
    return f"{value:g}"


def line_plot(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = PLOT_SIZE,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> LinePlot:
    """Draw one or two :class:`Series` (colours :data:`LINE_COLORS`) with axes, ticks, labels and a title.

    Args:
        series: the lines, drawn in order (the second over the first).
        title: the text above the data area.
        x_label, y_label: the axis labels (the y label reads bottom to top, left of the ticks).
        size: ``(width, height)`` of the image in pixels.
        x_range, y_range: the shown ranges; default: see :func:`plot_area`.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not 1 <= len(series) <= len(LINE_COLORS):
        raise ValueError(f"line_plot draws 1 to {len(LINE_COLORS)} series; got {len(series)}")
    area = plot_area(series, size, x_range, y_range)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def text_size(text: str) -> tuple[int, int]:
        box = draw.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    # grid lines and tick labels
    for x in nice_ticks(*area.x_range):
        column, _ = area.to_pixel(x, area.y_range[0])
        draw.line([(column, area.top), (column, area.bottom)], fill=GRID_COLOR)
        draw.line([(column, area.bottom), (column, area.bottom + TICK_LENGTH)], fill=FOREGROUND)
        w, _ = text_size(_label(x))
        draw.text((column - w // 2, area.bottom + TICK_LENGTH + 3), _label(x), fill=FOREGROUND, font=font)
    for y in nice_ticks(*area.y_range):
        _, row = area.to_pixel(area.x_range[0], y)
        draw.line([(area.left, row), (area.right, row)], fill=GRID_COLOR)
        draw.line([(area.left - TICK_LENGTH, row), (area.left, row)], fill=FOREGROUND)
        w, h = text_size(_label(y))
        draw.text((area.left - TICK_LENGTH - 3 - w, row - h // 2 - 1), _label(y), fill=FOREGROUND, font=font)
    draw.rectangle([(area.left, area.top), (area.right, area.bottom)], outline=FOREGROUND)

    # title, axis labels, legend
    w, h = text_size(title)
    draw.text(((size[0] - w) // 2, (MARGIN_TOP - h) // 2), title, fill=FOREGROUND, font=font)
    w, h = text_size(x_label)
    draw.text(((area.left + area.right - w) // 2, size[1] - h - 8), x_label, fill=FOREGROUND, font=font)
    w, h = text_size(y_label)
    label = Image.new("L", (w + 2, h + 6), 0)
    ImageDraw.Draw(label).text((1, 1), y_label, fill=255, font=font)
    label = label.rotate(90, expand=True)
    image.paste(FOREGROUND, (6, (area.top + area.bottom - label.height) // 2), label)
    if len(series) > 1:
        right = area.right
        for s, color in reversed(list(zip(series, LINE_COLORS, strict=False))):
            w, h = text_size(s.label)
            draw.text((right - w, area.top - h - 6), s.label, fill=FOREGROUND, font=font)
            draw.line([(right - w - 22, area.top - 8), (right - w - 6, area.top - 8)], fill=color, width=3)
            right -= w + 34

    # the data: a line per run of finite points
    for s, color in zip(series, LINE_COLORS, strict=False):
        runs: list[list[tuple[int, int]]] = [[]]
        for x, y in zip(s.x, s.y, strict=True):
            if math.isfinite(x) and math.isfinite(y):
                runs[-1].append(area.to_pixel(x, y))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) > 1:
                draw.line(run, fill=color, width=LINE_WIDTH, joint="curve")
        if len(s.x) <= MAX_DOTTED or any(len(run) == 1 for run in runs):
            r = DOT_RADIUS
            for column, row in (p for run in runs for p in run):
                draw.ellipse([(column - r, row - r), (column + r, row + r)], fill=color)
    return LinePlot(image, area)


def save_plot(plot: LinePlot, path: str | Path) -> Path:
    """Write ``plot`` as a PNG at ``path`` atomically (a reader never sees half a file); parents are made."""
    return write_atomically(path, lambda staging: plot.image.save(staging, format="PNG"), parents=True)
