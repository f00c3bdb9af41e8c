"""Tolerances and comparisons of the backbone self-test (:mod:`fastrm.self_test`): packed results against the
eager reference, each sequence alone.

The reference is eager attention in fp32 (low-precision weights upcast in place for it, restored exactly) with fp32
matmuls at "highest" precision.

**Exact runs** (fp32 / fp64 weights, no autocast, "highest" matmuls) must match it to fixed tolerances
(``EXACT``; correct paths differ by ~1e-6 in fp32): per sequence the max over its tokens of the relative L2 error
of each token's hidden state, each reward, each probed parameter's gradient. A low-precision run on a back end that
computes fp32 (``exact``, ``flex``) also runs its packed passes once in fp32 against these tolerances, so every
logic error is caught at the precision where it cannot hide.

**Low-precision runs** (bf16 / fp16 weights, autocast, TF32 matmuls) are calibrated on the same inputs: eager
attention in the run's own precision against the reference gives each quantity's normal error ``base``, and the
packed path (a different kernel, rounding elsewhere) may differ from the reference by:

=================  =====================================================  ============================================
quantity           statistic                                              tolerance
=================  =====================================================  ============================================
hidden, per seq.   75th percentile over its tokens of |h - ref| / |ref|   max(2u, 5 x base); base: the larger of the
                                                                          same over all eager tokens and over this
                                                                          sequence's eager tokens
hidden, pooled     the same over all tokens of a layout                   max(2u, 1.6 x base over all eager tokens)
reward, per seq.   |r - r_ref| / (|w_head| * mean |final_norm(h_last)|)   max(u/2, 25 x base); base: the larger of
                                                                          the RMS over eager's sequences and eager's
                                                                          error on this one
grad, per param.   |g - g_ref| / |g_ref| (L2)                             max(8u, 8 x max(base_p, median_p base_p))
grads, together    sqrt(sum |g - g_ref|^2) / sqrt(sum |g_ref|^2)          max(8u, 4 x base)
=================  =====================================================  ============================================

u is the unit roundoff of the run's low precision (bf16 2^-8; fp16 and TF32 2^-11). The 75th percentile, not the
max, and a sequence's own eager error in its base, because a router near-tie may flip a token (and what attends to
it) in either low-precision path, while the bugs this test exists for (lost masks and windows, leaks between
sequences, RoPE, a wrong scale) touch most tokens of a sequence or of the batch. Parameters whose reference
gradient is below 1e-3 of the largest (a key bias: its gradient is zero in softmax attention) carry only rounding
and are not compared in low precision.

Calibrated with benchmarks/calibrate_self_test.py (benchmarks/results/self_test_calibration_cpu_2026-12-02.json:
21 families of tests/backbone_families.py x bf16 weights, fp16 weights, bf16 autocast x 3 seeds, CPU): correct
paths reach at most 1.9x base per sequence, 1.11x pooled, 11x per reward (4.3x outside autocast), 5.5x per
parameter and 2.9x together (fp16; bf16 2.2x and 1.8x), and 0.73 of the tolerance at worst, so no family is
refused. A 5% attention-scale error planted in low-precision attention only is caught in all 69 fp16 runs, 60 of
69 in bf16 and 63 of 69 under autocast; it stays within the bf16 noise of the Gemma family (attention logits
softcapped or normed) and one PhiMoE seed, where only the fp32 pass can see such an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrm.attention import UnsupportedBackbone

EXACT = {  # fp32 / fp64 runs against the fp32 / fp64 reference
    "hidden": {torch.float64: 1e-7, torch.float32: 1e-4},
    "reward": {torch.float64: 1e-9, torch.float32: 1e-5},
    "grad": {torch.float64: 1e-7, torch.float32: 1e-4},
}
K = {"token": 5.0, "hidden": 1.6, "reward": 25.0, "grad": 8.0, "grads": 4.0}  # multiples of the calibrated base
FLOOR_U = {"token": 2.0, "hidden": 2.0, "reward": 0.5, "grad": 8.0, "grads": 8.0}  # floors, in unit roundoffs


@dataclass
class Result:
    """One run: hidden states (eager: per sequence [L, H]; packed: [T, H]) in fp32, rewards [S] fp32, gradients
    of sum_i w_i r_i per probed parameter (fp32; zeros where unused; None without a backward), the packed batch."""

    hidden: object
    rewards: torch.Tensor
    grads: list[torch.Tensor] | None
    batch: object = None


@dataclass
class Runs:
    """Everything the self-test ran: packed passes in the run's precision (``scoring``, ``training``: layout ->
    Result), in fp32 (``strict``, or None), the references, the eager run in the run's precision (``low``, None
    for exact runs) and the reward scale |w_head| * mean |final_norm(h_last)|."""

    scoring: dict[str, Result]
    training: dict[str, Result]
    strict: tuple[dict[str, Result], dict[str, Result]] | None
    ref_scoring: Result
    ref_training: Result
    low: Result | None
    reward_scale: float
    train_mode: bool


def token_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """[L] relative L2 error of each token's hidden state (got, ref: [L, H])."""
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)


