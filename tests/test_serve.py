"""The Serve app over real HTTP on loopback (a tiny reference and aligned model, VADER): each route,
best-of-n equal to the argmax of the returned rewards, DeRa at lambda 0 equal to pi_0's own samples,
concurrent requests batched yet answered as alone, overload answered 503 with Retry-After (at once
past the admission bound, by the queues behind it), bad input
answered with a 4xx naming the field while the server keeps serving (and, sent inside a batch of
valid requests, failing none of them), the playground page driven in a real headless chromium, and
OpenAI's surface through the official client: /v1/models, greedy and nucleus decoding, logprobs and
echo, stop applied before ranking, and streaming."""
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.ray
KEY = "test-key-7f3a"  # tight_server's API key
TIGHT_WAIT_S = 0.05  # tight_server's admission.max_wait_s: below any request's own time, so only an idle replica admits


@pytest.fixture(scope="module")
def serving(ray_session, tiny_lm_dir, tmp_path_factory):
    from ray import serve

    from conftest import free_ports, save_tiny_lm
    from serve.app import build_app

    aligned = save_tiny_lm(tmp_path_factory.mktemp("serve_aligned"), seed=7)
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(tiny_lm_dir), "aligned": str(aligned), "device": "cpu",
                         "limits": {"max_n": 8, "max_prompts": 4, "max_tokens": 16, "max_prompt_chars": 100,
                                    "max_body_bytes": 2000, "body_timeout_s": 1.0},
                         "batching": {"batch_wait_timeout_s": 0.05}}),
              name="sweetspot", route_prefix="/")
    yield f"http://127.0.0.1:{port}", aligned
    serve.shutdown()


@pytest.fixture(scope="module")
def server(serving):
    return serving[0]


@pytest.fixture(scope="module")
def tight_server(serving, tiny_lm_dir):
    """A second app beside the first: one request at a time on the generator, one more queued, and
    an LSC-combined reward (everything else is refused with a 503); admission with a bound (50 ms)
    below any request's own time, so it admits a request only when none is in flight; behind an API
    key (KEY) and a Host allowlist."""
    from ray import serve

    from serve.app import AppArgs, bind_app

    url, aligned = serving
    os.environ["SWEETSPOT_TEST_KEY"] = KEY  # read once, where the app is built; only its digest reaches the replica
    args = AppArgs(model=str(tiny_lm_dir), aligned=str(aligned), device="cpu", retry_after_s=2,
                   access={"api_key_env": "SWEETSPOT_TEST_KEY", "allowed_hosts": ["127.0.0.1", "localhost"]},
                   reward={"kind": "combined", "components": [{"kind": "vader"}, {"kind": "brevity", "max_words": 4}]},
                   limits={"max_n": 64, "max_tokens": 64}, batching={"max_batch_size": 1},
                   admission={"max_wait_s": TIGHT_WAIT_S, "min_in_flight": 1, "min_completions": 1, "window_s": 1})
    tight = {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 1, "max_queued_requests": 1}
    serve.run(bind_app(args, {"GeneratorDeployment": tight, "ScorerDeployment": {"ray_actor_options": {"num_cpus": 0}}}),
              name="tight", route_prefix="/tight")
    os.environ.pop("SWEETSPOT_TEST_KEY")
    yield url + "/tight"
    serve.delete("tight")


def post(url, route, body, raw=None):
    import requests

    auth = {"Authorization": f"Bearer {KEY}"}  # needed by tight_server; the other app has no key and ignores it
    if raw is not None:
        return requests.post(url + route, data=raw, headers={"Content-Type": "application/json", **auth}, timeout=60)
    return requests.post(url + route, json=body, headers=auth, timeout=60)


def test_health_and_openapi(server):
    import requests

    assert requests.get(server + "/healthz", timeout=10).json() == {"status": "ok"}
    paths = requests.get(server + "/openapi.json", timeout=10).json()["paths"]
    assert {"/healthz", "/v1/bon", "/v1/dera"} <= set(paths)


def test_bon_picks_the_best_returned_sample(server):
    r = post(server, "/v1/bon", {"prompt": ["the movie was", "a good film"], "n": 4, "max_tokens": 6, "min_tokens": 6,
                                 "return_all": True, "seed": 5})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["prompt"] for x in results] == ["the movie was", "a good film"]
    for x in results:
        rewards = [s["reward"] for s in x["samples"]]
        assert len(rewards) == 4 and x["chosen"] == rewards.index(max(rewards)) and x["reward"] == max(rewards)
        assert x["completion"] == x["samples"][x["chosen"]]["completion"]
    again = post(server, "/v1/bon", {"prompt": ["the movie was", "a good film"], "n": 4, "max_tokens": 6, "min_tokens": 6,
                                     "return_all": True, "seed": 5}).json()
    assert again == r.json(), "a fixed seed gives the same answer"


def test_dera_at_lambda_0_is_pi0(server, pi0):
    from actors.generator import prompt_seeds

    body = {"prompt": "the plot", "lambda": 0.0, "n": 3, "max_tokens": 6, "min_tokens": 6, "return_all": True, "seed": 2}
    r = post(server, "/v1/dera", body)
    assert r.status_code == 200, r.text
    got = [s["completion"] for s in r.json()["results"][0]["samples"]]
    want = pi0.sample(["the plot"], 3, 6, min_new_tokens=6, seeds=prompt_seeds(2, 1))["samples"][0]
    assert got == want.completions and r.json()["results"][0]["lambda"] == 0.0


def completion(**body):
    return {"model": "sweetspot", "prompt": "a", **body}


