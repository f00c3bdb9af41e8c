"""Ray Train: the same RewardTrainer on N workers (DDP over gloo on CPU, NCCL on GPU), with fault tolerance.

Every worker builds the tokenizer, the model (same seed on every rank, so the initial weights already match; DDP
broadcasts rank 0's anyway) and the full list of pairs; the trainer then takes every W-th pair of each step
(``idx[rank::world]``), all-reduces mu_B and the pair counts and normalises the loss by the step's global pair
count, so N workers train exactly what one worker trains on the same global batch (tests/test_ray.py checks it).
Evaluation is sharded the same way (each rank scores every W-th eval pair; the margins are gathered, so the
statistics are exactly one process's).

Where things go (one run folder, ``storage_path/name``, on storage every node reaches; see ray_cluster.py)::

    fastrm_run.json      what this run trains (checked at every start: another training is refused)
    checkpoint-N/        step checkpoints: HF model folder + trainer_state.pt + metrics.jsonl up to step N
    model/               the final checkpoint (the trained model), written after the final eval
    metrics.jsonl        the whole history (train steps and evals), result.json, skipped_rows_*.jsonl

Checkpoints are written once: rank 0 saves the folder atomically into a node-local scratch folder and
``ray.train.report`` uploads it (SYNC) to the run folder and deletes the local copy. Uploading through Ray rather
than writing into the storage path directly works the same for a shared filesystem and for ``s3://``/``gs://``,
and Ray registers a checkpoint (the one a restart resumes from) only once every rank has reported and the upload
is complete, so a crash mid-upload never becomes "latest". Each checkpoint carries the metrics history up to its
step; a restart resumes weights, optimizer, scheduler, RNG, step and that history (the redone steps are logged
once), and the driver copies the final history from ``model/`` to the run folder. A worker's ``output_dir`` is
its scratch folder: nothing is left on whichever node rank 0 landed on.

A resubmitted run also resumes when its driver was killed before Ray recorded a checkpoint: the driver takes the
highest complete checkpoint of this run from the run folder (fastrm/ray_resume.py, by the manifest each upload
carries) when it is newer than what Ray restores, and a finished run returns its final model without starting
workers. Rank 0 sets the logged statistics as Prometheus gauges (fastrm/ray_metrics.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from fastrm import distributed as dist
from fastrm import ray_cluster as cluster
from fastrm import ray_resume, saved_tokenizer
from fastrm.config import RewardConfig
from fastrm.evaluation import json_safe
from fastrm.ray_metrics import TrainingGauges
from fastrm.run_dir import training_fields
from fastrm.trainer import RewardTrainer, check_resumable, seed_everything

FINAL_NAME = "model"
RESULT_FILE = "result.json"
# Files of the worker's scratch output folder that travel with each checkpoint and end in the run folder.
REPORT_FILES = ("metrics.jsonl", "skipped_rows_*.jsonl", "eval_*", RESULT_FILE)

# ----------------------------------------------------------------------------------------------- worker side


class RayRewardTrainer(RewardTrainer):
    """A RewardTrainer that reports to Ray Train: every logged record (train steps, evals) and every checkpoint.

    ``ray.train.report`` is a barrier: every rank calls ``_log`` and ``save_checkpoint`` at the same steps, and only
    rank 0 attaches the checkpoint folder. The checkpoint at the last step is deferred to :meth:`finish`, after the
    final eval, so that the final checkpoint carries the whole history.
    """

    def __init__(
        self,
        *args,
        final_name: str = FINAL_NAME,
        fail_at_step: int | None = None,
        fail_marker: str | None = None,
        fail_mode: str = "raise",
        fail_node: str | None = None,
        run_id: str | None = None,
        run_name: str | None = None,
        **kwargs,
    ):
        user_cb = kwargs.pop("on_step_end", None)
        super().__init__(*args, on_step_end=self._on_step_end, **kwargs)
        self._user_cb: Callable[[int, dict], None] | None = user_cb
        self.final_name = final_name
        if fail_at_step is not None and not fail_marker:
            raise ValueError("fail_at_step needs fail_marker: a file every attempt sees, so the failure happens once")
        self._fail = (fail_at_step, fail_marker, fail_mode, fail_node)
        self._last: dict = {}
        self.run_id = run_id  # the identity hash of fastrm_run.json, recorded in every checkpoint's manifest
        # Prometheus / dashboard gauges, set by rank 0 (its train statistics are the all-reduced global ones).
        self._gauges = TrainingGauges(run_name or "fastrm") if dist.is_main() and ray_initialized() else None

    def _on_step_end(self, step: int, metrics: dict) -> None:
        self._maybe_fail(step)
        if self._user_cb is not None:
            self._user_cb(step, metrics)

    def _log(self, record: dict) -> None:
        super()._log(record)
        record = _scalars(record)
        if self._gauges is not None:
            self._gauges.record(record)
        if record.get("split") == "train":
            self._last = record
            a, step = self.args, record["step"]
            if (a.save_steps and step % a.save_steps == 0) or step >= self.total_steps:
                return  # the checkpoint's report carries these metrics (a report waits for the controller's poll)
        _report(record)

    def _maybe_fail(self, step: int) -> None:
        """Fault injection for recovery tests: at ``fail_at_step`` the last rank (or the rank on node
        ``fail_node``) raises, or kills its own process (``fail_mode="kill"``), once (the marker file)."""
        at, marker, mode, node = self._fail
        if at is None or step != at:
            return
        if node is not None:
            import ray

            if ray.get_runtime_context().get_node_id() != node:
                return
        elif dist.rank() != dist.world_size() - 1:
            return
        marker = Path(marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at step {step} (rank {dist.rank()}, pid {os.getpid()}, {mode})\n")
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"fastrm: injected worker failure at step {step} (rank {dist.rank()})")

    def save_checkpoint(self, path=None, *, final: bool = False) -> Path | None:
        """Save ``checkpoint-N`` (or the final checkpoint) to local scratch and report it: Ray uploads it to the run
        folder and deletes the local copy. An explicit ``path`` saves there without Ray."""
        import ray.train

        if path is not None:
            return super().save_checkpoint(path)
        if self.step >= self.total_steps and not final:
            return None  # train() ends with a save: finish() writes it after the final eval
        name = self.final_name if final else f"checkpoint-{self.step}"
        local = super().save_checkpoint(self.out / ".upload" / name)  # collective under FSDP; rank 0 writes
        checkpoint = None
        if dist.is_main() and final and getattr(self.model, "lora", None) is not None:
            from fastrm import lora

            # A base written into this scratch folder (a preset, or fastrm's token ids on a source's weights) is
            # gone after the upload: the final adapter folder carries it (step checkpoints resume from the spec).
            lora.embed_base(local, self.out)
        if dist.is_main():
            cluster.copy_reports(_local_fs(), str(self.out), str(local), REPORT_FILES)
            ray_resume.write_manifest(local, str(self.run_id))  # lets a later driver tell a complete upload
            checkpoint = ray.train.Checkpoint.from_directory(str(local))
        ray.train.report(
            {**self._last, "step": self.step},
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            delete_local_checkpoint_after_upload=True,
        )
        return local

    def load_checkpoint(self, path) -> None:
        super().load_checkpoint(path)
        if dist.is_main() and str(path) != "latest":  # the history up to the checkpoint's step continues here
            self.out.mkdir(parents=True, exist_ok=True)
            cluster.copy_reports(_local_fs(), str(Path(path).resolve()), str(self.out.resolve()), REPORT_FILES)

    def finish(self, result: dict) -> None:
        """Write and report the final checkpoint: the model, trainer state, whole history and ``result.json``."""
        if dist.is_main():
            (self.out / RESULT_FILE).write_text(json.dumps(json_safe(result), indent=2))
        self.save_checkpoint(final=True)


def ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def _local_fs():
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem()


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _report(metrics: dict) -> None:
    import ray.train

    ray.train.report(metrics)


def worker_device(use_gpu: bool) -> torch.device:
    """cuda:<local device> under Ray with GPUs (Ray sets CUDA_VISIBLE_DEVICES), else the CPU."""
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _as_list(x):
    return x if isinstance(x, list) else [x]


def _is_rows(x) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], dict)


def build_trainer(config: dict, scratch: str | os.PathLike, *, resume_from: str | None = None) -> RayRewardTrainer:
    """Tokenizer, model (seeded identically on every rank), data and a :class:`RayRewardTrainer` for one worker,
    writing into the node-local ``scratch`` folder. ``config`` is :func:`make_loop_config`'s dict."""
    from fastrm.loading import load_model, load_tokenizer

    args = RewardConfig(**config["args"])
    # The final checkpoint is the final model; output_dir is not a training field, so resuming is unaffected.
    args = dataclasses.replace(args, output_dir=str(scratch), save_final=False)
    if resume_from is not None:
        args = dataclasses.replace(args, resume_from_checkpoint=resume_from)
    if not dist.is_main():
        args = dataclasses.replace(args, progress=False)
    tok = load_tokenizer(config.get("tokenizer"), config["model"])
    seed_everything(args.seed)
    model = load_model(config["model"], tokenizer=tok, objective=args.objective)
    if not args.save_steps:  # finish() always saves; the trainer checks at construction only when save_steps is set
        saved_tokenizer.check_savable(tok, model.backbone.config)
    data, eval_data = config["data"], config.get("eval_data")
    trainer = RayRewardTrainer(
        model,
        args,
        data if _is_rows(data) else _as_list(data),
        (eval_data if _is_rows(eval_data) else _as_list(eval_data)) if eval_data else None,
        tokenizer=tok,
        device=worker_device(bool(config.get("use_gpu"))),
        fsdp=bool(config.get("fsdp")),
        final_name=config.get("final_name", FINAL_NAME),
        fail_at_step=config.get("fail_at_step"),
        fail_marker=config.get("fail_marker"),
        fail_mode=config.get("fail_mode", "raise"),
        fail_node=config.get("fail_node"),
        run_id=config.get("run_id"),
        run_name=config.get("run_name"),
    )
    if dist.is_main():  # counts in the job log; every skipped row in the run folder (skipped_rows_<split>.jsonl)
        for split, stats in trainer.load_stats.items():
            report = stats.write_skip_report(Path(scratch) / f"skipped_rows_{split}.jsonl")
            print(
                f"[{split}] {stats.summary()}" + (f" (skipped rows: {report.name})" if report else ""), file=sys.stderr
            )
    return trainer


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train's per-worker function: resume from Ray's latest checkpoint if any, train, report.

    Call it once per worker and attempt: within an attempt ``ray.train.get_checkpoint()`` also returns what this
    worker itself reported, so a second training in the same worker group must call :func:`train_worker`.
    Returns the trainer's result dict (train/eval metrics) on every rank.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    point = config.get("resume_point")  # the run folder's newest complete checkpoint, found by the driver
    use_point, line = ray_resume.prefer_run_folder(None if ckpt is None else ckpt.path, point)
    if use_point:
        if line and dist.is_main():
            print(line, flush=True)
        ckpt = ray.train.Checkpoint(point["uri"])
    if ckpt is None:
        return train_worker(config)
    with ckpt.as_directory() as d:  # the reported folder (downloaded first if storage is remote)
        return train_worker(config, resume_from=d)


