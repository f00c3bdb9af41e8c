"""The reward server as a Ray Serve deployment on a local Ray instance answers as ``fastrm serve`` does."""

import socket

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("ray.serve")

import ray  # noqa: E402

from fastrm.loading import load_model, load_tokenizer  # noqa: E402
from fastrm.ray_serve import app_builder  # noqa: E402
from fastrm.scoring import score  # noqa: E402
from fastrm.synthetic import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_answers_like_offline_scoring(tmp_path):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    ckpt = tmp_path / "rm"
    model = load_model("tiny-llama", tokenizer=tok)
    model.save_pretrained(ckpt, tokenizer=tok)
    model, tok = load_model(ckpt).eval(), load_tokenizer(None, ckpt)
    port = _free_port()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the Serve-config path (import_path + args): strings, as `serve run` and YAML files pass them
        app = app_builder({"model": str(ckpt), "max_wait_ms": "2", "num_cpus_per_replica": "0.5"})
        serve.run(app, name="fastrm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        prompts, responses = ["Q: hi\nA:", "Other?"], [[" yes", " no"], [" maybe"]]
        r = httpx.post(url + "/score", json={"prompts": prompts, "responses": responses}, timeout=60)
        assert r.status_code == 200, r.text
        want = score(model, prompts, responses, tokenizer=tok)
        for got, ref in zip(r.json()["rewards"], want):
            assert got == pytest.approx(ref, abs=1e-5)
        queries = [prompts[0] + " yes", prompts[0] + " no"]
        r = httpx.post(url + "/get_reward", json={"query": queries, "prompts": [prompts[0]] * 2}, timeout=60)
        assert r.status_code == 200 and r.json()["rewards"] == pytest.approx(want[0], abs=1e-5)
        bad = httpx.post(url + "/score", json={"prompts": ["Q"], "responses": [[]]}, timeout=60)
        assert bad.status_code == 400 and bad.json()["field"] == "responses[0]"
        assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_rm_entry_point_reports_bad_flags_in_one_line(capsys, monkeypatch):
    """ray_jobs/serve_rm.py uses fastrm's one error policy (fastrm.cli.run_user_facing): a refused setting is one
    line and exit status 1, before any Ray cluster starts; --debug shows the traceback instead."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "ray_jobs" / "serve_rm.py"
    spec = importlib.util.spec_from_file_location("serve_rm", path)
    serve_rm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_rm)
    monkeypatch.delenv("FASTRM_API_KEY", raising=False)
    assert serve_rm.cli(["--model", "runs/none", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("serve_rm.py: error: --host 0.0.0.0 is reachable") and "Traceback" not in err
    with pytest.raises(ValueError, match="--api-key"):
        serve_rm.cli(["--model", "runs/none", "--host", "0.0.0.0", "--debug"])