# (route, body or None, raw bytes or None, the field the answer names, its status)
BAD_INPUT = [
    ("/v1/bon", {"prompt": "a", "n": 0}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "n": 9}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "max_tokens": 17}, None, "max_tokens", 422),
    ("/v1/bon", {"prompt": "   "}, None, "prompt", 422),
    ("/v1/bon", {"prompt": ["a"] * 5}, None, "prompt", 422),
    ("/v1/bon", {"prompt": "x" * 101}, None, "prompt", 422),
    ("/v1/bon", {"prompt": "\u00e9" * 100, "max_tokens": 16}, None, "prompt", 422),  # 200 bytes: past the model's 128 positions
    ("/v1/bon", {"prompt": "a", "temperature": 0}, None, "n", 422),  # greedy with n = 8
    ("/v1/bon", {"prompt": "a", "n": "two"}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "penalty": "laplace"}, None, "penalty", 422),
    ("/v1/bon", {"prompt": "a", "selection": "best"}, None, "selection", 422),
    ("/v1/bon", {"n": 2}, None, "prompt", 422),
    ("/v1/bon", {"prompt": "a", "top_p": 0.9}, None, "top_p", 422),
    ("/v1/dera", {"prompt": "a", "lambda": -1}, None, "lambda", 422),
    ("/v1/bon", None, b"{not json", "body", 422),
    ("/v1/bon", None, b'{"prompt": "' + b"x" * 3000 + b'"}', "body", 413),
    # the fault round's inputs: each passed validation and failed inside the sampler, the selection or the encoder
    ("/v1/bon", {"prompt": "a", "seed": -1}, None, "seed", 422),
    ("/v1/bon", {"prompt": "a", "seed": 2**63}, None, "seed", 422),
    ("/v1/dera", {"prompt": "a", "lambda": 1e308}, None, "lambda", 422),
    ("/v1/dera", {"prompt": "a", "lambda": 100.5}, None, "lambda", 422),
    ("/v1/bon", None, b'{"prompt": "a", "max_tokens": 4, "selection": "rbon_kl", "beta": Infinity}', "beta", 422),
    ("/v1/bon", {"prompt": "a", "selection": "rbon_kl", "beta": 1e5}, None, "beta", 422),
    ("/v1/bon", {"prompt": "a", "coef": 1e300}, None, "coef", 422),
    ("/v1/bon", {"prompt": "\ud800"}, None, "prompt", 422),
    ("/v1/bon", {"prompt": ["a good film", "bad \udfff end"]}, None, "prompt", 422),
    ("/v1/bon", {"prompt": "a", "temperature": 1e-300, "return_all": True}, None, "temperature", 422),
    ("/v1/bon", {"prompt": "a", "temperature": 1e-300}, None, "temperature", 422),
    ("/v1/bon", None, b'{"prompt": "a", "max_tokens": 4, "temperature": Infinity}', "temperature", 422),
    ("/v1/bon", {"prompt": "a", "temperature": 1e308}, None, "temperature", 422),
    ("/v1/bon", {"prompt": "a", "temperature": 2.5}, None, "temperature", 422),
    ("/v1/bon", None, b'{"prompt": "a", "max_tokens": 4, "seed": NaN}', "seed", 422),
    ("/v1/bon", {"prompt": "a", "n": True}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "n": "3"}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "n": 2.0}, None, "n", 422),
    ("/v1/bon", {"prompt": "a", "seed": "42"}, None, "seed", 422),
    ("/v1/bon", {"prompt": "a", "return_all": 1}, None, "return_all", 422),
    ("/v1/dera", {"prompt": "a", "lambda": "0.5"}, None, "lambda", 422),
    ("/v1/completions", completion(best_of=1000000, n=1), None, "best_of", 422),
    ("/v1/completions", completion(best_of=9), None, "best_of", 422),
    ("/v1/completions", completion(n=True), None, "n", 422),
    ("/v1/completions", completion(n="3"), None, "n", 422),
    ("/v1/completions", completion(seed="42"), None, "seed", 422),
    ("/v1/completions", completion(seed=-1), None, "seed", 422),
    ("/v1/completions", completion(stop=["."] * 5), None, "stop", 422),
    ("/v1/completions", None, json.dumps(completion(max_tokens=4, stop=["."] * 400), separators=(",", ":")).encode(), "stop", 422),
    ("/v1/completions", completion(stop="x" * 65), None, "stop", 422),
    ("/v1/completions", completion(stop=["x" * 65]), None, "stop", 422),
    ("/v1/completions", completion(stop=["\ud800"]), None, "stop", 422),
    ("/v1/completions", completion(dera_lambda=1e308), None, "dera_lambda", 422),
    ("/v1/completions", completion(temperature=1e-300), None, "temperature", 422),
    ("/v1/bon", None, b'{"prompt": "a good \xff film"}', "body", 422),  # not UTF-8
    ("/v1/bon", None, b"\xff\xfe\x00", "body", 422),
    ("/v1/bon", None, b"[" * 1999, "body", 422),  # nested deeper than the JSON parser goes
]


@pytest.mark.parametrize("route, body, raw, field, status", BAD_INPUT)
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server, route, body, raw, field, status):
    if body is not None:
        body = {"max_tokens": 4, **body}  # within the server's limit unless the case is about it
    with ThreadPoolExecutor(2) as pool:  # a valid request in flight at the same time
        valid = pool.submit(post, server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 8})
        r = post(server, route, body, raw)
        assert valid.result().status_code == 200
    assert r.status_code == status, (r.status_code, r.text)
    param = r.json()["error"]["param"]
    assert re.match(rf"{field}\b", param), (param, r.text)  # the field, or an item of it (prompt[1], stop.0)
    assert r.json()["detail"].startswith(param + ":"), r.text
    ok = post(server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 4})
    assert ok.status_code == 200


