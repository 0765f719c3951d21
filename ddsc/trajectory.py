"""The denoising of generated cells as an animated GIF: one frame per sampler step, cells x genes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from ddsc.data.tokens import ExpressionTokens


def save_trajectory_gif(states: list[Tensor], tokens: ExpressionTokens, path: str | Path, fps: int = 8) -> Path:
    """``states``: the sampler's trajectory, int64 [B, G] per step; masked entries are drawn grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    frames = [np.ma.masked_where(s.numpy() >= tokens.num_bins, s.numpy()) for s in states]
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(frames[0], aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=tokens.num_bins - 1)
    fig.colorbar(image, ax=ax, label="expression bin")
    ax.set_xlabel("gene")
    ax.set_ylabel("cell")

    def draw(i: int):
        image.set_data(frames[i])
        masked = int(np.ma.count_masked(frames[i]))
        ax.set_title(f"step {i}/{len(frames) - 1}: {masked} of {frames[i].size} entries masked")
        return (image,)

    animation = FuncAnimation(fig, draw, frames=len(frames), blit=False)
    animation.save(str(path), writer=PillowWriter(fps=fps))
    plt.close(fig)
    return Path(path)
