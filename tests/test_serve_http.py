"""``jaxdlm serve`` over HTTP: one server (the embedded default model, linear self-speculation, 4 slots) started
once on 127.0.0.1 for the module, driven with the official ``openai`` client and ``httpx``.  Concurrent requests
equal ``generate`` alone; streams join to the non-streamed text; bad input gets OpenAI-style 400s naming the
field; dropped streams free their slots; /metrics parses; SIGTERM drains and exits 0 (the module's last test)."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import jaxdlm
from jaxdlm.default import heldout_prompts

openai = pytest.importorskip("openai")

SLOTS, BLOCK, MAX_LEN, MAX_TOKENS = 4, 8, 192, 48
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
pytestmark = pytest.mark.xdist_group("serve_http")  # one server under --dist loadgroup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc, url, log):
        self.proc, self.url, self.log = proc, url, log
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)

    def metrics(self) -> dict:
        """Unlabelled samples by name, and ``jaxdlm_requests_total{STATUS}`` summed over endpoints."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for s in family.samples:
                key = f"{s.name}{{{s.labels['status']}}}" if "status" in s.labels else s.name
                if s.labels and "status" not in s.labels:
                    continue
                out[key] = out.get(key, 0) + s.value
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    log = open(tmp / "server.log", "w+")
    cmd = [sys.executable, "-m", "jaxdlm.cli", "serve", "--mode", "linear_spec", "--block-length", str(BLOCK),
           "--slots", str(SLOTS), "--max-len", str(MAX_LEN), "--max-tokens", str(MAX_TOKENS), "--port", str(port),
           "--chat-template", str(tmp / "chat.jinja"), "--max-queue", "64"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"jaxdlm serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready within 300 s"
            time.sleep(0.5)
        yield Served(proc, url, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def model():
    return jaxdlm.load_default()


def _alone(model, ids, max_tokens, **opts):
    res = jaxdlm.generate(model, [ids], mode="linear_spec", max_new_tokens=max_tokens, block_length=BLOCK, **opts)
    return res.sequences()[0].tolist(), int(res.nfe[0])


def _decode(model, ids):
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def test_concurrent_requests_each_equal_generate_alone(server, model, rng):
    """16 requests at once (4 slots): mixed prompt lengths, max_tokens, temperatures, top-k / top-p, seeds."""
    texts = heldout_prompts()
    reqs = []
    for i in range(16):
        text = texts[i % len(texts)][: int(rng.integers(8, 120))]
        if i % 3 == 2:  # seeded sampling (one static choice: top-k and top-p given)
            knobs = dict(temperature=float(rng.uniform(0.3, 1.5)), top_p=float(rng.uniform(0.5, 0.99)),
                         seed=int(rng.integers(1 << 20)), extra_body={"top_k": int(rng.integers(2, 60)),
                                                                       "return_token_ids": True})
            cap = 16
        else:
            knobs = dict(temperature=0.0, extra_body={"return_token_ids": True})
            cap = (8, 16)[i % 2]
        reqs.append((text, cap, knobs))

    def call(req):
        text, cap, knobs = req
        return server.client.completions.create(model="jaxdlm", prompt=text, max_tokens=cap, **knobs)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, reqs, timeout=300))
    for (text, cap, knobs), r in zip(reqs, results):
        ids = model.tokenizer(text)["input_ids"]
        extra = dict(knobs.get("extra_body", {}))
        extra.pop("return_token_ids")
        opts = {k: v for k, v in knobs.items() if k != "extra_body"} | extra
        tokens, nfe = _alone(model, ids, cap, **opts)
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == tokens, (text, knobs)
        assert choice.text == _decode(model, tokens)
        assert r.usage.completion_tokens == len(tokens) and r.usage.prompt_tokens == len(ids)
        assert r.usage.model_extra["nfe"] == nfe
        assert choice.finish_reason in ("stop", "length")


