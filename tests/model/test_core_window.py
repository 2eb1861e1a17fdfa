"""`core_attention_window`: the core's attention cut to the last w positions, and `outer_attention_window`: the
prelude's and coda's (neither is Huginn's; 0 keeps exact parity). They must mean the same thing in every path: the
uncached forward, cached decoding (prefill and one token at a time, padded rows), the server's row engine,
speculative decoding and the fused decode op (its `window` argument); the compiled training step, whose core
attends to every earlier position, must not take a windowed core."""

from __future__ import annotations

import pytest
import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM


def _model(window: int, seed: int = 0, outer: int = 0) -> RecurrentDepthForCausalLM:
    cfg = RecurrentDepthConfig.from_name("debug", core_attention_window=window, outer_attention_window=outer,
                                         mean_recurrence=3)
    model = RecurrentDepthForCausalLM(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def _logits(model: RecurrentDepthForCausalLM, ids: torch.Tensor, r: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, num_steps=r, init_scale=0.0).logits


IDS = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))


def test_default_is_global_attention_and_a_window_covering_everything_changes_nothing() -> None:
    assert RecurrentDepthConfig.from_name("debug").core_attention_window == 0
    assert RecurrentDepthConfig.from_name("debug").outer_attention_window == 0
    assert all(b.attn.window == 0 for b in _model(0).transformer.core_block)
    full, wide = _model(0), _model(64, outer=64)
    wide.load_state_dict(full.state_dict())
    torch.testing.assert_close(_logits(wide, IDS), _logits(full, IDS), rtol=1e-5, atol=1e-5)
    assert wide.transformer.prelude[0].attn.window == wide.transformer.coda[0].attn.window == 64
    assert all(b.attn.window == 0 for b in _model(3).transformer.prelude)  # the core's window alone


def test_a_window_limits_what_the_core_sees() -> None:
    """With w = 2, a change at position 0 reaches position 11 only through the prelude and coda (full attention)
    or through enough core layers: at r = 1 (2 core layers, 1 position each) the core alone cannot carry it."""
    full, narrow = _model(0), _model(2)
    narrow.load_state_dict(full.state_dict())
    assert not torch.allclose(_logits(narrow, IDS), _logits(full, IDS), atol=1e-4)
    # the core's own reach: run only the core blocks on a state and perturb the first position
    t = narrow.transformer
    x = torch.randn(1, 12, t.cfg.n_embd)
    y = x.clone()
    y[:, 0] += 1.0
    from recurrent_depth.model.layers import AttentionContext, LayerKey

    ctx = AttentionContext(rope=t.rope[:, :12])
    def core(z):
        for i, block in enumerate(t.core_block):
            z = block(z, LayerKey("core", i, 0), ctx)
        return z
    with torch.no_grad():
        dx = (core(y) - core(x)).abs().amax(-1)[0]
    assert float(dx[3:].max()) == 0.0 and float(dx[:3].min()) > 0  # 2 layers x (w - 1) = 2 positions of reach


def test_with_both_windows_the_model_is_translation_invariant() -> None:
    """Core window 3 and outer window 2: position t sees at most 1 (prelude) + r x 2 x 2 (core) + 1 (coda) positions
    back, and RoPE is relative, so the last logits are the same whatever precedes that reach and however far the
    row starts from position 0; with a global prelude and coda they are not."""
    both, core_only = _model(3, outer=2), _model(3)
    core_only.load_state_dict(both.state_dict())
    ids = IDS[:1]
    longer = torch.cat([torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(2)), ids], 1)
    r = 2  # reach 1 + 2 x 4 + 1 = 10 < 12 positions
    torch.testing.assert_close(_logits(both, longer, r)[:, -2:], _logits(both, ids, r)[:, -2:], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(core_only, longer, r)[:, -2:], _logits(core_only, ids, r)[:, -2:], atol=1e-3)


OUTER = pytest.mark.parametrize("outer", [0, 2], ids=["core-window", "core-and-outer-windows"])


