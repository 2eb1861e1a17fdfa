"""The live server on 127.0.0.1, driven by the official `openai` client: completions and chat, streaming or not,
depth and exit fields in `extra_body`, concurrent requests at different depths, bad inputs, keys and disconnects."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from recurrent_depth.serving.app import create_app
from recurrent_depth.serving.model import ServedModel
from recurrent_depth.serving.protocol import Limits
from recurrent_depth.serving.server import serve_in_thread
from tests.serving.conftest import API_KEY, MODEL_ID

GREEDY = {"temperature": 0, "max_tokens": 8}


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


def _wait_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _health(url)
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s: {_health(url)}")


def test_models_and_health(client: openai.OpenAI, live) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert _health(live[0])["status"] == "ok"


def test_completion_reports_recurrence_steps(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="hello there", **GREEDY, extra_body={"num_steps": 3})
    choice = r.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(choice.recurrence_steps) >= 1
    assert choice.recurrence_steps == [3] * r.usage.completion_tokens
    assert r.usage.recurrence_steps == 3 * r.usage.completion_tokens
    assert r.usage.prompt_tokens == 1 + len("hello there")  # <bos> + one token per character


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "system", "content": "be brief"},
                                                                 {"role": "user", "content": "hi"}], **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.recurrence_steps == sum(r.choices[0].recurrence_steps)
    assert r.usage.prompt_tokens == len("system: be brief\nuser: hi\nassistant:")  # the documented default template


@pytest.mark.parametrize("extra, check", [
    ({"num_steps": 1}, lambda steps: steps and all(s == 1 for s in steps)),
    ({"num_steps": 12}, lambda steps: steps and all(s == 12 for s in steps)),
    ({"num_steps": 12, "exit_criterion": "kl", "exit_threshold": 10.0},
     lambda steps: steps and all(s == 1 for s in steps)),
    ({"num_steps": 12, "exit_criterion": "argmax-stability", "exit_threshold": 2},
     lambda steps: steps and all(3 <= s <= 12 for s in steps)),
    ({"num_steps": 0}, lambda steps: steps and all(s == 0 for s in steps)),
])
def test_extra_body_changes_steps(client: openai.OpenAI, extra: dict, check) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="abc", **GREEDY, extra_body=extra)
    assert check(r.choices[0].recurrence_steps), r.choices[0].recurrence_steps
    assert r.usage.recurrence_steps == sum(r.choices[0].recurrence_steps)


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    extra = {"num_steps": 6, "exit_criterion": "latent-diff", "exit_threshold": 0.05, "kv_sharing": "latest"}
    full = client.completions.create(model=MODEL_ID, prompt="stream me", **GREEDY, extra_body=extra)
    chunks = list(client.completions.create(model=MODEL_ID, prompt="stream me", **GREEDY, extra_body=extra,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    steps = [s for c in chunks if c.choices for s in c.choices[0].recurrence_steps]
    assert text == full.choices[0].text and steps == full.choices[0].recurrence_steps
    assert chunks[-1].usage.recurrence_steps == full.usage.recurrence_steps
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason

    messages = [{"role": "user", "content": "tell me"}]
    whole = client.chat.completions.create(model=MODEL_ID, messages=messages, **GREEDY, extra_body=extra)
    parts = list(client.chat.completions.create(model=MODEL_ID, messages=messages, **GREEDY, extra_body=extra,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    streamed_steps = [s for p in parts for s in getattr(p.choices[0], "recurrence_steps", [])]
    assert streamed_steps == whole.choices[0].recurrence_steps


def test_concurrent_requests_at_different_depths_equal_alone(client: openai.OpenAI, live) -> None:
    requests = [
        ("why?", {"num_steps": 1}),
        ("hello world", {"num_steps": 4}),
        ("abc abc", {"num_steps": 16}),
        ("the fox", {"num_steps": 20, "exit_criterion": "kl", "exit_threshold": 1e-3}),
        ("hi", {"num_steps": 10, "exit_criterion": "latent-diff", "exit_threshold": 0.05, "kv_sharing": "latest"}),
        ("quiet", {"num_steps": 8, "warm_start": True, "kv_sharing": 2}),
        ("seeded", {"num_steps": 5, "init_scale": 1.0}),
    ]

    def ask(item):
        prompt, extra = item
        r = client.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=12, seed=7,
                                      extra_body=extra)
        return r.choices[0].text, r.choices[0].recurrence_steps

    alone = [ask(item) for item in requests]
    before = _health(live[0])["peak_running"]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests * 2))
    assert together == alone * 2
    assert _health(live[0])["peak_running"] >= max(before, 2)  # they really shared batches


def test_sampling_is_seeded_and_choices_differ(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_ID, prompt="once", max_tokens=10, temperature=1.0, top_p=0.95, n=3, seed=11)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    def ask(prompt: str, steps: int, **kw) -> openai.types.Completion:
        return client.completions.create(model=MODEL_ID, prompt=prompt, temperature=0, max_tokens=12,
                                         extra_body={"num_steps": steps}, **kw)

    # a random model: find a greedy continuation long enough to cut (deterministic search)
    prompt, steps, base = next((p, r, text) for p in ("stop test", "abc", "hello", "why") for r in range(1, 8)
                               if len(text := ask(p, r).choices[0].text) >= 4)
    stop = base[2:4]
    r = ask(prompt, steps, stop=[stop, "never-there"])
    assert r.choices[0].text == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"


BAD = [
    ({"prompt": "a", "num_steps": -1}, 400, "num_steps"),
    ({"prompt": "a", "num_steps": 10_000}, 400, "num_steps"),
    ({"prompt": "a", "num_steps": "many"}, 400, "num_steps"),
    ({"prompt": "a", "exit_criterion": "magic"}, 400, "exit_criterion"),
    ({"prompt": "a", "exit_threshold": 0.1}, 400, "exit_threshold"),
    ({"prompt": "a", "exit_criterion": "kl", "exit_threshold": -1}, 400, "exit_threshold"),
    ({"prompt": "a", "kv_sharing": "sometimes"}, 400, "kv_sharing"),
    ({"prompt": "a", "kv_sharing": 0}, 400, "kv_sharing"),
    ({"prompt": "a", "warm_start": "hot"}, 400, "warm_start"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 17}, 400, "max_tokens"),
    ({"prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"prompt": "a", "top_p": -0.1}, 400, "top_p"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "a", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
    ({"prompt": "a" * 49}, 400, "prompt"),  # over --max-prompt-tokens (48)
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "a", "model": "other"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_completion_inputs(client: openai.OpenAI, body: dict, status: int, param: str) -> None:
    payload = {"model": MODEL_ID, **body}
    with pytest.raises(openai.APIStatusError) as info:
        client.post("/completions", body=payload, cast_to=object)
    err = info.value
    assert err.status_code == status
    assert err.body["param"] == param and err.body["message"]
    assert client.completions.create(model=MODEL_ID, prompt="ok", max_tokens=1).choices  # still serving


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x" * 60}]}, "messages"),
])
def test_bad_chat_inputs(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body={"model": MODEL_ID, **body}, cast_to=object)
    assert info.value.body["param"] == param


def test_context_length_error_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="a" * 49, max_tokens=1)
    assert info.value.code == "context_length_exceeded"


def test_malformed_and_oversize_bodies(live, client: openai.OpenAI) -> None:
    url, auth = live[0], {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for raw in (b"{not json", b"", b"[1, 2]", b"null", b"\xff\xfe",
                b'{"model": "debug-char", "prompt": "a", "temperature": NaN}', b"[" * 5000 + b"]" * 5000):
        r = httpx.post(url + "/v1/completions", content=raw, headers=auth, timeout=10)
        assert r.status_code in (400, 413) and "error" in r.json(), raw[:20]
    r = httpx.post(url + "/v1/chat/completions", content=b'{"model": "x", "pad": "' + b"a" * 20_000 + b'"}',
                   headers=auth, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    for field in ("num_steps", "prompt", "stop", "logit_bias", "frobnicate"):  # deep or huge values: short errors
        for value in ("[" * 900 + "]" * 900, '"' + "x" * 10_000 + '"'):
            raw = f'{{"model": "{MODEL_ID}", "prompt": "a", "{field}": {value}}}'.encode()
            r = httpx.post(url + "/v1/completions", content=raw, headers=auth, timeout=10)
            assert r.status_code == 400 and len(r.json()["error"]["message"]) < 400, (field, r.text[:200])
    r = httpx.get(url + "/v1/completions", headers=auth, timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    assert client.completions.create(model=MODEL_ID, prompt="ok", max_tokens=1).choices


def test_api_key_is_enforced(live) -> None:
    url = live[0]
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=MODEL_ID, prompt="a", max_tokens=1)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": "a"}).status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # health stays open for probes


class _NoEOS(ServedModel):
    stop_token_ids = ()  # generate until max_tokens: the request surely outlives the client


def test_disconnect_frees_the_slot(served) -> None:
    app = create_app(_NoEOS(served.model, served.tokenizer, MODEL_ID),
                     Limits(max_tokens=64, max_num_steps=400), max_batch=2)
    long = {"model": MODEL_ID, "prompt": "long", "max_tokens": 64, "num_steps": 400}
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model=MODEL_ID, prompt="long", max_tokens=64, stream=True,
                                           extra_body={"num_steps": 400})
        next(iter(stream))
        assert _health(url)["running"] == 1
        stream.close()
        assert _wait_idle(url)["aborted"] == 1  # cancelled, not run to its end

        with pytest.raises(httpx.ReadTimeout):  # the client gives up on a non-streaming request
            httpx.post(url + "/v1/completions", json=long, timeout=0.5)
        assert _wait_idle(url)["aborted"] == 2
        r = client.completions.create(model=MODEL_ID, prompt="after", max_tokens=2, extra_body={"num_steps": 1})
        assert r.usage.completion_tokens == 2


def test_queue_limit_answers_429(served) -> None:
    app = create_app(_NoEOS(served.model, served.tokenizer, MODEL_ID),
                     Limits(max_tokens=64, max_num_steps=400, max_queue=1), max_batch=1)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        long = dict(model=MODEL_ID, prompt="long", max_tokens=64, stream=True, extra_body={"num_steps": 400})
        running = client.completions.create(**long)
        next(iter(running))  # holds the only row
        waiting = client.completions.create(**long)  # the queue's one place (its headers arrive at once)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
        assert info.value.status_code == 429 and info.value.code == "server_busy"
        running.close()
        waiting.close()
        assert _wait_idle(url)["aborted"] == 2


def test_several_prompts_and_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt=["ab", "cd"], n=2, max_tokens=3, temperature=0,
                                  extra_body={"num_steps": 2})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: the choices of one prompt agree
    assert r.usage.prompt_tokens == 6  # <bos> + 2 characters, twice
    assert r.usage.completion_tokens == sum(len(c.recurrence_steps) for c in r.choices)
    ids = client.completions.create(model=MODEL_ID, prompt=[[5, 6, 7]], max_tokens=2, extra_body={"num_steps": 1})
    assert ids.usage.prompt_tokens == 3


def test_shallow_request_is_not_held_to_a_deep_ones_pace(served) -> None:
    """The deep request's first token needs DEEP engine steps; the shallow one, joining once the deep one runs, ends
    well before. DEEP leaves room for the engine steps that pass while the shallow request is sent (400 was too few
    once the fused op read the pages in place: 464 steps had passed in one CI run)."""
    DEEP = 2000  # noqa: N806
    app = create_app(_NoEOS(served.model, served.tokenizer, MODEL_ID),
                     Limits(max_tokens=64, max_num_steps=DEEP), max_batch=2)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        deep = client.completions.create(model=MODEL_ID, prompt="deep", max_tokens=64, stream=True,
                                         extra_body={"num_steps": DEEP})  # DEEP engine steps before its first token
        while _health(url)["running"] == 0:
            time.sleep(0.01)
        shallow = client.completions.create(model=MODEL_ID, prompt="shallow", max_tokens=4, temperature=0,
                                            extra_body={"num_steps": 1})
        state = _health(url)
        assert shallow.choices[0].recurrence_steps == [1, 1, 1, 1]
        assert state["running"] == 1 and state["peak_running"] == 2  # they were batched together
        assert state["engine_steps"] < DEEP  # done before the deep request finished its first token
        deep.close()


def _post_raw(live, path: str, raw: bytes, auth: str = f"Bearer {API_KEY}") -> httpx.Response:
    """POST bytes as they are (the openai client cannot send a lone surrogate or NaN)."""
    return httpx.post(live[0] + "/v1" + path, content=raw, timeout=30,
                      headers={"Authorization": auth, "Content-Type": "application/json"})


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"model": MODEL_ID, "prompt": "a\ud800b"}, "prompt"),
    ("/completions", {"model": MODEL_ID, "prompt": ["ok", "\udfff"]}, "prompt[1]"),
    ("/completions", {"model": MODEL_ID, "prompt": "ok", "stop": ["\ud800"]}, "stop[0]"),
    ("/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content"),
    ("/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "\ud800": 1},
     "body key '\\ud800'"),
])
def test_lone_surrogates_are_a_400_naming_the_field(live, path: str, body: dict, param: str) -> None:
    response = _post_raw(live, path, json.dumps(body).encode())  # json.dumps writes the surrogate as \ud800
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and "surrogate" in response.json()["error"]["message"]
    assert _health(live[0])["status"] == "ok"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-0.5"])
def test_temperature_that_is_not_a_usable_number_is_a_400(live, value: str) -> None:
    raw = f'{{"model": "{MODEL_ID}", "prompt": "a", "max_tokens": 1, "temperature": {value}}}'.encode()
    response = _post_raw(live, "/completions", raw)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "temperature"


def test_empty_bearer_token_is_refused(live) -> None:
    response = _post_raw(live, "/completions", json.dumps({"model": MODEL_ID, "prompt": "a"}).encode(), "Bearer")
    assert response.status_code == 401


def test_an_empty_api_key_is_refused_at_startup(served) -> None:
    for key in ("", " ", "key "):
        with pytest.raises(ValueError, match="API key"):
            create_app(served, api_key=key)


def test_requests_default_to_the_shared_inference_defaults() -> None:
    from recurrent_depth.inference.defaults import INIT_SCALE
    from recurrent_depth.serving.protocol import parse_depth

    fixed, adaptive = parse_depth({}, 8, Limits()), parse_depth({"exit_criterion": "kl"}, 8, Limits())
    assert (fixed.kv_sharing, adaptive.kv_sharing) == ("full", "latest")
    assert fixed.init_scale == adaptive.init_scale == INIT_SCALE
    assert parse_depth({"exit_criterion": "kl", "kv_sharing": "auto"}, 8, Limits()).kv_sharing == "latest"
    assert parse_depth({"exit_criterion": "kl", "kv_sharing": "full"}, 8, Limits()).kv_sharing == "full"
