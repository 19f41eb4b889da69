"""`gemma-jax serve` as a real process on 127.0.0.1 (the default model, one server for the module),
driven by the official `openai` client and httpx: OpenAI's formats, greedy output equal to
`generate_ids`, seeded sampling, every refused request, 64 concurrent requests against a queue of
8, `bench-serve`, a client that disconnects mid-stream, 503 while starting, and SIGTERM draining
to exit 0. (UTF-8 safe streaming of Japanese is tested in test_serving_engine.py with the real
Gemma 2 vocabulary: the default model's continuations of Japanese prompts hold no multi-byte text.)
"""

import asyncio
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import gemma_jax
from gemma_jax import default
from gemma_jax.serving.metrics import parse

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH, MAX_QUEUE, MAX_LENGTH, DECODE_STEPS = 4, 8, 512, 4
NEW = 32
MODEL = "gemma-jax-default"
PROMPTS = ["class Parser:", "def read_config(path):", "import os\nimport sys\n", "    def __init__(self",
           "for i in range(10):\n    ", "# Copyright", "x = [", "if __name__ == '__main__':\n"]


class Server:
    """A `gemma-jax serve --port 0` process. From the moment it listens (its stderr says where) until
    /health answers 200, it is polled: `startup` records the statuses of /health and of a completion."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # --no-compile-cache: warming up compiles for a second or more, a window in which to see 503s
        self.proc = subprocess.Popen([sys.executable, "-m", "gemma_jax", "--no-compile-cache", "serve", "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=q: [q.put(line) for line in s], daemon=True).start()
        line = self.err.get(timeout=120)
        assert "listening on http://127.0.0.1:" in line, line
        self.url = line.split("listening on ")[1].split()[0].rstrip(";,")
        self.startup = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            health = httpx.get(f"{self.url}/health", timeout=30)
            post = httpx.post(f"{self.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            self.startup.append((health.status_code, post.status_code, post.json()))
            if health.status_code == 200:
                break
            time.sleep(0.02)
        line = self.out.get(timeout=60)
        assert line.strip() == f"serving {MODEL} on {self.url}", line

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server():
    s = Server("--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-length", str(MAX_LENGTH),
               "--prefill-chunk", "64", "--decode-steps", str(DECODE_STEPS))
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model():
    return gemma_jax.load(default.checkpoint_dir(), dtype="float32")


@pytest.fixture(scope="module")
def reference(model):
    """Greedy continuations (NEW tokens, no stop) of each prompt alone: (prompt ids, text)."""
    tok = model.tokenizer
    out = {}
    for text in PROMPTS:
        ids = tok.encode(text)
        out[text] = ids, tok.decode(model.generate_ids([ids], NEW, stop_ids=[])[0])
    return out


def metrics(server) -> dict[str, float]:
    return parse(httpx.get(f"{server.url}/metrics", timeout=30).text)


def metric(values, name, **labels) -> float:
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in {"model_name": MODEL, **labels}.items()) + "}"
    return values[key]


# ------------------------------------------------------------------------------ formats and outputs
def test_completions_greedy_equal_generate_ids(client, reference):
    for text in PROMPTS[:3]:
        ids, expected = reference[text]
        r = client.completions.create(model=MODEL, prompt=text, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})
        assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == expected and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), NEW, len(ids) + NEW)
        chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=NEW, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW
        assert all(c.usage is None for c in chunks[:-1]) and len(chunks) > 3   # streamed in pieces
    # token ids as the prompt
    ids, expected = reference[PROMPTS[0]]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected


def test_chat_equals_model_chat(client, model):
    messages = [{"role": "user", "content": "Write a class."}, {"role": "assistant", "content": "class A:"},
                {"role": "user", "content": "Another one"}]
    expected = model.chat(messages, max_new_tokens=NEW)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    ids = model.tokenizer.encode_chat(messages)
    assert r.usage.prompt_tokens == len(ids)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected
    assert stream[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == stream[0].id for c in stream)


def test_seeded_sampling_repeats(client):
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW, temperature=0.9, top_p=0.9, seed=42)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    c = client.completions.create(**{**kw, "seed": 43}).choices[0].text
    streamed = "".join(x.choices[0].text for x in client.completions.create(**kw, stream=True))
    assert a == b == streamed and a != c


def test_logprobs(client, model, reference):
    ids, expected = reference[PROMPTS[0]]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    (gen,), (ref,) = model.generate_ids([ids], NEW, stop_ids=[], return_logprobs=True)   # the programs compiled
    gen, ref = gen[:8], ref[:8]
    assert len(lp.tokens) == len(gen) and "".join(lp.tokens) == r.choices[0].text
    np.testing.assert_allclose(lp.token_logprobs, ref, atol=1e-4)
    assert all(3 <= len(top) <= 4 and max(top.values()) == pytest.approx(v, abs=1e-6)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))   # greedy: the chosen token is the best
    assert lp.text_offset == np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]).tolist()
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in content)


def test_stop_strings_and_penalties(client, reference):
    _, expected = reference[PROMPTS[0]]
    stop = expected[12:16]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop])
    assert r.choices[0].text == expected[:expected.find(stop)] and r.choices[0].finish_reason == "stop"
    p = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=NEW, temperature=0,
                                  frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert p.choices[0].text != expected


def test_models_tokenize_health_metrics(server, client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}, timeout=30).json()
    assert r["tokens"] == model.tokenizer.encode("hello world") and r["max_model_len"] == MAX_LENGTH
    r = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30).json()
    assert r["tokens"] == model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f"# TYPE {name} " in text


BAD = {   # name: (body or raw text, route, status, words in the message)
    "malformed JSON": ('{"prompt": "x", ', "completions", 400, "not valid JSON"),
    "body not an object": ("[1, 2]", "completions", 400, "JSON object"),
    "unknown role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "chat", 400, "unknown role 'wizard'"),
    "system role": ({"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
                    "chat", 400, "system"),
    "roles not alternating": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                              "chat", 400, "alternate"),
    "NaN temperature": ('{"prompt": "x", "temperature": NaN}', "completions", 400, "temperature"),
    "negative temperature": ({"prompt": "x", "temperature": -0.5}, "completions", 400, "temperature"),
    "top_p 0": ({"prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    "top_p 1.5": ({"prompt": "x", "top_p": 1.5}, "completions", 400, "top_p"),
    "prompt + max_tokens past the cache": ({"prompt": "x", "max_tokens": MAX_LENGTH}, "completions", 400,
                                           f"max length {MAX_LENGTH}"),
    "max_tokens 0": ({"prompt": "x", "max_tokens": 0}, "completions", 400, "max_tokens"),
    "n 2": ({"prompt": "x", "n": 2}, "completions", 400, "n must be 1"),
    "logprobs 6": ({"prompt": "x", "logprobs": 6}, "completions", 400, "logprobs"),
    "token outside the vocabulary": ({"prompt": [2, 99999]}, "completions", 400, "vocabulary"),
    "unknown field": ({"prompt": "x", "max_token": 5}, "completions", 400, "max_token"),
    "penalty out of range": ({"prompt": "x", "presence_penalty": 3}, "completions", 400, "presence_penalty"),
    "stream_options without stream": ({"prompt": "x", "stream_options": {"include_usage": True}}, "completions", 400,
                                      "stream_options"),
    "unknown model": ({"prompt": "x", "model": "gpt-4"}, "completions", 404, "gpt-4"),
    "missing messages": ({}, "chat", 400, "messages"),
}


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    before = metrics(server)
    for name, (body, route, status, words) in BAD.items():
        url = f"{server.url}/v1/{'chat/completions' if route == 'chat' else 'completions'}"
        r = httpx.post(url, content=body if isinstance(body, str) else json.dumps(body),
                       headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and words in error["message"], (name, error)
        assert "Traceback" not in r.text
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=-1)
    after = metrics(server)
    assert metric(after, "gemma_jax:requests_rejected_total", reason="invalid") - \
        metric(before, "gemma_jax:requests_rejected_total", reason="invalid") == len(BAD) + 1
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=3).usage.completion_tokens >= 1


# ------------------------------------------------------------------------------ load, disconnects, shutdown
def test_64_concurrent_requests_complete_or_get_429(server, reference, report):
    before = metrics(server)
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i):
        text = PROMPTS[i % len(PROMPTS)]
        try:
            if i % 2:
                r = await aclient.completions.create(model=MODEL, prompt=text, max_tokens=NEW, temperature=0,
                                                     extra_body={"ignore_eos": True})
                return text, r.choices[0].text, r.usage
            parts, usage = [], None
            async for c in await aclient.completions.create(model=MODEL, prompt=text, max_tokens=NEW, temperature=0,
                                                            stream=True, stream_options={"include_usage": True},
                                                            extra_body={"ignore_eos": True}):
                parts += [x.text for x in c.choices]
                usage = c.usage or usage
            return text, "".join(parts), usage
        except openai.RateLimitError as e:
            assert e.status_code == 429 and "queue is full" in str(e)
            return None

    async def all_of_them():
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), 300)
        finally:
            await aclient.close()

    results = asyncio.run(all_of_them())
    done = [r for r in results if r is not None]
    for text, out, usage in done:
        assert out == reference[text][1] and usage.completion_tokens == NEW
    rejected = len(results) - len(done)
    assert len(done) > MAX_QUEUE and rejected > 0   # a full queue, and at least one slot
    report("64 concurrent requests (4 slots, queue 8)", f"{len(done)} completed, {rejected} got 429")
    after = metrics(server)
    delta = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert delta("vllm:request_success_total", finished_reason="length") == len(done)
    assert delta("gemma_jax:requests_rejected_total", reason="queue_full") == rejected
    assert delta("vllm:generation_tokens_total") == sum(u.completion_tokens for _, _, u in done)
    assert delta("vllm:prompt_tokens_total") == sum(u.prompt_tokens for _, _, u in done)
    assert delta("vllm:e2e_request_latency_seconds_count") == len(done)
    assert metric(after, "vllm:num_requests_running") == metric(after, "vllm:num_requests_waiting") == 0


def test_bench_serve_against_the_server(server, tmp_path):
    """`gemma-jax bench-serve` (a sweep of two concurrencies, every request streamed with a mix of
    sampling settings): every request completes, and its token counts agree with /metrics."""
    from gemma_jax import cli
    before = metrics(server)
    out = tmp_path / "load.json"
    assert cli.main(["--no-compile-cache", "bench-serve", "--url", server.url, "--concurrency", "1,3", "--requests", "4",
                     "--prompt-len", "4:40", "--max-tokens", "6", "--json", str(out),
                     "--plot", str(tmp_path / "load.png")]) == 0
    results = json.loads(out.read_text())
    assert [r["spec"]["concurrency"] for r in results] == [1, 3] and (tmp_path / "load.png").stat().st_size > 0
    for r in results:
        assert r["completed"] == 4 and r["failures"] == {} and r["output_tokens"] == 4 * 6
        assert 0 < r["ttft_s"]["p50"] <= r["e2e_s"]["p50"] and r["itl_s"]["p99"] > 0
    after = metrics(server)
    delta = lambda name, **kw: metric(after, name, **kw) - metric(before, name, **kw)  # noqa: E731
    assert delta("vllm:generation_tokens_total") == 8 * 6
    assert delta("vllm:prompt_tokens_total") == sum(r["prompt_tokens"] for r in results)


@pytest.mark.parametrize("when", ["after its first text", "before any text", "not streamed"])
def test_a_client_that_disconnects_frees_its_slot(server, report, when):
    """The client closes the connection mid-request: the request is aborted and its slot freed within
    a few decode calls of the close. 'before any text': after BOS the default model makes only `<s>`
    tokens, which carry no text, so nothing is written to the socket and only the web layer's
    disconnect watch can see the client leave (a failed write cannot); 'not streamed': nothing is
    written before the end either."""
    before = metrics(server)
    prompt, wanted = ("class Parser:", MAX_LENGTH - 32) if when == "after its first text" else ([2], MAX_LENGTH - 1)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": wanted, "temperature": 0, "stream": when != "not streamed",
            "ignore_eos": True}
    if when == "not streamed":
        with httpx.Client(timeout=httpx.Timeout(60, read=0.2)) as c, pytest.raises(httpx.ReadTimeout):
            c.post(f"{server.url}/v1/completions", json=body)   # the timeout closes the connection
        at_close = metric(metrics(server), "vllm:generation_tokens_total")
    else:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            if when == "after its first text":
                line = next(line for line in r.iter_lines() if line.startswith("data: "))
                assert json.loads(line[6:])["choices"][0]["text"]
            else:
                time.sleep(0.2)   # decoding, nothing sent
            at_close = metric(metrics(server), "vllm:generation_tokens_total")
    # the connection is closed here
    deadline = time.monotonic() + 30
    while metric(now := metrics(server), "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.02)
    assert metric(now, "vllm:request_success_total", finished_reason="abort") - \
        metric(before, "vllm:request_success_total", finished_reason="abort") == 1
    made = metric(now, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total")
    after = metric(now, "vllm:generation_tokens_total") - at_close
    assert made < wanted and after < 16 * DECODE_STEPS   # freed at a step boundary soon after the close
    report(f"tokens made for a request of {wanted} whose client left {when}, before the close and after",
           f"{made - after:g}, {after:g}")


def test_started_with_503_before_serving(server):
    """While the model loads and compiles, /health and requests answer 503 (OpenAI's error JSON);
    then 200, and only then the 'serving' line."""
    health = [h for h, _, _ in server.startup]
    assert health[-1] == 200 and health[:-1] and set(health[:-1]) == {503}
    starting = [body for h, post, body in server.startup[:-1] if post == 503]
    assert starting and "starting" in starting[0]["error"]["message"]


def test_sigterm_drains_running_requests_then_exits_0(server):
    """Run last: SIGTERM while a request streams; new requests get 503, the running one finishes,
    then the process exits 0."""
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (late := httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=30)).status_code != 503:
            assert late.status_code == 200 and time.monotonic() < deadline
        assert "shutting down" in late.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 120
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert server.proc.wait(60) == 0
