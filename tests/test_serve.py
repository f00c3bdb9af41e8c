"""The reward server over real HTTP on a free loopback port: rewards equal offline ``fastrm.score`` (every endpoint),
concurrent clients get their own answers, bad requests get a 4xx naming the field and the server keeps serving."""

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest_plugins = ["serve_helpers"]  # the ckpt and offline fixtures
pytest.register_assert_rewrite("serve_helpers")

from serve_helpers import AUTH, JSON, KEY, LIMITS, TOL, ServerThread, close, post  # noqa: E402

from fastrm import cli  # noqa: E402
from fastrm.serve import RewardService, ServeConfig  # noqa: E402
from fastrm.synthetic import byte_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerThread(RewardService.load(ServeConfig(model=str(ckpt), api_key=KEY, **LIMITS)))
    try:
        yield srv
    finally:
        srv.stop()


PROMPTS = ["Say something about Ada.\n", "", "Q?", "x" * 100]
RESPONSES = [[" Ada is kind.", " Ada is rude.", " Ada? Always so warm."], [" no prompt"], [" yes"], [" long prompt"]]


def test_score_equals_offline_score_and_reports_truncation(server, offline):
    r = post(server, "/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert r.status_code == 200, r.text
    got, want = r.json()["rewards"], offline(PROMPTS, RESPONSES)
    assert [len(g) for g in got] == [3, 1, 1, 1]
    assert all(close(g, w) for g, w in zip(got, want)), (got, want)
    # only the 100-character prompt is over MAX_LENGTH: its left end was cut, as in training
    assert r.json()["truncated"] == [[False] * 3, [False], [False], [True]]
    short = post(server, "/score", {"prompts": ["Q?"], "responses": [[" yes"]]}).json()
    assert "truncated" not in short and close(short["rewards"][0], want[2])


def test_get_reward_with_prompts_equals_offline_score(server, offline):
    eos = byte_tokenizer().eos_token
    pairs = [("Q: hi\nA:", " yes"), ("Q: hi\nA:", " no"), ("Tell me.\n", " A story." + eos), ("P", " other")]
    queries = [p + r for p, r in pairs]
    prompts = [p for p, _ in pairs[:3]] + ["not a prefix of its query"]
    body = {"query": queries, "prompts": prompts, "labels": [""] * 4}  # as OpenRLHF's agent sends it
    r = post(server, "/get_reward", body)
    assert r.status_code == 200, r.text
    out = r.json()
    # OpenRLHF reads rewards, scores (falls back to rewards) and extra_logs; "split" says the last query did not
    # start with its prompt, so it was tokenized whole
    assert set(out) == {"rewards", "scores", "extra_logs", "split"} and out["scores"] == out["rewards"]
    assert out["split"] == ["prompt", "prompt", "prompt", "whole"]
    want = [offline(p, [r.removesuffix(eos)])[0] for p, r in pairs[:3]] + offline("", [queries[3]])
    assert close(out["rewards"], want), (out["rewards"], want)
    r = post(server, "/get_reward", {"query": queries[:3], "prompts": prompts[:3]})
    assert "split" not in r.json() and close(r.json()["rewards"], want[:3])


def test_queries_without_prompts_are_split_as_training_splits_rows_without_one(server, offline):
    """An HH-RLHF transcript is split at its last "\n\nAssistant:" (as training does); other text is one sequence.
    /get_reward without prompts and vLLM's /classify (what verl calls) agree with offline scoring of that split."""
    hh = [
        ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?", "\n\nAssistant:", " yes"),
        ("\n\nHuman: x", "\n\nAssistant:", " y"),
    ]
    texts = [a + b + c for a, b, c in hh] + ["no marker here"]
    want = [offline(a + b, [c])[0] for a, b, c in hh] + offline("", [texts[2]])
    out = post(server, "/get_reward", {"query": texts}).json()
    assert out["split"] == ["assistant_marker", "assistant_marker", "whole"]
    assert close(out["rewards"], want), (out["rewards"], want)
    raw = post(server, "/classify", {"model": "rm", "input": texts, "activation": False}).json()
    assert [d["index"] for d in raw["data"]] == [0, 1, 2] and raw["model"] == "rm" and raw["object"] == "list"
    assert close([d["probs"][0] for d in raw["data"]], want) and raw["split"] == out["split"]
    assert raw["usage"]["prompt_tokens"] == raw["usage"]["total_tokens"] > sum(map(len, texts))  # + EOS each
    # vLLM's default (activation on): the sigmoid of the reward; a single string input is one item
    squashed = post(server, "/classify", {"input": texts[0]}).json()["data"]
    assert len(squashed) == 1 and abs(squashed[0]["probs"][0] - 1 / (1 + math.exp(-want[0]))) < TOL


def test_get_reward_without_prompts_equals_whole_query_scoring(server, offline):
    # shared prefixes are found in the tokens and scored once; the result equals scoring each text whole
    queries = [f"System: be nice.\nUser: hello {i}\nAssistant: reply {j}" for i in range(3) for j in range(3)]
    queries += ["unrelated", "x" * 100]
    r = post(server, "/get_reward", {"query": queries})
    assert r.status_code == 200, r.text
    want = [offline("", [q])[0] for q in queries]
    assert close(r.json()["rewards"], want)
    assert r.json()["truncated"] == [False] * 10 + [True] and r.json()["split"] == ["whole"] * 11


def test_32_concurrent_clients_get_their_own_answers(server, offline):
    n = 40
    bodies = []
    for i in range(n):
        if i % 2:  # /score, some prompts shared across requests (merged into one group by the batcher)
            bodies.append(("/score", {"prompts": [f"Q{i % 3}?"], "responses": [[f" a{i}", f" b{i}" * (i % 4 + 1)]]}))
        else:
            bodies.append(("/get_reward", {"query": [f"Q{i % 3}? r{i}"], "prompts": [f"Q{i % 3}?"]}))

    async def run():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in bodies))

    answers = asyncio.run(run())
    for (path, body), resp in zip(bodies, answers):
        assert resp.status_code == 200, resp.text
        if path == "/score":
            assert close(resp.json()["rewards"][0], offline(body["prompts"], body["responses"])[0])
        else:
            p = body["prompts"][0]
            assert close(resp.json()["rewards"], offline(p, [body["query"][0][len(p) :]]))


