"""GPU benchmark of the fused reward head + loss kernel (kernels/reward_head_loss.py).

Compares, in bf16 on a packed batch [T, H] with 2B pooled rows (RMSNorm head, Bradley-Terry loss):
  fused     reward_head_loss (Triton): norm + head + loss at the 2B pooled rows only
  eager     what HF / OpenRLHF reward models effectively run: final norm + value head over ALL T tokens, gather
            the pooled rows, then the loss
  compiled  torch.compile(reward_head_loss_ref) (default settings: automatic dynamic shapes after the first recompile)
for forward, backward (retain_graph, grads reset outside the timed region) and forward+backward.

Times are triton.testing.do_bench medians (CUDA events) stored in benchmark.extra_info; pytest-benchmark's own timer
wraps a synchronized call (benchmark.pedantic) and is only indicative. Each case also records a bandwidth lower bound:
the bytes that must move (read the 2B pooled rows and the parameters; in backward also write the whole [T, H]
grad_hidden, zeros included) over the measured device-to-device copy bandwidth.

Run (GPU only; skipped without CUDA):
    python -m pytest benchmarks/bench_kernels.py -q
Results go to benchmarks/results/kernels_<gpu>_<date>.json (FASTRM_KERNELS_OUT: another path), rewritten after each
case so a run cut by a time limit keeps what it measured. FASTRM_KERNELS_GRID picks the cases: ``full`` (default,
243 cases), ``runbook`` (the device runbook's minute: HH-pack sizes T = 32k, B = 64/128, H = 1024/2048, fused vs
eager), ``dry`` (the runbook's CPU rehearsal: tiny sizes under the Triton interpreter, wall-clock medians).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

GRID = os.environ.get("FASTRM_KERNELS_GRID", "full")
DRY = GRID == "dry"
pytestmark = [
    pytest.mark.benchmark,
    pytest.mark.skipif(not (torch.cuda.is_available() or DRY), reason="GPU benchmark: needs CUDA"),
]
if not DRY:
    pytestmark.append(pytest.mark.gpu)

TS, BS, HS, IMPLS = {
    "full": ([16 * 1024, 64 * 1024, 256 * 1024], [8, 128, 1024], [1024, 2048, 4096], ["fused", "eager", "compiled"]),
    # An HH pack at the default budget: T ~ 32k tokens, 64-80 pairs; pythia-410m / 1.4b widths.
    "runbook": ([32 * 1024], [64, 128], [1024, 2048], ["fused", "eager"]),
    "dry": ([512], [8], [64], ["fused", "eager"]),
}[GRID]
MODES = ["fwd", "bwd", "fwdbwd"]
EPS = 1e-6
DTYPE = torch.bfloat16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _bench(fn, grad_to_none=None) -> float:
    """Median milliseconds: triton.testing.do_bench (CUDA events) on a GPU, wall-clock medians in the dry run."""
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    import statistics
    import time

    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def eager_composition(hidden, pool_index, norm_weight, head_weight, head_bias, B: int) -> torch.Tensor:
    """HF LlamaRMSNorm + nn.Linear(H, 1) value head over all T tokens, gather at pool_index, BT loss."""
    h32 = hidden.float()
    y = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).to(hidden.dtype) * norm_weight
    values = F.linear(y, head_weight.view(1, -1), head_bias).squeeze(-1)  # [T]
    r = values[pool_index].float()
    return -F.logsigmoid(r[:B] - r[B:]).mean()


@functools.lru_cache(maxsize=1)
def _compiled_ref():
    from fastrm_kernels.reward_head_loss import reward_head_loss_ref

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(reward_head_loss_ref)


@functools.lru_cache(maxsize=1)
def _inputs(T: int, B: int, H: int):
    # One case alive at a time (T = 256k, H = 4096 is 2 GiB of bf16 hidden states).
    g = torch.Generator(device=DEVICE).manual_seed(T + B + H)
    dev = DEVICE
    hidden = torch.randn(T, H, device=dev, dtype=DTYPE, generator=g).requires_grad_()
    pool_index = torch.randperm(T, device=dev, generator=g)[: 2 * B].sort().values  # last tokens of packed sequences
    norm_weight = (1 + 0.1 * torch.randn(H, device=dev, generator=g)).to(DTYPE).requires_grad_()
    head_weight = (torch.randn(H, device=dev, generator=g) / H**0.5).to(DTYPE).requires_grad_()
    head_bias = torch.zeros(1, device=dev, dtype=DTYPE).requires_grad_()
    return hidden, pool_index, norm_weight, head_weight, head_bias


def _loss_fn(impl: str, T: int, B: int, H: int):
    from fastrm_kernels.reward_head_loss import reward_head_loss

    hidden, idx, nw, hw, hb = _inputs(T, B, H)
    if impl == "fused":
        return lambda: reward_head_loss(hidden, idx, nw, None, hw, hb, norm_type="rms", eps=EPS)[0]
    if impl == "eager":
        return lambda: eager_composition(hidden, idx, nw, hw, hb, B)
    ref = _compiled_ref()
    return lambda: ref(hidden, idx, nw, None, hw, hb, norm_type="rms", eps=EPS)[0]


def _bytes_lower_bound(T: int, B: int, H: int, mode: str) -> int:
    es = torch.finfo(DTYPE).bits // 8
    fwd = 2 * B * H * es + 2 * H * es  # pooled rows + norm / head weights
    bwd = T * H * es + 2 * B * H * es + 4 * H * es  # grad_hidden (zeros included) + pooled rows + params and grads
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Achievable HBM bandwidth in bytes/s: a 1 GiB device-to-device copy counts its read and its write."""
    n = 1 << (30 if DEVICE == "cuda" else 24)
    buf = torch.empty(2, n, dtype=torch.uint8, device=DEVICE)
    ms = _bench(lambda: buf[1].copy_(buf[0]))
    buf = None
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3)