# Requests that reached the shared sampler call before and failed every request batched with them.
POISON = [
    ("/v1/bon", {"prompt": "the plot", "n": 2, "max_tokens": 6, "seed": -1}, None, "seed"),
    ("/v1/dera", {"prompt": "the plot", "n": 2, "max_tokens": 6, "lambda": 1e308}, None, "lambda"),
    ("/v1/bon", {"prompt": "the plot \ud800", "n": 2, "max_tokens": 6}, None, "prompt"),
    ("/v1/bon", None, b'{"prompt": "the plot", "n": 2, "max_tokens": 6, "selection": "rbon_kl", "beta": Infinity}', "beta"),
    ("/v1/bon", {"prompt": "the plot", "n": 2, "max_tokens": 6, "temperature": 1e-300, "return_all": True}, None, "temperature"),
]
BATCHED = [("/v1/bon", {"prompt": p, "n": 2, "max_tokens": 4 + i, "seed": i, "return_all": True})
           for i, p in enumerate(["the movie was", "a good film", "the plot"])] + \
          [("/v1/dera", {"prompt": p, "n": 2, "max_tokens": 5, "lambda": lam, "seed": 7, "return_all": True})
           for p, lam in [("the movie was", 0.5), ("a bad", 1.0), ("the plot", 2.0)]]


@pytest.fixture(scope="module")
def batched_alone(server):
    """Each request of BATCHED answered alone."""
    return [post(server, route, body).json()["results"] for route, body in BATCHED]


def same_answer(got: list, want: list) -> bool:
    """The same samples, rewards, choice and log-probs (to float rounding: a batch pads the prompts)."""
    for g, w in zip(got, want, strict=True):
        assert [s["completion"] for s in g["samples"]] == [s["completion"] for s in w["samples"]]
        assert [s["tokens"] for s in g["samples"]] == [s["tokens"] for s in w["samples"]]
        assert g["chosen"] == w["chosen"] and g["completion"] == w["completion"] and g.get("lambda") == w.get("lambda")
        assert [s["reward"] for s in g["samples"]] == pytest.approx([s["reward"] for s in w["samples"]], abs=1e-9)
        assert [s["logprob"] for s in g["samples"]] == pytest.approx([s["logprob"] for s in w["samples"]], abs=1e-4)
    return True


@pytest.mark.parametrize("route, body, raw, field", POISON)
def test_a_bad_request_inside_a_batch_fails_alone(server, batched_alone, route, body, raw, field):
    """The bad request is sent in the middle of six valid ones at once (they batch: fewer sampler calls
    than requests). It gets a 422 naming its field; it never reaches the generator; each valid
    request gets exactly the answer it gets alone."""
    import requests

    before = requests.get(server + "/v1/stats", timeout=10).json()["generator"]
    with ThreadPoolExecutor(len(BATCHED) + 1) as pool:
        valid = [pool.submit(post, server, r, b) for r, b in BATCHED[:3]]
        bad = pool.submit(post, server, route, body, raw)
        valid += [pool.submit(post, server, r, b) for r, b in BATCHED[3:]]
        answers, bad = [f.result() for f in valid], bad.result()
    after = requests.get(server + "/v1/stats", timeout=10).json()["generator"]
    assert bad.status_code == 422 and bad.json()["error"]["param"] == field, bad.text
    assert [r.status_code for r in answers] == [200] * len(BATCHED), [r.text[:200] for r in answers]
    for r, want in zip(answers, batched_alone):
        assert same_answer(r.json()["results"], want)
    assert after["requests"] - before["requests"] == len(BATCHED), (before, after)
    assert after["sampler_calls"] - before["sampler_calls"] < len(BATCHED), (before, after)


def test_a_body_that_does_not_arrive_is_answered_408_within_the_timeout(server):
    """A client whose Content-Length promises more bytes than it sends gets a 408 naming the body
    once limits.body_timeout_s (1 s here) has passed, not a connection held open; the server goes on."""
    import socket
    import time

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/bon HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"prompt": "a good')
        start, data = time.perf_counter(), b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += sock.recv(65536)
        waited = time.perf_counter() - start
    assert head.startswith(b"HTTP/1.1 408"), head
    answer = json.loads(body)
    assert answer["error"]["param"] == "body" and "18 bytes of the 100" in answer["detail"], answer
    assert waited < 10, waited
    assert post(server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 4}).status_code == 200


def test_openai_completions_through_the_official_client(server):
    """best_of = 4, n = 2: the two best of four samples by the server's reward (VADER), in order, with
    OpenAI's response shape and usage counts; dera_lambda and stop pass through."""
    from openai import BadRequestError, NotFoundError, OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="sweetspot", prompt=["the movie was", "a bad"], n=2, best_of=4, max_tokens=6,
                                    seed=1, temperature=1.0)
    assert out.object == "text_completion" and [c.index for c in out.choices] == [0, 1, 2, 3]
    rewards = [c.model_extra["reward"] for c in out.choices]
    assert rewards[0] >= rewards[1] and rewards[2] >= rewards[3]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.completion_tokens <= 2 * 4 * 6 and out.usage.completion_tokens >= 2 * 4  # all best_of samples count
    dera = client.completions.create(model="sweetspot", prompt="the plot", max_tokens=6, extra_body={"dera_lambda": 0.5})
    assert len(dera.choices) == 1 and dera.choices[0].finish_reason in ("stop", "length")
    cut = client.completions.create(model="sweetspot", prompt="the plot", max_tokens=12, seed=3, stop=[" "])
    assert " " not in cut.choices[0].text
    with pytest.raises(NotFoundError, match="model"):
        client.completions.create(model="gpt-9", prompt="a", max_tokens=4)
    with pytest.raises((BadRequestError, UnprocessableEntityError), match="best_of"):
        client.completions.create(model="sweetspot", prompt="a", n=3, best_of=2, max_tokens=4)