GOOD = {"prompts": ["Q?"], "responses": [[" yes"]]}
BAD = [  # (endpoint, body, status, field)
    ("/score", b"{not json", 400, "body"),
    ("/score", [1, 2], 400, "body"),
    ("/score", {"responses": [[" a"]]}, 400, "prompts"),
    ("/score", {"prompts": "Q?", "responses": [[" a"]]}, 400, "prompts"),
    ("/score", {"prompts": ["Q?"]}, 400, "responses"),
    ("/score", {"prompts": ["Q?", 3], "responses": [[" a"], [" b"]]}, 400, "prompts[1]"),
    ("/score", {"prompts": ["Q?"], "responses": [[]]}, 400, "responses[0]"),
    ("/score", {"prompts": ["Q?"], "responses": [[" a", 3]]}, 400, "responses[0][1]"),
    ("/score", {"prompts": ["Q?"], "responses": [["  "]]}, 400, "responses[0][0]"),
    ("/score", {"prompts": ["Q?"], "responses": [[" a"], [" b"]]}, 400, "responses"),
    ("/score", {"prompts": [], "responses": []}, 400, "prompts"),
    ("/score", {"prompts": ["Q?"], "responses": [[" a"] * 65]}, 413, "responses"),
    ("/score", {"prompts": ["Q?"], "responses": [["x" * 70000]]}, 413, "body"),
    ("/get_reward", {"prompts": ["Q?"]}, 400, "query"),
    ("/get_reward", {"query": "Q? a"}, 400, "query"),
    ("/get_reward", {"query": ["Q? a", 7]}, 400, "query[1]"),
    ("/get_reward", {"query": [""]}, 400, "query[0]"),
    ("/get_reward", {"query": ["Q? a"], "prompts": ["Q?", "R?"]}, 400, "prompts"),
    ("/get_reward", {"query": ["Q? a"], "prompts": [5]}, 400, "prompts[0]"),
    ("/get_reward", {"query": ["Q? a"] * 65}, 413, "query"),
    # invalid Unicode (a lone surrogate: json.loads accepts it, no tokenizer can encode it), named by field
    ("/score", b'{"prompts": ["Q?"], "responses": [[" a\\ud800"]]}', 400, "responses[0][0]"),
    ("/get_reward", b'{"query": ["\\udfff"]}', 400, "query[0]"),
    ("/score", b'{"prompts": ["Q?"], "responses": [[" \xff"]]}', 400, "body"),  # not UTF-8
    # nested too deep: a 400, not a RecursionError
    (
        "/score",
        b'{"prompts": ["Q?"], "responses": [[" a"]], "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        400,
        "body",
    ),
    ("/get_reward", {"query": ["Q? a"], "labels": [[[[["deep", {"ok": 1}]]]]]}, 200, None),  # labels: ignored
    ("/score", {"prompts": ["Q?"], "responses": [["x" * 60 + str(i) for i in range(40)]]}, 413, "responses"),  # tokens
    ("/classify", {"model": "m"}, 400, "input"),
    ("/classify", {"input": [3]}, 400, "input[0]"),
    ("/classify", {"input": []}, 400, "input"),
    ("/classify", {"input": "Q? a", "add_special_tokens": True}, 400, "add_special_tokens"),
    ("/classify", {"input": "Q? a", "use_activation": "no"}, 400, "use_activation"),
]


