"""Ray on a cluster's shape: two Ray nodes on this machine, and the driver-side rules a cluster needs.

The cluster: a head (``ray start --head``, custom resource ``node_a``) and a second raylet that joins it
(``node_b``), one CPU each, on 127.0.0.1 with ports they choose. Where the machine allows a mount namespace (root,
or unprivileged user namespaces), the second node runs in one with an empty tmpfs over ``private/``: files the test
writes there exist for the driver and the head but not for node B, as a node-local disk on a real cluster;
``shared/`` is seen by both, as NFS would be. Each node runs in its own process group and is stopped by it (never
``ray stop``, which would stop other test runs' Ray too).

What it checks: 2 workers forced onto the two nodes (``STRICT_SPREAD``) train what one process trains (threshold
loss, step-wide mu_B), and after the worker on node B is SIGKILLed they resume to the same parameters with the
whole history in the run folder; a node-local storage path, input or model is refused with a message naming the
node; best-of-N runs an actor on each node and writes every row in order.

Budget: about 2 minutes on an idle 2-core machine (node start-up ~15 s, each worker group ~15 s, the restart
~20 s, best-of-N ~20 s); every wait is bounded (node start-up, Ray Train's worker-group start and health checks,
collectives, best-of-N actor start: see tests/ray_nodes.py) and every process is stopped by a finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")

from ray_nodes import TEST_ENV, RayNode, private_mount_prefix, wait_for  # noqa: E402

from fastrm import ray_cluster as cluster  # noqa: E402
from fastrm.config import RewardConfig  # noqa: E402
from fastrm.synthetic import byte_tokenizer, synthetic_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    loss="threshold",
    margin_scope="step",
    max_steps=3,
    pairs_per_step=8,
    max_tokens_per_batch=200,
    max_length=128,
    learning_rate=1e-3,
    adam_epsilon=1e-6,  # see tests/test_ray.py: keeps the comparison about the trainer, not Adam's conditioning
    warmup_ratio=0.0,
    seed=0,
    progress=False,
    logging_steps=1,
)


def _config(out: Path, **kw) -> RewardConfig:
    return RewardConfig(output_dir=str(out), **{**BASE, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- driver-side rules


def test_default_run_name_follows_what_is_trained():
    from fastrm.ray_train import training_fields

    def name(**kw):
        args = RewardConfig(output_dir="runs/My RM", **kw)
        return cluster.default_run_name(args.output_dir, cluster.run_identity(training_fields(args), {"data": "d"}))

    assert name() == name()  # the same command finds its run again
    assert name().startswith("My-RM-") and len(name()) == len("My-RM-") + 8
    assert name(logging_steps=7, save_steps=3, progress=False) == name()  # not training fields
    assert len({name(), name(learning_rate=1e-4), name(loss="threshold"), name(seed=1)}) == 4
    rows = synthetic_pairs(4)
    a = cluster.run_identity({}, {"data": rows})
    assert (
        a == cluster.run_identity({}, {"data": [dict(r) for r in rows]}) != cluster.run_identity({}, {"data": rows[:3]})
    )


def test_claim_run_refuses_another_training_and_keeps_its_files(tmp_path):
    from fastrm.ray_train import training_fields
    from fastrm.trainer import check_resumable

    def claim(name, **kw):
        args = RewardConfig(**kw)
        ident = cluster.run_identity(training_fields(args), {"data": "/d.jsonl"})
        fresh = "start fresh under another --name"
        return cluster.claim_run(
            str(tmp_path), name, ident, compare_config=lambda s, w: check_resumable(s, args, w, fresh)
        )

    run = Path(claim("rm"))
    (run / "checkpoint-16").mkdir()
    assert Path(claim("rm", logging_steps=5)) == run  # same training: resumable
    with pytest.raises(ValueError, match=r"loss: checkpoint 'bt', this run 'threshold'.*another --name"):
        claim("rm", loss="threshold")
    assert (run / "checkpoint-16").is_dir() and json.loads((run / cluster.RUN_FILE).read_text())["config"][
        "loss"
    ] == "bt"


def test_paths_resolve_on_the_driver_and_not_in_a_job_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cluster.resolve_path("runs/x", "--output-dir") == str(tmp_path / "runs/x")
    assert cluster.resolve_path("s3://bucket/x", "--storage-path") == "s3://bucket/x"
    (tmp_path / "d.jsonl").write_text("{}\n")
    assert cluster.resolve_input(["d.jsonl", "tiny-llama", "byte"], "--data") == [
        str(tmp_path / "d.jsonl"),
        "tiny-llama",
        "byte",
    ]
    job_copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    with pytest.raises(cluster.ClusterError, match=r"relative path.*\$PWD/runs/x"):
        cluster.resolve_path("runs/x", "--output-dir")
    assert cluster.resolve_path("/abs/runs/x", "--output-dir") == "/abs/runs/x"


def test_a_missing_data_file_fails_on_the_driver_before_any_worker(tmp_path):
    """Data is a path or rows, never a name: a typo used to surface as a worker traceback inside Ray Train."""
    from fastrm.ray_train import make_loop_config

    args = RewardConfig(output_dir=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="--data: no such file: .*nope.jsonl"):
        make_loop_config(args, data=str(tmp_path / "nope.jsonl"), model="tiny-llama", tokenizer="byte")
    with pytest.raises(FileNotFoundError, match="--eval-data: no such file"):
        make_loop_config(args, data=[{"prompt": "p", "chosen": "a", "rejected": "b"}], eval_data="e.jsonl", model="x")
    assert make_loop_config(args, data="s3://bucket/d.jsonl", model="tiny-llama")["data"] == "s3://bucket/d.jsonl"


def test_resources_and_worker_environment():
    assert cluster.parse_resources('{"CPU": 4, "GPU": 1, "accelerator_type:H100": 0.001}') == {
        "CPU": 4.0,
        "GPU": 1.0,
        "accelerator_type:H100": 0.001,
    }
    for bad in ('{"CPU": -1}', '["CPU"]', "{CPU: 1}", '{"GPU": true}'):
        with pytest.raises(ValueError, match="resources-per-worker"):
            cluster.parse_resources(bad)
    env = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO", "HOME": "/root", "MY_FLAG": "1"}
    assert cluster.worker_env(["MY_FLAG", "OTHER=x"], env) == {
        "GLOO_SOCKET_IFNAME": "eth0",
        "NCCL_DEBUG": "INFO",
        "MY_FLAG": "1",
        "OTHER": "x",
    }
    with pytest.raises(ValueError, match="not set"):
        cluster.worker_env(["MISSING"], env)


def test_a_rendezvous_that_cannot_connect_names_the_interface_variables():
    """The failure issue 32 saw (hostname -> 127.0.0.1 on a multi-node CPU cluster), as Ray Train wraps it."""
    try:
        try:
            raise RuntimeError(
                "Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144] "
                "Connection refused, remote=[127.0.0.1]:41023"
            )
        except RuntimeError as inner:
            raise ValueError("Training failed due to worker errors: rank 1 (see the worker log)") from inner
    except ValueError as e:
        hint = cluster.rendezvous_hint(e, {})
    assert "\n" not in hint and "Gloo connectFullMesh failed" in hint and "remote=[127.0.0.1]" in hint
    assert "GLOO_SOCKET_IFNAME unset" in hint and "--worker-env GLOO_SOCKET_IFNAME=eth0" in hint
    assert "does not reach the job" in hint
    # What a worker group with --worker-env GLOO_SOCKET_IFNAME=bogus0 raises (seen through run_training on Ray 2.60).
    bogus = RuntimeError(
        "[enforce fail at /__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/device.cc:84] ifa != nullptr. "
        "Unable to find address for: bogus0"
    )
    hint = cluster.rendezvous_hint(bogus, {"GLOO_SOCKET_IFNAME": "bogus0"})
    assert "(Unable to find address for: bogus0)" in hint and "the workers had GLOO_SOCKET_IFNAME=bogus0" in hint
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error")
    assert "NCCL_SOCKET_IFNAME" in cluster.rendezvous_hint(nccl, {})
    assert cluster.rendezvous_hint(RuntimeError("CUDA out of memory"), {}) is None


def test_best_of_n_output_keeps_other_fields_and_refuses_mixed_parquet_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastrm.data import DataError
    from fastrm.ray_bon import _Writer

    cols = ["prompt", "responses", "extra", "source"]
    schema = pa.schema([("prompt", pa.string()), ("responses", pa.list_(pa.string())), ("extra", pa.string())])
    schema = schema.append(pa.field("source", pa.string()))

    def batch(*extras):
        n = len(extras)
        return pa.table({"prompt": ["p"] * n, "responses": [["a"]] * n, "extra": list(extras), "source": ["s"] * n})

    w = _Writer(str(tmp_path / "out.jsonl"), cols, schema)
    w.write(batch('{"id": 7, "meta": {"k": [1, 2]}}', None))
    w.commit()
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == [
        {"prompt": "p", "responses": ["a"], "id": 7, "meta": {"k": [1, 2]}, "source": "s"},
        {"prompt": "p", "responses": ["a"], "source": "s"},
    ]
    assert list(got[0]) == ["prompt", "responses", "id", "meta", "source"]

    w = _Writer(str(tmp_path / "out.parquet"), cols, schema)
    w.write(batch('{"id": 1}', None))  # types unified over batches: null, then int and float -> double
    w.write(batch('{"id": 2.5, "tag": "x"}'))
    w.commit()
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.schema.names == ["prompt", "responses", "id", "tag", "source"]
    assert str(t.schema.field("id").type) == "double"
    assert t.column("id").to_pylist() == [1.0, None, 2.5] and t.column("tag").to_pylist() == [None, None, "x"]

    w = _Writer(str(tmp_path / "mixed.parquet"), cols, schema)
    w.write(batch('{"id": 1}'))
    w.write(batch('{"id": "a-1"}'))
    with pytest.raises(DataError, match=r"mixed.parquet: the input's other fields cannot be Parquet.*id.*\.jsonl"):
        try:
            w.commit()
        finally:
            w.close()
    assert not list(tmp_path.glob("*mixed*"))  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------- two nodes


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (node_a) + second raylet (node_b), the driver connected; yields a dict of paths and node ids."""
    ray.shutdown()  # another module's local Ray must not run beside these nodes
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _where_loop runs on the workers
    base = tmp_path_factory.mktemp("two-nodes")
    shared, private = base / "shared", base / "private"
    shared.mkdir()
    prefix = private_mount_prefix(private)
    temp_dir = tempfile.mkdtemp(prefix="ray2n-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **TEST_ENV}
    env.pop("RAY_ADDRESS", None)
    common = ("--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}")
    nodes: list[RayNode] = []
    with pytest.MonkeyPatch.context() as mp:
        for k, v in TEST_ENV.items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        try:
            # Node start-up bounds are for a machine shared with other test runs (about 10 s each when idle).
            head = RayNode(
                base / "head.log",
                "--head",
                "--port=0",
                "--include-dashboard=false",
                '--resources={"node_a": 1}',
                *common,
                env=env,
                temp_dir=temp_dir,
            )
            nodes.append(head)
            head.wait_started(300)
            gcs = head.gcs_address()
            node_b = RayNode(
                base / "node_b.log",
                f"--address={gcs}",
                '--resources={"node_b": 1}',
                *common,
                env=env,
                temp_dir=temp_dir,
                wrapper=prefix or (),
            )
            nodes.append(node_b)
            node_b.wait_started(300)
            ray.init(address=gcs, log_to_driver=False)
            alive = wait_for(lambda: len(cluster.alive_nodes()) == 2 and cluster.alive_nodes(), 120, "2 alive nodes")
            ids = {r: n["NodeID"] for n in alive for r in ("node_a", "node_b") if r in n["Resources"]}
            assert ray.get_runtime_context().get_node_id() == ids["node_a"]  # the driver is on the head
            yield {"shared": shared, "private": private if prefix else None, **ids}
        finally:
            ray.shutdown()
            for node in reversed(nodes):
                node.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _where_loop(config: dict) -> dict:
    """The real per-worker loop, after noting where this worker runs and which fastrm it imported."""
    import ray.train

    import fastrm
    from fastrm.ray_train import train_loop_per_worker

    record = {
        "rank": ray.train.get_context().get_world_rank(),
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "fastrm": fastrm.__file__,
    }
    with open(config["where_log"], "a") as f:  # one short O_APPEND write per worker: lines do not interleave
        f.write(json.dumps(record) + "\n")
    return train_loop_per_worker(config)


def _train(nodes: dict, out_name: str, **kw):
    from fastrm.ray_train import run_training

    shared = nodes["shared"]
    data = shared / "pairs.jsonl"  # an input file on the shared disk: every node sees it (checked at start)
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(24, seed=1)))
    where = shared / f"where-{out_name}.jsonl"
    result = run_training(
        _config(shared / out_name, **kw.pop("config", {})),
        data=[str(data)],
        model="tiny-llama",
        tokenizer="byte",
        num_workers=2,
        placement_strategy="STRICT_SPREAD",  # one worker per node
        storage_path=str(shared / "storage"),
        collective_timeout_s=120,
        train_loop=_where_loop,
        where_log=str(where),
        **kw,
    )
    return result, [json.loads(line) for line in where.read_text().splitlines()]


