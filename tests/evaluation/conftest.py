"""Fixtures for the evaluation tests: a tiny seeded model with a per-character tokenizer, saved as a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.data.tokenizer import char_tokenizer, save_tokenizer
from recurrent_depth.tasks import combined_alphabet

# The families whose characters the fixture's tokenizer covers, named rather than "all": a family with its own large
# alphabet (edge_chase: 256 edge characters) would otherwise change this untrained model's vocabulary, and with it
# every logit the evaluation tests read.
FAMILIES = ["addition", "variable_binding", "pointer_chase", "tree_path", "modular_chain", "cups", "binding_chain"]


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer(combined_alphabet(FAMILIES) + " .\n")


@pytest.fixture(scope="session")
def model(tokenizer):
    torch.manual_seed(1234)
    cfg = RecurrentDepthConfig.from_name("debug", vocab_size=len(tokenizer), mean_recurrence=4)
    model = RecurrentDepthForCausalLM(cfg).eval()
    with torch.no_grad():  # larger embeddings: an untrained model's greedy outputs then vary (and hit <eos>)
        model.transformer.wte.weight.mul_(8.0)
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path


@pytest.fixture(scope="session")
def trained_model(tokenizer):
    """The debug preset after 150 steps on modular_chain (answer-only loss): it has learnt the output format, so its
    greedy outputs are digits followed by <eos> (the task itself it has not learnt)."""
    from recurrent_depth.tasks import get_task

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = RecurrentDepthConfig.from_name("debug", vocab_size=len(tokenizer), mean_recurrence=2)
    model = RecurrentDepthForCausalLM(cfg)
    rows = get_task("modular_chain").generate(2400, "train", seed=0)
    seqs = [[tokenizer.bos_token_id] + tokenizer(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = seqs[step * 16:(step + 1) * 16]
        width = max(map(len, batch)) - 1
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (s, r) in enumerate(zip(batch, rows[step * 16:])):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            n_answer = len(r["answer"]) + 1
            labels[i, len(s) - 1 - n_answer: len(s) - 1] = torch.tensor(s[-n_answer:])
        loss = model(ids, num_steps=2, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()