def test_streams_join_to_the_text_and_chat_uses_the_template(server, model):
    client, prompt = server.client, heldout_prompts()[6][:60]
    full = client.completions.create(model="jaxdlm", prompt=prompt, max_tokens=40, extra_body={"stop_token_ids": []})
    chunks = [c.choices[0].text for c in client.completions.create(
        model="jaxdlm", prompt=prompt, max_tokens=40, stream=True, extra_body={"stop_token_ids": []})
        if c.choices and c.choices[0].text]
    assert len(chunks) > 1 and "".join(chunks) == full.choices[0].text
    assert full.usage.completion_tokens == 40

    # log-probabilities: one per token, the same streamed or not
    body = dict(model="jaxdlm", prompt=prompt, max_tokens=24, logprobs=0, extra_body={"return_token_ids": True})
    lp = client.completions.create(**body).choices[0]
    streamed = [c.choices[0] for c in client.completions.create(stream=True, **body) if c.choices]
    assert len(lp.logprobs.token_logprobs) == len(lp.model_extra["token_ids"]) == 24
    assert all(x <= 0 for x in lp.logprobs.token_logprobs)
    assert len(lp.logprobs.tokens) == 24 and lp.logprobs.text_offset[0] == 0
    joined = [x for c in streamed if c.logprobs for x in c.logprobs.token_logprobs]
    np.testing.assert_allclose(joined, lp.logprobs.token_logprobs, rtol=0, atol=1e-6)

    messages = [{"role": "system", "content": "code"}, {"role": "user", "content": "def add(a, b):"}]
    chat = client.chat.completions.create(model="jaxdlm", messages=messages, max_tokens=16)
    rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
    tokens, nfe = _alone(model, model.tokenizer(rendered, add_special_tokens=False)["input_ids"], 16)
    assert chat.choices[0].message.content == _decode(model, tokens) and chat.usage.model_extra["nfe"] == nfe
    streamed = client.chat.completions.create(model="jaxdlm", messages=messages, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True})
    parts, usage = [], None
    for c in streamed:
        if c.choices and c.choices[0].delta.content:
            parts.append(c.choices[0].delta.content)
        usage = c.usage or usage
    assert "".join(parts) == chat.choices[0].message.content and usage.completion_tokens == len(tokens)
    with_lp = client.chat.completions.create(model="jaxdlm", messages=messages, max_tokens=16, logprobs=True)
    assert [t.token for t in with_lp.choices[0].logprobs.content] == [model.tokenizer.decode([t]) for t in tokens]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="jaxdlm", messages=messages, max_tokens=4, logprobs=True,
                                       top_logprobs=2)
    models = client.models.list()
    assert [m.id for m in models.data] == ["jaxdlm"]


BAD = [
    (b'{"prompt": "x", "max_tokens": ', None),                     # malformed JSON
    ({"prompt": "x", "bogus": 1}, "bogus"),                        # unknown field
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),          # wrong type
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "policy": "nope"}, "policy"),
    ({"prompt": "x", "threshold": 1.5}, "threshold"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x" * 150, "max_tokens": MAX_TOKENS}, "max_tokens"),  # over the context
    ({"prompt": "x", "max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),                 # top alternatives are not served
]


def test_bad_requests_get_openai_400s_naming_the_field(server):
    for body, param in BAD:
        kw = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
              else {"json": body})
        r = httpx.post(server.url + "/v1/completions", timeout=60, **kw)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], (body, err)


def test_dropped_streams_free_their_slots(server):
    before = server.metrics()
    body = {"prompt": "import os\n", "max_tokens": MAX_TOKENS, "stream": True, "stop_token_ids": []}
    for _ in range(SLOTS):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then the client goes away
    deadline = time.monotonic() + 60
    key = "jaxdlm_requests_total{cancelled}"
    while server.metrics().get(key, 0) - before.get(key, 0) < SLOTS:
        assert time.monotonic() < deadline, "dropped streams were not cancelled"
        time.sleep(0.2)
    with concurrent.futures.ThreadPoolExecutor(SLOTS + 2) as pool:
        done = list(pool.map(lambda i: server.client.completions.create(
            model="jaxdlm", prompt=f"x = {i}", max_tokens=8, extra_body={"stop_token_ids": []}), range(SLOTS + 2),
            timeout=120))
    assert all(d.usage.completion_tokens == 8 for d in done)
    after = server.metrics()
    assert after["jaxdlm_active_slots"] == 0 and after["jaxdlm_queue_depth"] == 0
    # the dropped requests stopped early: fewer tokens than they asked for
    dropped = after["jaxdlm_generated_tokens_total"] - before["jaxdlm_generated_tokens_total"] - 8 * (SLOTS + 2)
    assert dropped < SLOTS * MAX_TOKENS


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.client.completions.create(model="jaxdlm", prompt="def f(", max_tokens=8)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("jaxdlm_requests", "jaxdlm_queue_depth", "jaxdlm_active_slots", "jaxdlm_generated_tokens",
                 "jaxdlm_nfe", "jaxdlm_tokens_per_forward", "jaxdlm_time_to_first_token_seconds",
                 "jaxdlm_inter_token_latency_seconds"):
        assert name in families, name
    ttft = {s.name: s.value for s in families["jaxdlm_time_to_first_token_seconds"].samples}
    assert ttft["jaxdlm_time_to_first_token_seconds_count"] >= 1


def test_sigterm_drains_running_requests_and_exits_zero(server):
    """The module's last test: it stops the server."""
    body = {"prompt": "class A:\n", "max_tokens": 32, "stream": True, "stop_token_ids": []}
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                if not lines:
                    server.proc.send_signal(signal.SIGTERM)  # mid-stream
                lines.append(line[6:])
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=5)


class _StubEngine:
    """What the HTTP side reads of an engine, for the checks that need no model."""

    class model:  # noqa: N801
        class config:  # noqa: N801
            vocab_size = 300

    def check(self, n, options, max_tokens):
        return options


def test_chat_without_a_template_and_a_full_queue_in_process():
    from fastapi.testclient import TestClient

    from jaxdlm.serving.server import Server

    class Tok:
        chat_template = None

        def __call__(self, text, **_):
            return {"input_ids": list(text.encode())}

    srv = Server(_StubEngine(), Tok(), max_queue=0)  # the worker never starts (no lifespan): nothing leaves the queue
    client = TestClient(srv.app())
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "chat template" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_busy"
