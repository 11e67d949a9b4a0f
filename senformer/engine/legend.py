"""The class key of a prediction folder: ``legend.png`` (colour swatch + "id name" per class) and
``classes.json`` (id, name, colour and predicted pixel count of every class)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LEGEND_CHOICES = ("present", "all", "none")
MAX_ROWS = 30  # per column: 150 ADE20K classes become 5 columns, not a 3000-pixel strip
PAD, GAP, COL_GAP = 8, 6, 16
BORDER = (128, 128, 128)  # outlines swatches so white or black classes still show on white


@dataclass(frozen=True)
class LegendRow:
    id: int
    name: str
    color: tuple
    swatch: tuple  # (x0, y0, x1, y1), inclusive, as ImageDraw takes it; the border is its outer pixel ring
    text_xy: tuple


def class_names(classes, num_classes: int) -> list:
    """``classes`` padded with "class<i>" names up to ``num_classes`` (a model may predict more ids than named)."""
    names = [str(c) for c in (classes or ())]
    return names + [f"class{i}" for i in range(len(names), num_classes)]


def class_colors(palette, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8; ids past the palette are black, as ``predict.colorize`` draws them."""
    out = np.zeros((num_classes, 3), np.uint8)
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)[:num_classes]
    out[: len(pal)] = pal
    return out


def class_table(counts, classes, palette) -> list:
    """What ``classes.json`` holds: one {"id", "name", "color", "pixels"} per class."""
    counts = np.asarray(counts, np.int64)
    names, colors = class_names(classes, len(counts)), class_colors(palette, len(counts))
    return [{"id": i, "name": names[i], "color": [int(v) for v in colors[i]], "pixels": int(counts[i])}
            for i in range(len(counts))]


def load_font(size=14):
    # Pillow >= 10.1 scales its built-in font; older ones have only the small fixed bitmap font
    try:
        return ImageFont.load_default(size=size)
    except Exception:
        return ImageFont.load_default()


def _text_size(font, text):
    if hasattr(font, "getbbox"):
        x0, y0, x1, y1 = font.getbbox(text)
        return x1, y1  # from the draw origin: text drawn at (x, y) ends at (x + x1, y + y1)
    return font.getsize(text)  # Pillow < 8


def legend_layout(table, font=None, max_rows=MAX_ROWS):
    """``(width, height), [LegendRow]`` for the classes of ``table`` (``class_table`` rows), in order,
    filling columns top to bottom with at most ``max_rows`` rows each."""
    font = font or load_font()
    labels = [f"{r['id']} {r['name']}" for r in table]
    sizes = [_text_size(font, t) for t in labels]
    line = max([h for _, h in sizes] + [_text_size(font, "Ag")[1]])
    sw = line  # square swatches as tall as a line of text
    row_h = line + GAP
    n = len(table)
    cols = max(1, -(-n // max_rows))
    per_col = max(1, -(-n // cols))  # balanced columns rather than full ones and a stub
    rows, x, height = [], PAD, PAD
    for c in range(cols):
        chunk = range(c * per_col, min(n, (c + 1) * per_col))
        text_w = max((sizes[i][0] for i in chunk), default=0)
        for k, i in enumerate(chunk):
            y = PAD + k * row_h
            rows.append(LegendRow(table[i]["id"], table[i]["name"], tuple(table[i]["color"]),
                                  (x, y, x + sw - 1, y + sw - 1), (x + sw + GAP, y)))
            height = max(height, y + row_h)
        x += sw + GAP + text_w + COL_GAP
    return (x - COL_GAP + PAD, height - GAP + PAD), rows


def draw_legend(table, font=None) -> Image.Image:
    font = font or load_font()
    size, rows = legend_layout(table, font)
    im = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(im)
    for r in rows:
        d.rectangle(r.swatch, fill=r.color, outline=BORDER)
        d.text(r.text_xy, f"{r.id} {r.name}", fill=(0, 0, 0), font=font)
    return im


def write_class_key(out_dir, counts, classes, palette, legend="present"):
    """Writes ``<out_dir>/classes.json`` (every class) and, unless ``legend`` is "none",
    ``<out_dir>/legend.png`` with the classes that have predicted pixels ("present") or all of them
    ("all"); no legend.png when no class is present. Returns the paths written."""
    if legend not in LEGEND_CHOICES:
        raise ValueError(f"legend must be one of {', '.join(LEGEND_CHOICES)}, got {legend!r}")
    out_dir = Path(out_dir)
    table = class_table(counts, classes, palette)
    written = [out_dir / "classes.json"]
    _atomic(written[0], lambda p: p.write_text(json.dumps(table, indent=1) + "\n"))
    shown = table if legend == "all" else [r for r in table if r["pixels"] > 0] if legend == "present" else []
    if shown:
        written.append(out_dir / "legend.png")
        _atomic(written[1], lambda p: draw_legend(shown).save(p, format="PNG"))
    return written


def _atomic(path: Path, write):
    # a reader (or a rerun into the same folder) never sees a half-written file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
