"""Offline tokenizers, saved beside a checkpoint as `tokenizer.json` (transformers' fast-tokenizer format).

- `char_tokenizer(alphabet)`: one token per character, for the procedural reasoning tasks (exact, tiny vocab).
- `train_bpe(texts, vocab_size)`: a byte-level BPE trained on the user's corpus with `tokenizers` (nothing fetched).
- `load_tokenizer(folder)` / `save_tokenizer(tok, folder)`.
- `encode_prompt(tok, text)`: a prompt's ids as training saw them, with the tokenizer's BOS in front (our training
  rows start with <bos>; a model reads a prompt without it as a different input).
- `left_pad(rows, pad_id)`: token-id lists as a left-padded batch (ids, attention mask) for `generate`.

Special tokens are always ids 0.. in this order: <pad>, <bos>, <eos>, <unk>.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """One token per character of `alphabet` (duplicates ignored), after the special tokens."""
    chars = list(dict.fromkeys(alphabet))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Byte-level BPE with `vocab_size` entries (special tokens included) trained on `texts`."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256} for a byte-level BPE")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: str | os.PathLike) -> None:
    """Write tokenizer.json (+ tokenizer_config.json) into `folder`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))


def load_tokenizer(folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load the tokenizer stored beside a checkpoint; a clear error if there is none."""
    path = Path(folder)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(path)!r} (train or save one beside the checkpoint)")
    try:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
        raise ValueError(f"{path / 'tokenizer.json'} is not a valid tokenizer file: {err}") from err
    for name in SPECIAL_TOKENS:
        if name not in tok.get_vocab():
            return tok
    tok.add_special_tokens({"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"})
    tok.padding_side = "left"
    return tok


def encode_prompt(tok: PreTrainedTokenizerFast, text: str, add_bos: bool = True) -> list[int]:
    """`text`'s token ids, preceded by the tokenizer's BOS when it has one (and `add_bos`); never twice."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    bos = tok.bos_token_id
    if add_bos and bos is not None and ids[:1] != [bos]:
        ids = [bos, *ids]
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids, attention_mask), both (B, longest) int64, padded on the left (what `generate` takes)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask
