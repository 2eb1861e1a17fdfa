"""Plain-text corpora: read files and folders, tokenize, and pack into fixed-length training sequences.

Documents are joined with <eos> and cut into blocks of seq_len + 1 tokens overlapping by one, so each block gives
inputs = block[:-1] and labels = block[1:] with no padding (Huginn's packing; no document masking).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from recurrent_depth.data.loader import TokenDataset


def list_files(paths: Iterable[str | Path], glob: str = "**/*.txt") -> list[Path]:
    """Files named directly plus files under folders matching `glob`, sorted per folder, duplicates dropped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.glob(glob) if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    return list(dict.fromkeys(files))


def read_texts(files: Iterable[Path], max_bytes: int = 0) -> list[str]:
    """The files' text (UTF-8, undecodable bytes replaced), stopping once `max_bytes` (0: no limit) are read."""
    texts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if max_bytes and total + len(text) > max_bytes:
            text = text[: max_bytes - total]
        texts.append(text)
        total += len(text)
        if max_bytes and total >= max_bytes:
            break
    if not texts:
        raise ValueError("no text found in the data paths (empty files, or no file matches the glob)")
    return texts


def tokenize_stream(texts: list[str], tokenizer, eos_id: int) -> torch.Tensor:
    """All documents as one 1-D token stream, each followed by <eos>."""
    ids: list[int] = []
    for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int) -> TokenDataset:
    """Cut a token stream into (N, seq_len) inputs and next-token labels (the last partial block is dropped)."""
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one sequence of data.seq_len={seq_len}")
    body = stream[: n * seq_len + 1]
    inputs = body[:-1].view(n, seq_len)
    labels = body[1:].view(n, seq_len)
    return TokenDataset(inputs.clone(), labels.clone())
