"""Load test of the reward server, side by side in one run: `fastrm serve` against two baselines written for this
test (benchmarks/serve_baselines.py: stock transformers, the same checkpoint, the same tokenization):

  naive     one sequence per forward, requests never batched together;
  openrlhf  the shape of OpenRLHF's serve_rm: a request's queries as one padded batch, no batching across requests.

Traffic is OpenRLHF's ``POST /get_reward`` with prompts, in two shapes:

  rollout   a prompt's N samples in one request (what a rollout worker sends per prompt);
  single    one sample per request, shuffled over prompts (samples sent one by one as they finish);

at 1, 8 and 64 concurrent clients: requests/s, p50/p99 latency and the server's CPU time per request (on a shared
machine the steadier measure). Every level is bounded in requests and seconds; the rewards of all servers and
levels must agree (checked: exit 1 otherwise).

Head-of-line blocking, per server: the latency of a small request alone, behind a large one (``--large-responses``
x ~``--large-chars`` tokens) and behind a large one whose client disconnected right after sending it (fastrm drops
its remaining micro-batches; /metrics counts them).

Results: benchmarks/results/serve_<device>_<date>.json (machine and its load, versions, date, command);
``--table FILE`` prints the README's table from a result file.

CPU (tiny model, a few minutes):  python benchmarks/bench_serve.py
smoke (CI):                       python benchmarks/bench_serve.py --smoke --out /tmp/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling helper modules, as bench_train does
from bench_machine import cpu_name  # noqa: E402

WORDS = "the a model reward answer question because however we they helpful kind clear short long good".split()
SERVERS = ("fastrm", "naive", "openrlhf")
TOL = 1e-4


def make_checkpoint(folder: Path) -> str:
    import torch

    from fastrm.loading import load_model
    from fastrm.synthetic import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    load_model("tiny-llama", tokenizer=tok).save_pretrained(folder, tokenizer=tok)
    return str(folder)


def _text(rng: random.Random, n: int) -> str:
    out = ""
    while len(out) < n:
        out += " " + rng.choice(WORDS)
    return out[:n]


def workloads(prompts: int, samples: int, prompt_chars: int, response_chars: int, seed: int = 0) -> dict:
    """{shape: [(body, keys)]}: the same samples as rollout requests (one per prompt) and as shuffled singles;
    ``keys`` name each sample (prompt, sample) so rewards can be compared across servers."""
    rng = random.Random(seed)
    groups = []
    for i in range(prompts):
        p = f"\n\nHuman: question {i}:{_text(rng, prompt_chars)}\n\nAssistant:"
        rs = [_text(rng, rng.randint(response_chars // 2, response_chars * 3 // 2)) for _ in range(samples)]
        groups.append([((i, j), p, r) for j, r in enumerate(rs)])
    rollout = [
        ({"query": [p + r for _, p, r in g], "prompts": [p for _, p, _ in g]}, [k for k, _, _ in g]) for g in groups
    ]
    flat = [s for g in groups for s in g]
    rng.shuffle(flat)
    single = [({"query": [p + r], "prompts": [p]}, [k]) for k, p, r in flat]
    return {"rollout": rollout, "single": single}


class Server:
    """A server subprocess on a free loopback port; ``kind`` is fastrm, naive or openrlhf."""

    def __init__(self, kind: str, model: str, threads: int | None):
        if kind == "fastrm":
            cmd = [
                sys.executable,
                "-m",
                "fastrm.cli",
                "serve",
                "--model",
                model,
                "--port",
                "0",
                "--log-level",
                "warning",
            ]
        else:
            cmd = [sys.executable, str(HERE / "serve_baselines.py"), kind, "--model", model, "--port", "0"]
        cmd += ["--threads", str(threads)] if threads else []
        log = open(os.environ.get("BENCH_SERVER_LOG", os.devnull), "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ))
        self.kind = kind
        self.url: str | None = None

    def wait_ready(self, timeout: float = 300) -> str:
        line: list[str] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not line or "listening on " not in line[0]:
            raise RuntimeError(f"{self.kind} server did not start: {line} (exit {self.proc.poll()})")
        self.url = line[0].split("listening on ")[1].split()[0]
        return self.url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def cpu_seconds(self) -> float | None:
        """CPU time the server process used so far (all its threads), or None off Linux."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def fastrm_metrics(http: aiohttp.ClientSession, server: Server) -> dict[str, float]:
    if server.kind != "fastrm":
        return {}
    async with http.get(server.url + "/metrics") as r:
        text = await r.text()
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln and ln[0] != "#"}


