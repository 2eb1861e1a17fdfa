"""Serving: an OpenAI-compatible HTTP server with per-request depth and adaptive exit (`rdepth serve`).

    engine.py     BatchEngine: continuous batching one recurrence step at a time, each row with its own depth, exit
                  criterion, threshold, cache sharing and positions (Sequence; the request's DepthParams and
                  SamplingParams and the paged RowKVCache are the library's, `recurrent_depth.inference`)
    scheduler.py  Scheduler: the engine on a background thread; requests join and leave between steps
    protocol.py   request validation (OpenAI fields + num_steps, exit_criterion, exit_threshold, warm_start,
                  kv_sharing, init_scale), OpenAI-style errors, usage with recurrence steps
    model.py      ServedModel / load_served_model: checkpoint + tokenizer + chat template
    app.py        create_app: the FastAPI app (/v1/models, /v1/completions, /v1/chat/completions, /health)
    server.py     serve / serve_in_thread: uvicorn in the foreground or on a thread
"""
