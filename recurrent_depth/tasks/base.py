"""The procedural-task contract shared by every task family.

A task is a small frozen dataclass whose fields are its difficulty knobs: ranges for the in-distribution splits
(`train`, `test`) and harder ranges for the `ood` split. Subclasses implement `_sample(rng, ood) -> Instance`; this
module supplies seeding, split separation, the chain-of-thought rendering and exact scoring.

    task = get_task("variable_binding", hops=(1, 4))
    rows = task.generate(1000, split="train", seed=0)            # [{"prompt", "answer", "level"}, ...]
    task.score("7", rows[0]["answer"])

Split separation: every instance is hashed (task name + prompt); a fixed fifth of the hash space belongs to the
held-out splits (`test`, `ood`) and the rest to `train`, so no test prompt can ever appear in training data, whatever
the seeds or sizes. Answers in chain-of-thought form are `<steps>#<final>`; `extract_answer` keeps what follows the
last `#`, so one scorer reads plain and chain-of-thought outputs alike.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, fields
from typing import Any, ClassVar

SPLITS = ("train", "test", "ood")
COT_SEP = "#"  # separates chain-of-thought steps from the final answer
HELD_OUT_BUCKETS = 5  # 1 in HELD_OUT_BUCKETS of the prompt-hash space is reserved for test/ood
_MAX_TRIES_PER_ROW = 200


@dataclass(frozen=True)
class Instance:
    """One problem: the prompt, the final answer, the intermediate steps (for chain of thought), and its level."""

    prompt: str
    answer: str
    steps: tuple[str, ...]
    level: int


def _check_range(name: str, value: Any, low: int, high: int) -> tuple[int, int]:
    """Validate an inclusive (min, max) knob; an int n means (n, n)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, tuple | list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"difficulty knob `{name}` must be an int or an inclusive (min, max) pair, got {value!r}")
    lo, hi = value
    if not low <= lo <= hi <= high:
        raise ValueError(f"difficulty knob `{name}` = {tuple(value)} must satisfy {low} <= min <= max <= {high}")
    return int(lo), int(hi)


def in_held_out(task_name: str, prompt: str) -> bool:
    """Whether a prompt belongs to the held-out part of the hash space (test/ood) rather than to train."""
    digest = hashlib.blake2b(f"{task_name}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


@dataclass(frozen=True)
class Task:
    """Base class: subclasses set `name`, `symbols` and implement `_sample`; fields are the difficulty knobs."""

    name: ClassVar[str] = "task"
    symbols: ClassVar[str] = ""  # every character prompts, answers and steps can use (COT_SEP added)
    step_sep: ClassVar[str] = ","

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Subclasses check their knobs here (see `_set_range`) and raise ValueError naming the bad one."""

    def _set_range(self, name: str, low: int, high: int) -> tuple[int, int]:
        """Normalise the range knob `name` to an inclusive (min, max) tuple within [low, high] and store it."""
        value = _check_range(name, getattr(self, name), low, high)
        object.__setattr__(self, name, value)  # frozen dataclass: normalise once, at construction
        return value

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        raise NotImplementedError

    def trace(self, inst: Instance) -> str | None:
        """Dense labels for `inst`, as long as its prompt: character i (a space: none) is the running state after
        prompt character i, trained at that position (`generate(..., targets=True)`); None: this task has none."""
        return None

    # ------------------------------------------------------------------------------------------- public API
    @property
    def alphabet(self) -> str:
        """Every character any prompt or answer (plain or chain-of-thought) of this task may contain, sorted."""
        return "".join(sorted(set(self.symbols + COT_SEP + self.step_sep)))

    @property
    def difficulty(self) -> dict[str, Any]:
        """The knobs as a plain dict (for records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def generate(self, n: int, split: str = "train", seed: int = 0, cot: bool = False,
                 targets: bool = False) -> list[dict[str, Any]]:
        """`n` seeded problems of `split` as dicts with `prompt`, `answer` (str) and `level` (int difficulty).

        split: "train" / "test" draw the in-distribution knobs, "ood" the harder ones; train never shares a prompt
        with test or ood. cot: answers write the intermediate steps before `#` and the final answer. targets: rows
        also carry `targets`, the running state under each prompt character (`trace`): labels for training only,
        never in the context, so the model still reasons in latent space (the prompt and answer are unchanged).
        """
        if targets and cot:
            raise ValueError("targets and cot are exclusive: cot writes the steps as tokens, targets only as labels")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        held_out = split != "train"
        rows: list[dict[str, Any]] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > _MAX_TRIES_PER_ROW * (n + 10):
                raise RuntimeError(f"{self.name}: could not draw {n} {split} problems with knobs {self.difficulty}")
            inst = self._sample(rng, ood=split == "ood")
            if in_held_out(self.name, inst.prompt) != held_out:
                continue
            answer = self.render_cot(inst) if cot else inst.answer
            row = {"prompt": inst.prompt, "answer": answer, "level": inst.level}
            if targets:
                trace = self.trace(inst)
                if trace is None:
                    raise ValueError(f"task {self.name!r} has no running state to label (targets=True); tasks "
                                     f"with one: those whose `trace` is defined")
                row["targets"] = trace
            rows.append(row)
        return rows

    def render_cot(self, inst: Instance) -> str:
        """Chain-of-thought answer: the intermediate steps, `#`, the final answer."""
        return self.step_sep.join(inst.steps) + COT_SEP + inst.answer

    @staticmethod
    def extract_answer(text: str) -> str:
        """The final answer inside a (possibly chain-of-thought) output: what follows the last `#`, stripped."""
        return text.rsplit(COT_SEP, 1)[-1].strip()

    def score(self, prediction: str, answer: str) -> bool:
        """Exact match of the final answers (chain-of-thought steps, if any, are not graded)."""
        return self.extract_answer(prediction) == self.extract_answer(answer)
