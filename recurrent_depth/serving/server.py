"""Running the app with uvicorn: in the foreground (`rdepth serve`) or on a background thread (tests, benchmarks).

    with serve_in_thread(app) as base_url:          # "http://127.0.0.1:<free port>"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


def _config(app: FastAPI, log_level: str) -> uvicorn.Config:
    # h11: the pure-Python HTTP parser is always installed; limit_concurrency is left to our own queue limit.
    return uvicorn.Config(app, log_level=log_level, http="h11", ws="none", lifespan="on",
                          timeout_graceful_shutdown=5)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    config = _config(app, log_level)
    config.host, config.port = host, port
    uvicorn.Server(config).run()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning",
                    timeout: float = 30.0) -> Iterator[str]:
    """Start the app on a free port of `host` in a daemon thread; yield its base URL; shut it down after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="rdepth-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
        sock.close()
