"""The model against the reference implementation's outputs (../shared/fixtures), and cached against uncached."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from recurrent_depth import RecurrentDepthForCausalLM
from recurrent_depth.inference.cache import KVCache
from tests.conftest import fixture_dir, fixture_json


@pytest.fixture
def loaded(fixture_name: str):
    path = fixture_dir(fixture_name)
    model = RecurrentDepthForCausalLM.from_pretrained(path)
    return model, load_file(str(path / "reference_outputs.safetensors")), fixture_json(fixture_name)


@torch.no_grad()
def test_logits_and_latents_match_reference_at_every_depth(loaded) -> None:
    model, ref, meta = loaded
    ids, states = ref["input_ids"], ref["input_states"]
    for n in meta["meta"]["steps"]:
        zero = model(ids, num_steps=n, init_scale=0.0)
        given = model(ids, num_steps=n, input_states=states)
        for out, tag in ((zero, "zero"), (given, "given")):
            torch.testing.assert_close(out.logits, ref[f"logits_{tag}_init_steps{n}"], rtol=0, atol=1e-5)
            torch.testing.assert_close(out.latent_states, ref[f"latents_{tag}_init_steps{n}"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_zero_init_equals_given_zero_state(loaded) -> None:
    model, ref, _ = loaded
    ids = ref["input_ids"]
    a = model(ids, num_steps=3, init_scale=0.0).logits
    b = model(ids, num_steps=3, input_states=torch.zeros(*ids.shape, model.config.n_embd)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_incremental_cached_decoding_equals_full_forward(loaded) -> None:
    model, ref, _ = loaded
    ids = ref["input_ids"]
    full = model(ids, num_steps=4, init_scale=0.0).logits
    cache = KVCache()
    pieces = [model(ids[:, :5], num_steps=4, init_scale=0.0, cache=cache).logits]
    for t in range(5, ids.shape[1]):
        pieces.append(model(ids[:, t:t + 1], num_steps=4, init_scale=0.0, cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
def test_hf_generate_reproduces_reference_greedy(loaded) -> None:
    model, _, meta = loaded
    prompt = torch.tensor(meta["prompt"])
    checked = 0
    for key, expected in meta["generations"].items():
        if not key.startswith("greedy_steps"):
            continue
        n = int(key.removeprefix("greedy_steps"))
        out = model.generate(prompt, max_new_tokens=len(expected[0]) - prompt.shape[1], do_sample=False,
                             num_steps=n, init_scale=0.0)
        assert out.tolist() == expected, key
        checked += 1
    assert checked >= 2


def test_gradients_reach_core_only_through_last_k_iterations() -> None:
    from recurrent_depth.config import RecurrentDepthConfig

    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    ids = torch.randint(0, 256, (2, 8))
    calls: list[bool] = []
    hook = model.transformer.core_block[0].register_forward_hook(lambda m, i, o: calls.append(o.requires_grad))
    out = model(ids, num_steps=(5, 2), init_scale=0.0, labels=ids)
    hook.remove()
    assert calls == [False] * 5 + [True] * 2
    out.loss.backward()
    assert model.transformer.core_block[0].attn.Wqkv.weight.grad is not None
    # k = 0: the core receives no gradient at all; the prelude/coda still do.
    model.zero_grad(set_to_none=True)
    model(ids, num_steps=(3, 0), init_scale=0.0, labels=ids).loss.backward()
    assert model.transformer.core_block[0].attn.Wqkv.weight.grad is None
    assert model.transformer.coda[0].attn.Wqkv.weight.grad is not None


def test_gradient_of_no_grad_prefix_does_not_change_values() -> None:
    from recurrent_depth.config import RecurrentDepthConfig

    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    ids = torch.randint(0, 256, (1, 6))
    a = model(ids, num_steps=(4, 2), init_scale=0.0).logits
    with torch.no_grad():
        b = model(ids, num_steps=6, init_scale=0.0).logits
    torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