@pytest.fixture(scope="module")
def pi0(tiny_lm_dir):
    """The server's reference model, loaded here to compute what the server should answer."""
    from actors.generator import Generator

    return Generator(str(tiny_lm_dir), device="cpu")


def test_models_greedy_top_p_logprobs_and_echo_through_the_official_client(server, pi0):
    """GET /v1/models in OpenAI's list format (and 404 naming model for another id). temperature 0 is
    the argmax continuation computed here with the model, token by token; top_p -> 0 is the same
    answer. logprobs with echo: the prompt's tokens first (null, then the model's own log-probs), the
    completion's token log-probs summing to the sampler's log-prob of that sample, the top 2 of each
    step holding the drawn token. Greedy with n or best_of > 1, and values out of range, are 422s."""
    import torch
    from openai import NotFoundError, OpenAI

    from actors.generator import prompt_seeds

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    (card,) = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("sweetspot", "model", "sweetspot") and isinstance(card.created, int)
    assert client.models.retrieve("sweetspot").id == "sweetspot"
    with pytest.raises(NotFoundError) as err:
        client.models.retrieve("gpt-9")
    assert err.value.body["param"] == "model" and "gpt-9" in err.value.body["message"]

    prompt, eos = "the movie was", pi0.tokenizer.eos_token_id
    ids = pi0.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        prompt_lps = torch.log_softmax(pi0.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        prompt_lps = prompt_lps.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
        argmax = []
        while len(argmax) < 8 and eos not in argmax:
            argmax.append(int(pi0.model(input_ids=torch.tensor([ids + argmax])).logits[0, -1].argmax()))
    greedy = client.completions.create(model="sweetspot", prompt=prompt, max_tokens=8, temperature=0, logprobs=1).choices[0]
    assert greedy.text == pi0.tokenizer.decode(argmax, skip_special_tokens=True)
    assert greedy.finish_reason == ("stop" if argmax[-1] == eos else "length")
    assert greedy.logprobs.token_logprobs == [0.0] * len(argmax)  # the point mass: one token, log-prob 0
    assert [list(d.values()) for d in greedy.logprobs.top_logprobs] == [[0.0]] * len(argmax)
    nucleus = client.completions.create(model="sweetspot", prompt=prompt, max_tokens=8, top_p=1e-9, seed=11, logprobs=1).choices[0]
    assert nucleus.model_dump() == greedy.model_dump()

    out = client.completions.create(model="sweetspot", prompt=prompt, max_tokens=6, best_of=3, seed=4, logprobs=2, echo=True)
    (choice,) = out.choices
    lp, P = choice.logprobs, len(ids)
    assert choice.text.startswith(prompt) and "".join(lp.tokens) == choice.text and "".join(lp.tokens[:P]) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:P] == pytest.approx(prompt_lps, abs=1e-4)
    drawn = pi0.sample([prompt], 3, 6, seeds=prompt_seeds(4, 1))["samples"][0]
    j = drawn.completions.index(choice.text[len(prompt):])
    assert len(lp.tokens) - P == len(drawn.completion_ids[j])
    assert sum(lp.token_logprobs[P:]) == pytest.approx(drawn.logprobs[j], abs=1e-4)
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 3 and any(v == pytest.approx(value, abs=1e-6) for v in top.values()) and max(top.values()) <= 0

    for body, field in [({"temperature": 0, "n": 2, "best_of": 2}, "n"), ({"temperature": 0, "best_of": 2}, "best_of"),
                        ({"temperature": 0.005}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                        ({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"echo": 1}, "echo"),
                        ({"stream_options": {"include_usage": True}}, "stream_options")]:
        r = post(server, "/v1/completions", completion(max_tokens=4, **body))
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (body, r.text)


def test_streamed_completions_add_up_to_the_answer(server):
    """stream: true sends the ranked choices as server-sent events, a chunk per token then one with
    the finish_reason; per index the chunks' texts and log-probs add up to the answer without stream
    (the official client), the usage chunk is the answer's usage, and the stream ends `data: [DONE]`."""
    import requests
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    body = dict(model="sweetspot", prompt=["the movie was", "a bad"], n=2, best_of=3, max_tokens=6, seed=9, logprobs=1,
                echo=True, stop=["\t"])
    whole = client.completions.create(**body)
    texts, tokens, lps, finish, usage = {}, {}, {}, {}, None
    for chunk in client.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "text_completion"
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs is not None:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
                lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert len(whole.choices) == 4 and texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in whole.choices}
    assert lps == {c.index: c.logprobs.token_logprobs for c in whole.choices}
    assert usage == whole.usage

    r = requests.post(server + "/v1/completions", json={**body, "logprobs": None, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == 0) == whole.choices[0].text


def test_stop_cuts_every_sample_before_it_is_scored_and_ranked(tight_server):
    """best_of = n = 8 on the combined (VADER + brevity) reward, once without stop and once with a
    whitespace stop that occurs in the samples: the texts are the same samples cut at it, each
    reward is the server's scorer's on exactly the returned texts (the cut changed some), the
    choices are ranked by those rewards, and usage counts the cut tokens only."""
    from actors.scorer import make_scorer

    body = completion(prompt="the movie was", n=8, best_of=8, max_tokens=12, seed=0)
    full = post(tight_server, "/v1/completions", body).json()
    texts = [c["text"] for c in full["choices"]]
    stop = next(ch for t in texts for ch in t.strip() if ch.isspace())
    cut = post(tight_server, "/v1/completions", {**body, "stop": stop}).json()
    got = [c["text"] for c in cut["choices"]]
    assert sorted(got) == sorted(t.split(stop)[0] for t in texts)
    scorer = make_scorer({"kind": "combined", "components": [{"kind": "vader"}, {"kind": "brevity", "max_words": 4}]})
    rewards = [c["reward"] for c in cut["choices"]]
    assert rewards == pytest.approx(scorer.score(["the movie was"] * 8, got, groups=[0] * 8).mean.tolist(), abs=1e-12)
    assert rewards == sorted(rewards, reverse=True) and sorted(rewards) != sorted(c["reward"] for c in full["choices"])
    assert all(c["finish_reason"] == "stop" for c in cut["choices"] if c["text"] not in texts)
    assert cut["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]


def test_concurrent_requests_are_batched_and_answered_as_alone(server):
    """Eight requests at once (different prompts, seeds, n and max_tokens): fewer sampler calls than
    requests, and each answer equal to the same request's answer when it ran alone."""
    import requests

    bodies = [{"prompt": ["the movie was", "a good film", "the plot"][i % 3], "n": 2 + i % 2, "max_tokens": 4 + i,
               "seed": i, "return_all": True} for i in range(8)]
    alone = [post(server, "/v1/bon", b).json()["results"] for b in bodies]
    before = requests.get(server + "/v1/stats", timeout=10).json()["generator"]
    with ThreadPoolExecutor(8) as pool:
        together = [r.json()["results"] for r in pool.map(lambda b: post(server, "/v1/bon", b), bodies)]
    after = requests.get(server + "/v1/stats", timeout=10).json()["generator"]
    assert after["requests"] - before["requests"] == 8
    assert after["sampler_calls"] - before["sampler_calls"] < 8, (before, after)
    for a, t in zip(alone, together):
        assert [s["completion"] for s in t[0]["samples"]] == [s["completion"] for s in a[0]["samples"]]
        assert t[0]["chosen"] == a[0]["chosen"] and t[0]["reward"] == pytest.approx(a[0]["reward"], abs=1e-9)


def test_info_and_playground_page(server):
    import requests

    info = requests.get(server + "/v1/info", timeout=10).json()
    assert info == {"model": "sweetspot", "reward": "vader", "dera": True, "limits": {
        "max_n": 8, "max_prompts": 4, "max_tokens": 16, "max_prompt_chars": 100, "max_body_bytes": 2000,
        "body_timeout_s": 1.0}}
    page = requests.get(server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/v1/bon" in page.text


def test_a_prompt_over_the_models_context_is_a_422_naming_it(tight_server):
    """The generator refuses it before it joins a batch; the ingress answers 422 with the generator's
    own message (not Ray's wrapper around it), and the next request is answered."""
    r = post(tight_server, "/v1/bon", {"prompt": ["a good film", "the movie " * 150], "n": 2, "max_tokens": 8})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("prompt[1]: ") and "exceed the model's context of 128 positions" in r.json()["detail"]
    assert post(tight_server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 8}).status_code == 200


def test_a_colocated_scorer_answers_exactly_as_its_own_deployment(serving, tiny_lm_dir):
    """colocate_scorer: no scorer deployment, the generator replica scores; every endpoint answers
    as the app with a scorer deployment does (same samples, same rewards, same choice)."""
    from ray import serve

    from serve.app import AppArgs, bind_app

    url, aligned = serving
    args = AppArgs(model=str(tiny_lm_dir), aligned=str(aligned), device="cpu", colocate_scorer=True,
                   limits={"max_n": 8, "max_prompts": 4, "max_tokens": 16, "max_prompt_chars": 100, "max_body_bytes": 2000})
    serve.run(bind_app(args, {"GeneratorDeployment": {"ray_actor_options": {"num_cpus": 0}}}), name="colocated",
              route_prefix="/colocated")
    try:
        assert "ScorerDeployment" not in serve.status().applications["colocated"].deployments
        for route, body in [("/v1/bon", {"prompt": ["the movie was", "a bad"], "n": 4, "max_tokens": 6, "seed": 3, "return_all": True}),
                            ("/v1/dera", {"prompt": "the plot", "n": 3, "max_tokens": 5, "lambda": 0.5, "seed": 1}),
                            ("/v1/completions", {"model": "sweetspot", "prompt": "a good", "best_of": 3, "n": 2, "max_tokens": 5, "seed": 2})]:
            own, colocated = post(url, route, body), post(url + "/colocated", route, body)
            assert own.status_code == colocated.status_code == 200
            a, b = own.json(), colocated.json()
            if route == "/v1/completions":
                a, b = a["choices"], b["choices"]
            else:
                a, b = a["results"], b["results"]
            assert a == b, route
    finally:
        serve.delete("colocated")


def test_overload_is_a_503_with_retry_after_and_the_server_recovers(tight_server):
    """Eight heavy requests at once on a generator that holds two: the excess is a 503 with
    Retry-After (the app's retry_after_s, 2, or more: the admission's expected wait), refused by the
    admission or by the generator's queue behind it (max_queued_requests, the backstop)."""
    body = {"prompt": "the movie was", "n": 64, "max_tokens": 64, "min_tokens": 64}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(tight_server, "/v1/bon", body), range(8)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    for busy in (r for r in answers if r.status_code == 503):
        assert int(busy.headers["Retry-After"]) >= 2 and busy.json()["error"]["message"].startswith("overloaded: ")
    assert post(tight_server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 4}).status_code == 200


def test_a_burst_past_the_admission_bound_is_refused_at_once(tight_server):
    """One heavy request measures tight_server's completion rate; then 12 at once. A second request
    in flight would be expected to wait 2 / rate, over the 50 ms bound: the one admitted is answered
    200, and the others get a 503 at once (each in well under a second, while the admitted one is
    still sampling) naming the expected wait and the bound, with Retry-After; afterwards nothing is
    left counted in flight and the counts add up (GET /v1/stats)."""
    import time

    import requests

    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "the movie was", "n": 64, "max_tokens": 64, "min_tokens": 64}
    assert post(tight_server, "/v1/bon", body).status_code == 200
    before = requests.get(tight_server + "/v1/stats", headers=auth, timeout=10).json()["admission"]
    assert before["enabled"] and before["max_wait_s"] == TIGHT_WAIT_S and before["in_flight"] == 0
    assert before["completion_rate_per_s"] > 0 and before["expected_wait_s"] == pytest.approx(1 / before["completion_rate_per_s"])

    def timed(_):
        t0 = time.perf_counter()
        r = post(tight_server, "/v1/bon", body)
        return r, time.perf_counter() - t0

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(timed, range(12)))
    accepted = [t for r, t in answers if r.status_code == 200]
    refused = [(r, t) for r, t in answers if r.status_code == 503 and "admission." in r.json()["detail"]]
    assert accepted and len(accepted) + len(refused) == 12, [(r.status_code, r.text[:200]) for r, _ in answers]
    assert len(refused) >= 9, len(refused)
    for r, t in refused:
        detail = r.json()["detail"]
        assert re.fullmatch(r"overloaded: expected wait [0-9.e+-]+ s > admission.max_wait_s 0.05 s \(\d+ requests in "
                            r"flight, [0-9.e+-]+ completed per second\)\. Retry after \d+ s", detail), detail
        assert r.json()["error"]["param"] == "overloaded" and int(r.headers["Retry-After"]) >= 2  # retry_after_s 2 at least
        assert t < 1.0, (t, detail)
    after = requests.get(tight_server + "/v1/stats", headers=auth, timeout=10).json()["admission"]
    assert after["in_flight"] == 0 and after["refused"] - before["refused"] == len(refused), after
    assert after["admitted"] - before["admitted"] == len(accepted) == after["completed"] - before["completed"], after
    print(f"\n  admission burst: 12 at once, {len(accepted)} answered 200 in {max(accepted) * 1000:.0f} ms, "
          f"{len(refused)} refused in {min(t for _, t in refused) * 1000:.0f} to {max(t for _, t in refused) * 1000:.0f} ms")


