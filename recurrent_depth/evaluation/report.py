"""One evaluation run written to a folder: the depth sweep (and optionally an exit-threshold sweep and a perplexity
sweep) as JSON + CSV records and PNG plots, plus `summary.json`. `rdepth eval` is a thin layer over `run_evaluation`.

    summary = run_evaluation(model, tok, "out/", rows=rows, num_steps=[1, 2, 4, 8, 16],
                             exit_criterion="kl", thresholds=[1e-2, 1e-3], texts=None)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recurrent_depth.evaluation.plots import plot_depth_by_level, plot_depth_sweep, plot_exit_sweep
from recurrent_depth.evaluation.records import write_records
from recurrent_depth.evaluation.sweeps import OnProgress, Scorer, depth_sweep, exact_match, exit_sweep, perplexity_sweep


def format_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of the chosen columns (floats to 4 significant digits)."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [[cell(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run_evaluation(model, tokenizer, out_dir: str | Path, num_steps: Sequence[int],
                   rows: Sequence[dict] | None = None, texts: Sequence[str] | None = None, scorer: Scorer = exact_match,
                   exit_criterion: str | None = None, thresholds: Sequence[float] = (),
                   max_num_steps: int | None = None,
                   meta: dict[str, Any] | None = None, seq_len: int = 128, max_blocks: int = 64,
                   method: str = "greedy", progress: OnProgress | None = None, **decode: Any) -> dict[str, Any]:
    """Run the sweeps the inputs call for and write them into `out_dir`; returns the summary (also saved).

    rows: prompt/answer data for accuracy against depth (and the exit sweep, if `exit_criterion`); every row's
    prediction at every point goes to `predictions.jsonl`. texts: documents for perplexity against depth; method:
    how the depth sweep scores ("greedy" or "teacher_forced"; the exit sweep always decodes); progress: told one
    line per batch and per point; decode: batch_size, max_new_tokens, init_scale, seed, add_bos.
    """
    if rows is None and texts is None:
        raise ValueError("nothing to evaluate: give prompt/answer rows, texts, or both")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"parameters": model.num_parameters(), "mean_recurrence": model.config.mean_recurrence,
            "depth_sweep_method": method, **(meta or {}),
            **{k: v for k, v in decode.items() if k != "batch_size"}}
    summary: dict[str, Any] = {"meta": meta, "files": {}}
    if rows is not None:
        greedy_only = ("max_new_tokens", "kv_sharing", "min_steps", "warm_start")
        tf_kw = {k: v for k, v in decode.items() if k not in greedy_only} if method == "teacher_forced" else decode
        recs = depth_sweep(model, tokenizer, rows, num_steps, scorer=scorer, method=method, keep_predictions=True,
                           progress=progress, **tf_kw)
        predictions = [prediction_rows(rows, r, "depth") for r in recs]
        summary["depth_sweep"] = [{k: r[k] for k in ("num_steps", "accuracy", "n")} for r in recs]
        summary["files"]["depth_sweep"] = _save(recs, out, "depth_sweep", meta, plot_depth_sweep, "accuracy")
        if all("accuracy_by_level" in r for r in recs):
            summary["depth_sweep_by_level"] = [{"num_steps": r["num_steps"], **r["accuracy_by_level"]} for r in recs]
            summary["files"]["depth_sweep"]["by_level_png"] = str(plot_depth_by_level(recs, out / "depth_by_level.png"))
        if exit_criterion is not None:
            cap = max_num_steps or max(num_steps)
            recs = exit_sweep(model, tokenizer, rows, exit_criterion, thresholds, cap, scorer=scorer,
                              keep_predictions=True, progress=progress, **decode)
            predictions += [prediction_rows(rows, r, "exit") for r in recs]
            summary["exit_sweep"] = [{k: r[k] for k in ("threshold", "accuracy", "mean_steps", "steps_saved")}
                                     for r in recs]
            summary["files"]["exit_sweep"] = _save(recs, out, "exit_sweep", {**meta, "criterion": exit_criterion,
                                                                              "max_num_steps": cap},
                                                   plot_exit_sweep, "accuracy")
        summary["files"]["predictions"] = str(_write_jsonl(out / "predictions.jsonl",
                                                           [p for point in predictions for p in point]))
    if texts is not None:
        ppl_kw = {k: decode[k] for k in ("init_scale", "seed", "batch_size") if k in decode}
        recs = perplexity_sweep(model, tokenizer, texts, num_steps, seq_len=seq_len, max_blocks=max_blocks,
                                progress=progress, **ppl_kw)
        summary["perplexity_sweep"] = [{k: r[k] for k in ("num_steps", "perplexity", "tokens")} for r in recs]
        summary["files"]["perplexity_sweep"] = _save(recs, out, "perplexity_sweep", meta, plot_depth_sweep,
                                                     "perplexity")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary


def prediction_rows(rows: Sequence[dict], rec: dict[str, Any], sweep: str) -> list[dict[str, Any]]:
    """One dict per row for one sweep point (a record made with keep_predictions, which it pops): the point
    (sweep, num_steps, threshold), the row's prompt, answer and level, the prediction, whether it scored correct,
    and the recurrence steps each generated token used (teacher-forced: r per answer position)."""
    preds, hits, steps = rec.pop("predictions"), rec.pop("hits"), rec.pop("token_steps")
    return [{"sweep": sweep, "num_steps": rec["num_steps"], "threshold": rec.get("threshold"),
             "prompt": row["prompt"], "answer": row["answer"], "prediction": pred, "correct": hit,
             "level": row.get("level"), "steps": st} for row, pred, hit, st in zip(rows, preds, hits, steps)]


def _write_jsonl(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def _save(recs: list[dict], out: Path, stem: str, meta: dict, plot, metric: str) -> dict[str, str]:
    paths = write_records(recs, out, stem, meta)
    paths["png"] = plot(recs, out / f"{stem}.png", metric=metric)
    return {k: str(v) for k, v in paths.items()}
