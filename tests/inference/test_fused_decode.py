"""The fused CPU decode (`recurrent_depth.inference.fused`) against the eager network: same logits to float rounding,
same tokens and steps, through padding, KV policies, adaptive exit (holes in the cache) and speculative decoding."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from recurrent_depth import kernels
from recurrent_depth.inference import fused
from recurrent_depth.inference.cache import KVCache
from recurrent_depth.inference.exit import make_exit_criterion
from recurrent_depth.inference.generate import generate
from recurrent_depth.inference.params import DepthParams, SamplingParams
from recurrent_depth.inference.rows import Row, RowEngine
from tests.inference.conftest import make_converging_model


@pytest.fixture(scope="module", autouse=True)
def _library() -> None:
    assert kernels.available(), f"the fused decode library did not build: {kernels.load_error()}"


@contextlib.contextmanager
def _fused(model, on: bool, counter: list[int] | None = None):
    """Switch the model's fused decode on or off; count the fused calls into `counter`."""
    original = fused.run_blocks

    def counting(*args, **kwargs):
        cache = args[3].cache  # a subset of the batch's rows: fewer rows bound in the RowKVCache than it holds
        subset = not isinstance(cache, KVCache) and len(cache.bound_rows) < cache.max_rows
        counter.append(args[1] + ("[rows]" if subset else ""))  # the stage: prelude, core or coda
        return original(*args, **kwargs)

    model.transformer.fused_decode = on
    if counter is not None:
        fused.run_blocks = counting
    try:
        yield
    finally:
        model.transformer.fused_decode = True
        fused.run_blocks = original


def _prefill_calls(mask: torch.Tensor) -> list[str]:
    """The fused calls of a padded batch's prefill on the row engine: one forward per distinct prompt length (rows of
    equal length share it), "[rows]" where it holds only some rows; prompts too long for the op prefill eagerly."""
    lengths = mask.sum(1).tolist()
    calls: list[str] = []
    for n in dict.fromkeys(lengths):
        if n <= fused.MAX_TOKENS:
            calls += [stage + ("[rows]" if lengths.count(n) < len(lengths) else "") for stage in ("prelude", "core",
                                                                                                  "coda")]
    return calls


