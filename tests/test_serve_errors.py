"""The reward server's edges over real HTTP: auth (scheme, UTF-8 keys, docs behind the key), Content-Type, a body
that never arrives, a 500 that tells the client only a request id, 4xx logged on the server, and a client that
leaves while its request is in the model: the rest of its work is never scored (checked in /metrics)."""

import base64
import json
import logging
import socket
import threading

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest_plugins = ["serve_helpers"]  # the ckpt fixture
pytest.register_assert_rewrite("serve_helpers")

from serve_helpers import AUTH, KEY, LIMITS, ServerThread, metrics, post, wait_for  # noqa: E402

from fastrm.serve import RewardService, ServeConfig  # noqa: E402

GOOD = {"prompts": ["Q?"], "responses": [[" yes"]]}
UNICODE_KEY = "clé-secrète-ñ"  # latin-1 encodable on purpose: those bytes must not match


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerThread(RewardService.load(ServeConfig(model=str(ckpt), api_key=KEY, **LIMITS)))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def unicode_server(ckpt):
    srv = ServerThread(RewardService.load(ServeConfig(model=str(ckpt), api_key=UNICODE_KEY, **LIMITS)))
    try:
        yield srv
    finally:
        srv.stop()


def raw_post(server, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A POST sent on a plain socket, so the test decides when (and whether) the rest arrives."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    return s


def test_keys_are_utf8_bytes_the_scheme_any_case_and_basic_auth_works(unicode_server):
    key = UNICODE_KEY.encode("utf-8")
    ok = [
        b"Bearer " + key,
        b"bearer " + key,
        b"BEARER  " + key,
        b"Basic " + base64.b64encode(b"any-user:" + key),
    ]
    bad = [
        b"Bearer " + UNICODE_KEY.encode("latin-1"),
        b"Bearer " + key[:-1],
        b"Token " + key,
        b"Basic !!!not-base64",
        b"Basic " + base64.b64encode(key),  # no "user:" part: the password is empty
    ]
    for header in ok:
        r = post(unicode_server, "/score", GOOD, headers={"Authorization": header})
        assert r.status_code == 200, (header, r.text)
    for header in bad:
        r = post(unicode_server, "/score", GOOD, headers={"Authorization": header})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", header
        assert r.json()["field"] == "authorization"


def test_docs_and_the_spec_are_behind_the_key_and_declare_the_bodies(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path  # a browser asks
        assert httpx.get(server.url + path, headers=AUTH, timeout=30).status_code == 200, path
    basic = {"Authorization": "Basic " + base64.b64encode(f"me:{KEY}".encode()).decode()}
    assert "swagger" in httpx.get(server.url + "/docs", headers=basic, timeout=30).text.lower()
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH, timeout=30).json()
    required = {"/score": ["prompts", "responses"], "/get_reward": ["query"], "/classify": ["input"]}
    for path, fields in required.items():
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert op["requestBody"]["required"] and body["required"] == fields and set(fields) <= set(body["properties"])
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].startswith("#/components")
        assert {"400", "401", "408", "413", "415", "500"} <= set(op["responses"])
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["paths"]["/health"]["get"]["security"] == []  # open, and says so


def test_content_type_must_be_json(server):
    for ctype, status in [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),  # curl -d without -H
        ({}, 415),
        ({"Content-Type": "Application/JSON; charset=utf-8"}, 200),
    ]:
        r = post(server, "/score", GOOD, content_type=ctype)
        assert r.status_code == status, (ctype, r.text)
        if status == 415:
            assert r.json()["field"] == "content-type" and "application/json" in r.json()["error"]


def test_a_body_that_does_not_arrive_gets_408_and_others_are_served_meanwhile(server):
    s = raw_post(server, "/score", b'{"prompts": ["Q', length=100)  # 16 of 100 bytes, then nothing
    try:
        assert post(server, "/score", GOOD).status_code == 200  # not blocked by the slow client
        reply = s.recv(65536).decode()
    finally:
        s.close()
    assert reply.startswith("HTTP/1.1 408"), reply[:200]
    assert '"field":"body"' in reply and "--body-timeout-s" in reply


