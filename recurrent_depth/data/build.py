"""Turn the `data` section of a training config into (train set, validation set, tokenizer).

    bundle = build_data(cfg.data, seed=0)                 # tokenizer trained / built / loaded as configured
    bundle = build_data(cfg.data, seed=0, tokenizer=tok)  # resume: reuse the tokenizer saved with the checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from recurrent_depth.data.loader import TokenDataset
from recurrent_depth.data.paths import expand_path
from recurrent_depth.data.prompts import encode_examples, has_level, read_jsonl, task_examples
from recurrent_depth.data.text import list_files, pack, read_texts, tokenize_stream
from recurrent_depth.data.tokenizer import char_tokenizer, load_tokenizer, train_bpe


@dataclass
class DataBundle:
    train: TokenDataset
    val: TokenDataset | None
    tokenizer: PreTrainedTokenizerFast
    notes: list[str] = field(default_factory=list)  # what was left out, and why (printed by the training loop)


def load_tokenizer_path(path: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer from a checkpoint folder or a tokenizer.json file."""
    p = Path(path)
    return load_tokenizer(p.parent if p.is_file() else p)


def _n_val(n: int, fraction: float) -> int:
    return min(max(1, round(n * fraction)), n - 1) if fraction > 0 and n > 1 else 0


def _text(section, seed: int, tok: PreTrainedTokenizerFast | None) -> DataBundle:
    texts = read_texts(list_files(map(expand_path, section.paths), section.glob), section.max_bytes)
    if tok is None:
        if section.tokenizer in ("auto", "bpe"):
            tok = train_bpe(texts, section.bpe_vocab_size)
        elif section.tokenizer == "char":
            tok = char_tokenizer("".join(sorted(set("".join(texts)))))
        else:
            tok = load_tokenizer_path(expand_path(section.tokenizer))
    train = pack(tokenize_stream(texts, tok, tok.eos_token_id), section.seq_len)
    val = None
    if section.val_paths:
        val_texts = read_texts(list_files(map(expand_path, section.val_paths), section.glob))
        val = pack(tokenize_stream(val_texts, tok, tok.eos_token_id), section.seq_len)
    elif (n_val := _n_val(len(train), section.val_fraction)) > 0:
        train, val = train.split(n_val)
    return DataBundle(train, val, tok)


def _prompts(section, seed: int, tok: PreTrainedTokenizerFast | None) -> DataBundle:
    if section.kind == "task":
        t = section.task
        train_ex, alphabet = task_examples(t.name, t.difficulty, t.num_train, "train", seed, t.targets)
        val_ex = task_examples(t.name, t.difficulty, t.num_eval, "test", seed + 1)[0] if t.num_eval else []
    else:
        train_ex = read_jsonl(map(expand_path, section.paths))
        val_ex = read_jsonl(map(expand_path, section.val_paths)) if section.val_paths else []
        alphabet = "".join(sorted({c for e in train_ex + val_ex for c in e["prompt"] + e["answer"]}))
        if not val_ex and (n_val := _n_val(len(train_ex), section.val_fraction)) > 0:
            train_ex, val_ex = train_ex[:-n_val], train_ex[-n_val:]
    if tok is None:
        if section.tokenizer in ("auto", "char"):
            tok = char_tokenizer(alphabet)
        elif section.tokenizer == "bpe":
            tok = train_bpe([e["prompt"] + e["answer"] for e in train_ex], section.bpe_vocab_size)
        else:
            tok = load_tokenizer_path(expand_path(section.tokenizer))
    if section.curriculum and (missing := sum(not has_level(e) for e in train_ex)):
        raise ValueError(f"data.curriculum needs an integer `level` on every training row; {missing} of "
                         f"{len(train_ex)} rows have none (add \"level\": N to each JSONL row, or set "
                         "data.curriculum: 0)")
    notes: list[str] = []
    train = encode_examples(train_ex, tok, section.seq_len, section.answer_only_loss, notes=notes)
    val = encode_examples(val_ex, tok, section.seq_len, section.answer_only_loss, notes=notes,
                          split="validation") if val_ex else None
    return DataBundle(train, val, tok, notes)


def build_data(section, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None) -> DataBundle:
    """Datasets and tokenizer for a `DataSection` (see recurrent_depth.training.config)."""
    if section.kind == "text":
        return _text(section, seed, tokenizer)
    return _prompts(section, seed, tokenizer)
