"""Dependency-free scatter/line charts saved as PNG (standard library only: zlib, struct).

    from scripts.png_plot import Series, plot_png
    plot_png("out.png", [Series("corm", [1, 2, 4], [0.5, 0.4, 0.35], connect=True)],
             title="Perplexity vs budget", x_label="budget", y_label="ppl", y_lower_is_better=True)

Markers are ~7 px filled circles / squares / diamonds (the shape cycles with a period of 3 and
the colour with a period of 10, so the first 30 series are all distinguishable); optional 2 px
connecting lines join consecutive points in the given order. Axes get "nice" ticks
(1/2/5 x 10^k), text uses a built-in 5x7 bitmap font, and the legend sits in a right-hand
margin sized to the longest label so it never covers data. NaN / inf points are skipped.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

Color = tuple[int, int, int]

# Tableau 10: clearly distinguishable on white.
PALETTE: tuple[Color, ...] = (
    (31, 119, 180),   # blue
    (255, 127, 14),   # orange
    (44, 160, 44),    # green
    (214, 39, 40),    # red
    (148, 103, 189),  # purple
    (140, 86, 75),    # brown
    (227, 119, 194),  # pink
    (127, 127, 127),  # grey
    (188, 189, 34),   # olive
    (23, 190, 207),   # cyan
)
MARKERS = ("circle", "square", "diamond")

WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
TEXT: Color = (30, 30, 30)
MUTED: Color = (110, 110, 110)
GRID: Color = (228, 228, 228)
LEGEND_BORDER: Color = (170, 170, 170)

GLYPH_W, GLYPH_H = 5, 8          # glyph box in font pixels (7 rows + 1 for descenders)
CELL_W = 6                       # advance per character (1 px spacing)
CAP_H = 7                        # rows above the baseline (used to centre text vertically)
MARKER_RADIUS = 3                # markers span 2 * 3 + 1 = 7 px


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    connect: bool = False   # draw line segments between consecutive points (in the given order)


# ---------------------------------------------------------------------------------------------
# PNG encoding
# ---------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(pixels: list[bytearray] | bytes, width: int, height: int) -> bytes:
    """Encode 8-bit RGB pixels (rows top to bottom, 3 bytes per pixel) as a PNG file's bytes.

    ``pixels`` is either a list of ``height`` rows of ``3 * width`` bytes each, or one flat
    buffer of ``3 * width * height`` bytes.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    stride = 3 * width
    if isinstance(pixels, (bytes, bytearray, memoryview)):
        flat = bytes(pixels)
        if len(flat) != stride * height:
            raise ValueError(f"expected {stride * height} bytes for a {width}x{height} RGB image, "
                             f"got {len(flat)}")
        rows = [flat[i * stride:(i + 1) * stride] for i in range(height)]
    else:
        rows = list(pixels)
        if len(rows) != height:
            raise ValueError(f"expected {height} rows, got {len(rows)}")
        for i, row in enumerate(rows):
            if len(row) != stride:
                raise ValueError(f"row {i} has {len(row)} bytes, expected {stride}")
    raw = b"".join(b"\x00" + bytes(row) for row in rows)   # filter type 0 (None) per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, RGB, deflate, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------
# Bitmap font: classic 5x7 (g j p q y with a descender row), one byte per column, bit 0 = top.
# ---------------------------------------------------------------------------------------------

