"""scripts/png_plot.py: PNG bytes decoded by hand, series colours where the data maps, nice ticks."""

from __future__ import annotations

import math
import random
import struct
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from scripts.png_plot import (  # noqa: E402
    FONT,
    PALETTE,
    UNKNOWN_GLYPH,
    Series,
    encode_png,
    format_ticks,
    nice_ticks,
    plot_png,
    render,
)

REQUIRED_CHARS = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                  " .,-+=()%/:_<>[]x")


def decode_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """Minimal decoder for 8-bit RGB, filter-0 PNGs; checks every CRC and the chunk order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds, idat, ihdr = 8, [], b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert pos == len(data)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", ihdr)
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = []
    for y in range(height):
        line = raw[y * stride:(y + 1) * stride]
        assert line[0] == 0, "filter byte must be 0"
        rows.append([tuple(line[1 + 3 * x:4 + 3 * x]) for x in range(width)])
    return width, height, rows


def pixels_of(rows, color, box=None):
    x0, y0, x1, y1 = box if box else (0, 0, len(rows[0]) - 1, len(rows) - 1)
    return [(x, y) for y in range(y0, y1 + 1) for x in range(x0, x1 + 1) if rows[y][x] == color]


def plot_area(lay):
    return lay.left + 1, lay.top + 1, lay.right - 1, lay.bottom - 1


# ------------------------------------------------------------------------------------ encoding

def test_encode_png_round_trip_both_input_forms():
    w, h = 3, 2
    rows = [bytearray([255, 0, 0, 0, 255, 0, 0, 0, 255]), bytearray([1, 2, 3, 4, 5, 6, 7, 8, 9])]
    png = encode_png(rows, w, h)
    assert png == encode_png(b"".join(rows), w, h)
    width, height, px = decode_png(png)
    assert (width, height) == (3, 2)
    assert px[0] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert px[1] == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]


@pytest.mark.parametrize("pixels,w,h", [(b"\x00" * 8, 3, 1), ([bytearray(9)], 3, 2),
                                        ([bytearray(8), bytearray(9)], 3, 2), (b"", 0, 1)])
def test_encode_png_rejects_wrong_sizes(pixels, w, h):
    with pytest.raises(ValueError):
        encode_png(pixels, w, h)


# ------------------------------------------------------------------------------------ plotting

def test_plot_png_is_valid_and_every_series_colour_is_in_the_plot_area(tmp_path):
    series = [Series(f"s{i}", [i, i + 1, i + 2], [i * i, i, 2 * i], connect=i % 2 == 0)
              for i in range(12)]
    out = tmp_path / "chart.png"
    kwargs = dict(title="Title", x_label="x", y_label="y", width=500, height=360)
    plot_png(out, series, **kwargs)
    width, height, rows = decode_png(out.read_bytes())
    assert (width, height) == (500, 360)
    _, lay = render(series, **kwargs)
    for i in range(12):
        colour = PALETTE[i % len(PALETTE)]
        assert pixels_of(rows, colour, plot_area(lay)), f"series {i} colour {colour} not drawn"
    # the legend sits outside (right of) the plot area and shows a swatch of each colour
    lx0, ly0, lx1, ly1 = lay.legend_box
    assert lx0 > lay.right
    for i in range(len(PALETTE)):
        assert pixels_of(rows, PALETTE[i], lay.legend_box)


def test_markers_land_where_the_data_maps(tmp_path):
    xs, ys = [0.0, 1.0, 2.0, 3.0], [5.0, 40.0, -10.0, 12.0]   # max y at x=1, min y at x=2
    s = [Series("data", xs, ys)]
    kwargs = dict(title="t", x_label="x", y_label="y", width=400, height=300)
    out = tmp_path / "m.png"
    plot_png(out, s, **kwargs)
    _, _, rows = decode_png(out.read_bytes())
    _, lay = render(s, **kwargs)
    colour = PALETTE[0]
    blue = pixels_of(rows, colour, plot_area(lay))
    assert blue
    for x, y in zip(xs, ys):   # each marker centre is painted in the series colour
        px, py = lay.to_px(x, y)
        assert rows[py][px] == colour
    # independently of to_px: the topmost blue pixel belongs to the max-y point (2nd from left)
    # and the lowest to the min-y point (3rd), and left/right order follows x
    top_px = min(blue, key=lambda p: p[1])
    bottom_px = max(blue, key=lambda p: p[1])
    assert top_px[1] < bottom_px[1]
    span = lay.right - lay.left
    assert abs(top_px[0] - (lay.left + span * (1 - lay.x_min) / (lay.x_max - lay.x_min))) <= 4
    assert abs(bottom_px[0] - (lay.left + span * (2 - lay.x_min) / (lay.x_max - lay.x_min))) <= 4
    assert top_px[0] < bottom_px[0]
    # the data range sits inside the axis range with some padding
    assert lay.x_min < 0 < 3 < lay.x_max and lay.y_min < -10 < 40 < lay.y_max
    assert lay.x_min <= lay.x_ticks[0] and lay.x_ticks[-1] <= lay.x_max
    assert lay.y_min <= lay.y_ticks[0] and lay.y_ticks[-1] <= lay.y_max


def test_axis_widens_to_enclosing_ticks():
    # padded y range ~[34.78, 36.47]: no nice step fits 4-8 ticks inside, so ticks enclose it
    s = [Series("a", [0.0, 1.0], [34.86, 36.39])]
    _, lay = render(s, title="t", x_label="x", y_label="y", width=400, height=300)
    assert lay.y_ticks[0] < 34.78 and lay.y_ticks[-1] > 36.47
    assert lay.y_min <= lay.y_ticks[0] and lay.y_ticks[-1] <= lay.y_max
    for t in lay.y_ticks:
        assert lay.top <= lay.to_px(0.0, t)[1] <= lay.bottom


def test_connected_series_draws_lines_and_unconnected_does_not(tmp_path):
    kwargs = dict(title="t", x_label="x", y_label="y", width=400, height=300)
    for connect in (True, False):
        s = [Series("a", [0.0, 10.0], [0.0, 10.0], connect=connect)]
        canvas, lay = render(s, **kwargs)
        (ax, ay), (bx, by) = lay.to_px(0, 0), lay.to_px(10, 10)
        mid = canvas.get((ax + bx) // 2, (ay + by) // 2)
        assert (mid == PALETTE[0]) is connect


def test_degenerate_inputs(tmp_path):
    nan, inf = float("nan"), float("inf")
    cases = [
        [Series("single", [3.0], [7.0])],
        [Series("flat y", [1, 2, 3], [5, 5, 5], connect=True)],
        [Series("flat x", [2, 2, 2], [1, 2, 3])],
        [Series("zeros", [0, 0], [0, 0])],
        [Series("bad", [nan, 1.0, inf, 2.0, 3.0], [1.0, nan, 2.0, -inf, 4.0], connect=True),
         Series("all bad", [nan], [inf])],
        [Series("only bad", [nan, inf], [1.0, 2.0])],
    ]
    for i, series in enumerate(cases):
        out = tmp_path / f"d{i}.png"
        kwargs = dict(title="degenerate", x_label="x", y_label="y", width=300, height=220)
        plot_png(out, series, **kwargs)
        _, _, rows = decode_png(out.read_bytes())
        _, lay = render(series, **kwargs)
        assert lay.x_min < lay.x_max and lay.y_min < lay.y_max
        assert all(math.isfinite(v) for v in (lay.x_min, lay.x_max, lay.y_min, lay.y_max))
        for x, y in zip(series[0].xs, series[0].ys):
            if math.isfinite(x) and math.isfinite(y):
                px, py = lay.to_px(x, y)
                assert lay.left < px < lay.right and lay.top < py < lay.bottom
                assert rows[py][px] == PALETTE[0]
        assert pixels_of(rows, PALETTE[0], lay.legend_box)   # legend entry even with no points


def test_empty_series_list_raises():
    with pytest.raises(ValueError, match="at least one Series"):
        plot_png("/nonexistent/never_written.png", [], title="t", x_label="x", y_label="y")


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="xs"):
        render([Series("a", [1, 2], [1])], title="t", x_label="x", y_label="y")


def test_text_is_drawn_title_and_lower_is_better(tmp_path):
    s = [Series("a", [0, 1], [0, 1])]
    base = dict(title="", x_label="", y_label="", width=400, height=300)
    blank, _ = render(s, **base)
    titled, lay = render(s, **{**base, "title": "Hello", "y_label": "loss"}, y_lower_is_better=True)
    plain, _ = render(s, **{**base, "title": "Hello", "y_label": "loss"})
    def dark(canvas, y0, y1):
        return sum(1 for y in range(y0, y1) for x in range(canvas.width)
                   if sum(canvas.get(x, y)) < 200)
    _, blank_lay = render(s, **base)
    assert dark(blank, 0, blank_lay.top) == 0
    assert blank_lay.top < lay.top   # title and y label push the plot down
    assert dark(titled, 0, lay.top) > dark(plain, 0, lay.top) > 50   # "(lower is better)" adds ink


# ------------------------------------------------------------------------------------ font, palette

def test_font_covers_required_characters_and_unknown_is_a_box():
    for ch in REQUIRED_CHARS:
        assert ch in FONT, ch
        assert len(FONT[ch]) == 5
        assert (ch == " ") == (not any(FONT[ch])), ch
    glyphs = [FONT[ch] for ch in sorted(set(REQUIRED_CHARS)) if ch != " "]
    assert len(set(glyphs)) == len(glyphs), "two characters share a glyph"
    assert UNKNOWN_GLYPH not in glyphs
    canvas, _ = render([Series("\u00fc", [0], [0])], title="", x_label="", y_label="",
                       width=300, height=200)   # must not raise on non-ASCII


def test_palette_is_distinct():
    assert len(PALETTE) >= 10
    for i, a in enumerate(PALETTE):
        for b in PALETTE[i + 1:]:
            assert sum((p - q) ** 2 for p, q in zip(a, b)) ** 0.5 > 60, (a, b)
        assert a != (255, 255, 255) and sum(a) > 0


# ------------------------------------------------------------------------------------ ticks

def _is_nice(step: float, tol: float = 1e-6) -> bool:
    k = math.floor(math.log10(step) + 1e-9)
    m = step / 10 ** k
    return any(abs(m - n) < tol * n for n in (1, 2, 5, 10))   # 9.9999997e-6 is 1e-5


def test_nice_ticks_steps_and_coverage():
    rng = random.Random(0)
    ranges = [(0, 1), (0, 100), (-3, 1e-3), (6.65, 7.35), (1e7, 1.36e7), (0, 1.2e-4),
              (123456, 123457), (-1e-9, 1e-9), (0.95, 1.05), (-250, -249.9)]
    for _ in range(300):
        centre = rng.uniform(-1, 1) * 10 ** rng.uniform(-6, 8)
        span = max(10 ** rng.uniform(-6, 8), 1e-9 * abs(centre))   # below ~1e-12 is degenerate
        ranges.append((centre, centre + span))
    spilled = 0
    for lo, hi in ranges:
        ticks = nice_ticks(lo, hi)
        assert 4 <= len(ticks) <= 8, (lo, hi, ticks)
        step = ticks[1] - ticks[0]
        # float resolution at this magnitude (e.g. ticks near 182204.534 one 5e-6 step apart)
        eps = 1e-13 * max(abs(lo), abs(hi))
        assert _is_nice(step, 1e-6 + 10 * eps / step), (lo, hi, step)
        step = float(f"{step:.1g}")   # the exact nice step, free of subtraction error
        for a, b in zip(ticks, ticks[1:]):
            assert math.isclose(b - a, step, rel_tol=1e-6, abs_tol=10 * eps)
        tol = step * 1e-6 + 10 * eps
        # no end of the range is more than one step from a tick; ticks spill over the range
        # only when no nice step fits 4-8 ticks inside it, and then just to enclose it
        assert lo - step - tol < ticks[0] < lo + step + tol
        assert hi - step - tol < ticks[-1] < hi + step + tol
        if ticks[0] < lo - tol or ticks[-1] > hi + tol:
            spilled += 1
            assert ticks[0] <= lo + tol and ticks[-1] >= hi - tol
        assert all(abs(t - round(t / step) * step) < tol for t in ticks)   # multiples of step
        labels = format_ticks(ticks)
        assert len(set(labels)) == len(labels), (ticks, labels)   # enough digits to tell apart
    assert spilled < len(ranges) // 4   # mostly inside the (padded) data range
    assert nice_ticks(34.78, 36.47) == [34.5, 35.0, 35.5, 36.0, 36.5]   # enclosing fallback


def test_nice_ticks_examples_and_errors():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 0) == nice_ticks(0, 1)
    assert nice_ticks(5, 5) == [5]
    assert format_ticks(nice_ticks(6.65, 7.35)) == ["6.7", "6.8", "6.9", "7.0", "7.1", "7.2", "7.3"]
    with pytest.raises(ValueError):
        nice_ticks(0, float("nan"))
