"""`rdepth eval`: accuracy (or perplexity) against test-time recurrence depth, and against mean steps under an
adaptive exit, for a checkpoint folder (model + tokenizer.json). Writes JSON, CSV and PNG files into --out.

    rdepth eval --model ckpt/ --data test.jsonl --num-steps 1,2,4,8,16,32,64 --out results/eval
    rdepth eval --model ckpt/ --task variable_binding --split ood --n 500 --exit kl:1e-2,1e-3,1e-4 --out results/eval
    rdepth eval --model ckpt/ --corpus docs --num-steps 1,4,8,32 --out results/ppl     # validation perplexity
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recurrent_depth.cli.options import (
    add_exit_arg,
    add_model_args,
    load_model,
    parse_exit_sweep,
    parse_num_steps_list,
)
from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO, KV_SHARING_HELP
from recurrent_depth.tasks import TASKS

SWEEP_THRESHOLDS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)  # --exit NAME without thresholds


def add_parser(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="accuracy / perplexity against test-time depth and adaptive-exit thresholds",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, num_steps=False)  # --num-steps here is a list of depths
    src = p.add_argument_group("data (at least one)")
    src.add_argument("--data", default=None, help='JSONL file of {"prompt": str, "answer": str} lines')
    src.add_argument("--task", default=None, help=f"a built-in reasoning task (generated): {', '.join(TASKS)}")
    src.add_argument("--text", default=None, help="a UTF-8 text file for perplexity against depth")
    src.add_argument("--corpus", default=None, choices=["docs", "code"],
                     help="perplexity on the validation split of the interpreter's docs / stdlib corpus")
    p.add_argument("--task-args", action="append", default=[], metavar="KNOBS",
                   help="--task difficulty knobs, a JSON object ('{\"hops\": [0, 2]}') or KEY=VALUE (hops=[0,2]); "
                        "repeatable; default: the knobs the checkpoint was trained on, when it records them")
    p.add_argument("--split", default="test", choices=["test", "ood"], help="split of --task")
    p.add_argument("--n", type=int, default=500, help="problems generated for --task")
    p.add_argument("--cot", action="store_true", help="--task answers in chain-of-thought form (steps#answer)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows of --data (0: all)")
    p.add_argument("--num-steps", default="1,2,4,8,16,32,64", help="comma-separated recurrence depths r to sweep")
    p.add_argument("--method", default="greedy", choices=["greedy", "teacher_forced"],
                   help="depth-sweep scoring: greedy decoding, or one teacher-forced pass per row (same exact-match "
                        "accuracy at fixed depth, faster; --task's chain-of-thought-aware scorer is not used)")
    add_exit_arg(p, help="an exit-threshold sweep, NAME[:T1,T2,...] (none: no sweep)",
                 thresholds=f"without thresholds: {','.join(f'{t:g}' for t in SWEEP_THRESHOLDS)}")
    p.add_argument("--kv-sharing", default=KV_SHARING_AUTO, help=KV_SHARING_HELP)
    p.add_argument("--max-num-steps", type=int, default=None,
                   help="depth cap of the exit sweep (default: the largest --num-steps)")
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded together")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="decoding budget (default: longest reference answer + 3)")
    p.add_argument("--init-scale", type=float, default=INIT_SCALE,
                   help="scale of the random initial state (default 0: zeros)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated tasks and initial states")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per block for perplexity")
    p.add_argument("--max-blocks", type=int, default=64, help="blocks evaluated for perplexity")
    p.add_argument("--out", required=True, help="output folder")
    return p


def read_jsonl_rows(path: str | Path, limit: int = 0) -> list[dict]:
    """Prompt/answer rows of a JSONL file (other keys kept; an int `level` gives per-level accuracy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file {str(path)!r} not found")
    from recurrent_depth.data.prompts import iter_jsonl_rows

    rows = []
    for row in iter_jsonl_rows(path):
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no prompt/answer rows")
    return rows


def _to_stderr(message: str) -> None:
    print(f"rdepth eval: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from recurrent_depth.evaluation.report import format_table, run_evaluation
    from recurrent_depth.evaluation.sweeps import exact_match

    if not any((args.data, args.task, args.text, args.corpus)):
        raise ValueError("give --data, --task, --text or --corpus")
    if args.task_args and not args.task:
        raise ValueError("--task-args sets the knobs of --task; give --task too")
    if args.data and args.task:
        raise ValueError("give either --data or --task, not both")
    steps = parse_num_steps_list(args.num_steps)
    exit_criterion, thresholds = parse_exit_sweep(args.exit) if args.exit else (None, [])
    if exit_criterion == "none":
        exit_criterion, thresholds = None, []
    thresholds = thresholds or (list(SWEEP_THRESHOLDS) if exit_criterion else [])
    model_dir, model, tokenizer = load_model(args, need_tokenizer=True)

    rows, scorer, meta = None, exact_match, {"model": str(model_dir)}
    if args.data:
        rows = read_jsonl_rows(args.data, args.limit)
        meta["data"] = str(args.data)
    if args.task:
        from recurrent_depth.evaluation.provenance import task_for_eval
        from recurrent_depth.tasks import parse_task_args

        task, note = task_for_eval(args.task, model_dir, parse_task_args(args.task_args))
        _to_stderr(note)
        rows = task.generate(args.n, split=args.split, seed=args.seed, cot=args.cot)
        scorer = task.score
        meta.update(task=args.task, split=args.split, n=args.n, cot=args.cot, difficulty=task.difficulty)
    texts = None
    if args.text:
        text_path = Path(args.text)
        if not text_path.is_file():
            raise FileNotFoundError(f"--text file {str(text_path)!r} not found")
        texts = [text_path.read_text(encoding="utf-8", errors="replace")]
        meta["text"] = str(text_path)
    if args.corpus:
        from recurrent_depth.evaluation.corpus import corpus_texts

        texts = (texts or []) + corpus_texts("validation", sources=(args.corpus,))
        meta["corpus"] = f"{args.corpus}/validation"

    summary = run_evaluation(model, tokenizer, args.out, steps, rows=rows, texts=texts, scorer=scorer,
                             exit_criterion=exit_criterion, thresholds=thresholds, max_num_steps=args.max_num_steps,
                             meta=meta, seq_len=args.seq_len, max_blocks=args.max_blocks, method=args.method,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                             init_scale=args.init_scale, seed=args.seed, kv_sharing=args.kv_sharing,
                             progress=_to_stderr)
    if "depth_sweep" in summary:
        print("accuracy against test-time depth\n" + format_table(summary["depth_sweep"],
                                                                   ["num_steps", "accuracy", "n"]))
    if "depth_sweep_by_level" in summary:
        by_level = [{str(k): v for k, v in r.items()} for r in summary["depth_sweep_by_level"]]
        print("\naccuracy by difficulty level (one column per level)\n"
              + format_table(by_level, list(by_level[0])))
    if "exit_sweep" in summary:
        print(f"\nadaptive exit ({exit_criterion})\n"
              + format_table(summary["exit_sweep"], ["threshold", "accuracy", "mean_steps", "steps_saved"]))
    if "perplexity_sweep" in summary:
        print("\nperplexity against test-time depth\n"
              + format_table(summary["perplexity_sweep"], ["num_steps", "perplexity", "tokens"]))
    print(f"\nwrote {Path(args.out) / 'summary.json'} and the JSON/CSV/PNG records beside it"
          + (" (every row's prediction: predictions.jsonl)" if rows is not None else ""))
    return 0
