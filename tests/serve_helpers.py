"""What the reward-server tests share: a tiny checkpoint, uvicorn in a thread on a loopback socket, a JSON poster
and a /metrics reader (fixtures are re-exported by the test modules that use them)."""

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from fastrm.loading import load_model, load_tokenizer
from fastrm.scoring import score
from fastrm.serve import RewardService, listen
from fastrm.serve_app import create_app
from fastrm.synthetic import byte_tokenizer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
MAX_LENGTH = 64  # small, so that truncation is easy to reach
LIMITS = dict(
    max_length=MAX_LENGTH,
    max_batch_tokens=512,
    max_wait_ms=20,
    max_responses=64,
    max_request_tokens=2048,
    max_body_bytes=65536,
    body_timeout_s=2.0,
)
TOL = 1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = byte_tokenizer()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("serve") / "rm"
    load_model("tiny-llama", tokenizer=tok).save_pretrained(path, tokenizer=tok)
    return path


@pytest.fixture(scope="module")
def offline(ckpt):
    """Offline scoring of the same checkpoint, as a user would: ``score(model, prompts, responses)``."""
    model, tok = load_model(ckpt).eval(), load_tokenizer(None, ckpt)
    return lambda prompts, responses: score(model, prompts, responses, tokenizer=tok, max_length=MAX_LENGTH)


class ServerThread:
    """uvicorn in a background thread on an already-listening loopback socket (clients may connect at once)."""

    def __init__(self, service: RewardService):
        self.service = service
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"


def post(server, path: str, body, headers=AUTH, content_type=JSON, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={**content_type, **headers}, timeout=60, **kw)


def close(got, want) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= TOL for a, b in zip(got, want))


def metrics(server) -> dict[str, float]:
    """The server's /metrics as {series (name and labels): value}."""
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(condition, what: str, timeout_s: float = 60) -> None:
    """Poll ``condition()`` until it holds (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