def write_results(rows: list[dict], copy_bandwidth: float) -> Path:
    """Write all rows plus environment and fused-vs-baseline speedups to results/kernels_<gpu>_<date>.json."""
    import triton

    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run, Triton interpreter)"
    by_key = {(r["T"], r["B"], r["H"], r["mode"], r["impl"]): r["median_ms"] for r in rows if "median_ms" in r}
    speedups = {}
    for (T, B, H, mode, impl), ms in by_key.items():
        if impl == "fused":
            for other in ("eager", "compiled"):
                if (T, B, H, mode, other) in by_key:
                    speedups[f"T={T} B={B} H={H} {mode} vs {other}"] = round(by_key[(T, B, H, mode, other)] / ms, 3)
    out = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(getattr(sys, "orig_argv", sys.argv)),
        "grid": GRID,
        "dtype": str(DTYPE),
        "norm": "rms",
        "loss": "bt",
        "copy_bandwidth_GBps": round(copy_bandwidth / 1e9, 1),
        "results": rows,
        "speedup_fused": speedups,
    }
    if os.environ.get("FASTRM_KERNELS_OUT"):
        path = Path(os.environ["FASTRM_KERNELS_OUT"])
    else:
        name = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
        path = RESULTS_DIR / f"kernels_{name}_{_dt.date.today():%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return path


class _Rows(list):
    """The results so far, written to the JSON after every case (a cut run keeps what it measured)."""

    def __init__(self, bandwidth: float):
        super().__init__()
        self.bandwidth = bandwidth

    def append(self, row: dict) -> None:
        super().append(row)
        self.path = write_results(self, self.bandwidth)


@pytest.fixture(scope="module")
def results(copy_bandwidth):
    rows = _Rows(copy_bandwidth)
    yield rows
    if rows:
        print(f"\nwrote {rows.path}", file=sys.stderr)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("T", TS)
def test_reward_head_loss(benchmark, results, copy_bandwidth, T, B, H, impl, mode):
    benchmark.group = f"T={T} B={B} H={H} {mode}"
    row = {"T": T, "B": B, "H": H, "impl": impl, "mode": mode}
    try:
        loss_fn = _loss_fn(impl, T, B, H)
        leaves = [t for t in _inputs(T, B, H) if t.requires_grad]
        if mode == "fwd":
            step = loss_fn
        elif mode == "bwd":
            loss = loss_fn()
            step = functools.partial(loss.backward, retain_graph=True)
        else:

            def step():
                loss_fn().backward()

        ms = _bench(step, grad_to_none=leaves)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["error"] = "OOM"
        results.append(row)
        pytest.skip(f"{impl} {mode} out of memory at T={T} B={B} H={H}")

    nbytes = _bytes_lower_bound(T, B, H, mode)
    bound_ms = nbytes / copy_bandwidth * 1e3
    row.update(
        median_ms=ms,
        lower_bound_ms=bound_ms,
        bytes_lower_bound=nbytes,
        bound_fraction=bound_ms / ms,
        copy_bandwidth_GBps=copy_bandwidth / 1e9,
    )
    results.append(row)
    benchmark.extra_info.update(row)

    def synced():
        for t in leaves:
            t.grad = None
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=1 if DRY else 5, iterations=1, warmup_rounds=0 if DRY else 1)
    if os.environ.get("FASTRM_BENCH_VERBOSE"):
        print(f"{impl:>8} {mode:>6} T={T} B={B} H={H}: {ms:.3f} ms (bound {bound_ms:.3f} ms)", file=sys.stderr)


@pytest.mark.parametrize("B", BS)
@pytest.mark.skipif(GRID != "full", reason="the full grid only")
def test_input_checks(benchmark, results, B):
    """Cost of the device-side input checks each fused call queues (no host sync): the pool_index range assert
    (every call) and the finite-margin assert (loss='margin' only). Compare with the fused fwd times above."""
    import triton.testing
    from fastrm_kernels.reward_head_fwd import check_pool_index

    from fastrm.losses import check_finite

    T = TS[0]
    idx = torch.randperm(T, device=DEVICE)[: 2 * B]
    margin = torch.rand(B, device=DEVICE)
    for what, fn in (
        ("pool_index_check", lambda: check_pool_index(idx, T)),
        ("margin_finite_check", lambda: check_finite(margin, "margin", on_device=True)),
    ):
        ms = triton.testing.do_bench(fn, return_mode="median")
        row = {"T": T, "B": B, "H": 0, "impl": what, "mode": "fwd", "median_ms": ms}
        results.append(row)
        benchmark.extra_info[what + "_ms"] = ms
    benchmark.pedantic(lambda: (check_pool_index(idx, T), torch.cuda.synchronize()), rounds=5, iterations=1)
