"""The request object every entry point builds (`inference.params`), the vocabulary ban, and the module layering."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recurrent_depth.inference.cache import LatestSharing
from recurrent_depth.inference.exit import NoExit
from recurrent_depth.inference.generate import generate
from recurrent_depth.inference.params import DepthParams, SamplingParams


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"warm_start": 0}, "warm_start"), ({"warm_start": "hot"}, "warm_start"), ({"warm_start": 1.0}, "warm_start"),
    ({"num_steps": -1}, "num_steps"), ({"num_steps": True}, "num_steps"), ({"init_scale": -0.5}, "init_scale"),
    ({"kv_sharing": "widest"}, "KV sharing"), ({"exit_criterion": None, "exit_threshold": 0.1}, "exit_threshold"),
    ({"exit_criterion": "kll"}, "exit criterion"),
])
def test_depth_params_refuse_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DepthParams(**{"num_steps": 4, **kwargs})


def test_generate_and_server_share_the_validation(debug_model) -> None:
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="warm_start must be"):
        generate(debug_model, ids, max_new_tokens=1, num_steps=2, warm_start=0)
    from recurrent_depth.serving.protocol import APIError, Limits, parse_depth

    with pytest.raises(APIError, match="warm_start: must be"):
        parse_depth({"warm_start": 0}, 4, Limits())
    for body, field in (({"kv_sharing": "widest"}, "kv_sharing"), ({"init_scale": 5}, "init_scale"),
                        ({"exit_criterion": "kll"}, "exit_criterion")):
        with pytest.raises(APIError) as err:
            parse_depth(body, 4, Limits())
        assert err.value.param == field and err.value.message.startswith(f"{field}: ")
        assert not err.value.message.startswith(f"{field}: {field}")  # named once


def test_depth_params_resolve_their_strategies() -> None:
    d = DepthParams(8, "kl", warm_start=True)
    assert isinstance(d.policy(), LatestSharing) and d.warm == "latent"
    assert isinstance(DepthParams(8).criterion(), NoExit) and DepthParams(8).warm is None
    assert DepthParams(8, warm_start="raw").warm == "raw"
    assert not SamplingParams(4, temperature=0.0).sampler(None).do_sample
    assert SamplingParams(4, temperature=0.5, top_p=0.9).sampler(None).top_p == 0.9


def test_vocab_limit_bans_rows_beyond_it(debug_model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    free = generate(debug_model, ids, max_new_tokens=4, num_steps=3).sequences[0, 3:]
    top = int(free.max())
    assert top > 0
    banned = generate(debug_model, ids, max_new_tokens=4, num_steps=3, exit_criterion="kl",
                      vocab_limit=top).sequences[0, 3:]
    assert int(banned.max()) < top
    same = generate(debug_model, ids, max_new_tokens=4, num_steps=3, vocab_limit=debug_model.config.vocab_size)
    assert same.sequences[0, 3:].tolist() == free.tolist()


def test_speculative_does_not_import_generate() -> None:
    code = ("import sys, recurrent_depth.inference.speculative; "
            "assert 'recurrent_depth.inference.generate' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_banned_rows_leave_the_kl_exit_working(converging_model) -> None:
    ids = torch.tensor([[5, 6, 7]])
    V = converging_model.config.vocab_size
    out = generate(converging_model, ids, max_new_tokens=4, num_steps=16, exit_criterion="kl", exit_threshold=5e-4,
                   vocab_limit=V // 2)
    assert int(out.steps.max()) < 16  # with -inf logits KL was NaN and no token ever exited
    assert int(out.sequences[0, 3:].max()) < V // 2
