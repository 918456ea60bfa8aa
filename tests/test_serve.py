"""The Serve app over real HTTP on loopback (a tiny reference and aligned model, VADER): each route,
best-of-n equal to the argmax of the returned rewards, DeRa at lambda 0 equal to pi_0's own samples,
and bad input answered with a 4xx naming the field while the server keeps serving."""
import json

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def server(ray_session, tiny_lm_dir, tmp_path_factory):
    from ray import serve

    from conftest import free_ports, save_tiny_lm
    from serve.app import build_app

    aligned = save_tiny_lm(tmp_path_factory.mktemp("serve_aligned"), seed=7)
    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(tiny_lm_dir), "aligned": str(aligned), "device": "cpu",
                         "limits": {"max_n": 8, "max_prompts": 4, "max_tokens": 16, "max_prompt_chars": 100,
                                    "max_body_bytes": 2000}}),
              name="sweetspot", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, route, body, raw=None):
    import requests

    if raw is not None:
        return requests.post(url + route, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    return requests.post(url + route, json=body, timeout=60)


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


def test_dera_at_lambda_0_is_pi0(server, tiny_lm_dir):
    from actors.generator import Generator

    body = {"prompt": "the plot", "lambda": 0.0, "n": 3, "max_tokens": 6, "min_tokens": 6, "return_all": True, "seed": 2}
    r = post(server, "/v1/dera", body)
    assert r.status_code == 200, r.text
    got = [s["completion"] for s in r.json()["results"][0]["samples"]]
    want = Generator(str(tiny_lm_dir), device="cpu").sample(["the plot"], 3, 6, min_new_tokens=6, seed=2)["samples"][0]
    assert got == want.completions and r.json()["results"][0]["lambda"] == 0.0


@pytest.mark.parametrize("route, body, raw, field", [
    ("/v1/bon", {"prompt": "a", "n": 0}, None, "n"),
    ("/v1/bon", {"prompt": "a", "n": 9}, None, "n"),
    ("/v1/bon", {"prompt": "a", "max_tokens": 17}, None, "max_tokens"),
    ("/v1/bon", {"prompt": "   "}, None, "prompt"),
    ("/v1/bon", {"prompt": ["a"] * 5}, None, "prompt"),
    ("/v1/bon", {"prompt": "x" * 101}, None, "prompt"),
    ("/v1/bon", {"prompt": "a", "temperature": 0}, None, "temperature"),
    ("/v1/bon", {"prompt": "a", "n": "two"}, None, "n"),
    ("/v1/bon", {"prompt": "a", "penalty": "laplace"}, None, "penalty"),
    ("/v1/bon", {"prompt": "a", "selection": "best"}, None, "selection"),
    ("/v1/bon", {"n": 2}, None, "prompt"),
    ("/v1/bon", {"prompt": "a", "top_p": 0.9}, None, "top_p"),
    ("/v1/dera", {"prompt": "a", "lambda": -1}, None, "lambda"),
    ("/v1/bon", None, b"{not json", None),
    ("/v1/bon", None, b'{"prompt": "' + b"x" * 3000 + b'"}', "body"),
    ("/v1/bon", None, b"\xff\xfe\x00", None),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server, route, body, raw, field):
    if body is not None:
        body = {"max_tokens": 4, **body}  # within the server's limit unless the case is about it
    r = post(server, route, body, raw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if field is not None:
        assert field in json.dumps(r.json()), r.text
    ok = post(server, "/v1/bon", {"prompt": "a good film", "n": 2, "max_tokens": 4})
    assert ok.status_code == 200


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


def test_cut_at_stop():
    from serve.app import cut_at_stop

    assert cut_at_stop("good film. bad end", [".", " bad"]) == ("good film", True)
    assert cut_at_stop("good film", ["!"]) == ("good film", False) and cut_at_stop("abc", []) == ("abc", False)
