"""Inference: one algorithm or policy per module, all pure functions and small strategy objects over the model.

    cache.py        KVCache (preallocated, one slot per recurrence step and layer) and sharing policies
                    (FullSharing, LatestSharing, CyclicSharing(k); make_kv_policy("full" | "latest" | k))
    exit.py         ExitCriterion protocol: kl, minp-kl, entropy-diff, latent-diff, cosine, argmax-stability, none
    sampling.py     Sampler: greedy, temperature, top-k, top-p, min-p with an explicit torch.Generator
    generate.py     generate(model, ids, mask, max_new_tokens=..., num_steps=...) and forward_rows (one row-subset step)
    speculative.py  self-speculative decoding: draft with few recurrences, verify with many
    compat.py       the reference's generate keywords (criterion, continuous_compute, draft_steps, ...) on the engine

Nothing is imported here eagerly; `recurrent_depth.generate` re-exports `generate.generate`.
"""