async def run_level(server: Server, requests: list, clients: int, timeout_s: float) -> dict:
    """``clients`` concurrent clients send ``requests`` in order (each takes the next one) until done or timed out."""
    latencies: list[float] = []
    rewards: dict = {}
    errors: list[str] = []
    next_i = 0
    deadline = time.perf_counter() + timeout_s

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < len(requests) and time.perf_counter() < deadline:
            body, keys = requests[next_i]
            next_i += 1
            t0 = time.perf_counter()
            try:
                async with http.post(server.url + "/get_reward", json=body) as r:
                    r.raise_for_status()
                    out = await r.json()
            except aiohttp.ClientError as e:  # counted and reported, not a crash of the load test
                errors.append(f"{type(e).__name__}: {e}")
                continue
            latencies.append(time.perf_counter() - t0)
            rewards.update(zip(map(tuple, keys), out["rewards"]))

    load = os.getloadavg()[0]
    # aiohttp: the client OpenRLHF's agent uses (and cheaper per request than httpx on a shared CPU)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        before, cpu0 = await fastrm_metrics(http, server), server.cpu_seconds()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
        after, cpu1 = await fastrm_metrics(http, server), server.cpu_seconds()
    n = len(latencies)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if n > 1 else latencies * 99
    calls = after.get("fastrm_batch_requests_count", 0) - before.get("fastrm_batch_requests_count", 0)
    shared = after.get("fastrm_batch_requests_sum", 0) - before.get("fastrm_batch_requests_sum", 0)
    return {
        "clients": clients,
        "requests": n,
        "responses": len(rewards),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": round(seconds, 3),
        "requests_per_s": round(n / seconds, 2) if seconds else 0.0,
        "responses_per_s": round(len(rewards) / seconds, 2) if seconds else 0.0,
        "p50_ms": round(1000 * q[49], 2) if n else None,
        "p99_ms": round(1000 * q[98], 2) if n else None,
        "server_cpu_ms_per_request": round(1000 * (cpu1 - cpu0) / max(n, 1), 2) if cpu0 is not None else None,
        "load_average_1min": round(load, 2),
        "model_calls": int(calls) if server.kind == "fastrm" else None,
        "requests_per_model_call": round(shared / calls, 2) if calls else None,
        "_rewards": rewards,
    }