def test_dera_with_the_combined_reward_is_refused_by_name(tight_server):
    r = post(tight_server, "/v1/dera", {"prompt": "the plot", "lambda": 0.5, "max_tokens": 4})
    assert r.status_code == 422 and r.json()["error"]["param"] == "lambda" and "combined" in r.text


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed "
                                                            "(`make test` installs them as root)")
def test_playground_in_headless_chromium(server):
    """Type a prompt, pick n and a DeRa lambda, press Sample: the samples appear ranked by reward with
    the chosen one (the best) marked; an n above the limit shows the server's message naming n."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "reward vader" in d.find_element(By.ID, "server").text)

        def fill(field, value):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)

        def rows():
            return driver.find_elements(By.CSS_SELECTOR, "#samples tr")

        fill("prompt", "the movie was")
        fill("n", "3")
        fill("max_tokens", "6")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: len(rows()) == 3)
        rewards = [float(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows()]
        assert rewards == sorted(rewards, reverse=True)
        chosen = driver.find_elements(By.CSS_SELECTOR, "#samples tr.chosen")
        assert len(chosen) == 1 and chosen[0] == rows()[0] and "chosen" in chosen[0].text

        fill("lambda", "0.5")
        fill("n", "2")
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: "at lambda 0.5" in d.find_element(By.ID, "status").text)
        assert len(rows()) == 2

        fill("n", "99")
        driver.execute_script("document.getElementById('n').removeAttribute('max')")  # let the server refuse it
        driver.find_element(By.ID, "run").click()
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text.startswith("422: n:")
    finally:
        driver.quit()


def test_load_test_counts_every_answer_and_reads_replica_memory(server, tmp_path):
    from jobs.bench.load_test import LoadTestConfig, percentile, run

    assert [percentile(list(range(1, 101)), q) for q in (0.5, 0.95, 0.99, 1.0)] == [50, 95, 99, 100]
    assert percentile([7.0], 0.99) == 7.0 and percentile([], 0.5) is None
    r = run(LoadTestConfig(url=server, clients=8, requests=40, body={"prompt": "the plot", "n": 2, "max_tokens": 4},
                           output_dir=str(tmp_path)))
    assert r["requests"] == 40 and r["ok"] + r["overloaded_503"] == 40 and r["failures"] == 0
    assert r["p50_s"] <= r["p95_s"] <= r["p99_s"] <= r["max_s"] and r["throughput_rps"] > 0
    assert (r["p50_503_s"] is None) == (r["overloaded_503"] == 0)
    assert r["admission"]["enabled"] and r["admission"]["in_flight"] == 0  # GET /v1/stats after the run: none left counted in
    assert any("GeneratorDeployment" in m["replica"] and m["before_mb"] > 50 for m in r["memory"])
    assert "requests/s" in (tmp_path / "results.md").read_text()


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server):
    """Bodies generated from each POST route's OpenAPI schema: its field names with values of any JSON
    type (and some right ones), whole bodies of any JSON, and undecodable bytes. Every answer is a
    2xx or a 4xx naming what is wrong, never a 5xx, and the server answers a valid request after."""
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = requests.get(server + "/openapi.json", timeout=30).json()
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
                               | st.text(max_size=40), lambda inner: st.lists(inner, max_size=4)
                               | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
    for route, ops in schema["paths"].items():
        if "post" not in ops:
            continue
        ref = ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        props = schema["components"]["schemas"][ref]["properties"]
        plausible = {"prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=5),
                     "n": st.integers(-2, 12), "max_tokens": st.integers(-2, 20), "temperature": st.floats(-1, 3),
                     "model": st.sampled_from(["sweetspot", "other"])}
        field_values = {k: (plausible[k] | json_values) if k in plausible else json_values for k in props}
        bodies = st.one_of(st.fixed_dictionaries({}, optional=field_values), json_values,
                           st.binary(max_size=40).map(lambda b: ("raw", b)))

        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies)
        def check(body):
            if isinstance(body, tuple) and body[:1] == ("raw",):
                r = post(server, route, None, body[1])
            else:
                r = requests.post(server + route, data=json.dumps(body), headers={"Content-Type": "application/json"},
                                  timeout=60)
            assert r.status_code < 500, (route, body, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert r.json()["error"]["message"], r.text

        check()
    assert post(server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize("error, detail", [
    ("died", "unavailable: a replica failed while holding this request (ActorDiedError); retry after 2.5 s"),
    ("queue full", "overloaded: Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1). "
                   "Retry after 2.5 s"),
])
def test_a_replica_dying_or_a_full_queue_is_a_503_with_retry_after(error, detail):
    """The ingress's mapping, without timing: a generator call that fails because its replica died
    (ActorDiedError) or its queue is full (BackPressureError: max_queued_requests, the backstop
    behind admission) is a 503 with Retry-After naming what happened; the admitted request is
    counted out."""
    import asyncio
    from types import SimpleNamespace

    from fastapi import HTTPException
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from serve.admission import Admission
    from serve.app import Api, BonRequest

    async def fails(call):
        raise ActorDiedError() if error == "died" else BackPressureError(1, 1)

    api = SimpleNamespace(generator=SimpleNamespace(sample=SimpleNamespace(remote=fails)),
                          scorer=SimpleNamespace(score_samples=None), retry_after_s=2.5, admission=Admission())
    with pytest.raises(HTTPException) as err:
        asyncio.run(Api.scored_samples(api, ["the plot"], BonRequest(prompt="the plot", n=2, max_tokens=4)))
    assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "3"}
    assert err.value.detail == detail
    assert api.admission.in_flight == 0 and api.admission.counts == {"admitted": 1, "failed": 1}


def test_a_request_past_the_admission_bound_is_a_503_at_once_without_a_handle_call():
    """The ingress's mapping of a refusal: 503, Retry-After the expected wait (at least
    retry_after_s), the reason in the body; the generator is never called. The admission section is
    validated by name."""
    import asyncio
    from types import SimpleNamespace

    from fastapi import HTTPException
    from pydantic import ValidationError

    from serve.admission import Admission
    from serve.app import Api, AppArgs, BonRequest

    async def never(call):
        raise AssertionError("a refused request reached the generator")

    t = [0.0]
    admission = Admission(max_wait_s=3, min_in_flight=1, min_completions=1, clock=lambda: t[0])
    admission.enter()
    t[0] = 2.0
    admission.leave(completed=True)  # 0.5 completions per busy second
    admission.enter()  # expected wait of the next: 2 / 0.5 = 4 s > 3 s
    api = SimpleNamespace(generator=SimpleNamespace(sample=SimpleNamespace(remote=never)),
                          scorer=None, retry_after_s=1.0, admission=admission)
    with pytest.raises(HTTPException) as err:
        asyncio.run(Api.scored_samples(api, ["the plot"], BonRequest(prompt="the plot", n=2, max_tokens=4)))
    assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "4"}
    assert err.value.detail == ("overloaded: expected wait 4 s > admission.max_wait_s 3 s (1 requests in flight, "
                                "0.5 completed per second). Retry after 4 s")
    assert admission.in_flight == 1 and admission.counts["refused"] == 1
    assert AppArgs().admission.enabled and AppArgs().admission.max_wait_s == 10 and AppArgs().admission.max_in_flight == 48
    with pytest.raises(ValidationError, match="admission.max_wait_s"):
        AppArgs(admission={"max_wait_s": 0})
    with pytest.raises(ValidationError, match="admission.bound"):
        AppArgs(admission={"bound": 3})
    with pytest.raises(ValidationError, match="min_in_flight: expected at most max_in_flight"):
        AppArgs(admission={"min_in_flight": 64})


def test_generator_replica_killed_under_load_gives_503s_and_the_server_recovers(server):
    """8 clients send requests back to back; once 16 are answered, the generator replica is killed
    (ray.kill: its process ends at once). Every request is answered, 200 or 503 with Retry-After (the
    ones the replica held), none hangs or gets another 5xx; Serve starts a new replica and the server
    answers again within a bounded time, reported here. Last in this module: the replica it kills
    served the tests above."""
    import threading
    import time

    import ray

    from jobs.bench.load_test import serve_replicas

    def replica():
        (r,) = serve_replicas("sweetspot", "GeneratorDeployment")
        return r

    victim = replica()
    body = {"prompt": ["the movie was", "a bad"], "n": 8, "max_tokens": 16, "min_tokens": 16}
    answers, killed_at = [], []
    start = time.perf_counter()

    def client():
        while time.perf_counter() - start < 4:
            sent = time.perf_counter()
            r = post(server, "/v1/bon", body)
            answers.append((sent, time.perf_counter(), r))

    def kill():
        while len(answers) < 16 and time.perf_counter() - start < 3:  # steady state: the generator is busy
            time.sleep(0.01)
        killed_at.append(time.perf_counter())
        ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)

    threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=kill)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    codes = [r.status_code for _, _, r in answers]
    assert set(codes) <= {200, 503}, [(r.status_code, r.text[:300]) for _, _, r in answers if r.status_code not in (200, 503)][:2]
    failed = [r for _, _, r in answers if r.status_code == 503]  # the requests the replica held, if any then
    assert all(r.headers["Retry-After"] == "1" and "replica failed" in r.json()["error"]["message"] for r in failed)
    while not any(sent > killed_at[0] and r.status_code == 200 for sent, _, r in answers):
        assert time.perf_counter() - killed_at[0] < 60, "no answer within 60 s of the kill"
        sent = time.perf_counter()
        answers.append((sent, time.perf_counter(), post(server, "/v1/bon", {"prompt": "the plot", "n": 2, "max_tokens": 4})))
    recovered = min(done for sent, done, r in answers if sent > killed_at[0] and r.status_code == 200) - killed_at[0]
    print(f"\n  replica killed under load: {codes.count(200)} answered 200, {len(failed)} answered 503; "
          f"the first request sent after the kill was answered 200 {recovered:.1f} s after it")
    assert replica()["actor_id"] != victim["actor_id"]


def test_the_door_api_key_and_host_allowlist(tight_server):
    """With an API key, a request without it or with another is a 401 naming Authorization (with
    WWW-Authenticate), before its body is read; a Host outside the allowlist is a 400 naming Host (DNS
    rebinding); /healthz and the page stay open; the official client with the key just works."""
    import openai
    import requests

    body = {"prompt": "a good film", "n": 2, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = requests.post(tight_server + "/v1/bon", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["param"] == "Authorization", (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and KEY not in r.text
    r = requests.post(tight_server + "/v1/bon", data=b"{not json", headers={}, timeout=30)
    assert r.status_code == 401  # refused before the body is read or parsed
    evil = {"Host": "attacker.example:8000", "Authorization": f"Bearer {KEY}"}
    r = requests.post(tight_server + "/v1/bon", json=body, headers=evil, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Host" and "attacker.example" in r.text
    assert requests.get(tight_server + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(tight_server + "/", timeout=10).status_code == 200
    assert post(tight_server, "/v1/bon", body).status_code == 200  # the key, and Host 127.0.0.1
    client = openai.OpenAI(base_url=tight_server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["sweetspot"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tight_server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_the_api_key_comes_from_the_environment_or_a_file_and_is_never_in_the_args(tmp_path, monkeypatch):
    import hashlib

    from align.runtime.config import ConfigError
    from serve.app import Access

    monkeypatch.setenv("MY_KEY", " secret-1 ")
    assert Access(api_key_env="MY_KEY").key_digest() == hashlib.sha256(b"secret-1").hexdigest()
    (tmp_path / "key").write_text("secret-2\nignored\n")
    assert Access(api_key_file=str(tmp_path / "key")).key_digest() == hashlib.sha256(b"secret-2").hexdigest()
    assert Access().key_digest() is None
    for access, field in ((Access(api_key_env="NOT_SET_ANYWHERE"), "access.api_key_env"),
                          (Access(api_key_file=str(tmp_path / "none")), "access.api_key_file"),
                          (Access(api_key_env="MY_KEY", api_key_file=str(tmp_path / "key")), "access.api_key_file")):
        with pytest.raises(ConfigError) as err:
            access.key_digest()
        assert err.value.field == field and "secret" not in str(err.value)


@pytest.fixture(scope="module")
def instruct_server(serving):
    """A third app beside the first: the instruct task's SmolLM2-135M-Instruct with the arithmetic verifier."""
    from ray import serve

    from serve.app import build_app

    url, _ = serving
    serve.run(build_app({"model": "smollm2", "device": "cpu", "reward": {"kind": "arithmetic"},
                         "limits": {"max_n": 8, "max_tokens": 24}, "batching": {"batch_wait_timeout_s": 0.05}}),
              name="instruct", route_prefix="/instruct")
    yield url + "/instruct"
    serve.delete("instruct")