def test_a_500_carries_only_a_request_id_and_the_log_has_the_details(server, caplog):
    batcher = server.service.batcher
    real = batcher.score_fn

    def broken(prompts, responses):
        raise RuntimeError("secret detail: /private/weights/path")

    caplog.set_level(logging.INFO, logger="fastrm.serve")
    batcher.score_fn = broken
    try:
        r = post(server, "/score", GOOD, headers={**AUTH, "X-Request-ID": "trace-42"})
    finally:
        batcher.score_fn = real
    assert r.status_code == 500 and r.headers["x-request-id"] == "trace-42"
    assert r.json() == {
        "error": "internal error (request id trace-42; the details are in the server log)",
        "field": None,
        "request_id": "trace-42",
    }
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR and "trace-42" in rec.getMessage()]
    assert len(errors) == 1 and "secret detail" in str(errors[0].exc_info[1])
    assert post(server, "/score", GOOD).status_code == 200


def test_a_4xx_is_logged_on_the_server_with_its_field(server, caplog):
    caplog.set_level(logging.INFO, logger="fastrm.serve")
    r = post(server, "/get_reward", {"query": ["Q? a", 7]}, headers={**AUTH, "X-Request-ID": "bad-7"})
    assert r.status_code == 400 and r.json()["field"] == "query[1]"
    logged = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any("/get_reward -> 400" in m and "query[1]" in m and "bad-7" in m for m in logged), logged
    bad_id = post(server, "/score", GOOD, headers={**AUTH, "X-Request-ID": "no spaces; allowed"})
    assert bad_id.status_code == 200 and bad_id.headers["x-request-id"] != "no spaces; allowed"


def test_unknown_paths_and_methods_get_the_error_body(server):
    r = httpx.get(server.url + "/nope", headers=AUTH, timeout=30)
    assert r.status_code == 404 and set(r.json()) == {"error", "field", "request_id"}
    assert httpx.get(server.url + "/score", headers=AUTH, timeout=30).status_code == 405


def test_a_client_that_leaves_has_its_remaining_work_dropped_not_scored(server, caplog):
    """30 responses of ~50 tokens under a 512-token budget: 3 micro-batches. The client disconnects while the first
    is in the model: the other two are never scored, /metrics counts them as abandoned and the request as 499."""
    batcher = server.service.batcher
    real = batcher.score_fn
    entered, release = threading.Event(), threading.Event()

    def held(prompts, responses):
        entered.set()
        assert release.wait(60)
        return real(prompts, responses)

    caplog.set_level(logging.INFO, logger="fastrm.serve")
    body = {"prompts": ["Q: pick one\nA:"], "responses": [[f" answer {i:02d} " + "x" * 38 for i in range(30)]]}
    before = metrics(server)
    batcher.score_fn = held
    try:
        s = raw_post(server, "/score", json.dumps(body).encode())
        assert entered.wait(60), "the request never reached the model"
        s.close()  # the client goes away while its first micro-batch runs
        gone = 'fastrm_requests_total{endpoint="/score",status="499"}'
        wait_for(lambda: metrics(server).get(gone, 0) == before.get(gone, 0) + 1, "the server to see the disconnect")
    finally:
        release.set()
        batcher.score_fn = real
    wait_for(
        lambda: metrics(server)["fastrm_abandoned_responses_total"] > before["fastrm_abandoned_responses_total"],
        "the drop",
    )
    assert post(server, "/score", GOOD).status_code == 200  # and it keeps serving
    after = metrics(server)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    # one model call (the micro-batch already running) plus the GOOD request's; nothing else of the 30 was scored
    assert delta["fastrm_batch_responses_count"] == 2
    scored = delta["fastrm_batch_responses_sum"] - 1
    assert 0 < scored < 30 and delta["fastrm_abandoned_responses_total"] == 30 - scored
    assert delta.get('fastrm_requests_total{endpoint="/score",status="500"}', 0) == 0
    left = [r for r in caplog.records if "left before its answer" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
