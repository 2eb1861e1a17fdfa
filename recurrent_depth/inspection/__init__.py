"""Seeing latent thought: per-token convergence, exit steps, logit lens and latent trajectories of a prompt.

The library functions return plain data (tensors and dataclass records); `write_report` turns them into PNG
figures and one self-contained HTML page. `rdepth inspect` is the command-line layer over `inspect_prompt`.
"""

from recurrent_depth.inspection.convergence import (
    Convergence,
    convergence,
    first_exit,
    relative_step_length,
    resolve_positions,
    select_positions,
)
from recurrent_depth.inspection.lens import LensEntry, logit_lens, token_texts
from recurrent_depth.inspection.report import Inspection, inspect_prompt, write_report
from recurrent_depth.inspection.trace import CRITERIA, LatentTrace, default_criteria, trace_latents
from recurrent_depth.inspection.trajectories import Trajectory, latent_trajectories, pca_projection

__all__ = [
    "CRITERIA", "Convergence", "Inspection", "LatentTrace", "LensEntry", "Trajectory", "convergence",
    "default_criteria", "first_exit", "inspect_prompt", "latent_trajectories", "logit_lens", "pca_projection",
    "relative_step_length", "resolve_positions", "select_positions", "token_texts", "trace_latents", "write_report",
]
