"""Serving: an OpenAI-compatible HTTP server with per-request depth and adaptive exit (`rdepth serve`).

    engine.py     BatchEngine: the library's per-row step engine (`inference.rows.RowEngine`: each row with its own
                  depth, exit criterion, cache sharing and positions, in the paged RowKVCache) plus text, stop
                  strings and events (Sequence, TokenEvent; DepthParams / SamplingParams from inference.params)
    scheduler.py  Scheduler: the engine on a background thread; requests join and leave between steps
    protocol.py   request validation (OpenAI fields + num_steps, exit_criterion, exit_threshold, warm_start,
                  kv_sharing, init_scale), OpenAI-style errors, usage with recurrence steps
    model.py      ServedModel / load_served_model: checkpoint + tokenizer + chat template
    app.py        create_app: the FastAPI app (/v1/models, /v1/completions, /v1/chat/completions, /health)
    server.py     serve / serve_in_thread: uvicorn in the foreground or on a thread
"""
