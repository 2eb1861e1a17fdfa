"""Inference: one algorithm or policy per module, all pure functions and small strategy objects over the model.

    cache.py        RowKVCache (paged, rows that join and leave: every decoder's), KVCache (one slot per recurrence
                    step and layer: the transformers-facing cache of `model(..., use_cache=True)` and HF
                    `generate`) and sharing policies, which own the exited-token fill (FullSharing, LatestSharing,
                    CyclicSharing(k); make_kv_policy("full" | "latest" | k))
    exit.py         ExitCriterion protocol: kl, minp-kl, entropy-diff, latent-diff, cosine, argmax-stability, none
    sampling.py     Sampler: greedy, temperature, top-k, top-p, min-p with an explicit torch.Generator
    params.py       DepthParams / SamplingParams: the typed request every entry point builds, validated once
    step.py         head_logits, the head every decoder uses; GenerateOutput
    rows.py         RowEngine: the one decode engine. Rows that join and leave, each with its own depth, exit,
                    sharing and positions, over a RowKVCache: the server's continuous batching, and the engine
                    the static decoders drive
    generate.py     generate(model, ids, mask, max_new_tokens=..., num_steps=...): a static batch on the RowEngine
    fused.py        the fused C++ CPU decode as the model's stage runner, over either store
    speculative.py  self-speculative decoding on the RowEngine: draft with few recurrences, verify with many
    compat.py       the reference's generate keywords (criterion, continuous_compute, draft_steps, ...) on the engine

Nothing is imported here eagerly; `recurrent_depth.generate` re-exports `generate.generate`.
"""
