"""Draws book/figures/favicon.png, the book's 64×64 browser-tab icon (`html: favicon:` in _config.yml).

Four tokens in the colours of architecture.png: two image patches (vision tower, blue), one projected image token
(yellow) and one text token (green), outlined like the figure's boxes. Without an icon the browser asked for
/favicon.ico and logged a 404 on the first page it opened.

Run from the repository root: python book/figures/draw_favicon.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

# The colours of draw_architecture.py: vision, text, projector/image tokens, and the outline.
VISION, TEXT, JOIN, EDGE = "#dbeafe", "#dcfce7", "#fef3c7", "#374151"
SIZE, SCALE = 64, 8  # drawn 8× larger, then scaled down, so the edges are smooth


def main() -> None:
    big = SIZE * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin, gap, outline = 3 * SCALE, 4 * SCALE, 3 * SCALE
    cell = (big - 2 * margin - gap) // 2
    colours = [[VISION, VISION], [JOIN, TEXT]]
    for row in range(2):
        for column in range(2):
            x = margin + column * (cell + gap)
            y = margin + row * (cell + gap)
            draw.rounded_rectangle((x, y, x + cell, y + cell), radius=5 * SCALE, fill=colours[row][column],
                                   outline=EDGE, width=outline)
    out = Path(__file__).with_name("favicon.png")
    image.resize((SIZE, SIZE), Image.LANCZOS).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
