"""Evaluation: depth sweeps (accuracy / perplexity against test-time recurrence r), exit-threshold sweeps (accuracy
against mean steps), JSON/CSV records, plots, the offline text corpus and an lm-eval adapter.

    from recurrent_depth.evaluation import depth_sweep, exit_sweep, perplexity_sweep, write_records
    recs = depth_sweep(model, tok, task.generate(500, "ood"), num_steps=[1, 2, 4, 8, 16, 32], scorer=task.score)

Submodules: decode (batched greedy decoding over the inference engine), sweeps, records, plots, report
(`run_evaluation`, what `rdepth eval` calls), corpus (Python docs / stdlib text), lm_eval_adapter (imported on demand:
it pulls in lm-eval).
"""

from recurrent_depth.evaluation.decode import DecodeOutput, greedy_decode
from recurrent_depth.evaluation.records import read_records, write_records
from recurrent_depth.evaluation.sweeps import (
    default_max_new_tokens,
    depth_sweep,
    evaluate_accuracy,
    exact_match,
    exit_sweep,
    perplexity_sweep,
)

__all__ = ["DecodeOutput", "default_max_new_tokens", "depth_sweep", "evaluate_accuracy", "exact_match", "exit_sweep",
           "greedy_decode", "perplexity_sweep", "read_records", "write_records"]