@pytest.mark.parametrize("endpoint, body, status, field", BAD, ids=[f"{e}-{f}-{s}" for e, _, s, f in BAD])
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server, endpoint, body, status, field):
    r = post(server, endpoint, body)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["field"] == field and r.json()["error"] and r.json()["request_id"] == r.headers["x-request-id"]
    assert post(server, "/score", GOOD).status_code == 200


def test_a_streamed_body_over_the_limit_is_refused_while_reading(server):
    chunks = (b" " * 8192 for _ in range(10))  # no Content-Length: chunked transfer, 80 KiB > 64 KiB
    r = httpx.post(server.url + "/score", content=chunks, headers={**AUTH, **JSON}, timeout=60)
    assert r.status_code == 413 and r.json()["field"] == "body"
    assert post(server, "/score", GOOD).status_code == 200


def test_bearer_token_health_and_metrics(server):
    assert post(server, "/score", GOOD, headers={}).status_code == 401
    assert post(server, "/get_reward", {"query": ["a"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
    # no token: the status only, for load balancers; with it, the details too
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    assert set(httpx.get(server.url + "/health", headers=AUTH, timeout=10).json()) == {
        "status",
        "model",
        "device",
        "scoring_rule",
        "scoring",
        "uptime_s",
    }
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    for name in ("fastrm_requests_total", "fastrm_responses_total", "fastrm_responses_per_second"):
        assert name in text
    for name in ("fastrm_request_latency_seconds", "fastrm_batch_requests", "fastrm_batch_tokens"):
        assert f"{name}_bucket" in text
    assert 'fastrm_requests_total{endpoint="/score",status="401"}' in text


def test_non_loopback_host_needs_an_api_key(ckpt, capsys, monkeypatch):
    monkeypatch.delenv("FASTRM_API_KEY", raising=False)
    assert cli.main(["serve", "--model", str(ckpt), "--host", "0.0.0.0"]) == 1
    assert "--api-key" in capsys.readouterr().err


def test_fastrm_serve_command_answers_the_readme_curl(ckpt, offline):
    """`fastrm serve --model DIR` as a user runs it (a subprocess), then the README's request."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "fastrm.cli", "serve", "--model", str(ckpt), "--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)
        assert line and "listening on http://127.0.0.1:" in line[0], (line, proc.poll())
        url = line[0].split("listening on ")[1].split()[0]
        body = {"prompts": ["What is 2+2?"], "responses": [[" 4", " 5"]]}
        r = httpx.post(url + "/score", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert close(r.json()["rewards"][0], offline(body["prompts"], body["responses"])[0])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_load_test_smoke(tmp_path):
    """benchmarks/bench_serve.py still runs: fastrm serve and both baselines, both traffic shapes, the head-of-line
    test (tiny settings: its numbers are not checked, its consistency is: the three servers agree on rewards)."""
    out = tmp_path / "serve.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    p = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    for shape in ("rollout", "single"):
        for server in ("fastrm", "naive", "openrlhf"):
            runs = res["levels"][shape][server]
            assert [r["clients"] for r in runs] == [1, 4]
            assert all(r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] > 0 for r in runs), (shape, server)
        assert set(res["ratios"][shape]["4"]) == {"vs_naive", "vs_openrlhf"}
    assert set(res["head_of_line"]) == {"fastrm", "naive", "openrlhf"}
    assert 0 <= res["head_of_line"]["fastrm"]["departed_large_responses_scored"] <= 16
    assert res["max_abs_reward_diff_across_servers_and_levels"] <= 1e-4 and res["meta"]["load_average_at_start"]
    assert (
        "| rollout | 4 |"
        in subprocess.run(
            [sys.executable, str(script), "--table", str(out)], capture_output=True, text=True, check=True
        ).stdout
    )