_FONT_DATA = {
    " ": "0000000000", "!": "00005f0000", '"': "0007000700", "#": "147f147f14",
    "$": "242a7f2a12", "%": "2313086462", "&": "3649552250", "'": "0000070000",
    "(": "001c224100", ")": "0041221c00", "*": "14083e0814", "+": "08083e0808",
    ",": "0050300000", "-": "0808080808", ".": "0060600000", "/": "2010080402",
    "0": "3e5149453e", "1": "00427f4000", "2": "4261514946", "3": "2141454b31",
    "4": "1814127f10", "5": "2745454539", "6": "3c4a494930", "7": "0171090503",
    "8": "3649494936", "9": "064949291e", ":": "0036360000", ";": "0056360000",
    "<": "0814224100", "=": "1414141414", ">": "0041221408", "?": "0201510906",
    "@": "324979413e", "A": "7e1111117e", "B": "7f49494936", "C": "3e41414122",
    "D": "7f4141221c", "E": "7f49494941", "F": "7f09090101", "G": "3e4149497a",
    "H": "7f0808087f", "I": "00417f4100", "J": "2040413f01", "K": "7f08142241",
    "L": "7f40404040", "M": "7f020c027f", "N": "7f0408107f", "O": "3e4141413e",
    "P": "7f09090906", "Q": "3e4151215e", "R": "7f09192946", "S": "4649494931",
    "T": "01017f0101", "U": "3f4040403f", "V": "1f2040201f", "W": "3f4038403f",
    "X": "6314081463", "Y": "0708700807", "Z": "6151494543", "[": "007f414100",
    "\\": "0204081020", "]": "0041417f00", "^": "0402010204", "_": "4040404040",
    "`": "0001020400", "a": "2054545478", "b": "7f48444438", "c": "3844444420",
    "d": "384444487f", "e": "3854545418", "f": "087e090102", "g": "18a4a4a47c",
    "h": "7f08040478", "i": "00447d4000", "j": "4080847d00", "k": "7f10284400",
    "l": "00417f4000", "m": "7c04180478", "n": "7c08040478", "o": "3844444438",
    "p": "fc24242418", "q": "18242418fc", "r": "7c08040408", "s": "4854545420",
    "t": "043f444020", "u": "3c4040207c", "v": "1c2040201c", "w": "3c4030403c",
    "x": "4428102844", "y": "1ca0a0a07c", "z": "4464544c44", "{": "0008364100",
    "|": "00007f0000", "}": "0041360800", "~": "0804081008",
}
FONT: dict[str, tuple[int, ...]] = {ch: tuple(bytes.fromhex(h)) for ch, h in _FONT_DATA.items()}
# Unknown characters render as a box (the full 5x7 outline).
UNKNOWN_GLYPH: tuple[int, ...] = (0x7F, 0x41, 0x41, 0x41, 0x7F)


def glyph(ch: str) -> tuple[int, ...]:
    return FONT.get(ch, UNKNOWN_GLYPH)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """Pixel (width, height) of ``text`` drawn at ``scale`` (no trailing spacing column)."""
    if not text:
        return 0, GLYPH_H * scale
    return (len(text) * CELL_W - 1) * scale, GLYPH_H * scale


# ---------------------------------------------------------------------------------------------
# Canvas
# ---------------------------------------------------------------------------------------------


