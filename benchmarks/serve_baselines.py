"""Two reference reward servers for the load test (benchmarks/bench_serve.py), written for it, on stock transformers
(``AutoModelForSequenceClassification``) and the same checkpoint as `fastrm serve`:

  naive     one sequence per forward: each query of a request is scored alone (a batch of one, no padding), in
            a worker thread, one model call at a time; requests are never batched together.
  openrlhf  the shape of OpenRLHF's ``openrlhf/cli/serve_rm.py``: all queries of a request as one left-padded
            batch (attention mask, position ids from it, the reward at the last token), computed inside the
            request handler as there (the event loop waits), no batching across requests.

Both answer ``POST /get_reward`` ``{"query": [...], "prompts": [...]?}`` -> ``{"rewards", "scores"}`` and tokenize
each query as fastrm trains (prompt ids + response ids + EOS when the query starts with its prompt, else the
whole text + EOS), so the three servers' rewards can be compared (bench_serve.py checks they agree).

    python benchmarks/serve_baselines.py naive --model runs/demo --port 0 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse


def token_ids(tokenizer, query: str, prompt: str | None) -> list[int]:
    """prompt ids + response ids + EOS (training's rule) when the query starts with its prompt, else the whole text."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if prompt and query.startswith(prompt) and query[len(prompt) :].strip():
        return enc(prompt) + enc(query[len(prompt) :]) + [tokenizer.eos_token_id]
    return enc(query) + [tokenizer.eos_token_id]


def build_app(kind: str, model, tokenizer):
    import torch

    app = FastAPI()
    executor = ThreadPoolExecutor(max_workers=1)  # naive: one model call at a time, off the event loop
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def one_by_one(seqs: list[list[int]]) -> list[float]:
        return [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs]

    @torch.no_grad()
    def left_padded(seqs: list[list[int]]) -> list[float]:
        n = max(map(len, seqs))
        ids = torch.tensor([[pad] * (n - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only, as OpenRLHF's model does
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        return logits[:, 0].tolist()  # HF pools the last non-pad token: the last one, with left padding

    @app.post("/get_reward")
    async def get_reward(request: Request):
        data = await request.json()
        queries, prompts = data["query"], data.get("prompts") or [None] * len(data["query"])
        seqs = [token_ids(tokenizer, q, p) for q, p in zip(queries, prompts)]
        if kind == "naive":
            rewards = await asyncio.get_running_loop().run_in_executor(executor, one_by_one, seqs)
        else:
            rewards = left_padded(seqs)  # in the handler, as OpenRLHF's serve_rm does
        return JSONResponse({"rewards": rewards, "scores": rewards})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    import torch
    import uvicorn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fastrm.serve import listen

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=("naive", "openrlhf"))
    p.add_argument("--model", required=True, help="a checkpoint folder transformers loads")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    model.forward = _on_device(model)
    sock = listen(a.host, a.port)
    app = build_app(a.kind, model, tokenizer)
    with torch.no_grad():  # warm-up outside the measurement, as fastrm serve does at start
        model(input_ids=torch.tensor([[1, 2, tokenizer.eos_token_id]]))
    print(f"{a.kind}: listening on http://{a.host}:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def _on_device(model):
    """The model's forward with its inputs moved to the model's device (a no-op on CPU)."""
    forward = model.forward
    device = next(model.parameters()).device

    def call(**kw):
        return forward(**{k: v.to(device) for k, v in kw.items()})

    return call


if __name__ == "__main__":
    sys.exit(main())