async def _timed_post(http: aiohttp.ClientSession, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with http.post(url + "/get_reward", json=body) as r:
        r.raise_for_status()
        await r.read()
    return round(1000 * (time.perf_counter() - t0), 2)


async def _send_and_leave(url: str, body: dict) -> None:
    """POST a request on a raw connection and close it at once: a client that gave up."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    head = f"POST /get_reward HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()
    writer.close()


async def head_of_line(server: Server, large: dict, small: dict, repeats: int = 5) -> dict:
    """The small request's latency alone, behind the large one, and behind the large one after its client left."""
    # a new connection per request: a server that held its event loop may have closed idle keep-alive ones
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        alone = [await _timed_post(http, server.url, small) for _ in range(repeats)]
        big = asyncio.ensure_future(_timed_post(http, server.url, large))
        await asyncio.sleep(0.05)  # the large request is in the server
        behind = await _timed_post(http, server.url, small)
        large_ms = await big
        before = await fastrm_metrics(http, server)
        await _send_and_leave(server.url, large)
        await asyncio.sleep(0.05)
        departed = await _timed_post(http, server.url, small)
        after = await fastrm_metrics(http, server)
        # again alone (the machine's load drifts); a baseline has finished the departed request by now (FIFO)
        alone += [await _timed_post(http, server.url, small) for _ in range(repeats)]
    alone_ms = statistics.median(alone)
    out = {
        "small_alone_ms": alone_ms,
        "small_behind_large_ms": behind,
        "large_ms": large_ms,
        "small_behind_departed_large_ms": departed,
        "behind_large_x_alone": round(behind / alone_ms, 1),
        "behind_departed_large_x_alone": round(departed / alone_ms, 1),
    }
    if server.kind == "fastrm":  # responses of the departed request that reached the model (the small one's 1 aside)
        scored = after["fastrm_batch_responses_sum"] - before["fastrm_batch_responses_sum"] - 1
        out["departed_large_responses_scored"] = int(scored)
        out["departed_large_responses_dropped_from_the_queue"] = int(
            after["fastrm_abandoned_responses_total"] - before["fastrm_abandoned_responses_total"]
        )
    return out


def meta(args: argparse.Namespace) -> dict:
    import fastapi
    import torch
    import transformers
    import uvicorn

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    cpu = cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "aiohttp": aiohttp.__version__,
        "fastrm_commit": commit,
        "model": args.model or "tiny-llama (random init), byte tokenizer",
        "server_torch_threads": args.threads or "torch default",
        "note": "clients and servers share the machine; one server is loaded at a time",
    }


def ratios(levels: dict) -> dict:
    """fastrm over each baseline, per shape and client count: requests/s (higher is better for fastrm) and server
    CPU per request (baseline's over fastrm's: how many times less CPU fastrm used)."""
    out: dict = {}
    for shape, by_server in levels.items():
        for i, fast in enumerate(by_server["fastrm"]):
            row = out.setdefault(shape, {}).setdefault(str(fast["clients"]), {})
            for base in ("naive", "openrlhf"):
                slow = by_server[base][i]
                cpu = None
                if fast["server_cpu_ms_per_request"] and slow["server_cpu_ms_per_request"]:
                    cpu = round(slow["server_cpu_ms_per_request"] / fast["server_cpu_ms_per_request"], 2)
                rps = round(fast["requests_per_s"] / slow["requests_per_s"], 2) if slow["requests_per_s"] else None
                row[f"vs_{base}"] = {"requests_per_s": rps, "server_cpu_per_request": cpu}
    return out