def train_worker(config: dict, resume_from: str | None = None) -> dict:
    """Build and run one training on this worker (resuming from ``resume_from``), reporting to Ray Train.

    A run whose final checkpoint exists is complete: it returns that result and reports nothing (a re-submitted
    finished job does not train again or rewrite its model)."""
    if resume_from is not None and (Path(resume_from) / RESULT_FILE).is_file():
        return json.loads((Path(resume_from) / RESULT_FILE).read_text())
    with tempfile.TemporaryDirectory(prefix="fastrm-worker-") as scratch:
        trainer = build_trainer(config, scratch, resume_from=resume_from)
        result = trainer.train()
        trainer.finish(result)
        return result


# ----------------------------------------------------------------------------------------------- driver side


def init_ray(**kwargs) -> None:
    """Connect to the running cluster inside a Ray job or when RAY_ADDRESS is set, else start a local Ray (which
    also joins a cluster started with ``ray start`` on this machine)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else None, **kwargs)


def make_loop_config(
    args: RewardConfig,
    *,
    data: Any,
    model: str,
    tokenizer: str | None = None,
    eval_data: Any = None,
    use_gpu: bool = False,
    fsdp: bool = False,
    **extra,
) -> dict:
    """The ``train_loop_config`` dict for :func:`train_loop_per_worker` (local paths resolved on this machine)."""
    for what, spec in (("--data", data), ("--eval-data", eval_data)):
        # data is a path or rows, never a name: a missing file fails here, before any worker starts
        missing = [p for p in _files(spec) if not cluster.is_uri(p) and not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{what}: no such file: {', '.join(map(str, missing))}")
    return {
        "args": args.to_dict(),
        "data": cluster.resolve_input(data, "--data"),
        "eval_data": cluster.resolve_input(eval_data, "--eval-data"),
        "model": cluster.resolve_input(model, "--model"),
        "tokenizer": cluster.resolve_input(tokenizer, "--tokenizer"),
        "use_gpu": use_gpu,
        "fsdp": fsdp,
        **extra,
    }


def _files(x: Any) -> list:
    """The path-like entries of a data spec (a path, a list of paths, or rows: rows are dicts, not paths)."""
    if isinstance(x, (list, tuple)):
        return [v for v in x if isinstance(v, (str, os.PathLike))]
    return [x] if isinstance(x, (str, os.PathLike)) else []


def prepare_run(
    loop_config: dict, storage_path: str | None, name: str | None, timeout_s: float
) -> tuple[str, str, str]:
    """Check the cluster and claim the run folder; returns ``(storage, name, run id)`` (the run id is the hash of
    what ``fastrm_run.json`` records).

    The storage path defaults to the output dir; the name to ``<output dir name>-<hash of what is trained>``."""
    args = RewardConfig(**loop_config["args"])
    flag = "--storage-path" if storage_path else "--output-dir"  # the default storage is the output dir
    storage = cluster.resolve_path(storage_path or args.output_dir, flag)
    identity = cluster.run_identity(training_fields(args), {k: loop_config[k] for k in ("data", "model", "tokenizer")})
    name = name or cluster.default_run_name(args.output_dir, identity)
    cluster.check_storage(storage, timeout_s, flag)
    inputs = [loop_config[k] for k in ("data", "eval_data", "model", "tokenizer")]
    cluster.check_visible_everywhere(cluster.local_paths(inputs), "--data/--eval-data/--model/--tokenizer", timeout_s)
    fresh = "start fresh under another --name (or leave --name out: the default is derived from the config)"
    cluster.claim_run(
        storage, name, identity, compare_config=lambda saved, where: check_resumable(saved, args, where, fresh)
    )
    return storage, name, cluster.identity_hash(identity)


def finalize_run(result) -> list[str]:
    """Copy the final checkpoint's history and reports (metrics.jsonl, result.json, ...) into the run folder."""
    ckpt = result.checkpoint
    if result.error is not None or ckpt is None:
        return []
    run_fs_path = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    return cluster.copy_reports(ckpt.filesystem, ckpt.path, run_fs_path, REPORT_FILES)