QUESTION = [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "What is 7 * 6? Reply with the number only."}]


def test_chat_completions_through_the_official_client_on_the_instruct_model(instruct_server):
    """n = 2 with best_of = 8 (extra_body): the two best of eight answers by the server's reward, best first,
    each an assistant message stopped at the end of its turn (no template token in it), with its reward;
    logprobs for the returned tokens; the stream adds up to the same answers; bad requests are 4xx by name."""
    from openai import BadRequestError, NotFoundError, OpenAI, UnprocessableEntityError

    client = OpenAI(base_url=instruct_server + "/v1", api_key="unused", max_retries=0)
    ask = dict(model="sweetspot", messages=QUESTION, n=2, max_tokens=24, seed=0, temperature=0.7, extra_body={"best_of": 8})
    out = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    assert out.object == "chat.completion" and [c.index for c in out.choices] == [0, 1]
    rewards = [c.model_extra["reward"] for c in out.choices]
    assert rewards[0] >= rewards[1] and set(rewards) <= {0.0, 1.0}
    for c in out.choices:
        assert c.message.role == "assistant" and "<|im" not in c.message.content and c.finish_reason in ("stop", "length")
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) <= 2 for t in c.logprobs.content)
    assert 8 <= out.usage.completion_tokens <= 8 * 24 and out.usage.prompt_tokens > 20  # the template's tokens count
    stream = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    text, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [text[0], text[1]] == [c.message.content for c in out.choices]
    assert [finish[0], finish[1]] == [c.finish_reason for c in out.choices]
    for bad, field in ((dict(messages=[]), "messages"), (dict(messages=[{"role": "assistant", "content": "hi"}]), r"messages\[0\]\.role"),
                       (dict(messages=[{"role": "robot", "content": "hi"}]), "messages"), (dict(n=3, extra_body={"best_of": 2}), "n"),
                       (dict(max_tokens=25), "max_tokens")):
        with pytest.raises((BadRequestError, UnprocessableEntityError), match=field):
            client.chat.completions.create(**{**ask, "extra_body": {}, "n": 1, **bad})
    with pytest.raises(NotFoundError, match="model"):
        client.chat.completions.create(**{**ask, "model": "gpt-9"})


def test_chat_completions_need_a_model_with_a_chat_template(server):
    r = post(server, "/v1/chat/completions", {"model": "sweetspot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 422 and "messages: a conversation needs a tokenizer with a chat template" in r.json()["error"]["message"]
    assert post(server, "/v1/completions", {"model": "sweetspot", "prompt": "the movie", "max_tokens": 4}).status_code == 200