def table(result: dict) -> str:
    """The README's tables (markdown) from a result file: fastrm's requests/s over each baseline's, and each
    baseline's server CPU per request over fastrm's (above 1: fastrm is faster, and cheaper)."""
    lines = [
        "| traffic | clients | requests/s: fastrm ÷ naive | CPU per request: naive ÷ fastrm "
        "| requests/s: fastrm ÷ OpenRLHF-style | CPU per request: OpenRLHF-style ÷ fastrm |",
        "|---|---|---|---|---|---|",
    ]
    for shape, rows in result["ratios"].items():
        for clients, r in rows.items():
            n, o = r["vs_naive"], r["vs_openrlhf"]
            lines.append(
                f"| {shape} | {clients} | {n['requests_per_s']}x | {n['server_cpu_per_request']}x "
                f"| {o['requests_per_s']}x | {o['server_cpu_per_request']}x |"
            )
    lines += [
        "",
        "| server | a small request behind a large one | behind a large one whose client left |",
        "|---|---|---|",
    ]
    for name, h in result["head_of_line"].items():
        lines.append(
            f"| {name} | {h['behind_large_x_alone']}x its latency alone | {h['behind_departed_large_x_alone']}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="checkpoint folder (default: a tiny random-init Llama, saved to a temp folder)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 64], help="concurrent clients")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-chars", type=int, default=400, help="prompt length (bytes = tokens with 'byte')")
    p.add_argument("--response-chars", type=int, default=60, help="mean response length")
    p.add_argument("--requests", type=int, default=256, help="requests per level at most")
    p.add_argument("--level-timeout", type=float, default=6.0, help="seconds per level at most")
    p.add_argument("--large-responses", type=int, default=200, help="head-of-line test: responses of the large request")
    p.add_argument("--large-chars", type=int, default=500, help="head-of-line test: tokens per large response")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (default 1; 0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds) for CI; numbers meaningless")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/serve_<device>_<date>.json)")
    p.add_argument("--table", metavar="FILE", help="print the README tables of a result file and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.smoke:
        args.levels, args.prompts, args.samples, args.requests, args.prompt_chars = [1, 4], 4, 4, 8, 40
        args.large_responses, args.large_chars, args.level_timeout = 16, 40, 30.0
    shapes = workloads(args.prompts, args.samples, args.prompt_chars, args.response_chars)
    rng = random.Random(1)
    lp = f"\n\nHuman: long one{_text(rng, 80)}\n\nAssistant:"
    large = {
        "query": [lp + _text(rng, args.large_chars) for _ in range(args.large_responses)],
        "prompts": [lp] * args.large_responses,
    }
    small = {"query": ["\n\nHuman: hi\n\nAssistant: hello"], "prompts": ["\n\nHuman: hi\n\nAssistant:"]}
    info = meta(args)
    levels: dict = {shape: {} for shape in shapes}
    hol: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp) / "rm")
        for kind in SERVERS:  # one server at a time: the others would not compete for the CPU, but stay tidy
            server = Server(kind, model, args.threads)
            try:
                server.wait_ready()
                asyncio.run(run_level(server, shapes["single"][:8], 1, args.level_timeout))  # warm-up, not measured
                for shape, reqs in shapes.items():
                    reqs = reqs[: args.requests]
                    levels[shape][kind] = [
                        asyncio.run(run_level(server, reqs, c, args.level_timeout)) for c in args.levels
                    ]
                hol[kind] = asyncio.run(head_of_line(server, large, small, repeats=2 if args.smoke else 5))
                print(f"{kind}: done", file=sys.stderr)
            finally:
                server.stop()
    diffs = []
    for by_server in levels.values():
        ref = by_server["fastrm"][0]["_rewards"]
        diffs += [
            abs(v - ref[k]) for runs in by_server.values() for r in runs for k, v in r["_rewards"].items() if k in ref
        ]
        for runs in by_server.values():
            for r in runs:
                r.pop("_rewards")
    result = {
        "meta": {**info, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "workload": {
            "endpoint": "/get_reward with prompts (OpenRLHF)",
            "prompts": args.prompts,
            "samples_per_prompt": args.samples,
            "prompt_chars": args.prompt_chars,
            "response_chars_mean": args.response_chars,
            "rollout": "one request per prompt with its samples",
            "single": "one request per sample, shuffled",
            "requests_per_level_at_most": args.requests,
            "seconds_per_level_at_most": args.level_timeout,
            "head_of_line_large_request": f"{args.large_responses} responses x ~{args.large_chars} tokens, one prompt",
        },
        "levels": levels,
        "ratios": ratios(levels),
        "head_of_line": hol,
        "max_abs_reward_diff_across_servers_and_levels": max(diffs) if diffs else None,
    }
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"serve_{info['device']}_{datetime.date.today()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'traffic':<8} {'clients':>7} " + " ".join(f"{k + ' req/s':>14} {k + ' p99':>12}" for k in SERVERS))
    for shape, by_server in levels.items():
        for i, c in enumerate(args.levels):
            cells = " ".join(
                f"{by_server[k][i]['requests_per_s']:>14} {by_server[k][i]['p99_ms']:>12}" for k in SERVERS
            )
            print(f"{shape:<8} {c:>7} {cells}")
    print(table(result))
    print(f"-> {out}")
    if diffs and max(diffs) > TOL:
        print(f"rewards differ across servers by up to {max(diffs)}", file=sys.stderr)
        return 1
    runs = [r for by_server in levels.values() for rs in by_server.values() for r in rs]
    return 0 if all(r["errors"] == 0 and r["requests"] > 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
