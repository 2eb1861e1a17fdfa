"""Property tests: no request body, however malformed, gets a 5xx, and the server stays up: JSON-shaped junk sent
with the official openai client, and raw bytes that are not valid text (lone UTF-16 surrogates, NUL, invalid UTF-8,
long runs of astral characters) sent as they are."""

from __future__ import annotations

import json

import httpx
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import API_KEY, MODEL_ID

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SMALL_INT = st.integers(-3, 30)
PLAUSIBLE = {
    "model": st.just(MODEL_ID) | st.text(max_size=8),
    "prompt": st.text(max_size=60) | st.lists(st.integers(-3, 60), max_size=8)
    | st.lists(st.text(max_size=6), max_size=3) | st.lists(st.lists(SMALL_INT, max_size=3), max_size=3),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"]),
         "content": st.text(max_size=20) | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=8)}), max_size=2)}),
        max_size=3),
    "max_tokens": st.integers(-2, 20), "max_completion_tokens": st.integers(-2, 20),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "n": st.integers(-1, 5),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5), "seed": st.integers(-(2**65), 2**65),
    "num_steps": SMALL_INT, "exit_criterion": st.sampled_from(["kl", "minp-kl", "entropy-diff", "latent-diff",
                                                                "cosine", "argmax-stability", "none", "bogus"]),
    "exit_threshold": st.floats(-1, 20), "warm_start": st.sampled_from([True, False, "latent", "raw", "x"]),
    "kv_sharing": st.sampled_from(["full", "latest", "3", "0", "x"]) | SMALL_INT,
    "init_scale": st.floats(-1, 5), "echo": st.booleans(), "logprobs": st.integers(0, 2),
}
FIELD = st.sampled_from(sorted(PLAUSIBLE)) | st.sampled_from(["user", "best_of", "suffix", "tools", "response_format",
                                                             "zzz"])


@st.composite
def bodies(draw) -> object:
    if draw(st.integers(0, 9)) == 0:
        return draw(JUNK)  # not even an object
    body = {"model": MODEL_ID}
    for name in draw(st.lists(FIELD, max_size=5, unique=True)):
        strategy = PLAUSIBLE.get(name, JUNK)
        body[name] = draw(JUNK) if draw(st.integers(0, 6)) == 0 else draw(strategy)
    return body


def _send(client: openai.OpenAI, path: str, body: object) -> None:
    try:
        response = client.post(path, body=body, cast_to=httpx.Response)
    except openai.APIStatusError as err:
        assert err.status_code < 500, (err.status_code, err.body, body)
        assert isinstance(err.body, dict) and err.body.get("message"), err.body
        return
    assert response.status_code == 200
    assert "server_error" not in response.text, (response.text[:300], body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=bodies(), chat=st.booleans())
def test_no_request_body_gets_a_5xx(client: openai.OpenAI, live, body: object, chat: bool) -> None:
    if isinstance(body, dict):  # mostly plausible requests, so that the generation paths run too
        body.setdefault("messages" if chat else "prompt", [{"role": "user", "content": "hi"}] if chat else "hi")
    _send(client, "/chat/completions" if chat else "/completions", body)
    assert httpx.get(live[0] + "/health", timeout=10).json()["status"] == "ok"


# any code point, lone surrogates (category Cs) included, plus hand-picked troublemakers
ODD_TEXT = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(
    ["\ud800", "a\udfffb", "\udc00\ud800", "\x00", "a\x00b", "\U0010ffff" * 60, "\U0001f642" * 300, "\u202e\ufeff",
     "\uffff\ufffe", "e\u0301" * 40])
BAD_BYTES = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x00", b"\x80"])


@st.composite
def odd_bodies(draw) -> tuple[str, bytes]:
    """(path, raw body): a plausible request whose strings are odd text, encoded one of several ways."""
    chat = draw(st.booleans())
    text = draw(ODD_TEXT)
    body: dict = {"model": MODEL_ID, "max_tokens": draw(st.integers(1, 4)), "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = draw(st.sampled_from([text, [text, "ok"]]))
    extra = draw(st.sampled_from(["none", "stop", "user", "key"]))
    if extra == "stop":
        body["stop"] = [draw(ODD_TEXT) or "x"]
    elif extra == "user":
        body["user"] = draw(ODD_TEXT)
    elif extra == "key":
        body[draw(ODD_TEXT)] = 1
    how = draw(st.sampled_from(["escaped", "raw-utf8", "bad-bytes"]))
    if how == "escaped":  # \uXXXX escapes: the server's JSON parser rebuilds lone surrogates
        raw = json.dumps(body).encode()
    else:  # UTF-8 as is; lone surrogates become invalid UTF-8 (CESU-style bytes)
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "bad-bytes":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(BAD_BYTES) + raw[at:]
    return ("/chat/completions" if chat else "/completions"), raw


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(case=odd_bodies())
def test_no_odd_text_gets_a_5xx(live, case: tuple[str, bytes]) -> None:
    path, raw = case
    response = httpx.post(live[0] + "/v1" + path, content=raw, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code < 500, (response.status_code, response.text[:300], raw[:200])
    if response.status_code >= 400:
        assert response.json()["error"]["message"], response.text
    else:
        assert "server_error" not in response.text, (response.text[:300], raw[:200])
    assert httpx.get(live[0] + "/health", timeout=10).json()["status"] == "ok"
