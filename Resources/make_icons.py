"""Draw the extension and module icons (128x128 PNG). Run once: python Resources/make_icons.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def icon(path: Path, accent: str, mark: str) -> None:
    y, x = np.mgrid[-1:1:128j, -1:1:128j]
    lungs = (((x + 0.38) / 0.3) ** 2 + (y / 0.62) ** 2 <= 1) | (((x - 0.38) / 0.3) ** 2 + (y / 0.62) ** 2 <= 1)
    heat = np.exp(-(((x - 0.42) ** 2 + (y + 0.12) ** 2) / 0.02))
    image = np.where(lungs, 0.15, 0.75)
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    ax.imshow(np.ma.masked_less(heat, 0.15), cmap="inferno", vmin=0, vmax=1, alpha=0.85)
    ax.text(0.06, 0.9, mark, transform=ax.transAxes, fontsize=16, weight="bold", color=accent, va="top")
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


icon(ROOT / "Resources" / "Icons" / "NoduleAI.png", "#ff8c00", "AI")
icon(ROOT / "NoduleDetect" / "Resources" / "Icons" / "NoduleDetect.png", "#ff8c00", "D")
icon(ROOT / "NoduleTraining" / "Resources" / "Icons" / "NoduleTraining.png", "#2ca02c", "T")
