"""The HTTP layer of the reward server (FastAPI): routes, auth, body reading, errors and clients that leave.

:func:`create_app` builds the one app that uvicorn runs for ``fastrm serve`` and every Ray Serve replica runs
(:mod:`fastrm.ray_serve`). What it guarantees, endpoint by endpoint:

* **Auth**: with an API key, every endpoint needs ``Authorization: Bearer <key>`` (the scheme in any case; the key
  compared in constant time as UTF-8 bytes) or HTTP Basic auth with the key as password, so a browser can open
  ``/docs``; ``/docs``, ``/redoc`` and ``/openapi.json`` are behind it too; ``/health`` answers ``{"status": "ok"}``
  without it (for load balancers) and adds the model and device with it.
* **Bodies**: ``Content-Type: application/json`` (else 415), at most ``--max-body-bytes`` (413, checked before and
  while reading), received within ``--body-timeout-s`` (408), then validated by the models of
  :mod:`fastrm.serve_schema` (400 naming the field, invalid Unicode and too-deep nesting included).
* **Errors**: every 4xx is ``{"error", "field", "request_id"}`` and is also logged at WARNING (OpenRLHF's client
  retries and then drops the body, so the server log is where its user finds the field); a 500 carries only
  the request id, the traceback goes to the log. Every answer of a POST has an ``X-Request-ID`` header (the
  client's own, when it sent a well-formed one).
* **A client that leaves** before its answer (closes the connection; under Ray Serve, the request is cancelled):
  its responses that have not reached the model are dropped and never scored (``fastrm_abandoned_responses``),
  it is logged once at INFO and counted as status 499 (nginx's "client closed request"), not as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # an optional extra: say how to get it instead of a bare ModuleNotFoundError
    raise ImportError(f"fastrm serve needs FastAPI and uvicorn: pip install 'fastrm[serve]' ({e})") from e

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from fastrm.batching import BatcherClosed
from fastrm.serve import RewardService, add_serve_flags, config_from_args, listen, logger
from fastrm.serve_schema import (
    BadRequest,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    HealthResponse,
    ScoreRequest,
    ScoreResponse,
    TokenRewardsResponse,
)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "a field is missing, mistyped, empty or invalid (named in `field`)"),
        (401, "missing or wrong API key"),
        (404, "/token_rewards on a server whose model is a scalar reward model"),
        (408, "the body did not arrive within --body-timeout-s"),
        (413, "over --max-body-bytes, --max-responses or --max-request-tokens"),
        (415, "Content-Type is not application/json"),
        (500, "internal error: only the request id here, the details are in the server log"),
        (503, "the server is shutting down"),
    )
}


class _ClientGone(Exception):
    """The client closed the connection before its answer."""


def _request_body(model) -> dict:
    # The body is read and validated by hand (limits, timeout, our error format); declare it for /docs and clients.
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


def _error(status: int, message: str, field: str | None, rid: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": message, "field": field, "request_id": rid}
    return JSONResponse(body, status_code=status, headers={"X-Request-ID": rid, **(headers or {})})


def _credential(request: Request) -> bytes | None:
    """The key a request presents (a Bearer token, or the password of Basic auth) as the bytes the client sent."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    # Starlette decodes header bytes as latin-1; encoding back gives the client's bytes (UTF-8 for a non-ASCII key).
    scheme, _, rest = header.encode("latin-1").strip().partition(b" ")
    scheme, rest = scheme.lower(), rest.strip()
    if scheme == b"bearer":
        return rest
    if scheme == b"basic":
        try:
            return base64.b64decode(rest, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return None
    return None


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body: JSON content type (415), at most ``limit`` bytes (413), all of it within ``timeout_s`` (408)."""
    ctype = request.headers.get("content-type")
    if ctype is None or ctype.split(";")[0].strip().lower() != "application/json":
        got = f"got {ctype[:100]!r}" if ctype is not None else "got none"
        raise BadRequest("content-type", f"Content-Type must be application/json, {got}", 415)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BadRequest("body", f"body of {int(length)} bytes is over the limit of {limit} (--max-body-bytes)", 413)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest("body", f"body is over the limit of {limit} bytes (--max-body-bytes)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise BadRequest("body", f"body not received within {timeout_s:g} s (--body-timeout-s)", 408) from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone: once the body is read, the next ASGI message is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)  # not expected after the body; never spin on a server that sends others


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()  # a result nobody awaits any more (its client left): no "never retrieved" warning


def _counts(endpoint: str, result: dict) -> tuple[int, int]:
    """(responses answered, responses truncated) of an answer, for the metrics."""
    cut = result.get("truncated") or []
    if endpoint == "/score":
        return sum(map(len, result["rewards"])), sum(map(sum, cut))
    if endpoint == "/token_rewards":
        return sum(map(len, result["scores"])), 0
    n = len(result["data"]) if endpoint == "/classify" else len(result["rewards"])
    return n, sum(cut)


def create_app(service: RewardService) -> FastAPI:
    """The FastAPI app over a :class:`RewardService` (the same app under uvicorn and Ray Serve)."""
    from fastrm import __version__

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await service.aclose()

    cfg = service.config
    key = cfg.api_key.encode("utf-8") if cfg.api_key else None
    app = FastAPI(
        title="fastrm reward server",
        version=__version__,
        description="Rewards of prompt + response texts, computed as fastrm trains (same values as offline "
        "fastrm.score). Concurrent requests share fair token-budget micro-batches.",
        lifespan=lifespan,
        docs_url=None,  # served below, behind the API key
        redoc_url=None,
        openapi_url=None,
    )

    def authorized(request: Request) -> bool:
        if key is None:
            return True
        given = _credential(request)
        return given is not None and hmac.compare_digest(given, key)

    def unauthorized(rid: str, browser: bool = False) -> JSONResponse:
        # A Basic challenge makes a browser ask for the key (as the password) and send it for /openapi.json too.
        challenge = 'Basic realm="fastrm", charset="UTF-8"' if browser else "Bearer"
        msg = "missing or wrong API key (Authorization: Bearer <key>)"
        return _error(401, msg, "authorization", rid, {"WWW-Authenticate": challenge})

    def client(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "?"

    async def handle(request: Request, endpoint: str, fn) -> Response:
        rid = _request_id(request)
        t0 = time.perf_counter()
        status, n, cut = 200, 0, 0
        work = gone = None
        try:
            if not authorized(request):
                raise BadRequest("authorization", "missing or wrong API key (Authorization: Bearer <key>)", 401)
            raw = await _read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
            work = asyncio.ensure_future(fn(raw))
            work.add_done_callback(_retrieve)
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise _ClientGone
            result = work.result()
            n, cut = _counts(endpoint, result)
            resp: Response = JSONResponse(result, headers={"X-Request-ID": rid})
        except BadRequest as e:
            status = e.status
            who = client(request)
            logger.warning("%s %s -> %d: %s (request %s)", who, endpoint, status, e.message, rid)
            resp = unauthorized(rid) if status == 401 else _error(status, e.message, e.field, rid)
        except (_ClientGone, ClientDisconnect, asyncio.CancelledError) as e:
            status = 499
            logger.info(
                "%s %s: the client left before its answer; its responses not yet scored are dropped (request %s)",
                client(request),
                endpoint,
                rid,
            )
            service.metrics.observe_request(endpoint, status, time.perf_counter() - t0, 0, 0)
            if isinstance(e, asyncio.CancelledError):
                raise  # the server cancelled us (Ray Serve on a disconnect, or shutdown): let it finish
            return Response(status_code=499)
        except BatcherClosed as e:
            status, resp = 503, _error(503, str(e), None, rid)
        except Exception:  # a failure while scoring fails this request only; the details stay in the log
            status = 500
            logger.exception("%s %s failed (request %s)", client(request), endpoint, rid)
            resp = _error(500, f"internal error (request id {rid}; the details are in the server log)", None, rid)
        finally:
            for task in (work, gone):
                if task is not None and not task.done():
                    task.cancel()
        service.metrics.observe_request(endpoint, status, time.perf_counter() - t0, n, cut)
        return resp

    @app.post("/score", response_model=ScoreResponse, responses=ERRORS, openapi_extra=_request_body(ScoreRequest))
    async def score(request: Request) -> Response:
        """Rewards of each prompt's responses: {"prompts": [P, ...], "responses": [[R, ...], ...]}."""
        return await handle(request, "/score", service.score)

    @app.post(
        "/token_rewards",
        response_model=TokenRewardsResponse,
        responses=ERRORS,
        openapi_extra=_request_body(ScoreRequest),
    )
    async def token_rewards(request: Request) -> Response:
        """Seq2seq reward models: each response's token rewards, tokens and sequence score (body as /score)."""
        return await handle(request, "/token_rewards", service.token_rewards)

    @app.post(
        "/get_reward",
        response_model=GetRewardResponse,
        responses=ERRORS,
        openapi_extra=_request_body(GetRewardRequest),
    )
    async def get_reward(request: Request) -> Response:
        """OpenRLHF's remote reward model (--remote_rm_url): {"query": [prompt + response, ...], "prompts": [...]}."""
        return await handle(request, "/get_reward", service.get_reward)

    @app.post(
        "/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=_request_body(ClassifyRequest)
    )
    async def classify(request: Request) -> Response:
        """vLLM's classification API, as verl's reward loop calls it: {"input": [text, ...], "activation": false}."""
        return await handle(request, "/classify", service.classify)

    @app.get(
        "/health",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        openapi_extra={"security": []},  # open to load balancers; the details need the key
    )
    async def health(request: Request) -> dict:
        """Liveness, without the API key; the model and device only with it."""
        return service.health(detailed=authorized(request))

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: ERRORS[401]})
    async def metrics(request: Request) -> Response:
        """Prometheus text format: requests, responses, batches, queue, latency."""
        if not authorized(request):
            return unauthorized(_request_id(request))
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if key is not None:
                bearer = {"type": "http", "scheme": "bearer"}
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": bearer}
                schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(_request_id(request), browser=True)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(_request_id(request), browser=True)
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        if not authorized(request):
            return unauthorized(_request_id(request), browser=True)
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:  # 404, 405: our error body too
        return _error(e.status_code, str(e.detail), None, _request_id(request), dict(e.headers or {}))

    return app


def main(argv: list[str] | None = None) -> int:
    """``fastrm serve --model DIR``: serve the reward model over HTTP until interrupted."""
    import uvicorn

    p = argparse.ArgumentParser(
        prog="fastrm serve",
        description="Serve a reward model over HTTP: POST /score, POST /get_reward (OpenRLHF), POST /classify "
        "(vLLM, verl), GET /health, GET /metrics, GET /docs; concurrent requests share fair token-budget batches.",
    )
    add_serve_flags(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="server log level (default: info)",
    )
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = listen(a.host, a.port)
    service = RewardService.load(cfg)
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    shown = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    print(f"fastrm serve: {json.dumps(shown)}", file=sys.stderr)
    print(f"fastrm serve: listening on http://{host}:{port} (auth: {'bearer token' if cfg.api_key else 'none'})")
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=a.log_level, lifespan="on"))
    server.run(sockets=[sock])
    return 0
