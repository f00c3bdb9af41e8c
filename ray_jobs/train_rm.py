"""Train a reward model with Ray Train (DDP over N workers): the same config file and flags as `fastrm train`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python ray_jobs/train_rm.py --model tiny-llama --tokenizer byte --data $PWD/pairs.jsonl --num-workers 2

See ray_jobs/README.md. Data, model and tokenizer paths must be readable on every node (checked at start); the
run folder (checkpoints, final model, metrics history) is <storage-path>/<name>, on storage every node reaches.
"""

from __future__ import annotations

import sys

from fastrm.cli import build_train_parser, config_from_args
from fastrm.ray_cluster import NODE_CHECK_TIMEOUT_S, PLACEMENT_STRATEGIES, parse_resources, worker_env
from fastrm.ray_train import init_ray, run_training

EPILOG = """examples (see ray_jobs/README.md):
  ray job submit --address http://HEAD:8265 --working-dir . -- python ray_jobs/train_rm.py \\
      --model tiny-llama --tokenizer byte --data $PWD/pairs.jsonl --on-bad-row skip \\
      --num-workers 2 --max-failures 1 --output-dir $PWD/runs/rm            (one machine: run folder under it)
  ... --use-gpu --num-workers 16 --resources-per-worker '{"CPU": 8, "GPU": 1}' --accelerator-type H100 \\
      --storage-path s3://bucket/rm-runs --worker-env NCCL_SOCKET_IFNAME=ib0   (a GPU cluster)

environment:
  RAY_TRAIN_ENABLE_STATE_TRACKING=1 is set for the run (the dashboard's Train view; set it to 0 to opt out).
  Worker nodes join a token-auth head with RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the head's token> ray start ...
  CPU workers on several nodes need GLOO_SOCKET_IFNAME=<interface> when the hostname resolves to 127.0.x.x: pass
  --worker-env GLOO_SOCKET_IFNAME=eth0 (exported where you run `ray job submit` it does not reach the job).
"""


def build_parser():
    p = build_train_parser(prog="ray_jobs/train_rm.py")
    p.epilog = EPILOG
    g = p.add_argument_group("Ray Train: run folder")
    g.add_argument(
        "--storage-path",
        help="where run folders live: a path every node mounts (NFS, ...) or a URI (s3://bucket/path, gs://...); "
        "checked at start on a multi-node cluster (default: --output-dir, fine on one node)",
    )
    g.add_argument(
        "--name",
        help="run folder under --storage-path (default: <output-dir name>-<hash of the training settings and "
        "inputs>, so the same command resumes its run and different settings never share a folder); a name that "
        "holds another training is refused",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=0,
        help="restart the worker group this many times after a failure, resuming from the last checkpoint",
    )
    g.add_argument(
        "--node-check-timeout-s",
        type=float,
        default=NODE_CHECK_TIMEOUT_S,
        help="how long each node may take to answer the start-up file checks (storage shared, inputs visible); "
        "its first task of a job also sets up the job's runtime env there",
    )
    g = p.add_argument_group("Ray Train: workers and placement")
    g.add_argument("--num-workers", type=int, default=1, help="training workers (one per GPU with --use-gpu)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL (default: CPU workers, gloo)")
    g.add_argument(
        "--resources-per-worker",
        type=parse_resources,
        help='JSON resources of one worker, e.g. \'{"CPU": 8, "GPU": 1}\' or with a custom resource '
        '\'{"CPU": 4, "GPU": 1, "big_mem": 1}\' (a GPU entry implies --use-gpu; default: 1 CPU, or 1 GPU)',
    )
    g.add_argument(
        "--placement-strategy",
        choices=PLACEMENT_STRATEGIES,
        default="PACK",
        help="how workers are placed: PACK (fill nodes; the default), SPREAD, STRICT_PACK (one node), "
        "STRICT_SPREAD (one worker per node)",
    )
    g.add_argument("--accelerator-type", help="only nodes with this accelerator, e.g. H100 or A100-80G")
    g.add_argument(
        "--collective-timeout-s",
        type=int,
        default=1800,
        help="how long an all-reduce may wait for a rank before the group fails (and restarts with --max-failures)",
    )
    g.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="environment variable for the workers (repeatable; NAME alone takes the driver's value), e.g. "
        "GLOO_SOCKET_IFNAME=eth0: `ray job submit` does not pass your shell's environment to the job. GLOO_*, "
        "NCCL_*, TORCH_NCCL_* and TP_SOCKET_IFNAME of the driver's own environment are passed on without it",
    )
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard parameters, gradients and optimizer state with FSDP2 instead of DDP (models that do not fit "
        "one GPU)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg, extra = config_from_args(args)
    if "data" not in extra or "model" not in extra:
        raise SystemExit("error: --data and --model are required (on the command line or in --config)")
    as_list = lambda x: x if isinstance(x, list) else [x]  # noqa: E731
    init_ray()
    result = run_training(
        cfg,
        data=as_list(extra["data"]),
        model=extra["model"],
        tokenizer=extra.get("tokenizer"),
        eval_data=as_list(extra["eval_data"]) if extra.get("eval_data") else None,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        max_failures=args.max_failures,
        storage_path=args.storage_path,
        name=args.name,
        fsdp=args.fsdp,
        resources_per_worker=args.resources_per_worker,
        placement_strategy=args.placement_strategy,
        accelerator_type=args.accelerator_type,
        collective_timeout_s=args.collective_timeout_s,
        worker_env=worker_env(args.worker_env),
        node_check_timeout_s=args.node_check_timeout_s,
    )
    m = result.metrics or {}
    print(
        f"trained {m.get('step', 0)} steps on {args.num_workers} workers; last step loss "
        f"{m.get('loss', float('nan')):.4f}, accuracy {m.get('accuracy', float('nan')):.3f}"
    )
    print(f"run folder: {result.path} (metrics.jsonl, result.json)")
    print(f"final model: {result.checkpoint.path if result.checkpoint else None}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with fastrm's one-line errors (``--debug`` shows the traceback)."""
    from fastrm.cli import run_user_facing

    return run_user_facing("train_rm.py", main, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(cli())