class Canvas:
    """RGB8 raster; all drawing is clipped to the canvas (and to ``clip`` when set)."""

    def __init__(self, width: int, height: int, background: Color = WHITE):
        self.width, self.height = width, height
        bg = bytes(background)
        self.rows = [bytearray(bg * width) for _ in range(height)]
        self.clip: tuple[int, int, int, int] | None = None   # x0, y0, x1, y1 inclusive

    def _bounds(self) -> tuple[int, int, int, int]:
        if self.clip is None:
            return 0, 0, self.width - 1, self.height - 1
        x0, y0, x1, y1 = self.clip
        return max(0, x0), max(0, y0), min(self.width - 1, x1), min(self.height - 1, y1)

    def get(self, x: int, y: int) -> Color:
        row = self.rows[y]
        return row[3 * x], row[3 * x + 1], row[3 * x + 2]

    def set(self, x: int, y: int, color: Color) -> None:
        bx0, by0, bx1, by1 = self._bounds()
        if bx0 <= x <= bx1 and by0 <= y <= by1:
            self.rows[y][3 * x:3 * x + 3] = bytes(color)

    def fill_rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill the rectangle with corners (x0, y0) and (x1, y1), both inclusive."""
        bx0, by0, bx1, by1 = self._bounds()
        x0, x1 = max(min(x0, x1), bx0), min(max(x0, x1), bx1)
        y0, y1 = max(min(y0, y1), by0), min(max(y0, y1), by1)
        if x0 > x1 or y0 > y1:
            return
        span = bytes(color) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            self.rows[y][3 * x0:3 * x1 + 3] = span

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """1 px outline."""
        self.fill_rect(x0, y0, x1, y0, color)
        self.fill_rect(x0, y1, x1, y1, color)
        self.fill_rect(x0, y0, x0, y1, color)
        self.fill_rect(x1, y0, x1, y1, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, thickness: int = 2) -> None:
        """Bresenham line drawn with a ``thickness`` x ``thickness`` pen."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        lo = -(thickness // 2)
        hi = lo + thickness - 1
        while True:
            self.fill_rect(x0 + lo, y0 + lo, x0 + hi, y0 + hi, color)
            if x0 == x1 and y0 == y1:
                break
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def marker(self, cx: int, cy: int, shape: str, color: Color, radius: int = MARKER_RADIUS,
               halo: bool = False) -> None:
        """Filled marker about ``2 * radius + 1`` px across; ``halo`` adds a 1 px white rim."""
        if halo:
            self.marker(cx, cy, shape, WHITE, radius + 1)
        r = radius + 1 if shape == "diamond" else radius   # same visual weight as the others
        for dy in range(-r, r + 1):
            if shape == "square":
                half = r
            elif shape == "diamond":
                half = r - abs(dy)
            else:  # circle
                half = int(math.sqrt(max(0.0, (r + 0.5) ** 2 - dy * dy)))
            self.fill_rect(cx - half, cy + dy, cx + half, cy + dy, color)

    def text(self, x: int, y: int, text: str, color: Color = TEXT, scale: int = 1) -> None:
        """Draw ``text`` with its top-left corner at (x, y)."""
        for i, ch in enumerate(text):
            gx = x + i * CELL_W * scale
            for col, bits in enumerate(glyph(ch)):
                for row in range(GLYPH_H):
                    if bits >> row & 1:
                        px, py = gx + col * scale, y + row * scale
                        self.fill_rect(px, py, px + scale - 1, py + scale - 1, color)

    def to_png(self) -> bytes:
        return encode_png(self.rows, self.width, self.height)


# ---------------------------------------------------------------------------------------------
# Ticks
# ---------------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, min_ticks: int = 4, max_ticks: int = 8) -> list[float]:
    """Evenly spaced ticks for [lo, hi]: multiples of a step of 1, 2 or 5 x 10^k.

    Returns ``min_ticks`` to ``max_ticks`` ticks (about 6 preferred), one step apart, with
    neither end of the range more than one step from a tick. Ticks lie inside [lo, hi] when
    some nice step allows that; otherwise (e.g. [34.8, 36.5]: step 0.2 gives 9 ticks, 0.5 gives
    3) the outermost ticks sit just outside the range, enclosing it, and the caller widens its
    axis to ``[min(lo, ticks[0]), max(hi, ticks[-1])]``. ``lo == hi`` gives ``[lo]``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if lo > hi:
        lo, hi = hi, lo
    span = hi - lo
    if span == 0 or span <= 1e-12 * max(abs(lo), abs(hi)):
        return [lo]
    k0 = math.floor(math.log10(span))
    best: tuple[tuple[int, int, int], int, int, int, int] | None = None
    for k in range(k0 - 2, k0 + 2):
        for m in (1, 2, 5):
            step = m * 10.0 ** k
            eps = step * 1e-9
            inside = (math.ceil((lo - eps) / step), math.floor((hi + eps) / step))
            enclosing = (math.floor((lo + eps) / step), math.ceil((hi - eps) / step))
            for mode, (first, last) in enumerate((inside, enclosing)):
                count = last - first + 1
                if count < 1:
                    continue
                fits = min_ticks <= count <= max_ticks
                score = (0 if fits else 1, mode, abs(count - 6))
                if best is None or score < best[0]:
                    best = (score, m, k, first, last)
    assert best is not None
    _, m, k, first, last = best
    step = m * 10.0 ** k
    ticks = [round(i * step, max(0, -k) + 1) for i in range(first, last + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def format_ticks(ticks: list[float]) -> list[str]:
    """Labels with just enough digits for the tick step; scientific notation for extremes."""
    if len(ticks) < 2:
        step = abs(ticks[0]) / 10 if ticks and ticks[0] != 0 else 1.0
    else:
        step = abs(ticks[1] - ticks[0])
    biggest = max((abs(t) for t in ticks), default=0.0)
    step_exp = math.floor(math.log10(step) + 1e-9)   # ticks[1] - ticks[0] may be 0.0999...
    if step_exp < -4 or biggest >= 1e7:
        big_exp = math.floor(math.log10(biggest)) if biggest > 0 else step_exp
        digits = max(0, big_exp - step_exp)
        labels = [f"{t:.{digits}e}" if t != 0 else "0" for t in ticks]
        return [lab.replace("e+0", "e").replace("e-0", "e-").replace("e+", "e") for lab in labels]
    decimals = max(0, -step_exp)
    labels = [f"{t:.{decimals}f}" for t in ticks]
    return [lab[1:] if lab.startswith("-") and lab.strip("-0.") == "" else lab for lab in labels]


# ---------------------------------------------------------------------------------------------
# Layout and rendering
# ---------------------------------------------------------------------------------------------


def _finite_points(s: Series) -> list[tuple[float, float]]:
    if len(s.xs) != len(s.ys):
        raise ValueError(f"series {s.label!r}: {len(s.xs)} xs but {len(s.ys)} ys")
    out = []
    for x, y in zip(s.xs, s.ys):
        try:
            fx, fy = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(fx) and math.isfinite(fy):
            out.append((fx, fy))
    return out


def _axis_range(values: list[float]) -> tuple[float, float]:
    """Data range padded by 5% each side; a degenerate range gets a sensible width."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    span = hi - lo
    if span <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        half = abs(lo) * 0.05 if lo != 0 else 0.5
        return lo - half, hi + half
    return lo - 0.05 * span, hi + 0.05 * span


