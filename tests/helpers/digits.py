"""Digit photos unlike MNIST: typeset digits (Pillow's built-in font), dark ink on paper, at
several sizes, slants and stroke weights, as PNG files. The shipped model reads many of them
with low confidence: inputs field capture is meant to keep."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont


def digit_png(digit: int, size: int = 40, angle: float = 0.0, stroke: int = 0, canvas: int = 64) -> bytes:
    font = ImageFont.load_default(size=size)
    image = Image.new("L", (canvas, canvas), 235)  # light paper
    draw = ImageDraw.Draw(image)
    draw.text((canvas / 2, canvas / 2), str(digit), fill=20, font=font, anchor="mm", stroke_width=stroke, stroke_fill=20)
    if angle:
        image = image.rotate(angle, fillcolor=235)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def digit_pngs() -> list[tuple[int, bytes]]:
    """30 PNGs: each digit at three styles, with its true label."""
    styles = ((40, 0.0, 0), (32, 12.0, 2), (44, -10.0, 1))
    return [(d, digit_png(d, size, angle, stroke)) for size, angle, stroke in styles for d in range(10)]