def _padded(seed: int = 0, batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


class _Teacher(RowEngine):
    """Teacher forcing on the row engine: after its prompt each row is fed the given tokens whatever it produced;
    each token's logits and recurrence steps are recorded."""

    def __init__(self, model, rows: list[Row], new: torch.Tensor) -> None:
        super().__init__(model, max_rows=len(rows), chunk=None)
        self.new, self.index = new, {row.id: b for b, row in enumerate(rows)}
        self.logits: list[list[torch.Tensor]] = [[] for _ in rows]
        self.steps: list[list[int]] = [[] for _ in rows]

    def _emit(self, s: Row, token: int) -> None:
        b, pos = self.index[s.id], len(s.tokens) - 1
        self.logits[b].append(s.logits[0])
        self.steps[b].append(s.token_steps[-1])
        if pos < self.new.shape[1]:
            s.pending = [int(self.new[b, pos])]
        else:
            self._free_row(s, "length")


def _teacher_forced(model, ids, mask, new, *, policy, num_steps, criterion=None, chunk=1):
    """Logits and steps of each row's prefill (its prompt without the padding) plus one forward per `chunk` tokens
    of `new` (B, n), fed regardless of the logits (last-position logits of each forward), on the row engine: one
    token at a time through its step cycle (per-row exits), or `chunk` tokens at a time at fixed depth."""
    prompts = RowEngine.unpadded(ids, mask)
    criteria = criterion if isinstance(criterion, list) else [criterion] * len(prompts)
    rows = [Row(p, DepthParams(num_steps, c, kv_sharing=policy), SamplingParams(new.shape[1] + 1, 0.0))
            for p, c in zip(prompts, criteria)]
    engine = _Teacher(model, rows, new)
    if chunk == 1:
        engine.run(rows)
        return (torch.stack([torch.stack(r) for r in engine.logits]),
                torch.tensor(engine.steps))
    assert criterion is None, "several tokens per forward: fixed depth only"
    for row in rows:
        engine.add(row)
    logits = [torch.cat([engine.forward([row], [row.prompt], num_steps) for row in rows])]
    for p in range(0, new.shape[1], chunk):
        logits.append(engine.forward(rows, new[:, p: p + chunk].tolist(), num_steps))
    return torch.stack(logits, 1), torch.full((len(rows), len(logits)), num_steps)


def _eager_and_fused(model, ids, mask, new, **kw) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`_teacher_forced` logits on the eager network and on the fused path, and the fused calls taken."""
    with torch.inference_mode(), _fused(model, False):
        eager, _ = _teacher_forced(model, ids, mask, new, **kw)
    calls: list[str] = []
    with torch.inference_mode(), _fused(model, True, calls):
        fast, _ = _teacher_forced(model, ids, mask, new, **kw)
    return eager, fast, calls


@pytest.mark.parametrize("policy", ["full", "latest", 2, 1])
def test_fused_decode_matches_eager_with_padding(debug_model, policy) -> None:
    ids, mask = _padded(0)
    new = torch.randint(4, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    eager, fast, calls = _eager_and_fused(debug_model, ids, mask, new, policy=policy, num_steps=5)
    # the prefill per prompt length, then each token: prelude, 5 core steps in one call, coda
    assert sorted(calls) == sorted(_prefill_calls(mask) + ["prelude", "core", "coda"] * 5)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["full", "latest", 1])
def test_fused_decode_matches_eager_with_adaptive_exit(policy) -> None:
    """Rows exit at different steps: deeper cache slots get holes, which the fused path must mask as eager does."""
    converging_model = make_converging_model(contraction=0.6)  # slow enough convergence for varied exits
    ids = torch.randint(4, 256, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    new = torch.randint(4, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    crit = make_exit_criterion("kl", 1e-4)
    with torch.inference_mode(), _fused(converging_model, False):
        eager, eager_steps = _teacher_forced(converging_model, ids, mask, new, policy=policy, num_steps=12,
                                             criterion=crit)
    calls: list[int] = []
    with torch.inference_mode(), _fused(converging_model, True, calls):
        fast, fast_steps = _teacher_forced(converging_model, ids, mask, new, policy=policy, num_steps=12,
                                           criterion=crit)
    assert calls, "the fused path was never taken"
    assert "core[rows]" in calls  # rows still iterating after others exited ran fused too
    assert fast_steps.tolist() == eager_steps.tolist()
    assert len(set(eager_steps[:, 1:].flatten().tolist())) > 1  # rows did exit at different depths
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_fused_generate_with_eos_and_exit_gives_eager_tokens() -> None:
    """Rows that stop at EOS leave the batch (cache.rows), rows exit at different depths: tokens and steps as eager."""
    model = make_converging_model(contraction=0.6)
    ids, mask = _padded(8)
    kw = dict(max_new_tokens=8, num_steps=12, exit_criterion="kl", exit_threshold=1e-4, kv_sharing="latest")
    probe = generate(model, ids, mask, **kw)
    eos = int(probe.sequences[0, ids.shape[1] + 2])  # a token row 0 emits: that row stops early
    with _fused(model, False):
        eager = generate(model, ids, mask, eos_token_id=eos, **kw)
    calls: list[str] = []
    with _fused(model, True, calls):
        fast = generate(model, ids, mask, eos_token_id=eos, **kw)
    assert "core[rows]" in calls
    assert fast.sequences.tolist() == eager.sequences.tolist()
    assert fast.steps.tolist() == eager.steps.tolist()


@pytest.mark.parametrize("outer", [0, 3])
@pytest.mark.parametrize("policy", ["full", "latest"])
def test_fused_decode_of_a_windowed_model_matches_eager(policy, outer: int) -> None:
    """`core_attention_window` / `outer_attention_window`: the op's `window` (each token attends to the last w
    positions) on the row engine's pages, through padding, as the eager network's band mask; and on a dense cache."""
    from recurrent_depth.inference.cache import KVCache
    from tests.inference.conftest import make_debug_model

    model = make_debug_model(3, core_attention_window=3, outer_attention_window=outer)
    ids, mask = _padded(5, length=9)  # prompts of 4-9 tokens, longer than the windows
    new = torch.randint(4, 256, (3, 6), generator=torch.Generator().manual_seed(6))
    eager, fast, calls = _eager_and_fused(model, ids, mask, new, policy=policy, num_steps=4)
    assert sorted(calls) == sorted(_prefill_calls(mask) + ["prelude", "core", "coda"] * 6)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)
    global_attention = make_debug_model(3)  # the same weights without the windows: other logits (the test can fail)
    with torch.inference_mode():
        other, _ = _teacher_forced(global_attention, ids, mask, new, policy=policy, num_steps=4)
    assert (other - eager).abs().max() > 1e-2
    seq = torch.cat([ids[:1], new[:1]], 1)  # the dense KVCache (model(ids, use_cache=True)): prefill, then a token
    out = {}
    for on in (False, True):
        dense: list[str] = []
        with torch.inference_mode(), _fused(model, on, dense):
            cache = KVCache(policy, max_length=seq.shape[1])
            model(seq[:, :-1], num_steps=4, use_cache=True, cache=cache, init_scale=0.0)
            out[on] = model(seq[:, -1:], num_steps=4, use_cache=True, cache=cache, init_scale=0.0).logits
        assert bool(dense) == on
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


def test_fused_generate_gives_eager_tokens(debug_model) -> None:
    ids, mask = _padded(4)
    with _fused(debug_model, False):
        eager = generate(debug_model, ids, mask, max_new_tokens=8, num_steps=6)
        eager_spec = generate(debug_model, ids, mask, max_new_tokens=8, num_steps=6, draft_steps=2, lookahead=3)
    calls: list[int] = []
    with _fused(debug_model, True, calls):
        fast = generate(debug_model, ids, mask, max_new_tokens=8, num_steps=6)
        fast_spec = generate(debug_model, ids, mask, max_new_tokens=8, num_steps=6, draft_steps=2, lookahead=3)
    assert calls
    assert fast.sequences.tolist() == eager.sequences.tolist()
    assert fast_spec.sequences.tolist() == eager_spec.sequences.tolist() == eager.sequences.tolist()


def test_fused_path_is_skipped_where_it_does_not_apply(debug_model) -> None:
    """Autograd, hooked blocks and multi-token forwards run the modules themselves."""
    ids = torch.randint(4, 256, (1, 1))
    calls: list[int] = []
    with _fused(debug_model, True, calls):
        cache = KVCache("full", max_length=4)
        debug_model(ids, num_steps=2, use_cache=True, cache=cache)  # grad mode on: eager
        assert not calls
        seen: list[int] = []
        hook = debug_model.transformer.core_block[0].register_forward_hook(lambda *a: seen.append(1))
        try:
            with torch.inference_mode():
                debug_model(ids, num_steps=2, use_cache=True, cache=KVCache("full", max_length=4))
        finally:
            hook.remove()
        assert seen == [1, 1] and "core" not in calls  # the hooked stage ran its modules; the others fused
        with torch.inference_mode():
            debug_model(ids, num_steps=2, use_cache=True, cache=KVCache("full", max_length=4))
        assert calls


@pytest.mark.parametrize("policy", ["full", 1])
def test_fused_multi_token_forwards_match_eager(debug_model, policy) -> None:
    """Several new tokens per forward after a cached past (causal within the chunk, padding, holes-free)."""
    ids, mask = _padded(5)
    new = torch.randint(4, 256, (3, 9), generator=torch.Generator().manual_seed(6))
    eager, fast, calls = _eager_and_fused(debug_model, ids, mask, new, policy=policy, num_steps=4, chunk=3)
    assert sorted(calls) == sorted(_prefill_calls(mask) + ["prelude", "core", "coda"] * 3)
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-4)


def test_long_prompts_prefill_eagerly(debug_model) -> None:
    ids = torch.randint(4, 256, (1, fused.MAX_TOKENS + 1), generator=torch.Generator().manual_seed(7))
    calls: list[int] = []
    with _fused(debug_model, True, calls):
        generate(debug_model, ids, max_new_tokens=2, num_steps=2)
    assert calls == ["prelude", "core", "coda"]  # the prompt's forward was eager, the one decode step fused


def test_fused_op_rejects_bad_arguments(debug_model) -> None:
    d, H = debug_model.config.n_embd, debug_model.config.n_heads
    weights = fused._weights(debug_model.transformer.core_block[:1])
    slot = torch.zeros(1, H, 4, d // H)
    rope = torch.zeros(1, 1, d // H // 2, 2)
    args = dict(x=torch.zeros(1, 1, d), e=None, adapter=None, n_steps=1, weights=weights, kslots=[slot],
                vslots=[slot], pos=0, masks=[fused._EMPTY], rope=rope, eps=1e-6, n_heads=H, window=0)
    torch.ops.rdepth.blocks(*args.values())  # well-formed: runs
    for change, message in [(dict(x=torch.zeros(1, d)), "x must be"),
                            (dict(window=-1), "window must be >= 0"),
                            (dict(x=torch.zeros(1, 1, d, dtype=torch.float64)), "x must be a contiguous fp32"),
                            (dict(weights=weights[:8]), "9 weights per block"),
                            (dict(kslots=[slot, slot]), "one k slot"),
                            (dict(pos=4), "C >= pos"),
                            (dict(pos=-1), "pos must be"),
                            (dict(masks=[torch.ones(1, 3, dtype=torch.bool)]), "a mask must be"),
                            (dict(n_steps=2), "one k slot"),
                            (dict(adapter=torch.zeros(d, 2 * d)), "adapter needs e"),
                            (dict(rope=torch.zeros(1, 1, 3, 2)), "rope must be"),
                            (dict(kslots=[torch.zeros(2, H, 4, d // H)], vslots=[torch.zeros(2, H, 4, d // H)]),
                             "cache slots must be \\(B")]:
        with pytest.raises(RuntimeError, match=f"rdepth.blocks: .*{message}"):
            torch.ops.rdepth.blocks(*{**args, **change}.values())


def test_fused_op_reads_strided_slots(debug_model) -> None:
    """A cache slot may be any (B, H, C, D) view whose D is contiguous (a (B, S, H, D) tensor transposed): the output
    and the keys written are those of contiguous slots; a strided D, or k and v laid out differently, is refused."""
    d, H = debug_model.config.n_embd, debug_model.config.n_heads
    blocks = debug_model.transformer.core_block
    weights, L, D = fused._weights(blocks), len(blocks), d // H
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, d, generator=g)
    rope = debug_model.transformer.rope[0, 3:5].reshape(1, 2, D // 2, 2).float().contiguous()
    base_k, base_v = torch.randn(2, 6, H, D, generator=g), torch.randn(2, 6, H, D, generator=g)

    def run(ks, vs):
        return torch.ops.rdepth.blocks(x, None, None, 1, weights, ks, vs, 3, [fused._EMPTY] * L, rope, 1e-6, H)

    strided_k = [base_k.clone().transpose(1, 2) for _ in range(L)]  # (B, H, C, D) views of (B, C, H, D) memory
    strided_v = [base_v.clone().transpose(1, 2) for _ in range(L)]
    dense_k, dense_v = [k.contiguous() for k in strided_k], [v.contiguous() for v in strided_v]
    assert torch.equal(run(strided_k, strided_v), run(dense_k, dense_v))
    for a, b in zip(strided_k + strided_v, dense_k + dense_v):
        assert torch.equal(a, b)  # the same new keys and values, at positions 3 and 4
    assert not torch.equal(strided_k[0][:, :, 3:5], base_k.transpose(1, 2)[:, :, 3:5])
    with pytest.raises(RuntimeError, match="k slot must be a contiguous fp32 CPU tensor along D"):
        run([k.transpose(2, 3).contiguous().transpose(2, 3) for k in dense_k], dense_v)
    with pytest.raises(RuntimeError, match="k and v alike"):
        run(strided_k, dense_v)


def test_fused_can_be_disabled_by_environment(monkeypatch) -> None:
    saved = dict(kernels._state)
    monkeypatch.setenv("RDEPTH_FUSED", "0")
    try:
        assert kernels._load() is False
        assert "RDEPTH_FUSED=0" in kernels.load_error()
    finally:
        kernels._state.update(saved)


@pytest.mark.parametrize("rows", [1, 2, 3, 16, 17])
def test_fused_matrix_vector_kernel_matches_linear(rows) -> None:
    """The op's own products (up to 16 rows; ATen's GEMM above), including weight-row counts that leave remainders."""
    g = torch.Generator().manual_seed(rows)
    for n_out, n_in in [(13, 40), (64, 32), (200, 96)]:
        x, w = torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
        torch.testing.assert_close(torch.ops.rdepth.linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5,
                                   atol=1e-5)


def test_fused_kernel_splits_large_products_over_threads() -> None:
    """Products of at least 256 KiB of weights per task run on several threads; the result must not change."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 512, generator=g), torch.randn(2050, 512, generator=g)  # 4 MiB: several tasks
    one = torch.ops.rdepth.linear(x, w)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = torch.ops.rdepth.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(two, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4)
    assert torch.equal(one, two)  # each output is one thread's dot product either way


