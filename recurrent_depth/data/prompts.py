"""Prompt/answer data: JSONL files of {"prompt": ..., "answer": ...} and the built-in reasoning tasks.

Each example becomes <bos> prompt answer <eos>, right-padded to a common length. With `answer_only`, the loss covers
the answer tokens (and <eos>) only; `answer_labels` always does, so evaluation can score exact-match accuracy by
teacher forcing (every answer token is the argmax <=> greedy decoding reproduces the answer).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.data.loader import TokenDataset

IGNORE = -100


def iter_jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of one JSONL file, each checked to be an object with string `prompt` and `answer` (other keys kept;
    blank lines skipped); errors name the file and line."""
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{no}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                or not isinstance(row.get("answer"), str):
            raise ValueError(f'{path}:{no}: expected {{"prompt": str, "answer": str}}, got {line[:80]!r}')
        yield row


def read_jsonl(paths: Iterable[str | Path]) -> list[dict[str, str]]:
    """Examples from JSONL files or folders of them: prompt and answer, and `targets` (dense labels under the prompt
    characters, see `encode_examples`) and `level` (an integer difficulty, for `data.curriculum`) where a row has
    them."""
    out = []
    for path in map(Path, paths):
        for f in sorted(path.glob("**/*.jsonl")) if path.is_dir() else [path]:
            out.extend({k: row[k] for k in ("prompt", "answer", "targets", "level") if k in row}
                       for row in iter_jsonl_rows(f))
    if not out:
        raise ValueError("no prompt/answer examples found in the data paths")
    return out


def task_examples(name: str, difficulty: dict[str, Any], n: int, split: str, seed: int,
                  targets: bool = False) -> tuple[list[dict], str]:
    """`n` examples of a built-in reasoning task and the task's alphabet (imports recurrent_depth.tasks lazily);
    `targets`: with the dense running-state labels (`Task.trace`)."""
    from recurrent_depth.tasks import TASKS, get_task

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (data.task.name); choose one of {sorted(TASKS)}")
    task = get_task(name, **difficulty)
    extra = {"targets": True} if targets else {}
    return task.generate(n, split=split, seed=seed, **extra), task.alphabet


def has_level(example: dict[str, Any]) -> bool:
    """Whether an example carries an integer difficulty `level` (what `data.curriculum` orders rows by)."""
    level = example.get("level")
    return isinstance(level, int) and not isinstance(level, bool)


Encoded = tuple[list[int], int, dict[str, str]]  # <bos> prompt answer <eos> ids, prompt length, the example


def _fit(seqs: list[Encoded], seq_len: int, split: str, notes: list[str] | None) -> list[Encoded]:
    """The sequences that fit in seq_len positions (<bos> prompt answer; <eos> is only a target). Those left out
    are counted in `notes`; ValueError when none is left."""
    kept = [s for s in seqs if len(s[0]) - 1 <= seq_len]
    lengths = sorted(len(s[0]) - 1 for s in seqs)
    if not kept:
        raise ValueError(f"all {len(seqs)} {split} examples are longer than data.seq_len={seq_len} tokens (the "
                         f"shortest needs {lengths[0]}: <bos>, prompt and answer); raise data.seq_len")
    if len(kept) < len(seqs) and notes is not None:
        notes.append(f"data: {len(seqs) - len(kept)} of {len(seqs)} {split} examples are longer than "
                     f"data.seq_len={seq_len} tokens (the longest needs {lengths[-1]}) and were left out; raise "
                     "data.seq_len to keep them")
    return kept


def encode_examples(examples: list[dict[str, str]], tokenizer, seq_len: int, answer_only: bool,
                    length: int | None = None, notes: list[str] | None = None,
                    split: str = "train") -> TokenDataset:
    """Tokenize examples into a padded TokenDataset of width `length` (default: the longest, at most seq_len).
    Examples longer than seq_len are left out, counted in `notes` (named by `split`). Where every example has an
    integer `level`, the dataset carries them (`levels`)."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = tokenizer([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e["answer"] for e in examples], add_special_tokens=False)["input_ids"]
    seqs = [([bos] + p + a + [eos], len(p), e) for p, a, e in zip(prompts, answers, examples)]
    kept = _fit(seqs, seq_len, split, notes)
    width = length or max(len(ids) - 1 for ids, _, _ in kept)
    n = len(kept)
    inputs = torch.full((n, width), pad, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    answer_labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt, _) in enumerate(kept):
        ids = ids[: width + 1]
        t = torch.tensor(ids)
        inputs[i, : len(ids) - 1] = t[:-1]
        labels[i, : len(ids) - 1] = t[1:]
        answer_labels[i, n_prompt: len(ids) - 1] = t[1 + n_prompt:]  # position j predicts ids[j+1]
    if answer_only:
        labels = answer_labels.clone()
    for i, (_, n_prompt, example) in enumerate(kept):
        if "targets" in example:
            _place_targets(labels[i], example, n_prompt, tokenizer)
    levels = torch.tensor([e["level"] for _, _, e in kept]) if all(has_level(e) for _, _, e in kept) else None
    return TokenDataset(inputs, labels, answer_labels, levels)


def _place_targets(labels: torch.Tensor, example: dict, n_prompt: int, tokenizer) -> None:
    """Write an example's dense `targets` (one character per prompt character, space = none) into `labels`: the
    label at the position of prompt character i (input position i + 1, after <bos>). Needs one token per prompt
    character (the char tokenizer); the last prompt position keeps predicting the answer."""
    targets, prompt = example["targets"], example["prompt"]
    if not isinstance(targets, str) or len(targets) != len(prompt):
        raise ValueError(f"example {prompt!r}: `targets` must be a string as long as the prompt ({len(prompt)} "
                         f"characters), got {targets!r}")
    if n_prompt != len(prompt):
        raise ValueError(f"example {prompt!r}: `targets` need one token per prompt character (data.tokenizer: "
                         f"char); this tokenizer gives {n_prompt} tokens for {len(prompt)} characters")
    for j, ch in enumerate(targets[:-1]):
        if ch != " ":
            ids = tokenizer(ch, add_special_tokens=False)["input_ids"]
            if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"example {prompt!r}: target {ch!r} is not one token of the tokenizer")
            labels[j + 1] = ids[0]