@pytest.fixture(scope="module")
def spread_run(two_nodes):
    return _train(two_nodes, "spread")


def test_two_workers_on_two_nodes_train_what_one_process_trains(two_nodes, spread_run, tmp_path):
    from fastrm.loading import load_model
    from fastrm.trainer import RewardTrainer, seed_everything

    result, where = spread_run
    assert sorted(w["rank"] for w in where) == [0, 1]
    assert {w["node"] for w in where} == {two_nodes["node_a"], two_nodes["node_b"]}
    assert all(Path(w["fastrm"]).resolve().is_relative_to(ROOT) for w in where), where  # this checkout's code
    run = Path(result.path)
    history = _history(run)
    assert [r["step"] for r in history if r["split"] == "train"] == [1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"] or history[-1]["accuracy"] >= history[0]["accuracy"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a 1-CPU Ray worker
    try:
        tok = byte_tokenizer()
        seed_everything(BASE["seed"])
        model = load_model("tiny-llama", tokenizer=tok)
        pairs = synthetic_pairs(24, seed=1)
        RewardTrainer(model, _config(tmp_path / "ref"), pairs, tokenizer=tok, device=torch.device("cpu")).train()
    finally:
        torch.set_num_threads(threads)
    assert _max_diff(_weights(run / "model"), _weights(tmp_path / "ref")) < 1e-5


def test_killed_worker_on_the_second_node_resumes_to_the_same_parameters(two_nodes, spread_run):
    shared = two_nodes["shared"]
    marker = shared / "killed-once"
    result, where = _train(
        two_nodes,
        "killed",
        config=dict(save_steps=1),
        max_failures=1,
        fail_at_step=2,
        fail_mode="kill",
        fail_node=two_nodes["node_b"],
        fail_marker=str(marker),
    )
    assert marker.exists(), "the worker on node B was not killed"
    killed_pid = int(marker.read_text().split("pid ")[1].split(",")[0])
    first, second = where[:2], where[2:]
    assert len(where) == 4, where  # two attempts of two workers
    for attempt in (first, second):
        assert {w["node"] for w in attempt} == {two_nodes["node_a"], two_nodes["node_b"]}
    assert [w["pid"] for w in first if w["node"] == two_nodes["node_b"]] == [killed_pid]
    assert killed_pid not in [w["pid"] for w in second]
    run = Path(result.path)
    assert _max_diff(_weights(run / "model"), _weights(Path(spread_run[0].path) / "model")) < 1e-6
    assert [r["step"] for r in _history(run) if r["split"] == "train"] == [1, 2, 3]  # redone step logged once


def test_node_local_paths_are_refused_with_the_node_named(two_nodes):
    from fastrm.loading import load_model
    from fastrm.ray_bon import run_best_of_n
    from fastrm.ray_train import run_training

    private = two_nodes["private"]
    if private is None:
        pytest.skip("no mount namespace on this machine (needs root or unprivileged user namespaces)")
    b = two_nodes["node_b"][:8]
    kw = dict(model="tiny-llama", tokenizer="byte", num_workers=2, node_check_timeout_s=60)
    with pytest.raises(cluster.ClusterError, match=rf"--storage-path {private / 'storage'} is not shared.*node {b}"):
        run_training(_config(private / "out"), data=synthetic_pairs(8), storage_path=str(private / "storage"), **kw)
    # Only --output-dir given: the error names the flag the user gave (the default storage path is the output dir).
    with pytest.raises(
        cluster.ClusterError, match=rf"^--output-dir {private / 'out'} \(the default --storage-path\) is not shared"
    ):
        run_training(_config(private / "out"), data=synthetic_pairs(8), **kw)
    local = private / "pairs.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(8)))
    with pytest.raises(cluster.ClusterError, match=rf"--data.*node {b}.*{local}"):
        run_training(_config(private / "out"), data=[str(local)], storage_path=str(two_nodes["shared"]), **kw)
    load_model("tiny-llama", tokenizer=byte_tokenizer()).save_pretrained(private / "rm")
    with pytest.raises(cluster.ClusterError, match=rf"--model.*node {b}.*{private / 'rm'}"):
        run_best_of_n(str(local), str(private / "bon.jsonl"), str(private / "rm"), node_check_timeout_s=60)
    assert not (two_nodes["shared"] / "out").exists()  # refused before anything was written


def test_start_up_says_which_interface_the_workers_rendezvous_uses(two_nodes):
    """`ray job submit` does not pass the submitting shell's environment on: the run says, per node, what the
    workers will have (each node's environment plus --worker-env), checked from a task in that environment."""
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert var not in os.environ  # the nodes inherited this environment
    unset = cluster.worker_network_report({}, "gloo", 120)
    assert unset.startswith("fastrm: GLOO_SOCKET_IFNAME is not set for the workers on 2 of 2 nodes (")
    assert "hostname -> " in unset and "--worker-env GLOO_SOCKET_IFNAME=<interface>" in unset
    assert "does not reach the job" in unset and "\n" not in unset
    given = cluster.worker_network_report({"GLOO_SOCKET_IFNAME": "lo"}, "gloo", 120)
    assert given == "fastrm: the workers' GLOO_SOCKET_IFNAME is lo on all 2 nodes"


def test_best_of_n_runs_an_actor_on_each_node(two_nodes, tmp_path):
    from fastrm.loading import load_model
    from fastrm.model import RewardModel
    from fastrm.ray_bon import run_best_of_n
    from fastrm.scoring import score_rows

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model_dir = two_nodes["shared"] / "rm"  # the model on the shared disk: every actor loads it
    load_model("tiny-llama", tokenizer=tok).save_pretrained(model_dir, tokenizer=tok)
    rows = [
        {"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["chosen"] + " Indeed."]}
        for r in synthetic_pairs(24, seed=3)
    ]
    # The input on the driver's disk only (node B does not see `private/`): read on the driver's node, streamed.
    src = (two_nodes["private"] or tmp_path) / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_best_of_n(
        str(src), str(tmp_path / "best.jsonl"), str(model_dir), num_actors=2, batch_size=2, actor_start_timeout_s=300
    )
    assert res["rows"] == len(rows) and res["errors"] == 0
    assert set(res["nodes"]) == {two_nodes["node_a"], two_nodes["node_b"]}  # one 1-CPU actor per node
    got = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    assert [(g["prompt"], g["responses"]) for g in got] == [(r["prompt"], r["responses"]) for r in rows]
    m = RewardModel.from_pretrained(model_dir)
    ref = score_rows(m, [dict(r) for r in rows], tokenizer=m.tokenizer)
    for g, w in zip(got, ref):
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5)
        assert g["best_response"] == g["responses"][g["best_index"]]
