"""Inference: one algorithm or policy per module, all pure functions and small strategy objects over the model.

    cache.py        KVCache (preallocated, one slot per recurrence step and layer), RowKVCache (paged, rows that
                    join and leave: the server's) and sharing policies, which own the exited-token fill
                    (FullSharing, LatestSharing, CyclicSharing(k); make_kv_policy("full" | "latest" | k))
    exit.py         ExitCriterion protocol: kl, minp-kl, entropy-diff, latent-diff, cosine, argmax-stability, none
    sampling.py     Sampler: greedy, temperature, top-k, top-p, min-p with an explicit torch.Generator
    params.py       DepthParams / SamplingParams: the typed request every entry point builds, validated once
    step.py         forward_rows: one forward of T tokens for a subset of rows, with per-row adaptive exit (over a
                    KVCache); head_logits, the head every decoder uses
    generate.py     generate(model, ids, mask, max_new_tokens=..., num_steps=...): static batches over forward_rows
    rows.py         RowEngine: rows that join and leave, one recurrence step per engine step over a RowKVCache (the
                    server's core; not forward_rows)
    fused.py        the fused C++ CPU decode as the model's stage runner, over either store
    speculative.py  self-speculative decoding: draft with few recurrences, verify with many
    compat.py       the reference's generate keywords (criterion, continuous_compute, draft_steps, ...) on the engine

Nothing is imported here eagerly; `recurrent_depth.generate` re-exports `generate.generate`.
"""
