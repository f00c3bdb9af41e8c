"""The reward server on Ray Serve: `fastrm serve`'s app in N replicas (one per GPU with --num-gpus-per-replica 1).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python ray_jobs/serve_rm.py --model $PWD/runs/demo --num-replicas 2

Serve's HTTP proxy listens on --host/--port (default 127.0.0.1:8000) on every node with a replica's traffic;
the endpoints, JSON and flags are those of `fastrm serve` (fastrm/serve.py). Blocks until interrupted, unless
--detach (the application then keeps running on the cluster: `serve shutdown` removes it).
"""

from __future__ import annotations

import argparse
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    from fastrm.serve import add_serve_flags

    p = argparse.ArgumentParser(prog="ray_jobs/serve_rm.py", description=__doc__.split("\n")[0])
    add_serve_flags(p)
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--num-replicas", type=int, default=1, help="replicas (fixed; see --min/--max-replicas)")
    g.add_argument("--num-gpus-per-replica", type=float, default=0, help="1: one replica per GPU (default: CPU)")
    g.add_argument("--num-cpus-per-replica", type=float, default=1)
    g.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    g.add_argument("--max-replicas", type=int)
    g.add_argument("--target-ongoing-requests", type=float, default=64, help="autoscaling target per replica")
    g.add_argument("--max-ongoing-requests", type=int, default=256, help="requests a replica takes at once")
    g.add_argument("--app-name", default="fastrm")
    g.add_argument("--detach", action="store_true", help="deploy and exit; the application keeps running")
    return p


def main(argv: list[str] | None = None) -> int:
    from ray import serve

    from fastrm.ray_serve import build_app
    from fastrm.ray_train import init_ray
    from fastrm.serve import config_from_args

    a = build_parser().parse_args(argv)
    cfg = config_from_args(a)
    init_ray()
    serve.start(http_options={"host": a.host, "port": a.port})
    app = build_app(
        cfg,
        num_replicas=a.num_replicas,
        num_gpus_per_replica=a.num_gpus_per_replica,
        num_cpus_per_replica=a.num_cpus_per_replica,
        min_replicas=a.min_replicas,
        max_replicas=a.max_replicas,
        target_ongoing_requests=a.target_ongoing_requests,
        max_ongoing_requests=a.max_ongoing_requests,
    )
    serve.run(app, name=a.app_name, route_prefix="/")
    print(f"fastrm on Ray Serve: http://{a.host}:{a.port}/score, /get_reward, /health, /metrics", flush=True)
    if a.detach:
        return 0
    try:
        threading.Event().wait()  # serve until Ctrl-C (or `ray job stop`)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with fastrm's one-line errors (``--debug`` shows the traceback)."""
    from fastrm.cli import run_user_facing

    return run_user_facing("serve_rm.py", main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(cli())
