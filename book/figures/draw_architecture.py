"""Draws book/figures/architecture.png, the overview of PaliGemma used by the introduction.

Run from the repository root: python book/figures/draw_architecture.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

VISION, TEXT, JOIN, DATA = "#dbeafe", "#dcfce7", "#fef3c7", "#f3f4f6"


def box(ax, x, y, w, h, text, colour, size=10, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=colour, ec="#374151", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#374151", lw=1.2))


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(0, 11); ax.set_ylim(0, 6.2); ax.axis("off")

    box(ax, 0.2, 4.9, 1.8, 0.9, "image\n224×224×3", DATA)
    box(ax, 2.5, 4.9, 2.1, 0.9, "patches 14×14\n+ positions\n(ch. 1)", VISION, 9)
    box(ax, 5.1, 4.9, 2.3, 0.9, "SigLIP encoder ×27\nattention + MLP\n(ch. 2–3)", VISION, 9)
    box(ax, 7.9, 4.9, 2.0, 0.9, "linear projector\n1152 → 2048\n(ch. 8)", JOIN, 9)
    arrow(ax, (2.0, 5.35), (2.5, 5.35)); arrow(ax, (4.6, 5.35), (5.1, 5.35)); arrow(ax, (7.4, 5.35), (7.9, 5.35))

    box(ax, 0.2, 3.1, 1.8, 0.9, 'prompt\n"caption en"', DATA)
    box(ax, 2.5, 3.1, 2.1, 0.9, "tokenizer\n(ch. 9)", TEXT, 9)
    box(ax, 5.1, 3.1, 2.3, 0.9, "token embeddings\n× √2048", TEXT, 9)
    arrow(ax, (2.0, 3.55), (2.5, 3.55)); arrow(ax, (4.6, 3.55), (5.1, 3.55))

    ax.text(0.2, 2.55, "sequence:", fontsize=9, weight="bold")
    cells = [("img₁", JOIN)] + [("…", JOIN)] + [("img₂₅₆", JOIN), ("<bos>", TEXT), ("caption", TEXT), ("en", TEXT), ("\\n", TEXT),
                                                ("answer…", "#fde2e2"), ("<eos>", "#fde2e2")]
    x = 1.3
    for label, colour in cells:
        box(ax, x, 2.3, 0.95, 0.5, label, colour, 8)
        x += 1.02
    ax.plot([8.9, 8.9, 2.28], [4.9, 4.45, 4.45], color="#374151", lw=1.2)   # image tokens: down, across, down
    arrow(ax, (2.28, 4.45), (2.28, 2.82)); arrow(ax, (6.25, 3.1), (5.5, 2.82))
    ax.text(1.3, 1.95, "prefix: full attention (ch. 8)", fontsize=8, color="#1f2937")
    ax.text(8.45, 1.95, "suffix: causal", fontsize=8, color="#1f2937")

    box(ax, 1.3, 0.45, 5.0, 1.2, "Gemma decoder ×18\nRMSNorm (ch. 4) · RoPE (ch. 5)\nmulti-query attention + KV cache (ch. 6)\ngated MLP (ch. 7)", TEXT, 8.5)
    box(ax, 6.8, 0.55, 1.9, 1.0, "tied head\n→ logits", TEXT, 9)
    box(ax, 9.1, 0.55, 1.7, 1.0, "generation\n(ch. 10)", DATA, 9)
    arrow(ax, (3.8, 2.3), (3.8, 1.55)); arrow(ax, (6.3, 1.05), (6.8, 1.05)); arrow(ax, (8.7, 1.05), (9.1, 1.05))
    ax.set_title("PaliGemma-3B-224: SigLIP So400m/14 + linear projector + Gemma 2B", fontsize=12, weight="bold")
    out = Path(__file__).with_name("architecture.png")
    fig.savefig(out, dpi=130, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
