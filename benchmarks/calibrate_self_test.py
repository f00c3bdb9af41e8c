"""Where the self-test's low-precision tolerances come from (fastrm/self_test_judge.py): on every family that
tests/backbone_families.py lists as exact, in bf16 weights, fp16 weights and fp32 weights under bf16 autocast, a
few weight seeds each, the ratio of each statistic to its calibrated base (eager's own error in that precision)
for the correct packed path, and the same with a 5% attention-scale error planted in low-precision attention only
(the fp32 pass cannot see it: the calibrated tolerances must).

The JSON (per precision: the largest ratio of each statistic on correct paths, which the multiples K must exceed;
per family and seed the largest stat/tolerance, below 1 when correct, and whether the planted error was caught)
goes to --out, by default benchmarks/results/self_test_calibration_cpu_<date>.json. CPU, one torch thread:

    python benchmarks/calibrate_self_test.py                  # 3 seeds, all families (about 10 CPU minutes)
    python benchmarks/calibrate_self_test.py --seeds 1 --families llama,gemma2 --out /tmp/c.json   (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PRECISIONS = {
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "fp32+bf16-autocast": (None, torch.bfloat16),
}


@contextlib.contextmanager
def scale_error(factor: float):
    """Attention scale x factor in the packed path, for low-precision inputs only (not the fp32 pass)."""
    from fastrm import attention

    orig = attention.varlen_attention

    def planted(q, k, v, plan, **kw):
        if q.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(q.device.type):
            kw["scale"] = factor * (q.shape[-1] ** -0.5 if kw.get("scale") is None else kw["scale"])
        return orig(q, k, v, plan, **kw)

    attention.varlen_attention = planted
    try:
        yield
    finally:
        attention.varlen_attention = orig


def summarize(measured: list[dict]) -> dict:
    calibrated = [m for m in measured if m["base"] is not None]
    ratios: dict[str, float] = {}
    for m in calibrated:
        ratios[m["check"]] = max(ratios.get(m["check"], 0.0), m["stat"] / max(m["base"], 1e-30))
    worst = max(measured, key=lambda m: m["stat"] / m["tol"])
    return {
        "max_stat_over_tol": round(worst["stat"] / worst["tol"], 3),
        "worst": f"{worst['check']} ({worst['pass']}, {worst['layout']})",
        "caught": any(not m["stat"] <= m["tol"] for m in measured),
        "ratio_to_base": {k: round(v, 3) for k, v in ratios.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default="all", help="comma-separated names of tests/backbone_families.py")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import transformers
    from backbone_families import FAMILIES, family_config

    from fastrm import backbones
    from fastrm.model import RewardModel
    from fastrm.self_test_judge import K

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    names = [n for n, f in FAMILIES.items() if not f.refused] if a.families == "all" else a.families.split(",")
    runs, summary = [], {}
    for prec in a.precisions.split(","):
        dtype, autocast = PRECISIONS[prec]
        worst_ok: dict[str, float] = {}
        missed = []
        for name in names:
            fam = FAMILIES[name]
            for seed in range(a.seeds):
                torch.manual_seed(seed)
                model = RewardModel.from_config(family_config(fam.model_type, fam.kwargs), self_test=False)
                model = model.to(dtype) if dtype is not None else model
                ok = summarize(backbones.self_test(model, autocast=autocast, measure=True)["measured"])
                with scale_error(1.05):
                    bug = summarize(backbones.self_test(model, autocast=autocast, measure=True)["measured"])
                runs.append({"precision": prec, "family": name, "seed": seed, "correct": ok, "scale_5pct": bug})
                for k, v in ok["ratio_to_base"].items():
                    worst_ok[k] = max(worst_ok.get(k, 0.0), v)
                if not bug["caught"]:
                    missed.append(f"{name} seed {seed}")
                flag = "" if not ok["caught"] else "  <-- FALSE REFUSAL"
                print(
                    f"{prec:18s} {name:28s} s{seed} correct {ok['max_stat_over_tol']:.2f} of tol{flag}; 5% scale "
                    f"{'caught' if bug['caught'] else 'missed'} ({bug['max_stat_over_tol']:.2f} of tol)",
                    flush=True,
                )
        summary[prec] = {
            "largest_ratio_to_base_on_correct_paths": {k: round(v, 3) for k, v in worst_ok.items()},
            "multiples_K": K,
            "false_refusals": [
                f"{r['family']} seed {r['seed']}" for r in runs if r["precision"] == prec and r["correct"]["caught"]
            ],
            "scale_5pct_missed": missed,
            "scale_5pct_caught": f"{len(names) * a.seeds - len(missed)} of {len(names) * a.seeds}",
        }
        print(prec, json.dumps(summary[prec]), flush=True)
    date = datetime.datetime.now(datetime.timezone.utc)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"self_test_calibration_cpu_{date:%Y-%m-%d}.json")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {
        "date": date.isoformat(timespec="seconds"),
        "command": "python benchmarks/calibrate_self_test.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastrm_commit": head,
        "device": "cpu, exact back end, one torch thread",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
