"""``fastrm serve``: a reward-model HTTP server with fair dynamic batching and shared-prompt scoring.

The service behind one ASGI app (FastAPI, :mod:`fastrm.serve_app`, whose ``main`` runs it with uvicorn), also run by
Ray Serve in :mod:`fastrm.ray_serve`:

* ``POST /score`` ``{"prompts": [str], "responses": [[str]]}`` -> ``{"rewards": [[float]]}``;
* ``POST /get_reward`` (OpenRLHF's remote reward model) ``{"query": [str], "prompts": [str]?, "labels": ...?}``
  -> ``{"rewards": [float], "scores": [float], "extra_logs": {}}``;
* ``POST /classify`` (vLLM's classification API, which verl calls) ``{"input": [str]}`` -> ``{"data": [{"probs":
  [float]}, ...], ...}``;
* ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``, ``/docs``, ``/redoc``.

The bodies are the pydantic models of :mod:`fastrm.serve_schema`; texts become token groups in
:mod:`fastrm.serve_requests` (the training rule: same rewards as offline :func:`fastrm.score`); concurrent requests
are merged into fair token-budget micro-batches by :mod:`fastrm.batching`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # an optional extra: say how to get it instead of a bare ModuleNotFoundError
    raise ImportError(f"fastrm serve needs FastAPI and uvicorn: pip install 'fastrm[serve]' ({e})") from e

from fastrm.batching import BatcherClosed, BatchStats, DynamicBatcher
from fastrm.formatting import ScoringRule, add_rule_flags, refuse_rule_settings, resolve_rule
from fastrm.serve_requests import Limits, Prepared, prepare_classify, prepare_get_reward, prepare_score
from fastrm.serve_schema import BadRequest, ClassifyRequest, GetRewardRequest, ScoreRequest, parse_body

__all__ = ["BatcherClosed", "RewardService", "ServeConfig", "ServerMetrics"]

logger = logging.getLogger("fastrm.serve")

API_KEY_ENV = "FASTRM_API_KEY"
REQUEST_TOKENS_PER_BATCH = 16  # default --max-request-tokens: this many micro-batches of --max-batch-tokens
BODY_BYTES_PER_TOKEN = 32  # default --max-body-bytes per allowed token (JSON escapes, /get_reward's repeated prompt)
INLINE_BODY_BYTES = 32 * 1024  # bodies up to this are parsed and tokenized in the event loop (about a millisecond)


@dataclass
class ServeConfig:
    """What a server (or each Ray Serve replica) loads and how it batches; the flags of ``fastrm serve``.

    The per-request limits follow the token budget unless set: ``max_request_tokens`` = 16 micro-batches of
    ``max_batch_tokens`` (a request holds the model for at most that many, and shares it with other requests
    meanwhile), ``max_body_bytes`` = 32 bytes per such token."""

    model: str
    tokenizer: str | None = None  # default: the model folder's
    max_length: int | None = None  # default: the checkpoint's scoring record (prompt cut from the left)
    scoring_rule: str = "auto"  # auto | fastrm | hf (fastrm/formatting.py); /health says which
    append_eos: bool | None = None  # default: the checkpoint's scoring record
    max_batch_tokens: int = 16384  # token budget of one model call (one micro-batch)
    max_wait_ms: float = 5.0  # how long a batch may wait for requests still being read/tokenized
    max_responses: int = 4096  # per request
    max_request_tokens: int | None = None  # per request, after tokenization (default: 16 * max_batch_tokens)
    max_body_bytes: int | None = None  # per request (default: 32 * max_request_tokens)
    body_timeout_s: float = 30.0  # a body not received within this is refused (408): slow clients hold no slot
    prefix_sharing: bool = True  # a prompt's responses as one shared-prompt segment (prompt computed once)
    api_key: str | None = None  # bearer token required on every endpoint; /health then shows only its status
    device: str = "auto"  # auto: cuda when available
    threads: int | None = None  # torch CPU threads of the process (None: torch's default)

    def __post_init__(self) -> None:
        if self.max_request_tokens is None:
            self.max_request_tokens = REQUEST_TOKENS_PER_BATCH * self.max_batch_tokens
        if self.max_body_bytes is None:
            self.max_body_bytes = BODY_BYTES_PER_TOKEN * self.max_request_tokens
        if self.max_length is not None:
            self.check_length(self.max_length)
        if self.max_responses < 1 or self.max_body_bytes < 1 or self.max_wait_ms < 0 or self.body_timeout_s <= 0:
            raise ValueError(
                "--max-responses and --max-body-bytes must be >= 1, --max-wait-ms >= 0 and --body-timeout-s > 0"
            )

    def check_length(self, max_length: int) -> None:
        """Every sequence of ``max_length`` tokens must fit one batch and one request."""
        if max_length < 1 or max_length > self.max_batch_tokens:
            raise ValueError(
                f"--max-length ({max_length}) must be between 1 and --max-batch-tokens ({self.max_batch_tokens}): "
                "every sequence must fit one batch"
            )
        if self.max_request_tokens < max_length:
            raise ValueError(
                f"--max-request-tokens ({self.max_request_tokens}) must be at least --max-length ({max_length}): "
                "a request of one full-length sequence must be accepted"
            )

    def limits(self, rule: ScoringRule) -> Limits:
        """The per-request limits under ``rule`` (its max_length, checked against the token budgets)."""
        self.check_length(rule.max_length)
        layout = "shared_prompt" if self.prefix_sharing else "separate"
        return Limits(rule.max_length, self.max_responses, self.max_request_tokens, layout, rule)


class ServerMetrics:
    """Prometheus metrics of one server process (its own registry, so several apps can live in one process)."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    SIZE_BUCKETS = tuple(2**k for k in range(13))  # 1 .. 4096
    TOKEN_BUCKETS = tuple(2**k for k in range(6, 19))  # 64 .. 262144
    RATE_WINDOW_S = 60.0

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "fastrm_requests",
            "HTTP requests (status 499: the client left before the answer)",
            ["endpoint", "status"],
            registry=r,
        )
        self.responses = Counter("fastrm_responses", "responses (prompt + response sequences) answered", registry=r)
        self.truncated = Counter("fastrm_truncated_responses", "responses that lost tokens to --max-length", registry=r)
        self.abandoned = Counter(
            "fastrm_abandoned_responses", "queued responses dropped unscored because their client left", registry=r
        )
        self.split = Counter(
            "fastrm_query_split", "queries by how they were split into prompt + response", ["rule"], registry=r
        )
        self.latency = Histogram(
            "fastrm_request_latency_seconds", "request latency", ["endpoint"], buckets=self.LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "fastrm_queue_wait_seconds", "arrival to first micro-batch", buckets=self.LATENCY_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "fastrm_model_seconds", "seconds per model call", buckets=self.LATENCY_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "fastrm_batch_requests", "requests sharing one model call", buckets=self.SIZE_BUCKETS, registry=r
        )
        self.batch_responses = Histogram(
            "fastrm_batch_responses",
            "responses per model call (sum: responses scored)",
            buckets=self.SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "fastrm_batch_tokens", "packed tokens per model call", buckets=self.TOKEN_BUCKETS, registry=r
        )
        self.queued_requests = Gauge("fastrm_queued_requests", "requests with responses waiting", registry=r)
        self.queued_tokens = Gauge("fastrm_queued_tokens", "tokens waiting to be scored (estimate)", registry=r)
        self._recent: deque[tuple[float, int]] = deque()  # (time, responses) of recent batches
        rate = Gauge("fastrm_responses_per_second", "responses scored per second over the last 60 s", registry=r)
        rate.set_function(self.responses_per_second)

    def watch(self, batcher: DynamicBatcher) -> None:
        """Report the batcher's queue in the queue gauges."""
        self.queued_requests.set_function(lambda: batcher.queued_requests)
        self.queued_tokens.set_function(lambda: batcher.queued_tokens)

    def responses_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / self.RATE_WINDOW_S

    def observe_request(self, endpoint: str, status: int, seconds: float, responses: int, truncated: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.responses.inc(responses)
        self.truncated.inc(truncated)

    def observe_abandoned(self, n: int) -> None:
        self.abandoned.inc(n)

    def observe_split(self, rules: list[str]) -> None:
        for rule in set(rules):
            self.split.labels(rule).inc(rules.count(rule))

    def observe_batch(self, s: BatchStats) -> None:
        self._recent.append((time.monotonic(), s.responses))
        self.batch_requests.observe(s.requests)
        self.batch_responses.observe(s.responses)
        self.batch_tokens.observe(s.tokens)
        self.model_seconds.observe(s.seconds)
        for q in s.queue_seconds:
            self.queue_wait.observe(q)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RewardService:
    """The model, its tokenizer and the batcher behind the HTTP endpoints (no HTTP here).

    Each endpoint method takes the request body (JSON bytes or a parsed dict) and returns the answer as a dict;
    bad input raises :class:`fastrm.serve_schema.BadRequest`.

    >>> service = RewardService.load(ServeConfig(model="runs/demo"))
    >>> await service.score({"prompts": ["Q?"], "responses": [[" yes", " no"]]})   # -> {"rewards": [[r, r]]}
    """

    def __init__(self, model, tokenizer, config: ServeConfig, metrics: ServerMetrics | None = None):
        from fastrm.scoring import score_token_groups
        from fastrm.seq2seq_rewards import is_seq2seq

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.seq2seq = None
        if is_seq2seq(model):  # token rewards; /score and /get_reward answer sequence scores (fastrm/serve_seq2seq.py)
            from fastrm import serve_seq2seq

            refuse_rule_settings(config.scoring_rule, config.max_length, config.append_eos)
            self.rule = serve_seq2seq.scoring_rule(model)
            self.seq2seq = serve_seq2seq.Seq2SeqEndpoints(self)
        else:
            self.rule = resolve_rule(
                model, tokenizer, config.scoring_rule, max_length=config.max_length, append_eos=config.append_eos
            )
        self.limits = config.limits(self.rule)
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.started = time.time()

        def score_fn(prompts, responses):
            return score_token_groups(
                self.model,
                prompts,
                responses,
                max_tokens_per_batch=config.max_batch_tokens,
                prefix_sharing=config.prefix_sharing,
            )

        self.batcher = DynamicBatcher(
            score_fn,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_ms=config.max_wait_ms,
            layout=self.limits.layout,
            on_batch=self.metrics.observe_batch,
            on_abandon=self.metrics.observe_abandoned,
        )
        self.metrics.watch(self.batcher)
        # warm-up: the first forward pays one-off initialisation, not a client
        self.seq2seq.warm_up() if self.seq2seq is not None else score_fn([[1, 2]], [[[3, 4]]])

    @classmethod
    def load(cls, config: ServeConfig, metrics: ServerMetrics | None = None) -> "RewardService":
        import torch

        from fastrm.loading import load_model, load_tokenizer

        if config.threads:
            # On a CPU shared with the event loop (and other processes), fewer OpenMP threads than cores avoids
            # threads spinning on each other: 2 threads on a busy 2-core machine ran a tiny model 30x slower than 1.
            torch.set_num_threads(config.threads)
        tok = load_tokenizer(config.tokenizer, config.model)
        model = load_model(config.model, tokenizer=tok)
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tok, config, metrics)

    async def _rewards(self, body: bytes | dict, model, prepare) -> tuple[Any, Prepared, list[list[float]]]:
        """Parse, validate and tokenize, then score. A big body is prepared in a thread (it would stall the event
        loop); a small one at once (a thread hop costs more than its work on a busy CPU)."""

        def parse_and_prepare():
            req = parse_body(body, model)
            return req, prepare(self.tokenizer, req, self.limits)

        if isinstance(body, dict) or len(body) <= INLINE_BODY_BYTES:
            req, prepared = parse_and_prepare()
        else:
            with self.batcher.arriving():
                req, prepared = await asyncio.to_thread(parse_and_prepare)
        if prepared.split is not None:
            self.metrics.observe_split(prepared.split)
        return req, prepared, await self.batcher.submit(prepared.groups)

    async def score(self, body: bytes | dict) -> dict:
        if self.seq2seq is not None:
            return await self.seq2seq.score(body)
        _, prepared, rewards = await self._rewards(body, ScoreRequest, prepare_score)
        out: dict[str, Any] = {"rewards": rewards}
        if any(map(any, prepared.truncated)):
            out["truncated"] = prepared.truncated
        return out

    async def token_rewards(self, body: bytes | dict) -> dict:
        """``/token_rewards`` (seq2seq reward models): {"scores", "token_rewards", "tokens"} per response."""
        if self.seq2seq is None:
            parse_body(body, ScoreRequest)
            raise BadRequest(
                None,
                "this server's model is a scalar reward model (one reward per response: /score); /token_rewards needs "
                "a seq2seq reward model (docs/seq2seq.md)",
                404,
            )
        return await self.seq2seq.token_rewards(body)

    async def get_reward(self, body: bytes | dict) -> dict:
        if self.seq2seq is not None:
            return await self.seq2seq.get_reward(body)
        _, prepared, groups = await self._rewards(body, GetRewardRequest, prepare_get_reward)
        rewards = [r for (r,) in groups]
        # OpenRLHF reads "rewards" (advantages), "scores" (dynamic filtering; it falls back to rewards) and
        # "extra_logs" (logged per sample); its own serve_rm answers all three with the same values.
        return self._with_flags({"rewards": rewards, "scores": rewards, "extra_logs": {}}, prepared)

    async def classify(self, body: bytes | dict) -> dict:
        """vLLM's ``/classify`` answer: one ``probs`` list of one value per input (raw reward with
        ``use_activation``/``activation`` false, as verl sends it; its sigmoid otherwise, vLLM's default)."""
        if self.seq2seq is not None:
            return await self.seq2seq.classify(body)
        req, prepared, groups = await self._rewards(body, ClassifyRequest, prepare_classify)
        activation = req.use_activation if req.use_activation is not None else req.activation
        squash = activation is None or activation
        data = [
            {
                "index": i,
                "label": "LABEL_0",
                "probs": [1.0 / (1.0 + math.exp(-r)) if squash else r],
                "num_classes": 1,
            }
            for i, ((r,),) in enumerate(zip(groups))
        ]
        out = {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": req.model or str(self.config.model),
            "data": data,
            "usage": {
                "prompt_tokens": prepared.tokens,
                "total_tokens": prepared.tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
        return self._with_flags(out, prepared)

    @staticmethod
    def _with_flags(out: dict, prepared: Prepared) -> dict:
        if any(prepared.truncated):
            out["truncated"] = prepared.truncated
        if prepared.split is not None:
            out["split"] = prepared.split
        return out

    def health(self, detailed: bool = True) -> dict:
        if not detailed:
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": str(self.config.model),
            "device": str(next(self.model.parameters()).device),
            "scoring_rule": "seq2seq" if self.seq2seq is not None else self.rule.rule,
            "scoring": self.rule.describe() if self.seq2seq is None else _seq2seq_describe(self.model),
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def aclose(self) -> None:
        await self.batcher.aclose()


def _seq2seq_describe(model) -> str:
    from fastrm.serve_seq2seq import describe

    return describe(model)


# ------------------------------------------------------------------------------------------------ command line


def is_loopback(host: str) -> bool:
    """True when ``host`` names only loopback addresses (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`ServeConfig` and the security flags; shared by ``fastrm serve`` and the Ray job."""
    d = ServeConfig(model="")
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. runs/demo), or any fastrm model spec")
    p.add_argument("--tokenizer", help="tokenizer folder, tokenizer.json or 'byte' (default: the model folder's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    add_rule_flags(p)
    p.add_argument(
        "--max-batch-tokens", type=int, default=d.max_batch_tokens, help="tokens per model call (default: %(default)s)"
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=d.max_wait_ms,
        help="how long a batch may wait for requests still being read and tokenized (default: %(default)s)",
    )
    p.add_argument("--max-responses", type=int, default=d.max_responses, help="per request (default: %(default)s)")
    p.add_argument(
        "--max-request-tokens",
        type=int,
        help=f"tokens to score in one request, after tokenization; larger requests get 413 (default: "
        f"{REQUEST_TOKENS_PER_BATCH} x --max-batch-tokens)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        help=f"request body size; larger bodies get 413 (default: {BODY_BYTES_PER_TOKEN} x --max-request-tokens)",
    )
    p.add_argument(
        "--body-timeout-s",
        type=float,
        default=d.body_timeout_s,
        help="seconds a client has to send the whole body after its headers; 408 after (default: %(default)s)",
    )
    p.add_argument("--no-prefix-sharing", action="store_true", help="score each response as its own sequence")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a small shared CPU)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"bearer token clients must send; required on a non-loopback --host. Prefer ${API_KEY_ENV} "
        "(the default): a flag's value is visible to other users in `ps`",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    """A :class:`ServeConfig` from parsed flags, after the security rule: no open port without a key."""
    if not is_loopback(a.host) and not a.api_key and not a.insecure:
        raise ValueError(
            f"--host {a.host} is reachable from other machines: set --api-key (or ${API_KEY_ENV}), "
            "or pass --insecure to serve without one"
        )
    return ServeConfig(
        model=a.model,
        tokenizer=a.tokenizer,
        max_length=a.max_length,
        scoring_rule=a.scoring_rule,
        append_eos=a.append_eos,
        max_batch_tokens=a.max_batch_tokens,
        max_wait_ms=a.max_wait_ms,
        max_responses=a.max_responses,
        max_request_tokens=a.max_request_tokens,
        max_body_bytes=a.max_body_bytes,
        body_timeout_s=a.body_timeout_s,
        prefix_sharing=not a.no_prefix_sharing,
        api_key=a.api_key or None,
        device=a.device,
        threads=a.threads,
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; connections queue in its backlog until the server accepts them (no start race)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)
