"""Training metrics on Ray's metrics endpoint, so Prometheus (and the Ray dashboard's Grafana panels) see a run.

Rank 0 of a Ray Train run sets one gauge per logged statistic (``ray.util.metrics.Gauge``; Ray's Prometheus names
carry a ``ray_`` prefix), tagged with the run folder's name:

    ray_fastrm_train_loss{run="rm-threshold-1a2b3c4d"}    ray_fastrm_eval_accuracy{run=...}   ...

The train gauges are the step's global (all-reduced) values, so one rank suffices and the series are not repeated
per worker. Each node's metrics agent serves them on its metrics export port (``ray.nodes()[i]
["MetricsExportPort"]``; the dashboard's Prometheus service discovery scrapes it), every
``RAY_metrics_report_interval_ms`` (10 s by default); the last values stay there while the worker lives.
"""

from __future__ import annotations

import math
import threading
import time

# Logged field -> help text. Train records are per logged step; eval records per evaluation.
TRAIN_FIELDS = {
    "loss": "training loss of the last logged step",
    "accuracy": "fraction of the step's pairs with r_chosen > r_rejected",
    "mean_margin": "mean r_chosen - r_rejected over the step's pairs",
    "mu": "the threshold loss's mean margin mu_B of the step",
    "tokens_per_s": "tokens trained per second in the step (all workers)",
    "pairs_per_s": "pairs trained per second in the step (all workers)",
    "lr": "learning rate",
    "grad_norm": "gradient norm before clipping",
    "step": "optimizer steps done",
}
EVAL_FIELDS = {
    "accuracy": "eval accuracy (r_chosen > r_rejected)",
    "bt_loss": "eval Bradley-Terry loss, mean -log sigmoid(margin)",
    "margin_mean": "eval mean margin",
    "margin_std": "eval margin standard deviation",
    "step": "step of the last evaluation",
}


_GAUGES: dict[str, dict[str, object]] = {}  # split -> field -> Gauge, made once per process (see TrainingGauges)
_LAST: dict[tuple[str, str, str], float] = {}  # (split, field, run) -> the value last set, re-set by the keeper
_LOCK = threading.Lock()
_KEEPER: threading.Thread | None = None


def _report_interval_s() -> float:
    """How often Ray exports a process's metrics (``RAY_metrics_report_interval_ms``, floored at 1 s by Ray)."""
    try:
        import ray

        return max(1.0, ray._config.metrics_report_interval_ms() / 1000.0)
    except Exception:  # an internal API: fall back to Ray's default
        return 10.0


def _keep_alive(period_s: float) -> None:
    # Ray's metrics agent drops a gauge series two export intervals after its last set, so a run that logs less
    # often than that (slow steps, --logging-steps) would flicker out of Prometheus: re-set the last values.
    while True:
        time.sleep(period_s)
        with _LOCK:
            items = list(_LAST.items())
        for (split, name, run), value in items:
            _GAUGES[split][name].set(value, tags={"run": run})


class TrainingGauges:
    """One gauge per field of :data:`TRAIN_FIELDS` and :data:`EVAL_FIELDS`, tagged ``run``; needs Ray initialised
    (a Ray Train worker is). The gauges are created once per process and shared by every training in it (a second
    ``Gauge`` of the same name in one process is never exported), and a daemon thread re-sets the last values every
    export interval while the process lives, so the series stay in Prometheus between logged steps."""

    def __init__(self, run: str):
        global _KEEPER
        from ray.util.metrics import Gauge

        with _LOCK:
            if not _GAUGES:
                for split, fields in (("train", TRAIN_FIELDS), ("eval", EVAL_FIELDS)):
                    _GAUGES[split] = {
                        k: Gauge(f"fastrm_{split}_{k}", description=text, tag_keys=("run",))
                        for k, text in fields.items()
                    }
            if _KEEPER is None:
                _KEEPER = threading.Thread(
                    target=_keep_alive, args=(_report_interval_s(),), name="fastrm-gauges", daemon=True
                )
                _KEEPER.start()
        self.run = run

    def record(self, record: dict) -> None:
        """Set the gauges of a logged record (``record["split"]`` is "train" or "eval"); NaN and missing fields
        leave their gauge as it was."""
        split = record.get("split")
        for name, gauge in _GAUGES.get(split, {}).items():
            value = record.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                with _LOCK:
                    _LAST[(split, name, self.run)] = float(value)
                gauge.set(float(value), tags={"run": self.run})
