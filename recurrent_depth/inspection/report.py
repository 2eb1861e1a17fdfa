"""One inspection of a prompt, end to end: trace, convergence, logit lens, trajectories, then figures and page.

    from recurrent_depth.inspection import inspect_prompt, write_report
    result = inspect_prompt(model, tokenizer, "The capital of France is", num_steps=64)
    write_report(result, "out/inspect")   # PNG figures + a self-contained index.html
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.inspection.convergence import Convergence, convergence, resolve_positions, select_positions
from recurrent_depth.inspection.lens import LensEntry, logit_lens, token_texts
from recurrent_depth.inspection.trace import LatentTrace, default_criteria, trace_latents
from recurrent_depth.inspection.trajectories import Trajectory, latent_trajectories


@dataclass(frozen=True)
class Inspection:
    """Everything computed for one prompt: the trace and the three views of it, with the tokens' texts."""

    prompt: str
    texts: list[str]
    trace: LatentTrace
    convergence: Convergence
    lens: list[list[list[LensEntry]]]
    trajectories: list[Trajectory]
    meta: dict[str, Any] = field(default_factory=dict)


def inspect_prompt(model: torch.nn.Module, tokenizer: Any, prompt: str, num_steps: int = 64,
                   tokens: Sequence[int | str] | None = None, thresholds: Mapping[str, float] | None = None,
                   init_scale: float = 1.0, seed: int = 0, top_k: int = 5, n_components: int = 6,
                   meta: Mapping[str, Any] | None = None) -> Inspection:
    """Trace `prompt` through `num_steps` recurrences and compute convergence, logit lens and trajectories.

    tokenizer: anything with `__call__(text)["input_ids"]` and `decode(ids)` (a transformers tokenizer).
    tokens: the positions (ints, negative from the end) or token texts whose trajectories to draw; default: the
        two most and two least converged positions.
    thresholds: exit thresholds by criterion name (defaults: those of `recurrent_depth.inference.exit`).
    init_scale, seed: the random initial state s_0 (seeded, so the result is reproducible); 0.0 gives s_0 = 0.
    """
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) == 0:
        raise ValueError("the prompt is empty after tokenization: there is no token to inspect")
    texts = token_texts(ids, tokenizer.decode)
    picked = resolve_positions(tokens, texts) if tokens else None  # a bad pick fails before the model runs
    device = next(iter(model.parameters())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    trace = trace_latents(model, torch.tensor(ids), num_steps, init_scale=init_scale, top_k=top_k,
                          generator=generator, criteria=default_criteria(dict(thresholds or {})))
    conv = convergence(trace)
    positions = picked if picked is not None else select_positions(trace)
    info = {"num_steps": num_steps, "init_scale": init_scale, "seed": seed, "top_k": top_k, **(meta or {})}
    return Inspection(prompt=prompt, texts=texts, trace=trace, convergence=conv,
                      lens=logit_lens(trace, tokenizer.decode),
                      trajectories=latent_trajectories(trace, positions, n_components), meta=info)


def write_report(result: Inspection, out_dir: str | Path, colour_by: str = "kl") -> dict[str, Path]:
    """Write the PNG figures and `index.html` (figures embedded, no network resources) into `out_dir`."""
    from recurrent_depth.inspection import figures
    from recurrent_depth.inspection.page import render_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conv, texts = result.convergence, result.texts
    paths = {
        "overview": figures.plot_overview(conv, texts, result.trajectories, out / "overview.png", colour_by),
        "convergence": figures.plot_convergence(conv, texts, out / "convergence.png"),
        "exit_steps": figures.plot_exit_steps(conv, texts, out / "exit_steps.png"),
        "trajectories": figures.plot_trajectories(result.trajectories, texts, out / "trajectories.png"),
        "logit_lens": figures.plot_logit_lens(result.lens, texts, out / "logit_lens.png"),
    }
    page = out / "index.html"
    page.write_text(render_page(result, images={k: v for k, v in paths.items() if k != "overview"},
                                colour_by=colour_by), encoding="utf-8")
    paths["page"] = page
    return paths
