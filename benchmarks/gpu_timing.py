"""Timing fidelity and regression power of qatcheck's CUDA latency measurement (ResNet-50).

Run on a CUDA machine from the repo root:  PYTHONPATH=. python benchmarks/gpu_timing.py --out DIR

1. Fidelity: for batch 1 / 32 and fp32 / fp16, qatcheck's median (qatcheck.timing.measure over
   TorchRunner.timed_call = eager CUDA events, and over the CUDA-graph variant in
   qatcheck.backends.cuda_timing) against independent measurements: torch.utils.benchmark's
   Timer.blocked_autorange (wall clock, synchronised per block) and triton.testing.do_bench /
   do_bench_cudagraph (CUDA events; do_bench flushes L2 before every call).
2. Regression power: a planted slowdown (a chain of extra 3x3 convs whose count is calibrated to
   ~5% of the median) must be flagged by ``measured > baseline * (1 + tol)`` in 10/10 runs, and
   the unchanged model in 0/10, against a baseline recorded once.

Writes results.json (all figures) and prints a table last.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qatcheck import timing
from qatcheck.backends import cuda_timing
from qatcheck.backends.torch_backend import TorchRunner, strict_fp32

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def resnet50() -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


class Planted(torch.nn.Module):
    """The model plus ``k`` extra 3x3 convs (64 ch, 56x56) on a constant tensor: a known extra cost
    that cannot be fused away or skipped (eager runs every op; graph capture records every kernel)."""

    def __init__(self, base: torch.nn.Module, k: int, batch: int) -> None:
        super().__init__()
        self.base = base
        self.k = k
        self.extra = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.register_buffer("z", torch.randn(batch, 64, 56, 56))

    def forward(self, x):
        y = self.base(x)
        z = self.z
        for _ in range(self.k):
            z = self.extra(z)
        return y


def qc_call(module, precision: str, x: np.ndarray, variant: str):
    """qatcheck's own TimedCall, exactly as a suite gets it: ``TorchRunner.timed_call`` with
    ``--qatcheck-cuda-graph off`` (eager: an event pair around each forward) or ``on`` (graph: an
    event pair around each CUDA-graph replay; ``auto``, the default, is ``on`` when capture works)."""
    runner = TorchRunner(module, precision, "cuda", cuda_graph="off" if variant == "eager" else "on")
    call = runner.timed_call(x)
    assert call.clock == (cuda_timing.EAGER_CLOCK if variant == "eager" else cuda_timing.GRAPH_CLOCK)
    return runner, call


def qc_median(call, batch: int, iterations: int, warmup_s: float) -> timing.LatencyStats:
    return timing.measure(call, batch, iterations, warmup_s)


def independent(runner, x: np.ndarray, variant: str) -> dict:
    from torch.utils.benchmark import Timer

    xt = runner._to_device(x)
    strict = runner._strict  # fp32 runs with TF32 off in qatcheck; the references must do the same

    def mod(t):
        with strict_fp32(strict):
            return runner.module(t)
    out: dict = {}
    if variant == "eager":
        def f():
            with torch.inference_mode():
                mod(xt)
    else:
        g, _ = cuda_timing.capture_graph(lambda: mod(xt))

        def f():
            g.replay()
    m = Timer(stmt="f()", globals={"f": f}).blocked_autorange(min_run_time=1.0)
    out["timer_blocked_autorange_ms"] = m.median * 1e3
    out["timer_iqr_rel"] = m.iqr / m.median
    try:
        import triton.testing as tt

        out["do_bench_ms"] = float(tt.do_bench(f, warmup=100, rep=500, return_mode="median"))
        if variant == "graph":
            def fe():
                mod(xt)
            with torch.inference_mode():
                out["do_bench_cudagraph_ms"] = float(tt.do_bench_cudagraph(fe, rep=500, return_mode="median"))
    except Exception as exc:  # triton missing or API drift: keep the Timer figure
        out["do_bench_error"] = f"{type(exc).__name__}: {exc}"
    return out


def fidelity(configs, iterations, warmup_s) -> list[dict]:
    rows = []
    for batch, precision in configs:
        base = resnet50()
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for variant in ("eager", "graph"):
            runner, call = qc_call(copy.deepcopy(base), precision, x, variant)
            st = qc_median(call, batch, iterations, warmup_s)
            st2 = qc_median(call, batch, iterations, warmup_s)  # same version twice: run-to-run spread
            ind = independent(runner, x, variant)
            row = {"batch": batch, "precision": precision, "variant": variant, "clock": getattr(call, "clock", st.clock),
                   "qc_median_ms": st.median_ms, "qc_median_rerun_ms": st2.median_ms, "qc_p90_ms": st.p90_ms,
                   "qc_p99_ms": st.p99_ms, "qc_mean_ms": st.mean_ms, "qc_cv": st.cv, "qc_cv_rerun": st2.cv, **ind}
            row["ratio_vs_timer"] = st.median_ms / ind["timer_blocked_autorange_ms"]
            if "do_bench_ms" in ind:
                row["ratio_vs_do_bench"] = st.median_ms / ind["do_bench_ms"]
            if "do_bench_cudagraph_ms" in ind:
                row["ratio_vs_do_bench_cudagraph"] = st.median_ms / ind["do_bench_cudagraph_ms"]
            log("fidelity", json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
            rows.append(row)
            del runner, call
            torch.cuda.empty_cache()
    return rows


def regression(configs, variants, iterations, warmup_s, tol, trials, target) -> list[dict]:
    rows = []
    for batch, precision in configs:
        x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        for variant in variants:
            base = resnet50()
            _, base_call = qc_call(copy.deepcopy(base), precision, x, variant)
            # calibrate the planted cost: k extra convs ~ target * median
            m0 = qc_median(base_call, batch, iterations, warmup_s).median_ms
            _, probe = qc_call(Planted(copy.deepcopy(base), 8, batch), precision, x, variant)
            m8 = qc_median(probe, batch, iterations, warmup_s).median_ms
            unit = max((m8 - m0) / 8, 1e-6)
            k = max(1, int(round(target * m0 / unit)))
            del probe
            _, planted_call = qc_call(Planted(copy.deepcopy(base), k, batch), precision, x, variant)
            # the 8-conv probe can misjudge one conv's cost (small kernels overlap, clocks move):
            # add convs until the planted model really is ~target slower (at least 90% of it)
            def ratio() -> float:  # against a fresh base figure: GPU clocks drift between runs
                base_ms = qc_median(base_call, batch, iterations, warmup_s).median_ms
                return qc_median(planted_call, batch, iterations, warmup_s).median_ms / base_ms
            while k < 64 and min(ratio(), ratio()) < 1 + 0.9 * target:
                k += 1
                _, planted_call = qc_call(Planted(copy.deepcopy(base), k, batch), precision, x, variant)
            baseline = qc_median(base_call, batch, iterations, warmup_s).median_ms  # recorded once
            unchanged, planted = [], []
            for _ in range(trials):  # interleaved, so drift hits both alike
                unchanged.append(qc_median(base_call, batch, iterations, warmup_s).median_ms)
                planted.append(qc_median(planted_call, batch, iterations, warmup_s).median_ms)
            limit = baseline * (1 + tol)
            row = {"batch": batch, "precision": precision, "variant": variant, "tol": tol,
                   "k_extra_convs": k, "unit_ms": unit, "baseline_ms": baseline,
                   "planted_ratio_median": float(np.median(planted) / np.median(unchanged)),
                   "unchanged_ms": unchanged, "planted_ms": planted,
                   "unchanged_max_rel": max(unchanged) / baseline - 1,
                   "planted_min_rel": min(planted) / baseline - 1,
                   "false_alarms": sum(m > limit for m in unchanged),
                   "detected": sum(m > limit for m in planted), "trials": trials}
            log("regression", json.dumps({k2: (round(v, 4) if isinstance(v, float) else v)
                                          for k2, v in row.items() if not isinstance(v, list)}))
            rows.append(row)
            del base_call, planted_call
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--warmup", type=float, default=0.2)
    ap.add_argument("--tol", type=float, default=0.025)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.05)
    ap.add_argument("--budget-s", type=float, default=330, help="skip regression configs past this")
    ap.add_argument("--configs", default="b1-fp32,b1-fp16,b32-fp32,b32-fp16",
                    help="comma-separated b<batch>-<precision> configurations")
    ap.add_argument("--variants", default="graph,eager", help="timed calls for the regression part")
    ap.add_argument("--skip-fidelity", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assert torch.cuda.is_available(), "needs CUDA"
    env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    log("env", env)
    configs = [(int(c.split("-")[0][1:]), c.split("-")[1]) for c in args.configs.split(",")]
    res = {"env": env, "args": vars(args)}
    res["fidelity"] = [] if args.skip_fidelity else fidelity(configs, args.iterations, args.warmup)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    res["regression"] = []
    for cfg in configs:
        for variant in args.variants.split(","):
            if time.perf_counter() - T0 > args.budget_s:
                log("budget reached; skipping regression", cfg, variant)
                res.setdefault("skipped", []).append([*cfg, variant])
                continue
            res["regression"] += regression([cfg], [variant], args.iterations, args.warmup, args.tol,
                                             args.trials, args.target)
            (out / "results.json").write_text(json.dumps(res, indent=1))
    print("\n== fidelity (ms; ratio = qatcheck median / independent median) ==")
    print(f"{'cfg':10} {'variant':6} {'qc_med':>8} {'rerun':>8} {'cv':>6} {'timer':>8} {'r_tim':>6} "
          f"{'dobench':>8} {'r_db':>6} {'db_graph':>8} {'r_dbg':>6}")
    for r in res["fidelity"]:
        print(f"b{r['batch']:<3}{r['precision']:6} {r['variant']:6} {r['qc_median_ms']:8.4f} "
              f"{r['qc_median_rerun_ms']:8.4f} {r['qc_cv']:6.2%} {r['timer_blocked_autorange_ms']:8.4f} "
              f"{r['ratio_vs_timer']:6.3f} {r.get('do_bench_ms', float('nan')):8.4f} "
              f"{r.get('ratio_vs_do_bench', float('nan')):6.3f} {r.get('do_bench_cudagraph_ms', float('nan')):8.4f} "
              f"{r.get('ratio_vs_do_bench_cudagraph', float('nan')):6.3f}")
    print(f"\n== regression power (tol {args.tol:.1%}; flag = median > baseline*(1+tol)) ==")
    for r in res["regression"]:
        print(f"b{r['batch']:<3}{r['precision']:6} {r['variant']:6} k={r['k_extra_convs']:<3} "
              f"base={r['baseline_ms']:.4f} planted x{r['planted_ratio_median']:.4f} "
              f"unchanged max {r['unchanged_max_rel']:+.2%} -> {r['false_alarms']}/{r['trials']} flagged; "
              f"planted min {r['planted_min_rel']:+.2%} -> {r['detected']}/{r['trials']} flagged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
