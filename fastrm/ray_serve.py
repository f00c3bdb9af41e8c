"""Ray Serve deployment of the reward server: the app of ``fastrm serve`` in every replica, one replica per GPU.

Each replica loads the model once, batches the requests routed to it with the same :class:`DynamicBatcher`, and
answers the same endpoints (:func:`fastrm.serve.create_app`). Its metrics go both to its own ``GET /metrics`` (that
replica only) and to Ray's metrics (``ray.serve.metrics``: tagged by deployment and replica, scraped from each
node's Ray metrics port beside Serve's own ``ray_serve_*`` request metrics), which add up across replicas.

Entry points: ``ray_jobs/serve_rm.py`` (flags as ``fastrm serve``), or a Serve config / ``serve run`` with
:func:`app_builder`::

    serve run fastrm.ray_serve:app_builder model=/abs/path/runs/demo num_replicas=2
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from ray import serve

from fastrm.batching import BatchStats
from fastrm.serve import RewardService, ServeConfig, ServerMetrics
from fastrm.serve_app import create_app


class RayServeMetrics(ServerMetrics):
    """:class:`ServerMetrics` that also records into Ray's metrics system (aggregated across replicas)."""

    def __init__(self) -> None:
        super().__init__()
        from ray.serve.metrics import Counter, Histogram

        self.ray_requests = Counter("fastrm_requests", description="HTTP requests", tag_keys=("endpoint", "status"))
        self.ray_responses = Counter("fastrm_responses", description="responses scored")
        self.ray_latency = Histogram(
            "fastrm_request_latency_seconds",
            description="request latency",
            boundaries=list(self.LATENCY_BUCKETS),
            tag_keys=("endpoint",),
        )
        self.ray_batch_responses = Histogram(
            "fastrm_batch_responses", description="responses per model call", boundaries=list(self.SIZE_BUCKETS)
        )
        self.ray_batch_tokens = Histogram(
            "fastrm_batch_tokens", description="packed tokens per model call", boundaries=list(self.TOKEN_BUCKETS)
        )
        self.ray_abandoned = Counter("fastrm_abandoned_responses", description="queued responses dropped: client left")

    def observe_request(self, endpoint: str, status: int, seconds: float, responses: int, truncated: int) -> None:
        super().observe_request(endpoint, status, seconds, responses, truncated)
        self.ray_requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.ray_latency.observe(seconds, tags={"endpoint": endpoint})
        if responses:
            self.ray_responses.inc(responses)

    def observe_abandoned(self, n: int) -> None:
        super().observe_abandoned(n)
        if n:
            self.ray_abandoned.inc(n)

    def observe_batch(self, s: BatchStats) -> None:
        super().observe_batch(s)
        self.ray_batch_responses.observe(s.responses)
        self.ray_batch_tokens.observe(s.tokens)


@serve.deployment(name="fastrm_reward")
@serve.ingress()  # the app is built per replica, after __init__ loaded the model (__serve_build_asgi_app__)
class RewardDeployment:
    def __init__(self, config: dict[str, Any]):
        self.service = RewardService.load(ServeConfig(**config), metrics=RayServeMetrics())

    def __serve_build_asgi_app__(self):
        return create_app(self.service)


def _absolute(path: str | None) -> str | None:
    # Replicas run in their own working directory (a job's copy of it): resolve paths the caller can see.
    return os.path.abspath(path) if path and os.path.exists(path) else path


def build_app(
    config: ServeConfig,
    *,
    num_replicas: int = 1,
    num_gpus_per_replica: float = 0,
    num_cpus_per_replica: float = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 64,
    max_ongoing_requests: int = 256,
):
    """The bound Serve application: ``num_replicas`` replicas, or autoscaling between ``min_replicas`` and
    ``max_replicas`` on ongoing requests per replica, each with ``num_gpus_per_replica`` GPUs.

    ``max_ongoing_requests`` is high on purpose: the batcher needs many requests in a replica at once to fill a
    batch (Serve's default of 5 would cap a batch at 5 requests)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus_per_replica, "num_cpus": num_cpus_per_replica},
        "max_ongoing_requests": max_ongoing_requests,
    }
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": max_replicas if max_replicas is not None else max(lo, num_replicas),
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        options["num_replicas"] = num_replicas
    config = dataclasses.replace(config, model=_absolute(config.model), tokenizer=_absolute(config.tokenizer))
    return RewardDeployment.options(**options).bind(dataclasses.asdict(config))


def app_builder(args: dict[str, Any]):
    """For ``serve run fastrm.ray_serve:app_builder key=value ...`` and Serve config files (``import_path`` +
    ``args``): keys are :class:`ServeConfig` fields and :func:`build_app` keywords; strings are converted."""
    config_types = typing.get_type_hints(ServeConfig)
    cfg, opts = {}, {}
    for key, value in args.items():
        if key in config_types:
            cfg[key] = _convert(key, value, config_types[key])
        elif key in _BUILD_TYPES:
            opts[key] = _convert(key, value, _BUILD_TYPES[key])
        else:
            raise ValueError(f"unknown argument {key!r}: expected one of {sorted([*config_types, *_BUILD_TYPES])}")
    if "model" not in cfg:
        raise ValueError("the argument model=<checkpoint folder> is required")
    return build_app(ServeConfig(**cfg), **opts)


_BUILD_TYPES: dict[str, type] = {
    "num_replicas": int,
    "num_gpus_per_replica": float,
    "num_cpus_per_replica": float,
    "min_replicas": int,
    "max_replicas": int,
    "target_ongoing_requests": float,
    "max_ongoing_requests": int,
}


def _convert(key: str, value: Any, hint: Any) -> Any:
    """A command-line string as the field's type (``int | None`` -> int); other values as given."""
    if not isinstance(value, str):
        return value
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return base(value) if base in (int, float) else value