def rows_of_sequences(prompts, responses, layout: str) -> list[list[int]]:
    """Packed rows of each sequence (prompt + response) in group-then-response order."""
    rows, at = [], 0
    for p, rs in zip(prompts, responses):
        if layout == "separate":
            for r in rs:
                rows.append(list(range(at, at + len(p) + len(r))))
                at += len(p) + len(r)
        else:
            prompt_rows = list(range(at, at + len(p)))
            at += len(p)
            for r in rs:
                rows.append(prompt_rows + list(range(at, at + len(r))))
                at += len(r)
    return rows


class Judge:
    """Checks :class:`Runs`; raises :class:`UnsupportedBackbone` at the first mismatch."""

    def __init__(self, model_type: str, names: list[str], runs: Runs, dtype: torch.dtype, unit_roundoff: float | None):
        self.model_type, self.names, self.runs, self.dtype, self.u = model_type, names, runs, dtype, unit_roundoff
        self.measured: list[dict] | None = None  # self_test(measure=True): every statistic instead of refusing
        self.last_base: float | None = None  # the calibrated base of the last tolerance() (None: exact)
        ref, low = runs.ref_training, runs.low
        self.denoms = self.keep = None
        if ref.grads is not None:
            norms = torch.stack([g.norm() for g in ref.grads])
            top = norms.max().clamp_min(1e-30)
            self.denoms = norms.clamp_min(1e-3 * top)  # exact runs: a gradient-free parameter counts absolutely
            self.keep = (norms >= 1e-3 * top).tolist()
        self.base = None
        if low is None:
            return
        errs = torch.cat([token_errors(a, b) for a, b in zip(low.hidden, ref.hidden)])
        q75 = errs.quantile(0.75).item()
        reward = ((low.rewards - ref.rewards) / runs.reward_scale).pow(2).mean().sqrt().item()
        self.base = {"token": q75, "hidden": q75, "reward": reward}
        if low.grads is not None and ref.grads is not None:
            per = [((a - b).norm() / n).item() for a, b, n in zip(low.grads, ref.grads, self.denoms)]
            kept = [p for p, k in zip(per, self.keep) if k]
            median = sorted(kept)[len(kept) // 2] if kept else 0.0
            self.base["grad"] = [max(p, median) for p in per]
            self.base["grads"] = self._together(low.grads)

    def _together(self, grads) -> float:
        ref = self.runs.ref_training.grads
        num = sum((g - r).pow(2).sum() for g, r, k in zip(grads, ref, self.keep) if k)
        den = sum(r.pow(2).sum() for r, k in zip(ref, self.keep) if k)
        return float((num / den).sqrt()) if den > 0 else 0.0

    def tolerance(self, kind: str, calibrated: bool, i: int = 0, own: float = 0.0) -> tuple[float, str]:
        """(tolerance, how it was set); ``own``: eager's error on this very sequence (a router flip in both)."""
        self.last_base = None
        if not calibrated:
            tol = EXACT["grad" if kind == "grads" else ("hidden" if kind == "token" else kind)][self.dtype]
            return tol, f"tolerance {tol:.0e}"
        base = self.last_base = max(own, self.base[kind][i] if kind == "grad" else self.base[kind])
        floor = FLOOR_U[kind] * self.u
        tol = max(floor, K[kind] * base)
        return tol, f"tolerance {tol:.1e} = max({floor:.1e}, {K[kind]:g} x eager's own error {base:.1e})"

    def check(self, prompts, responses, rope_limit: int | None, describe: str, strict_describe: str) -> None:
        """The fp32 pass (if any) with exact tolerances, then the run's own precision. A shared prompt's rows are
        compared only for sequences within the RoPE limit: a longer one runs alone (its prompt rows then differ
        from the shared ones, and are never pooled)."""
        runs = self.runs
        if runs.strict is not None:
            self._check_set(runs.strict, False, strict_describe, prompts, responses, rope_limit)
        self._check_set((runs.scoring, runs.training), runs.low is not None, describe, prompts, responses, rope_limit)

    def refuse(self, what: str, layout: str, describe: str, detail: str):
        raise UnsupportedBackbone(
            f"fastrm cannot train {self.model_type} exactly: its packed {what} ({layout} layout; {describe}) "
            f"{detail}. Use a checkpoint of another family"
        )

    def _expect(self, stat: float, tol: float, kind: str, where: tuple, detail: str) -> None:
        """Refuse unless stat <= tol (NaN refuses); when measuring, record it instead. ``where``: (what, layout,
        describe)."""
        if self.measured is None:
            if not stat <= tol:
                self.refuse(*where, detail)
            return
        self.measured.append(
            {"pass": where[0], "layout": where[1], "check": kind, "stat": stat, "tol": tol, "base": self.last_base}
        )

    def _check_set(self, passes, calibrated: bool, describe: str, prompts, responses, rope_limit) -> None:
        runs = self.runs
        flat = [r for rs in responses for r in rs]
        for name, packed, ref in zip(("scoring", "training"), passes, (runs.ref_scoring, runs.ref_training)):
            what = f"{name} pass" + (
                " in train mode, fixed dropout masks" if name == "training" and runs.train_mode else ""
            )
            for layout, got in packed.items():
                rows = rows_of_sequences(prompts, responses, layout)
                last, pooled = [r[-1] for r in rows], got.batch.pool_index.tolist()
                if pooled != last:
                    self.refuse("batch", layout, describe, f"pools rows {pooled} but its sequences end at rows {last}")
                where = (what, layout, describe)
                self._hidden(where, got, ref, rows, flat, calibrated, rope_limit)
                self._rewards(where, got, ref, calibrated)
                if got.grads is not None and ref.grads is not None:
                    self._grads(where, got, ref, calibrated)

    def _hidden(self, where, got, ref, rows, flat, calibrated, rope_limit) -> None:
        stat_name = "75th percentile" if calibrated else "max"
        low, errs = self.runs.low, []
        for i, (r, h) in enumerate(zip(rows, ref.hidden)):
            lo = low.hidden[i] if calibrated else None
            if where[1] == "shared_prompt" and rope_limit is not None and len(r) > rope_limit:
                n = len(flat[i])
                r, h, lo = r[-n:], h[-n:], None if lo is None else lo[-n:]
            err = token_errors(got.hidden.index_select(0, torch.tensor(r, device=got.hidden.device)), h)
            errs.append(err)
            own = (
                token_errors(lo, self.runs.ref_training.hidden[i][-len(r) :]).quantile(0.75).item() if calibrated else 0
            )
            tol, why = self.tolerance("token", calibrated, own=own)
            stat = (err.quantile(0.75) if calibrated else err.max()).item()
            self._expect(
                stat,
                tol,
                "token",
                where,
                (
                    f"differs from its eager attention on sequence {i} of {len(rows)} ({len(r)} tokens) by "
                    f"{stat:.2e} (relative L2 per token, {stat_name}; {why}), worst at token "
                    f"{int(err.nan_to_num(float('inf')).argmax())}"
                ),
            )
        if calibrated:
            tol, why = self.tolerance("hidden", True)
            stat = torch.cat(errs).quantile(0.75).item()
            self._expect(
                stat,
                tol,
                "hidden",
                where,
                (
                    f"differs from its eager attention over all {len(rows)} sequences by {stat:.2e} (relative L2 "
                    f"per token, 75th percentile over all tokens; {why})"
                ),
            )

    def _rewards(self, where, got, ref, calibrated) -> None:
        scale = self.runs.reward_scale
        err = ((got.rewards - ref.rewards).abs() / scale).tolist()
        own = ((self.runs.low.rewards - self.runs.ref_training.rewards).abs() / scale).tolist() if calibrated else None
        for i, e in enumerate(err):
            tol, why = self.tolerance("reward", calibrated, own=own[i] if own else 0.0)
            self._expect(
                e,
                tol,
                "reward",
                where,
                (
                    f"gives reward {got.rewards[i].item():.6g} on sequence {i} where final norm + head on its last "
                    f"token alone give {ref.rewards[i].item():.6g} (error {e:.2e} relative to |w_head| * |h|; {why})"
                ),
            )

    def _grads(self, where, got, ref, calibrated) -> None:
        for j, (g, g_ref) in enumerate(zip(got.grads, ref.grads)):
            if calibrated and not self.keep[j]:
                continue
            err = ((g - g_ref).norm() / self.denoms[j]).item()
            tol, why = self.tolerance("grad", calibrated, j)
            self._expect(
                err,
                tol,
                "grad",
                where,
                (f"gives a gradient of {self.names[j]} that differs from eager's by {err:.2e} (relative L2; {why})"),
            )
        if calibrated:
            err = self._together(got.grads)
            tol, why = self.tolerance("grads", True)
            self._expect(
                err,
                tol,
                "grads",
                where,
                (
                    f"gives gradients that differ from eager's by {err:.2e} (relative L2 over {sum(self.keep)} "
                    f"parameters together; {why})"
                ),
            )