def test_stages_without_blocks_run_without_the_fused_op() -> None:
    """A model with no prelude and no coda layers: those stages are empty (nothing to fuse), the core still fuses."""
    from tests.inference.conftest import make_debug_model

    model = make_debug_model(n_layers_in_prelude=0, n_layers_in_coda=0)
    ids = torch.randint(4, 256, (2, 5), generator=torch.Generator().manual_seed(9))
    with _fused(model, False):
        eager = generate(model, ids, max_new_tokens=4, num_steps=3)
    calls: list[str] = []
    with _fused(model, True, calls):
        fast = generate(model, ids, max_new_tokens=4, num_steps=3)
    assert calls == ["core"] * 4
    assert fast.sequences.tolist() == eager.sequences.tolist()


# ------------------------------------------------------------------------------------------ bf16 weights
requires_avx512 = pytest.mark.skipif(kernels.available() and kernels.vector_isa() != "avx512",
                                     reason="bf16 decode takes the fused op only where it was built with AVX-512 "
                                            "(F, BW, VL); on this CPU bf16 models run eagerly")


def _bf16_pair(model):
    """(the model in bf16, the fp32 network on the same bf16-rounded weights): the fused bf16 path computes in fp32,
    so it should sit closer to the second than the eager bf16 network, which rounds every activation to bf16."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    return low, copy.deepcopy(low).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class _Replay:
    """An exit criterion that replays one row's plan: its k-th token exits after plan[k] steps (the same exits,
    hence the same cache holes, on every path compared)."""

    name, threshold, needs_logits = "replay", 0.0, False

    def __init__(self, plan: list[int]) -> None:
        self.plan = list(plan)

    def init(self, state: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return torch.tensor([[self.plan.pop(0), 0]])  # (1, 2): planned steps, steps so far

    def check(self, memory, state, logits, valid=None):
        count = memory[:, 1] + 1
        return count >= memory[:, 0], torch.stack([memory[:, 0], count], 1), count.float()


@requires_avx512
@pytest.mark.parametrize(("policy", "length"), [("full", 7), (1, 7), ("full", fused.MAX_TOKENS + 1)])
def test_fused_bf16_decode_matches_eager_with_padding(debug_model, policy, length) -> None:
    """bf16 weights through the fused op, padded rows, prefill plus five tokens: within bf16 rounding of the eager
    bf16 network, and closer than it to the fp32 network on the same weights (fp32 activations inside the op). A
    prompt too long for the op prefills eagerly into the bf16 cache that the fused steps then read."""
    low, ref_model = _bf16_pair(debug_model)
    ids, mask = _padded(0, length=length)
    new = torch.randint(4, 256, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), _fused(low, False), _fused(ref_model, False):
        eager, _ = _teacher_forced(low, ids, mask, new, policy=policy, num_steps=5)
        ref, _ = _teacher_forced(ref_model, ids, mask, new, policy=policy, num_steps=5)
    calls: list[str] = []
    with torch.inference_mode(), _fused(low, True, calls):
        fast, _ = _teacher_forced(low, ids, mask, new, policy=policy, num_steps=5)
    assert sorted(calls) == sorted(_prefill_calls(mask) + ["prelude", "core", "coda"] * 5)
    assert _rel(fast, eager) < 2e-2  # bf16 rounding of activations (eager) and of stage outputs and the cache (ours)
    assert _rel(fast, ref) < 1e-2
    assert _rel(fast, ref) < _rel(eager, ref)


@requires_avx512
@pytest.mark.parametrize("policy", ["full", "latest", 1])
def test_fused_bf16_decode_with_rows_exiting_at_different_depths(policy) -> None:
    """A batch whose rows exit at different steps (a replayed plan, so that every path has the same holes): the
    bf16 fused path, including the rows still iterating (a subset of the rows bound), against eager bf16 and fp32."""
    low, ref_model = _bf16_pair(make_converging_model(contraction=0.6))
    ids = torch.randint(4, 256, (3, 6), generator=torch.Generator().manual_seed(2))
    new = torch.randint(4, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    plans = list(torch.randint(1, 13, (7, 3), generator=torch.Generator().manual_seed(4)))
    run = dict(policy=policy, num_steps=12, mask=torch.ones_like(ids))

    def replay() -> list[_Replay]:  # row b's plan: its tokens' exit steps
        return [_Replay([int(p[b]) for p in plans]) for b in range(3)]

    with torch.inference_mode(), _fused(low, False), _fused(ref_model, False):
        eager, eager_steps = _teacher_forced(low, ids, new=new, criterion=replay(), **run)
        ref, _ = _teacher_forced(ref_model, ids, new=new, criterion=replay(), **run)
    calls: list[str] = []
    with torch.inference_mode(), _fused(low, True, calls):
        fast, fast_steps = _teacher_forced(low, ids, new=new, criterion=replay(), **run)
    assert "core[rows]" in calls and "coda[rows]" in calls
    assert fast_steps.tolist() == eager_steps.tolist() == torch.stack(plans, 1).tolist()
    assert _rel(fast, eager) < 2e-2
    assert _rel(fast, ref) < _rel(eager, ref)


@requires_avx512
def test_fused_bf16_greedy_tokens(debug_model) -> None:
    """Greedy generation of a padded batch, plain and speculative: the fused bf16 path gives the tokens of the fp32
    network on the same weights (the eager bf16 network, rounding every activation, may not)."""
    low, ref_model = _bf16_pair(debug_model)
    ids, mask = _padded(4)
    kw = dict(max_new_tokens=8, num_steps=6)
    with _fused(ref_model, False):
        ref = generate(ref_model, ids, mask, **kw)
    calls: list[str] = []
    with _fused(low, True, calls):
        fast = generate(low, ids, mask, **kw)
        fast_spec = generate(low, ids, mask, draft_steps=2, lookahead=3, **kw)
    assert calls
    assert fast.sequences.tolist() == ref.sequences.tolist()
    assert fast_spec.sequences.tolist() == ref.sequences.tolist()


@requires_avx512
def test_fused_bf16_bundled_model_answers_as_fp32() -> None:
    """The bundled trained checkpoint in bf16 on its task's prompts: the fused path's greedy answers are the fp32
    model's and the eager bf16 model's."""
    from recurrent_depth.assets import bundle_info, resolve_model
    from recurrent_depth.data.tokenizer import encode_prompt, load_tokenizer
    from recurrent_depth.hf import RecurrentDepthForCausalLM
    from recurrent_depth.tasks import get_task

    path = resolve_model(None)
    info = bundle_info(path)
    model, tok = RecurrentDepthForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    low = copy.deepcopy(model).to(torch.bfloat16)
    task = get_task(info["task"], **info.get("difficulty", {}))
    for row in task.generate(4, split="test", seed=11):
        ids = torch.tensor([encode_prompt(tok, row["prompt"])])
        kw = dict(max_new_tokens=6, num_steps=8)
        with _fused(model, False), _fused(low, False):
            fp32, eager = generate(model, ids, **kw), generate(low, ids, **kw)
        calls: list[str] = []
        with _fused(low, True, calls):
            fast = generate(low, ids, **kw)
        assert calls
        assert fast.sequences.tolist() == fp32.sequences.tolist() == eager.sequences.tolist()


def test_bf16_runs_eagerly_without_avx512(debug_model, monkeypatch) -> None:
    """Where the library lacks the AVX-512 kernel, bf16 models keep the eager network (fp32 ones still fuse)."""
    monkeypatch.setitem(kernels._state, "isa", "portable")
    low = copy.deepcopy(debug_model).to(torch.bfloat16)
    ids = torch.randint(4, 256, (1, 4), generator=torch.Generator().manual_seed(10))
    calls: list[str] = []
    with _fused(low, True, calls):
        out = generate(low, ids, max_new_tokens=3, num_steps=2)
    assert not calls and out.sequences.shape == (1, 7)
    with _fused(debug_model, True, calls):
        generate(debug_model, ids, max_new_tokens=3, num_steps=2)
    assert calls


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17])
def test_fused_matrix_vector_kernel_reads_bf16_weights(rows) -> None:
    """fp32 x against bf16 W: exact fp32 products of the widened weights (up to 4 rows, with row lengths that leave
    tails of every size below 32); above 4 rows ATen's bf16 GEMM, on x rounded to bf16 (csrc: kGemmRows)."""
    g = torch.Generator().manual_seed(rows)
    for n_out, n_in in [(13, 40), (64, 32), (200, 96), (9, 31), (24, 65)]:
        x = torch.randn(rows, n_in, generator=g)
        w = torch.randn(n_out, n_in, generator=g).to(torch.bfloat16)
        got = torch.ops.rdepth.linear(x, w)
        assert got.dtype == torch.float32
        if rows <= 4:
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w.float()), rtol=1e-5, atol=1e-5)
        else:
            want = torch.nn.functional.linear(x.to(torch.bfloat16), w).float()
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    g2 = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 512, generator=g2), torch.randn(2050, 512, generator=g2).to(torch.bfloat16)
    threads = torch.get_num_threads()
    one = torch.ops.rdepth.linear(x, w)
    torch.set_num_threads(2)
    try:
        assert torch.equal(torch.ops.rdepth.linear(x, w), one)  # split over threads: each output unchanged
    finally:
        torch.set_num_threads(threads)


