"""Latent trajectories: the path of one token's state over the iterations, on its own principal components.

As in the paper's figures, the PCA is fitted to the R+1 states s_0..s_R of a single position (centred over the
iterations), so the axes show where that token's state moves most: a point it converges to, an orbit, or a slide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from recurrent_depth.inspection.trace import LatentTrace


@dataclass(frozen=True)
class Trajectory:
    """One position's states projected on their principal components.

    position: index in the prompt; token_id: the token there.
    coords: (R+1, C) the coordinates of s_0..s_R on the first C components (C <= min(R+1, d)).
    explained: (C,) fraction of the trajectory's variance along each component.
    """

    position: int
    token_id: int
    coords: Tensor
    explained: Tensor


def pca_projection(points: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """(N, d) points -> ((N, C) coordinates on the top C principal axes, (C,) explained variance ratios).

    Axis signs are fixed so that the last point has a non-negative coordinate on each (a reproducible picture).
    """
    x = points.double() - points.double().mean(0, keepdim=True)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    C = min(n_components, vh.shape[0])
    coords = x @ vh[:C].T  # (N, C)
    sign = torch.where(coords[-1] < 0, -1.0, 1.0).to(coords)
    coords = coords * sign
    var = sv.pow(2)
    total = var.sum()
    explained = var[:C] / total if total > 0 else torch.zeros(C, dtype=var.dtype)
    return coords.float(), explained.float()


def latent_trajectories(trace: LatentTrace, positions: Sequence[int], n_components: int = 6) -> list[Trajectory]:
    """Each chosen position's state path s_0..s_R on its own top `n_components` principal components."""
    T = trace.num_tokens
    out = []
    for p in positions:
        if not 0 <= p < T:
            raise ValueError(f"position {p} is outside the prompt's {T} tokens")
        coords, explained = pca_projection(trace.states[:, p], n_components)
        out.append(Trajectory(position=int(p), token_id=int(trace.input_ids[p]), coords=coords, explained=explained))
    return out
