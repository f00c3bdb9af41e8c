"""Ray Train and Ray Data: N DDP workers train what one process trains, a failed worker resumes exactly, best-of-N
on Ray scores what in-process scoring scores, and the job entry points run through `ray job submit`.

Budget: about 2-3 minutes on 2 CPU cores (Ray process start-up dominates: each TorchTrainer worker group costs
~15 s, the local cluster and the job-test head ~10 s each).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")

from ray_nodes import TEST_ENV, JobHead  # noqa: E402

from fastrm.config import RewardConfig  # noqa: E402
from fastrm.loading import load_model  # noqa: E402
from fastrm.synthetic import byte_tokenizer, synthetic_pairs  # noqa: E402
from fastrm.trainer import RewardTrainer, seed_everything  # noqa: E402

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]

# pairs_per_step=8 over 2 workers = 4 pairs per worker; ~100 tokens a pair and 200 tokens a micro-batch give each
# worker 2-4 micro-batches per step (checked below), the single process 4-6. Adam divides by sqrt(v) + eps: with
# the default eps=1e-8 a gradient element that cancels to ~1e-9 turns summation-order noise (~1e-10; DDP adds
# the ranks' gradients in another order) into 1e-5 parameter differences, so eps=1e-6 keeps the comparison about
# the trainer rather than Adam's conditioning (the step losses agree to ~1e-7 either way).
BASE = dict(
    max_steps=3,
    pairs_per_step=8,
    max_tokens_per_batch=200,
    max_length=128,
    learning_rate=1e-3,
    adam_epsilon=1e-6,
    warmup_ratio=0.0,
    seed=0,
    progress=False,
    logging_steps=1,
    save_steps=0,
)
CASES = {
    "bt": dict(loss="bt"),
    "margin": dict(loss="margin"),
    "batch_mean": dict(loss="batch_mean", margin_scope="step"),
    "threshold": dict(loss="threshold", margin_scope="step"),
    "threshold_exact_mu": dict(loss="threshold", margin_scope="step", detach_mean=False),
}
FSDP_CASES = {"threshold_fsdp": dict(loss="threshold", margin_scope="step")}
ALL_CASES = {**CASES, **FSDP_CASES}
# The sequence-to-sequence objective (fastrm/seq2seq.py) on the same Ray Train path; trained first in the worker
# group, so the last training (whose gauges the metrics test reads) stays a scalar one.
# A seq2seq pair is two branches [x | y_l | y_w], [x | y_w | y_w]: about twice a scalar pair's tokens.
SEQ2SEQ_CASES = {"seq2seq": dict(objective="seq2seq", prefix_sharing=True, max_tokens_per_batch=400)}
# LoRA adapters (PEFT) under DDP and FSDP2: the final checkpoint is an adapter folder with its base.
LORA = dict(loss="threshold", margin_scope="step", lora_r=4, lora_alpha=8, lora_dropout=0.0)
LORA_CASES = {"lora_ddp": LORA, "lora_fsdp": LORA}
FIRST_CASES = {**SEQ2SEQ_CASES, **LORA_CASES}  # trained before ALL_CASES in the worker group


def _rows() -> list[dict]:
    rows = synthetic_pairs(24, seed=1)
    for i, r in enumerate(rows):
        r["margin"] = 0.5 * (i % 3)
    return rows


def _config(out: Path, **kw) -> RewardConfig:
    return RewardConfig(output_dir=str(out), **{**BASE, **kw})


def _weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _metrics(folder: Path, split: str = "train") -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def _eval_rows() -> list[dict]:
    return synthetic_pairs(11, seed=2)  # odd: the two ranks' eval shares differ in size


EVAL_CASE = "threshold"  # trained with eval data: the sharded eval must equal one process's


def _train_many(config: dict) -> None:
    """One worker group, several trainings in a row (start-up dominates the cost of a run); then rank 0 saves what
    its node's Ray metrics endpoint serves (what Prometheus scrapes) once fastrm's gauges are in it."""
    import urllib.request

    import ray.train

    from fastrm.ray_train import train_worker

    for run in config["runs"]:
        train_worker(run)
    if ray.train.get_context().get_world_rank() != 0:
        return
    here = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == here)
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    # Exported every max(RAY_metrics_report_interval_ms, 1 s): after 2.5 s the last values are out, and they stay
    # (fastrm re-sets them; Ray drops a series two intervals after its last set).
    time.sleep(2.5)
    text, deadline = "", time.monotonic() + 60
    while "ray_fastrm_eval_accuracy{" not in text and time.monotonic() < deadline:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        time.sleep(0.5)
    Path(config["metrics_out"]).write_text(text)


@pytest.fixture(scope="module")
def ray_local():
    # Test-module functions run on the workers: ship them by value (tests/ is not importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.MonkeyPatch.context() as mp:  # the local cluster's processes inherit this environment
        for k, v in TEST_ENV.items():
            mp.setenv(k, v)
        mp.setenv("RAY_metrics_report_interval_ms", "500")  # metrics reach the node's endpoint within 0.5 s
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ddp_runs(ray_local, tmp_path_factory):
    """Every loss case trained by 2 DDP workers (gloo) in one TorchTrainer run: {case: its final checkpoint}."""
    from fastrm.ray_train import make_loop_config, run_training

    base = tmp_path_factory.mktemp("ddp")
    runs = [
        make_loop_config(
            _config(base / c, **kw),
            data=_rows(),
            eval_data=_eval_rows() if c == EVAL_CASE else None,
            model="tiny-llama",
            tokenizer="byte",
            fsdp=c in FSDP_CASES or c == "lora_fsdp",
            final_name=c,  # one run folder, one final checkpoint per case
        )
        for c, kw in {**FIRST_CASES, **ALL_CASES}.items()
    ]
    result = run_training(
        _config(base / "driver", save_total_limit=0),  # Ray keeps every case's final checkpoint
        data=_rows(),
        model="tiny-llama",
        tokenizer="byte",
        num_workers=2,
        train_loop=_train_many,
        runs=runs,
        metrics_out=str(base / "prometheus.txt"),
        storage_path=str(base / "ray"),
        collective_timeout_s=120,
    )
    assert result.error is None
    return {case: Path(result.path) / case for case in {**FIRST_CASES, **ALL_CASES}}


def _gauge(text: str, name: str) -> float:
    """The value of fastrm gauge ``name`` (tagged run="fastrm") in Prometheus exposition text; one series only."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"ray_{name}{{")]
    assert len(values) == 1 and 'run="fastrm"' in text, (name, values)  # rank 0 only: one series, not one per rank
    return values[0]


def test_training_metrics_reach_rays_prometheus_endpoint(ddp_runs):
    """Loss, accuracy, margin and throughput of the last logged step (and the last eval) as gauges on the node's
    Ray metrics endpoint while the run's workers live: what the dashboard's Prometheus/Grafana read."""
    text = (ddp_runs[EVAL_CASE].parents[2] / "prometheus.txt").read_text()  # base/ray/<run>/<case>
    last = _metrics(ddp_runs[list(ALL_CASES)[-1]])[-1]  # the worker's last training: its gauges hold
    for key in ("loss", "accuracy", "mean_margin", "tokens_per_s", "lr", "step"):
        assert _gauge(text, f"fastrm_train_{key}") == pytest.approx(last[key], rel=1e-6), key
    [ev] = _metrics(ddp_runs[EVAL_CASE], "eval")
    assert _gauge(text, "fastrm_eval_accuracy") == pytest.approx(ev["accuracy"], rel=1e-6)
    assert _gauge(text, "fastrm_eval_bt_loss") == pytest.approx(ev["bt_loss"], rel=1e-6)


def _reference(case: str, out: Path, **kw) -> dict[str, torch.Tensor]:
    """The same training in this process, no Ray, one thread like a 1-CPU Ray worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = byte_tokenizer()
        seed_everything(BASE["seed"])
        cfg = _config(out, **{**ALL_CASES, **FIRST_CASES}[case], **kw)
        model = load_model("tiny-llama", tokenizer=tok, objective=cfg.objective)
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        RewardTrainer(
            model,
            cfg,
            _rows(),
            _eval_rows() if case == EVAL_CASE else None,
            tokenizer=tok,
            device=torch.device("cpu"),
        ).train()
    finally:
        torch.set_num_threads(threads)
    after = model.state_dict()  # with LoRA the adapted layers' keys changed (base_layer): the others, head included
    moved = max(float((after[k] - init[k]).abs().max()) for k in init.keys() & after.keys())
    assert moved > 1e-4, "training did not change the parameters"
    return _weights(out) if not cfg.lora_r else _weights(out, "adapter_model.safetensors")


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_ddp_two_workers_equal_one_process(case, ddp_runs, tmp_path):
    """DDP (and FSDP2 where the trainer has it) on 2 gloo workers = one process on the same global batch."""
    ray_out = ddp_runs[case]
    ref = _reference(case, tmp_path / "ref")
    assert _max_diff(_weights(ray_out), ref) < 1e-5
    ray_m, ref_m = _metrics(ray_out), _metrics(tmp_path / "ref")
    assert [m["step"] for m in ray_m] == [1, 2, 3]
    assert max(m["micro_batches"] for m in ray_m) > 1  # rank 0 accumulated over several micro-batches
    for a, b in zip(ray_m, ref_m):  # global (all-reduced) step statistics match too
        for key in ("loss", "accuracy", "mean_margin", "num_pairs", "tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    # The final checkpoint in the run folder: an HF-loadable model + trainer state + the history.
    assert (ray_out / "trainer_state.pt").exists() and (ray_out / "config.json").exists()
    if case == EVAL_CASE:  # sharded over the 2 ranks (6 + 5 pairs), gathered: one process's statistics
        from fastrm.evaluation import margin_statistics
        from fastrm.model import RewardModel

        [got] = _metrics(ray_out, "eval")
        margins = np.load(ray_out / "eval_margins.npy")  # gathered from the ranks' shares, in input order
        model = RewardModel.from_pretrained(ray_out)  # the same weights, evaluated by one process
        one = RewardTrainer(model, _config(tmp_path / "one"), _rows(), _eval_rows(), device=torch.device("cpu"))
        one.evaluate()
        # Per pair equal up to fp32 summation order (the packed micro-batches differ), so in the right order.
        assert np.abs(margins - np.load(tmp_path / "one" / "eval_margins.npy")).max() < 1e-6
        assert got == {"split": "eval", "step": 3, **margin_statistics(margins)}  # exact statistics, not averages
        assert got["num_pairs"] == 11


def test_seq2seq_two_workers_equal_one_process(ddp_runs, tmp_path):
    """The seq2seq objective on Ray Train (2 DDP gloo workers) = one process: the step's loss is normalised over
    the step's target tokens on all ranks, so the weights and the global step statistics agree; the final
    checkpoint is a seq2seq one (fastrm_seq2seq.json beside an HF causal LM)."""
    from fastrm.seq2seq_model import Seq2SeqRewardModel

    ray_out = ddp_runs["seq2seq"]
    ref = _reference("seq2seq", tmp_path / "ref")
    assert _max_diff(_weights(ray_out), ref) < 1e-5
    ray_m, ref_m = _metrics(ray_out), _metrics(tmp_path / "ref")
    assert [m["step"] for m in ray_m] == [1, 2, 3] and max(m["micro_batches"] for m in ray_m) > 1
    keys = {k for k in ref_m[0] if isinstance(ref_m[0][k], float) and "per_s" not in k and "time" not in k}
    assert {"loss", "token_accuracy"} <= keys
    for a, b in zip(ray_m, ref_m):
        for key in keys | {"tokens", "num_pairs"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert (ray_out / "fastrm_seq2seq.json").is_file()
    assert isinstance(load_model(str(ray_out)), Seq2SeqRewardModel)


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_on_two_workers_equals_one_process(case, ddp_runs, tmp_path):
    """LoRA adapters under DDP and FSDP2 on 2 gloo workers = one process: the same adapters and head, the same step
    statistics; the final checkpoint is an adapter folder whose recorded base loads with it (fastrm.load_model)."""
    ray_out = ddp_runs[case]
    ref = _reference(case, tmp_path / "ref")
    got = _weights(ray_out, "adapter_model.safetensors")
    assert got.keys() == ref.keys() and any("lora_A" in k for k in got) and any("score" in k for k in got)
    assert _max_diff(got, ref) < 1e-5
    for a, b in zip(_metrics(ray_out), _metrics(tmp_path / "ref")):
        for key in ("loss", "accuracy", "mean_margin", "num_pairs", "tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert (ray_out / "adapter_config.json").is_file()
    model, ref_model = load_model(str(ray_out)).eval(), load_model(str(tmp_path / "ref")).eval()
    prompt, responses = "Say something about Ada.\n", [" Ada is kind.", " Ada is rude."]
    assert model.score_texts(prompt, responses) == pytest.approx(ref_model.score_texts(prompt, responses), abs=1e-5)
    assert (ray_out / "lora_base" / "config.json").is_file()  # the base came with the folder (scratch is gone)


def test_worker_failure_resumes_from_checkpoint(ddp_runs, tmp_path):
    from fastrm.ray_cluster import ClusterError
    from fastrm.ray_train import run_training

    out, marker = tmp_path / "out", tmp_path / "failed-once"
    kw = dict(data=_rows(), model="tiny-llama", tokenizer="byte", num_workers=2, collective_timeout_s=120)
    result = run_training(
        _config(out, save_steps=1, **CASES["bt"]),
        max_failures=1,
        storage_path=str(tmp_path / "ray"),
        fail_at_step=2,
        fail_marker=str(marker),
        **kw,
    )
    assert marker.exists(), "the injected failure did not happen"
    run = Path(result.path)
    assert run.parent == tmp_path / "ray" and run.name.startswith("out-")  # <output dir name>-<config hash>
    assert Path(result.checkpoint.path) == run / "model"
    # Resumed from checkpoint-1: ends exactly where the uninterrupted 2-worker run ends.
    assert _max_diff(_weights(run / "model"), _weights(ddp_runs["bt"])) < 1e-6
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3]  # the redone step is logged once
    assert json.loads((run / "result.json").read_text())["train"]["step"] == 3
    assert not out.exists()  # nothing written on whichever node rank 0 ran: everything is in the run folder
    kept = sorted(p.name for p in run.glob("checkpoint-*"))
    assert kept == ["checkpoint-2"]  # save_total_limit=2 counts the final checkpoint ("model")

    # Another training under the same name is refused before anything starts, naming the field.
    with pytest.raises(ValueError, match="learning_rate.*another --name"):
        run_training(
            _config(out, save_steps=1, **{**CASES["bt"], "learning_rate": 2e-3}),
            storage_path=str(tmp_path / "ray"),
            name=run.name,
            **kw,
        )
    with pytest.raises(ClusterError, match="other inputs"):
        run_training(
            _config(out, save_steps=1, **CASES["bt"]),
            storage_path=str(tmp_path / "ray"),
            name=run.name,
            **{**kw, "data": _rows()[:20]},
        )
    assert sorted(p.name for p in run.glob("checkpoint-*")) == kept and (run / "model").is_dir()


def test_merge_lora_on_ray_is_refused_before_any_worker_starts(tmp_path):
    from fastrm.ray_train import run_training

    with pytest.raises(ValueError, match="merge_lora: not applied by a Ray run.*fastrm merge-lora"):
        run_training(_config(tmp_path, merge_lora=True, **LORA), data=_rows(), model="tiny-llama", tokenizer="byte")


def test_lora_fsdp_worker_failure_resumes_exactly(ddp_runs, tmp_path):
    """A LoRA run under FSDP2 that loses a worker at step 2 resumes from checkpoint-1 (adapters, head and sharded
    optimizer state) and ends where the uninterrupted run ends."""
    from fastrm.ray_train import run_training

    marker = tmp_path / "failed-once"
    kw = dict(data=_rows(), model="tiny-llama", tokenizer="byte", num_workers=2, collective_timeout_s=120, fsdp=True)
    result = run_training(
        _config(tmp_path / "out", save_steps=1, **LORA_CASES["lora_fsdp"]),
        max_failures=1,
        storage_path=str(tmp_path / "ray"),
        fail_at_step=2,
        fail_marker=str(marker),
        **kw,
    )
    assert marker.exists(), "the injected failure did not happen"
    final = Path(result.path) / "model"
    adapters = "adapter_model.safetensors"
    assert _max_diff(_weights(final, adapters), _weights(ddp_runs["lora_fsdp"], adapters)) < 1e-6
    assert [m["step"] for m in _metrics(Path(result.path))] == [1, 2, 3]


# ----------------------------------------------------------------------------------------------- best-of-N


@pytest.fixture(scope="module")
def rm_checkpoint(tmp_path_factory) -> Path:
    tok = byte_tokenizer()
    seed_everything(0)
    path = tmp_path_factory.mktemp("rm") / "model"
    load_model("tiny-llama", tokenizer=tok).save_pretrained(path, tokenizer=tok)
    return path


VALID = [
    {
        "id": 0,
        "prompt": "Say something about Ada.\n",
        "responses": [" Ada is kind.", " Ada is rude.", " Ada? Always so warm."],
        "meta": {"lang": "en", "n": 3},  # other fields are kept (before or after prompt/responses in the input)
    },
    {"prompt": "One answer only.\n", "responses": [" The only one."], "id": 1},  # N = 1
    {"prompt": "Ties.\n", "responses": [" same", " same", " same"], "id": 2},  # all tied: the first index wins
    {"prompt": "", "responses": [" no prompt at all", " still fine"]},  # no id: none in its output row
    {"prompt": "Many.\n", "responses": [f" candidate number {j}" for j in range(40)], "id": 4},  # > a micro-batch
    {"prompt": "Dup.\n", "responses": [" other", " dup", " dup"], "id": 5},
]
VALID += [
    {"prompt": f"Q{i}?\n", "responses": [f" answer {j} to {i}" for j in range(1 + i % 5)], "id": 6 + i}
    for i in range(8)
]

BAD = {  # line text -> expected words in the reason
    "{not json": "invalid JSON",
    json.dumps({"prompt": "p"}): "'responses': missing",
    json.dumps({"prompt": 3, "responses": ["a"]}): "'prompt'",
    json.dumps({"prompt": "p", "responses": []}): "empty list",
    json.dumps({"prompt": "p", "responses": "abc"}): "'responses'",
    json.dumps({"prompt": "p", "responses": ["fine", ""]}): "responses[1]': expected a non-empty string",
    json.dumps([1, 2]): "JSON object",
    json.dumps({"prompt": "p", "responses": ["a"], "scores": [1.0]}): "'scores': a column best-of-N writes itself",
}


def _check_scores(got_rows: list[dict], ref_rows: list[dict]) -> None:
    """Ray rows against in-process ``score_rows`` rows: same scores, the argmax (first on ties) picked."""
    assert len(got_rows) == len(ref_rows)
    for got, want in zip(got_rows, ref_rows):
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        assert got["best_index"] == got["scores"].index(max(got["scores"]))
        assert got["best_response"] == got["responses"][got["best_index"]]
        assert got["top_k"] == sorted(range(len(got["scores"])), key=lambda i: (-got["scores"][i], i))[:2]
        s = sorted(want["scores"], reverse=True)
        if len(s) == 1 or s[0] - s[1] > 1e-5:  # not a near-tie that float noise may decide
            assert got["best_index"] == want["best_index"]


def test_best_of_n_matches_in_process_scoring(ray_local, rm_checkpoint, tmp_path):
    from fastrm.model import RewardModel
    from fastrm.ray_bon import run_best_of_n
    from fastrm.scoring import score_rows

    lines = [json.dumps(r) for r in VALID]
    for k, text in enumerate(BAD):  # spread the bad rows through the file, plus a blank line (not a row)
        pos = 2 * k + 1
        lines.insert(pos, text)
    lines.insert(4, "")
    bad_lines = {lines.index(t) + 1: t for t in BAD}
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")

    res = run_best_of_n(
        str(src),
        str(tmp_path / "out.jsonl"),
        str(rm_checkpoint),
        num_actors=2,
        batch_size=3,
        cpus_per_actor=0.5,
        top_k=2,
        max_tokens_per_batch=300,
    )
    assert len(res.pop("nodes")) == 1  # the local cluster's one node
    assert res == {
        "rows": len(VALID),
        "errors": len(BAD),
        "output": str(tmp_path / "out.jsonl"),
        "errors_path": str(tmp_path / "out.errors.jsonl"),
    }
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]

    # Input order kept; every bad row is in the errors file with its line and reason, and only there.
    assert [(r["prompt"], r["responses"]) for r in out] == [(r["prompt"], r["responses"]) for r in VALID]
    # Each row's other fields kept as they were, right after prompt and responses.
    assert [{k: r[k] for k in ("id", "meta") if k in r} for r in out] == [
        {k: r[k] for k in ("id", "meta") if k in r} for r in VALID
    ]
    assert list(out[0])[:5] == ["prompt", "responses", "id", "meta", "source"]
    assert sorted(int(e["source"].rsplit(":", 1)[1]) for e in errors) == sorted(bad_lines)
    for e in errors:
        assert BAD[bad_lines[int(e["source"].rsplit(":", 1)[1])]] in e["reason"], e

    model = RewardModel.from_pretrained(rm_checkpoint)
    ref = score_rows(model, [dict(r) for r in VALID], tokenizer=model.tokenizer, top_k=2)
    _check_scores(out, ref)
    assert out[1]["best_index"] == 0 and len(out[1]["scores"]) == 1
    # Identical responses are scored once: exact ties, the first index wins.
    assert len(set(out[2]["scores"])) == 1 and out[2]["best_index"] == 0 and out[2]["top_k"] == [0, 1]
    assert out[5]["scores"][1] == out[5]["scores"][2]
    assert out[5]["top_k"] == sorted(range(3), key=lambda i: (-out[5]["scores"][i], i))[:2]

    # An existing output is never emptied silently: refused before any work, replaced only with overwrite=True.
    before = (tmp_path / "out.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_best_of_n(str(src), str(tmp_path / "out.jsonl"), str(rm_checkpoint))
    assert (tmp_path / "out.jsonl").read_text() == before
    res = run_best_of_n(str(src), str(tmp_path / "out.jsonl"), str(rm_checkpoint), batch_size=8, overwrite=True)
    assert res["rows"] == len(VALID) and (tmp_path / "out.jsonl").read_text().count("\n") == len(VALID)
    assert not list(tmp_path.glob(".out*.tmp-*"))  # the temporary files were renamed into place


def test_seq2seq_best_of_n_on_ray_data_equals_in_process(ray_local, ddp_runs, tmp_path):
    """A seq2seq checkpoint (the one Ray Train wrote above) on Ray Data: each response's sequence score as in one
    process, and a response over max_length as the target rejects its row with the reason (never truncated)."""
    from fastrm.ray_bon import run_best_of_n
    from fastrm.seq2seq_rewards import score_rows

    folder = ddp_runs["seq2seq"]
    too_long = {"prompt": "Long.\n", "responses": [" fine", " x" * 100], "id": 99}  # 200 tokens > max_length 128
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*VALID[:3], too_long, *VALID[3:]]))
    kw = dict(num_actors=2, batch_size=3, cpus_per_actor=0.5, top_k=2, max_tokens_per_batch=600)
    res = run_best_of_n(str(src), str(tmp_path / "out.jsonl"), str(folder), **kw)
    assert (res["rows"], res["errors"]) == (len(VALID), 1)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    [err] = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert err["source"].endswith(":4") and "response 1 needs 200 tokens" in err["reason"], err
    model = load_model(str(folder))
    ref = score_rows(model, [dict(r) for r in VALID], model.tokenizer, top_k=2)
    _check_scores(out, ref)
    assert len({tuple(r["scores"]) for r in out}) > 3  # the trained RM scores rows differently


# ----------------------------------------------------------------------------------------------- ray job submit


def _dashboard_missing() -> str | None:
    """Why `ray start --include-dashboard=true` cannot start a job server here (ray without its [default] extra)."""
    try:
        return ray._private.utils.get_dashboard_dependency_error()
    except AttributeError:  # another Ray version: let `ray start` decide
        return None


@pytest.mark.skipif(
    bool(_dashboard_missing()),
    reason="the job server needs ray[default] (aiohttp, grpcio, ...): pip install 'ray[default]'",
)
def test_job_submit_best_of_n(rm_checkpoint, tmp_path):
    """ray start --head + JobSubmissionClient + ray_jobs/best_of_n.py on a datasets folder, Parquet output: the
    rows' other columns (``id``, a struct ``meta``) come back as typed columns. Issue 18 saw this fail once under
    load: every wait is now a condition with its own bound (see ray_nodes.JobHead; idle 2-core machine ~7 s, ~5 s
    and ~40 s)."""
    import datasets
    import pyarrow.parquet as pq
    from ray.job_submission import JobStatus

    from fastrm.model import RewardModel
    from fastrm.scoring import score_rows

    ray.shutdown()  # the module's local Ray (if any) must not run beside the head
    rows = VALID[:4] + [{"prompt": "p", "responses": ["ok", ""], "id": 99}] + VALID[4:7]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "best.parquet"
    head = JobHead(tmp_path / "head.log")  # bounds: head start-up 300 s, agent ready 120 s, the job 300 s
    try:
        job = head.submit(
            f"{sys.executable} ray_jobs/best_of_n.py --model {rm_checkpoint} "
            f"--input {tmp_path / 'ds'} --output {out} --num-actors 1 --batch-size 4 --top-k 2",
            runtime_env={"working_dir": str(ROOT), "excludes": [".git", "runs", "benchmarks/results"]},
            prefix="fastrm-bon",
        )
        status, logs = head.wait(job), head.logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "scored 7 rows" in logs
    finally:
        head.stop()
    got = pq.read_table(out).to_pylist()
    errors = [json.loads(x) for x in (tmp_path / "best.errors.jsonl").read_text().splitlines()]
    assert [e["source"] for e in errors] == ["dataset[4]"] and "empty string" in errors[0]["reason"]
    want_rows = rows[:4] + rows[5:]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in want_rows]
    schema = pq.read_schema(out)  # the other columns, typed: an int, a struct (null where a row had none)
    assert schema.names[:4] == ["prompt", "responses", "id", "meta"] and str(schema.field("id").type) == "int64"
    assert [(r["id"], r["meta"]) for r in got] == [(r.get("id"), r.get("meta")) for r in want_rows]
    model = RewardModel.from_pretrained(rm_checkpoint)
    ref = score_rows(model, [dict(r) for r in want_rows], tokenizer=model.tokenizer, top_k=2)
    _check_scores(got, ref)