def run_training(
    args: RewardConfig,
    *,
    data: Any,
    model: str,
    tokenizer: str | None = None,
    eval_data: Any = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    max_failures: int = 0,
    storage_path: str | None = None,
    name: str | None = None,
    fsdp: bool = False,
    resources_per_worker: dict | None = None,
    placement_strategy: str = "PACK",
    accelerator_type: str | None = None,
    collective_timeout_s: int = 1800,
    worker_env: dict[str, str] | None = None,
    node_check_timeout_s: float = cluster.NODE_CHECK_TIMEOUT_S,
    train_loop: Callable[[dict], Any] | None = None,
    **extra,
):
    """Train with Ray Train's TorchTrainer on ``num_workers`` workers; returns the ``ray.train.Result`` (its
    ``path`` is the run folder, its ``checkpoint`` the final model).

    Args:
        args: the RewardConfig (``pairs_per_step`` is the global batch over all workers).
        data, eval_data: paths readable on every node (checked), or a list of dict rows (shipped to the workers).
        model, tokenizer: as for ``fastrm train`` (preset / config.json / checkpoint; 'byte' / tokenizer.json /
            folder).
        max_failures: worker-group restarts after a failure; each resumes from the last reported checkpoint.
        storage_path: where run folders live (default ``args.output_dir``): a URI (``s3://``, ``gs://``) or a path
            every node shares (checked when the cluster has several nodes).
        name: the run folder's name (default ``<output dir name>-<hash of the training fields and inputs>``);
            re-running the same training resumes it, another training under the same name is refused.
        resources_per_worker: e.g. ``{"CPU": 4, "GPU": 1}`` (a GPU entry implies ``use_gpu``).
        placement_strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node).
        accelerator_type: e.g. "H100" (workers only on nodes with that accelerator).
        collective_timeout_s: how long a collective may wait for a rank before the group fails.
        worker_env: environment for the workers (see :func:`fastrm.ray_cluster.worker_env`).
        fsdp: shard parameters, gradients and optimizer state with FSDP2 instead of DDP.
        train_loop: the per-worker function (default :func:`train_loop_per_worker`).
        extra: more keys for the loop config (``fail_at_step``/``fail_marker``/``fail_mode``/``fail_node`` inject
            one failure, ``final_name`` names the final checkpoint; for tests).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # The dashboard's Train view is empty without it; set before the trainer exists (read when it starts).
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if placement_strategy not in cluster.PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy {placement_strategy!r}: one of {', '.join(cluster.PLACEMENT_STRATEGIES)}")
    if args.merge_lora:  # the final model is the adapter folder Ray uploads; merging is a step of its own
        raise ValueError(
            "merge_lora: not applied by a Ray run (its final model is the uploaded adapter folder); merge it after "
            "the run with `fastrm merge-lora RUN_FOLDER/model OUT`"
        )
    loop_config = make_loop_config(
        args, data=data, model=model, tokenizer=tokenizer, eval_data=eval_data, use_gpu=use_gpu, fsdp=fsdp, **extra
    )
    storage, name, run_id = prepare_run(loop_config, storage_path, name, node_check_timeout_s)
    loop_config.update(run_id=run_id, run_name=name)
    point = ray_resume.find_resume_point(storage, name, run_id, loop_config.get("final_name", FINAL_NAME))
    if point is not None and point.final:  # finished, whether or not Ray recorded it: no worker needs to start
        print(f"fastrm: {point.uri} is this run's final model: the run is complete, nothing to train", flush=True)
        result = _finished_result(point, storage, name)
        finalize_run(result)
        return result
    if point is not None:  # the workers resume from it when it is newer than what Ray restores
        loop_config["resume_point"] = {"uri": point.uri, "step": point.step}
        if not ray_resume.has_ray_snapshot(storage, name):
            print(
                f"fastrm: resuming from {point.uri} (step {point.step}): Ray has no record of this run's checkpoints "
                "(the driver that wrote them was stopped before Ray recorded one)",
                flush=True,
            )
    use_gpu = use_gpu or bool((resources_per_worker or {}).get("GPU"))
    loop_config["use_gpu"] = use_gpu
    network = cluster.worker_network_report(worker_env or {}, "nccl" if use_gpu else "gloo", node_check_timeout_s)
    if network is not None:
        print(network, flush=True)
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=collective_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources_per_worker,
            placement_strategy=placement_strategy,
            accelerator_type=accelerator_type,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=args.save_total_limit or None),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # a rendezvous that cannot connect says which variables decide the interface
        hint = cluster.rendezvous_hint(e, worker_env or {})
        if hint is None:
            raise
        raise cluster.ClusterError(hint) from e
    finalize_run(result)
    if point is not None and result.error is None and result.best_checkpoints is not None:
        # Leftovers Ray never tracked follow save_total_limit too (never one Ray tracks: its snapshot names them).
        tracked = [Path(c.path.rstrip("/")).name for c, _ in result.best_checkpoints]
        ray_resume.prune_untracked(storage, name, run_id, args.save_total_limit, tracked, upto=point.step)
    return result


def _finished_result(point: ray_resume.ResumePoint, storage: str, name: str):
    """The ``ray.train.Result`` of a finished run, read from its final checkpoint (no worker started)."""
    from ray.train import Checkpoint, Result

    checkpoint = Checkpoint(point.uri)
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{RESULT_FILE}") as f:
        done = json.loads(f.read().decode())
    metrics = _scalars(done.get("train", {}))
    run = f"{storage.rstrip('/')}/{name}"
    return Result(
        metrics=metrics,
        checkpoint=checkpoint,
        error=None,
        path=run if cluster.is_uri(run) else str(Path(run)),
        best_checkpoints=[(checkpoint, metrics)],
        return_value=done,
    )
