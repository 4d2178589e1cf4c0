"""pytest-xdist against a single process: wall times, and whether every figure and verdict agrees.

1. ``--record``: a first run with ``-n N --update-baselines`` into a scratch copy of baselines/ (on a
   cold cache it is also the concurrent build: each artifact built once, under its per-key lock);
   every case of the report must be in the baselines it wrote;
2. the same suites with ``-n 0`` and then ``-n N`` (warm cache), each a fresh pytest process, timed;
3. every case's metrics, parity (whole-model and per output), structure and check verdicts compared,
   read from the runs' report JSON (reports/<recipe>.json).

A check skipped on either side is not compared (latency is skipped under xdist without a GPU per
worker, with its reason); a case in one run and not the other is a difference.

    python benchmarks/xdist_compare.py --suites suites/test_digits.py --workers 2 --record \\
        --out /tmp/xdist -- -k "not test_latency"
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(suites, workers: int, baselines: Path, reports: Path, extra, record=False) -> dict:
    reports.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "-n", str(workers),
           "--qatcheck-baselines", str(baselines), "--qatcheck-reports", str(reports),
           "--qatcheck-no-progress", *extra, *(["--update-baselines"] if record else [])]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t
    (reports / "pytest.log").write_text(proc.stdout + proc.stderr)
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [""]
    print(f"-n {workers}{' --update-baselines' if record else ''}: rc={proc.returncode} {secs:.1f} s "
          f"{tail[0]}", flush=True)
    return {"workers": workers, "record": record, "rc": proc.returncode, "seconds": secs, "last_line": tail[0],
            "tables": proc.stdout.count("qatcheck: ")}


def cases(reports: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(reports.glob("*.json")):
        for c in json.loads(f.read_text())["cases"]:
            out[c["case"]["id"]] = c
    return out


def figures(c: dict) -> dict[str, float]:
    """The numbers a case reports (flattened): metrics, parity, per-output parity, structure counts."""
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[prefix] = float(v)
    for part in ("metrics", "parity", "output_parity", "structure", "nonfinite_outputs"):
        walk(part, c.get(part))
    return flat


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    only = sorted(set(a) ^ set(b))
    exact = differ = 0
    worst = (0.0, "")
    verdicts = []
    for cid in sorted(set(a) & set(b)):
        fa, fb = figures(a[cid]), figures(b[cid])
        for k in sorted(set(fa) | set(fb)):
            x, y = fa.get(k), fb.get(k)
            if x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y)):
                exact += 1
                continue
            differ += 1
            rel = math.inf if x is None or y is None else abs(x - y) / max(abs(x), abs(y), 1e-12)
            if rel > worst[0]:
                worst = (rel, f"{cid} {k}: {x} vs {y}")
        for check in sorted(set(a[cid]["checks"]) | set(b[cid]["checks"])):
            sa = a[cid]["checks"].get(check, {}).get("status")
            sb = b[cid]["checks"].get(check, {}).get("status")
            if "skip" in (sa, sb):
                continue
            if sa != sb:
                verdicts.append(f"{cid} {check}: {sa} vs {sb}")
    return {"cases": len(set(a) & set(b)), "only_in_one": only, "figures_identical": exact,
            "figures_different": differ, "worst_relative_difference": worst[0], "worst": worst[1],
            "verdicts_different": verdicts}


def recorded_every_case(baselines: Path, reports: Path) -> list[str]:
    """Cases of the record run's report that its baselines do not hold (should be none)."""
    stored = set()
    for f in baselines.glob("*.json"):
        stored |= {f"{f.stem}-{k}" for k in json.loads(f.read_text()).get("cases", {})}
    return sorted(cid for cid, c in cases(reports).items()
                  if c.get("verdict") != "error" and f"{c['case']['recipe']}-{c['case']['key']}" not in stored)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--record", action="store_true", help="first record the baselines under -n N")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments for every run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="xdist-compare-"))
    baselines = work / "baselines"
    shutil.copytree(ROOT / "baselines", baselines)
    result = {"suites": a.suites, "workers": a.workers, "pytest_args": a.pytest_args, "runs": []}
    if a.record:
        r = run(a.suites, a.workers, baselines, work / "record", a.pytest_args, record=True)
        r["not_recorded"] = recorded_every_case(baselines, work / "record")
        result["runs"].append(r)
    serial = run(a.suites, 0, baselines, work / "serial", a.pytest_args)
    par = run(a.suites, a.workers, baselines, work / "parallel", a.pytest_args)
    result["runs"] += [serial, par]
    result["speedup"] = serial["seconds"] / par["seconds"]
    result["comparison"] = compare(cases(work / "serial"), cases(work / "parallel"))
    for d in ("record", "serial", "parallel"):
        if (work / d).is_dir():
            shutil.copytree(work / d, a.out / d, dirs_exist_ok=True)
    (a.out / "xdist-compare.json").write_text(json.dumps(result, indent=1))
    c = result["comparison"]
    md = [f"pytest-xdist -n {a.workers} vs -n 0: {' '.join(a.suites)} {' '.join(a.pytest_args)}", "",
          "| run | rc | wall s | pytest's last line |", "|---|---|---|---|"]
    md += [f"| -n {r['workers']}{' --update-baselines' if r['record'] else ''} | {r['rc']} | {r['seconds']:.1f} "
           f"| {r['last_line']} |" for r in result["runs"]]
    md += ["", f"speedup x{result['speedup']:.2f}; {c['cases']} cases in both, {len(c['only_in_one'])} in one only; "
           f"figures: {c['figures_identical']} identical, {c['figures_different']} different"
           + (f" (worst relative {c['worst_relative_difference']:.2e}: {c['worst']})" if c["figures_different"] else "")
           + f"; verdicts different: {len(c['verdicts_different'])}"]
    md += [f"- {v}" for v in c["verdicts_different"]]
    if a.record:
        md.append(f"record run: cases not in the baselines it wrote: {result['runs'][0]['not_recorded'] or 'none'}")
    (a.out / "xdist-compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