def _fit(text: str, max_width: int, scales: tuple[int, ...]) -> tuple[str, int]:
    """Largest scale at which ``text`` fits ``max_width``; else the smallest, truncated."""
    for scale in scales:
        if text_size(text, scale)[0] <= max_width:
            return text, scale
    scale = scales[-1]
    max_chars = max(1, (max_width // scale + 1) // CELL_W)
    if len(text) > max_chars:
        text = text[:max(0, max_chars - 3)] + "..." if max_chars > 3 else text[:max_chars]
    return text, scale


@dataclass
class Layout:
    """Where things landed; ``to_px`` maps data coordinates to pixel coordinates."""
    left: int
    top: int
    right: int
    bottom: int
    x_min: float
    x_max: float
    y_min: float
    y_max: float
    x_ticks: list[float] = field(default_factory=list)
    y_ticks: list[float] = field(default_factory=list)
    legend_box: tuple[int, int, int, int] | None = None   # x0, y0, x1, y1

    def to_px(self, x: float, y: float) -> tuple[int, int]:
        fx = (x - self.x_min) / (self.x_max - self.x_min)
        fy = (y - self.y_min) / (self.y_max - self.y_min)
        return (round(self.left + fx * (self.right - self.left)),
                round(self.bottom - fy * (self.bottom - self.top)))


def render(series: list[Series], *, title: str, x_label: str, y_label: str, width: int = 900,
           height: int = 600, y_lower_is_better: bool | None = None) -> tuple[Canvas, Layout]:
    """Draw the chart onto a new canvas; returns the canvas and its layout."""
    if not series:
        raise ValueError("plot_png needs at least one Series; got an empty series list")
    if width < 240 or height < 180:
        raise ValueError(f"image too small for a chart: {width}x{height} (minimum 240x180)")
    points = [_finite_points(s) for s in series]

    pad = 12
    canvas = Canvas(width, height)

    # --- title and the y label (written horizontally above the y axis) ---
    title_text, title_scale = _fit(title, width - 2 * pad, (3, 2, 1))
    title_h = GLYPH_H * title_scale
    ylab = y_label
    if y_lower_is_better is True:
        ylab += "  (lower is better)"
    elif y_lower_is_better is False:
        ylab += "  (higher is better)"
    ylab_text, ylab_scale = _fit(ylab, width - 2 * pad, (2, 1))
    ylab_y = pad + (title_h + 12 if title_text else 0)
    top = ylab_y + (GLYPH_H * ylab_scale + 10 if ylab_text else 0)

    # --- legend: right-hand margin sized to the longest label (capped at 40% of the width) ---
    swatch_w, legend_pad, legend_gap = 22, 8, 6
    max_legend_w = int(width * 0.4)
    legend_scale = 2
    labels = [s.label for s in series]
    longest = max(text_size(lab, 2)[0] for lab in labels)
    rows_at_2 = (height - 2 * pad - top - 2 * legend_pad) // (GLYPH_H * 2 + 8)
    if swatch_w + legend_gap + longest + 2 * legend_pad > max_legend_w or len(labels) > rows_at_2:
        legend_scale = 1
    room = max_legend_w - (swatch_w + legend_gap + 2 * legend_pad)
    legend_labels = [_fit(lab, room, (legend_scale,))[0] for lab in labels]
    text_w = max(text_size(lab, legend_scale)[0] for lab in legend_labels)
    legend_w = swatch_w + legend_gap + text_w + 2 * legend_pad
    row_h = max(GLYPH_H * legend_scale, 2 * MARKER_RADIUS + 1) + 8
    right = width - pad - legend_w - 16

    # --- x axis: label at the bottom, tick labels above it ---
    tick_len = 5
    xlab_text, xlab_scale = _fit(x_label, width - 2 * pad, (2, 1))
    xlab_h = GLYPH_H * xlab_scale if xlab_text else 0
    tick_scale = 2
    x_lo, x_hi = _axis_range([p[0] for pts in points for p in pts])
    y_lo, y_hi = _axis_range([p[1] for pts in points for p in pts])
    x_ticks, y_ticks = nice_ticks(x_lo, x_hi), nice_ticks(y_lo, y_hi)
    x_lo, x_hi = min(x_lo, x_ticks[0]), max(x_hi, x_ticks[-1])
    y_lo, y_hi = min(y_lo, y_ticks[0]), max(y_hi, y_ticks[-1])
    x_tick_labels, y_tick_labels = format_ticks(x_ticks), format_ticks(y_ticks)

    def layout_for(scale: int) -> tuple[int, int]:
        ytick_w = max(text_size(lab, scale)[0] for lab in y_tick_labels)
        left = pad + ytick_w + 6 + tick_len
        bottom = height - pad - xlab_h - (10 if xlab_text else 0) - GLYPH_H * scale - 6 - tick_len
        return left, bottom

    left, bottom = layout_for(tick_scale)
    # x tick labels must not collide: shrink the font, then label every other tick.
    x_every = 1
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else x_hi - x_lo

    def tick_spacing() -> float:   # pixels between neighbouring x ticks
        return (right - left) * x_step / (x_hi - x_lo)

    spacing = tick_spacing()
    widest_x = max(text_size(lab, tick_scale)[0] for lab in x_tick_labels)
    if widest_x + 10 > spacing:
        tick_scale = 1
        left, bottom = layout_for(tick_scale)
        spacing = tick_spacing()
        widest_x = max(text_size(lab, tick_scale)[0] for lab in x_tick_labels)
        while widest_x + 10 > spacing * x_every and x_every < len(x_ticks):
            x_every += 1
    if right - left < 60 or bottom - top < 60:
        raise ValueError(f"image {width}x{height} leaves no room for the plot area "
                         "(labels too long or image too small)")

    lay = Layout(left, top, right, bottom, x_lo, x_hi, y_lo, y_hi, x_ticks, y_ticks)

    # --- grid, frame, ticks, tick labels ---
    for t in x_ticks:
        px = lay.to_px(t, y_lo)[0]
        canvas.fill_rect(px, top + 1, px, bottom - 1, GRID)
    for t in y_ticks:
        py = lay.to_px(x_lo, t)[1]
        canvas.fill_rect(left + 1, py, right - 1, py, GRID)
    canvas.rect(left, top, right, bottom, BLACK)
    tick_h = CAP_H * tick_scale
    for i, (t, lab) in enumerate(zip(x_ticks, x_tick_labels)):
        px = lay.to_px(t, y_lo)[0]
        canvas.fill_rect(px, bottom + 1, px, bottom + tick_len, BLACK)
        if i % x_every == 0:
            w = text_size(lab, tick_scale)[0]
            tx = min(max(px - w // 2, 0), width - w)
            canvas.text(tx, bottom + tick_len + 6, lab, TEXT, tick_scale)
    for t, lab in zip(y_ticks, y_tick_labels):
        py = lay.to_px(x_lo, t)[1]
        canvas.fill_rect(left - tick_len, py, left - 1, py, BLACK)
        w = text_size(lab, tick_scale)[0]
        canvas.text(left - tick_len - 6 - w, py - tick_h // 2, lab, TEXT, tick_scale)

    # --- title, axis labels ---
    if title_text:
        tw = text_size(title_text, title_scale)[0]
        canvas.text((width - tw) // 2, pad, title_text, BLACK, title_scale)
    if ylab_text:
        canvas.text(pad, ylab_y, ylab_text, TEXT, ylab_scale)
    if xlab_text:
        xw = text_size(xlab_text, xlab_scale)[0]
        xx = min(max((left + right) // 2 - xw // 2, pad), width - pad - xw)
        canvas.text(xx, height - pad - xlab_h, xlab_text, TEXT, xlab_scale)

    # --- data: lines first, then markers on top (clipped to the inside of the frame) ---
    styles = [(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i in range(len(series))]
    canvas.clip = (left + 1, top + 1, right - 1, bottom - 1)
    for s, pts, (color, _) in zip(series, points, styles):
        if s.connect:
            pix = [lay.to_px(x, y) for x, y in pts]
            for (ax, ay), (bx, by) in zip(pix, pix[1:]):
                canvas.line(ax, ay, bx, by, color, 2)
    for pts, (color, shape) in zip(points, styles):
        for x, y in pts:
            canvas.marker(*lay.to_px(x, y), shape, color, halo=True)
    canvas.clip = None

    # --- legend box (outside the plot area, so it never hides data) ---
    lx0 = width - pad - legend_w
    ly0 = top
    max_rows = max(1, (height - pad - ly0 - 2 * legend_pad) // row_h)
    entries = list(zip(legend_labels, styles, series))
    if len(entries) > max_rows:
        shown = entries[:max_rows - 1]
        more = f"+{len(entries) - len(shown)} more"
    else:
        shown, more = entries, ""
    n_rows = len(shown) + (1 if more else 0)
    lx1, ly1 = width - pad, ly0 + 2 * legend_pad + n_rows * row_h - 8
    canvas.fill_rect(lx0, ly0, lx1, ly1, WHITE)
    canvas.rect(lx0, ly0, lx1, ly1, LEGEND_BORDER)
    for r, (lab, (color, shape), s) in enumerate(shown):
        cy = ly0 + legend_pad + r * row_h + CAP_H * legend_scale // 2
        sx = lx0 + legend_pad
        if s.connect:
            canvas.line(sx, cy, sx + swatch_w - 1, cy, color, 2)
        canvas.marker(sx + swatch_w // 2, cy, shape, color)
        canvas.text(sx + swatch_w + legend_gap, cy - CAP_H * legend_scale // 2, lab, TEXT,
                    legend_scale)
    if more:
        r = len(shown)
        canvas.text(lx0 + legend_pad, ly0 + legend_pad + r * row_h, more, MUTED, legend_scale)
    lay.legend_box = (lx0, ly0, lx1, ly1)
    return canvas, lay


def plot_png(path: str | Path, series: list[Series], *, title: str, x_label: str, y_label: str,
             width: int = 900, height: int = 600, y_lower_is_better: bool | None = None) -> None:
    """Render ``series`` as a scatter (optionally connected) chart and write it to ``path``."""
    canvas, _ = render(series, title=title, x_label=x_label, y_label=y_label, width=width,
                       height=height, y_lower_is_better=y_lower_is_better)
    Path(path).write_bytes(canvas.to_png())