@OUTER
@pytest.mark.parametrize("kv_sharing", ["full", "latest"])
def test_cached_decoding_equals_the_uncached_forward_with_padding(kv_sharing: str, outer: int) -> None:
    from recurrent_depth.inference.generate import generate

    model = _model(3, outer=outer)
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # a left-padded row
    out = generate(model, ids, mask, max_new_tokens=6, num_steps=4, kv_sharing=kv_sharing, init_scale=0.0)
    for row in range(2):
        seq = ids[row, int((mask[row] == 0).sum()):].tolist()
        for _ in range(6):  # greedy by full forwards over the row alone, no cache
            seq.append(int(_logits(model, torch.tensor([seq]), 4)[0, -1].argmax()))
        assert out.sequences[row, -6:].tolist() == seq[-6:], row


def test_the_compiled_training_step_refuses_a_windowed_core_and_the_fused_decode_takes_one() -> None:
    from recurrent_depth.inference import fused
    from recurrent_depth.inference.cache import KVCache
    from recurrent_depth.model.layers import AttentionContext
    from recurrent_depth.training.fused import install_fused_recurrence

    model = _model(3)
    x = torch.zeros(1, 1, model.config.n_embd)
    ctx = AttentionContext(rope=model.transformer.rope[:, :1], cache=KVCache("full"))
    with torch.no_grad():  # the decode op's `window` argument (tests/inference/test_fused_decode.py: parity)
        assert fused.applicable(x, ctx, model.transformer.core_block) == fused.available()
    with pytest.raises(ValueError, match="core_attention_window"):
        install_fused_recurrence(model, compile=False)


def test_the_window_is_saved_and_a_bad_one_is_refused(tmp_path) -> None:
    model = _model(3, outer=4)
    model.save_pretrained(tmp_path)
    again = RecurrentDepthForCausalLM.from_pretrained(tmp_path)
    assert again.config.core_attention_window == 3 and again.transformer.core_block[1].attn.window == 3
    assert again.config.outer_attention_window == 4 and again.transformer.coda[0].attn.window == 4
    torch.testing.assert_close(_logits(again, IDS), _logits(model, IDS))
    with pytest.raises(ValueError, match="core_attention_window"):
        RecurrentDepthConfig.from_name("debug", core_attention_window=-1)
    with pytest.raises(ValueError, match="outer_attention_window"):
        RecurrentDepthConfig.from_name("debug", outer_attention_window=-2)


@OUTER
def test_the_row_engine_serves_a_windowed_model_as_generate_does(outer: int) -> None:
    """The server's engine (paged store, rows of different lengths joined at different times) applies the window
    at each row's own positions: every row's tokens equal generate() on that row alone."""
    from recurrent_depth.inference.generate import generate
    from recurrent_depth.inference.params import DepthParams, SamplingParams
    from recurrent_depth.inference.rows import Row, RowEngine

    model = _model(3, outer=outer)
    prompts = [IDS[0, :9].tolist(), IDS[1, :4].tolist(), IDS[1, 2:12].tolist()]
    rows = [Row(p, DepthParams(4, kv_sharing="full"), SamplingParams(5, 0.0, seed=0)) for p in prompts]
    RowEngine(model, max_rows=2).run(rows)
    for row in rows:
        alone = generate(model, torch.tensor([row.prompt]), max_new_tokens=5, num_steps=4, kv_sharing="full",
                         init_scale=0.0)
        assert row.tokens == alone.sequences[0, len(row.prompt):].tolist()


@OUTER
def test_speculative_decoding_of_a_windowed_model_equals_plain_greedy(outer: int) -> None:
    """Self-speculative decoding (a shallow draft verified at full depth) over the windowed core's cache: the tokens
    are plain greedy's, row for row, with left padding."""
    from recurrent_depth.inference.generate import generate

    model = _model(3, outer=outer)
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    mask[1, :4] = 0
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=8, num_steps=4, init_scale=0.0)
    fast = generate(model, ids, attention_mask=mask, max_new_tokens=8, num_steps=4, init_scale=0.0, draft_steps=1,
                    lookahead=3)
    assert torch.equal(fast.sequences, plain.sequences)