@requires_avx512
def test_bf16_decode_head_runs_on_the_op_kernel(debug_model, monkeypatch) -> None:
    """A bf16 decode's head (one position per row) takes the op's matrix-vector kernel: exact fp32 products of the
    bf16 weights and hidden state (ATen's bf16 head rounds its logits to bf16), the same greedy tokens as the eager
    head; fp32 models, all-position logits, autograd and fused_decode = False keep `lm_head`."""
    low, _ = _bf16_pair(debug_model)
    hidden = torch.randn(3, low.config.n_embd).to(torch.bfloat16)
    with torch.no_grad():
        got = fused.head(low, hidden)
        assert fused.head(debug_model, hidden.float()) is None and fused.head(low, hidden[None]) is None
        low.transformer.fused_decode = False
        assert fused.head(low, hidden) is None
        low.transformer.fused_decode = True
    assert fused.head(low, hidden) is None  # autograd on
    want = torch.nn.functional.linear(hidden.float(), low.lm_head.weight.float())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ids = torch.randint(4, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    taken: list[bool] = []
    real = fused.head

    def counted(model, h):
        out = real(model, h)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(fused, "head", counted)
    fast = generate(low, ids, max_new_tokens=4, num_steps=3)
    assert taken == [True] * 4  # the prompt's last position and each new token's
    monkeypatch.setattr(fused, "head", lambda m, h: None)
    eager = generate(low, ids, max_new_tokens=4, num_steps=3)
    assert fast.sequences.tolist() == eager.sequences.tolist()


def test_fused_op_rejects_mixed_storage_types(debug_model) -> None:
    """bf16 weight matrices need bf16 x and cache slots, and fp32 norm weights; other weight dtypes are refused."""
    d, H = debug_model.config.n_embd, debug_model.config.n_heads
    block = copy.deepcopy(debug_model.transformer.core_block[:1]).to(torch.bfloat16)
    weights = fused._weights(block)
    slot = torch.zeros(1, H, 4, d // H, dtype=torch.bfloat16)
    args = dict(x=torch.zeros(1, 1, d, dtype=torch.bfloat16), e=None, adapter=None, n_steps=1, weights=weights,
                kslots=[slot], vslots=[slot], pos=0, masks=[fused._EMPTY], rope=torch.zeros(1, 1, d // H // 2, 2),
                eps=1e-6, n_heads=H)
    assert torch.ops.rdepth.blocks(*args.values()).dtype == torch.bfloat16  # well-formed: runs
    norm_bf16 = [weights[0].to(torch.bfloat16), *weights[1:]]
    half = [w.half() if w.dim() == 2 else w for w in weights]
    for change, message in [(dict(x=torch.zeros(1, 1, d)), "x must be a contiguous bf16"),
                            (dict(kslots=[slot.float()]), "k slot must be a contiguous bf16"),
                            (dict(weights=norm_bf16), "norm weight or bias must be a contiguous fp32"),
                            (dict(weights=half), "must be fp32 or bf16")]:
        with pytest.raises(RuntimeError, match=f"rdepth.blocks: .*{message}"):
            torch.ops.rdepth.blocks(*{**args, **change}.values())


@requires_avx512
def test_fused_bf16_row_engine_gives_generate_alone(debug_model, monkeypatch) -> None:
    """A bf16 model in the row engine (the server's loop) runs its stages on the fused op over the paged store's bf16
    keys, and each row gives what bf16 `generate()` gives it alone (up to 4 rows a call: the op's own products)."""
    from recurrent_depth.inference.params import DepthParams, SamplingParams
    from recurrent_depth.inference.rows import Row, RowEngine

    low, _ = _bf16_pair(debug_model)
    stages: list[str] = []
    real = fused._run_paged
    monkeypatch.setattr(fused, "_run_paged", lambda cache, blocks, part, *a: stages.append(part)
                        or real(cache, blocks, part, *a))
    depths = [DepthParams(5), DepthParams(8, "kl", 1e-3), DepthParams(3, kv_sharing=1), DepthParams(6)]
    rows = [Row(p, d, SamplingParams(8, 0.0)) for p, d in zip([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], depths)]
    RowEngine(low, max_rows=3).run(rows)
    assert {"prelude", "core", "coda"} <= set(stages)
    for row, d in zip(rows, depths):
        out = generate(low, torch.tensor([row.prompt]), max_new_tokens=8, num_steps=d.num_steps,
                       exit_criterion=d.exit_criterion, exit_threshold=d.exit_threshold, kv_sharing=d.kv_sharing)
        alone = (out.sequences[0, len(row.prompt):].tolist(), out.steps[0].tolist())
        assert (row.tokens, row.token_steps) == alone, d


# ------------------------------------------------------------------------------------------ the paged op
def _engine_forwards(model, on: bool, policy, calls: list[str] | None = None) -> list[torch.Tensor]:
    """Rows of different lengths in one paged store (`RowEngine.forward`): separate prefills, then forwards of one
    and of three tokens for all rows together (each at its own position), at several recurrences per call, then a
    truncation and a forward over the truncated positions. Returns every forward's logits."""
    from recurrent_depth.inference.params import DepthParams, SamplingParams
    from recurrent_depth.inference.rows import Row, RowEngine

    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    engine = RowEngine(model, max_rows=3, max_len=24, chunk=None, page_size=4)  # pages smaller than a row
    rows = [Row(p, DepthParams(5, kv_sharing=policy), SamplingParams(8, 0.0)) for p in prompts]
    for row in rows:
        engine.add(row)
    out = []
    with _fused(model, on, calls):
        for row in rows:
            out.append(engine.forward([row], [row.prompt], 5))
        out.append(engine.forward(rows, [[20], [21], [22]], 5, all_logits=True))
        out.append(engine.forward(rows, [[23, 24, 25]] * 3, 5, all_logits=True))
        for row in rows:
            engine.truncate(row, row.length - 2)
        out.append(engine.forward(rows, [[26, 27]] * 3, 5, all_logits=True))
    return out


@pytest.mark.parametrize("policy", ["full", 2])
def test_paged_op_matches_eager_rows_at_their_own_positions(debug_model, policy) -> None:
    """The fused op over the paged store (`rdepth.blocks_paged`: page tables, each row at its own position, five
    recurrences per call, keys read and written in place) against the eager modules over the same store."""
    eager = _engine_forwards(debug_model, False, policy)
    calls: list[str] = []
    fast = _engine_forwards(debug_model, True, policy, calls)
    assert [c.removesuffix("[rows]") for c in calls] == ["prelude", "core", "coda"] * 6  # all recurrences in one
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_paged_op_rejects_bad_arguments(debug_model) -> None:
    d, H = debug_model.config.n_embd, debug_model.config.n_heads
    D = d // H
    weights = fused._weights(debug_model.transformer.core_block[:1])
    pool = torch.zeros(3, 4, H, D)
    rope = torch.zeros(1, 1, D // 2, 2)
    args = dict(x=torch.zeros(1, 1, d), e=None, adapter=None, n_steps=1, weights=weights, kpools=[pool],
                vpools=[pool], tables=[torch.tensor([[0, 1]])], starts=torch.tensor([5]),
                valid=torch.zeros(12, dtype=torch.bool), rope=rope, eps=1e-6, n_heads=H, window=0)
    torch.ops.rdepth.blocks_paged(*args.values())  # well-formed: runs, and marks position 5 (page 1, slot 1) valid
    assert args["valid"].nonzero().flatten().tolist() == [4 + 1]
    for change, message in [(dict(tables=[torch.tensor([[0, -1]])]), "has no page"),
                            (dict(window=-1), "window must be >= 0"),
                            (dict(tables=[torch.tensor([[0]])]), "covering every position"),
                            (dict(tables=[]), "one k slot"),
                            (dict(starts=torch.tensor([-1])), "starts must be >= 0"),
                            (dict(starts=torch.tensor([1, 2])), "starts must be"),
                            (dict(valid=torch.zeros(11, dtype=torch.bool)), "pages \\* P flags"),
                            (dict(kpools=[torch.zeros(3, 4, H, D + 2)], vpools=[torch.zeros(3, 4, H, D + 2)]),
                             "pools must be"),
                            (dict(kpools=[]), "a pool per block")]:
        with pytest.raises(RuntimeError, match=f"rdepth.blocks(_paged)?: .*{message}"):
            torch.ops.rdepth.blocks_paged(*{**args, **change}.values())
