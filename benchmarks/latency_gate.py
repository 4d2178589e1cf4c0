"""False-alarm and detection rates of qatcheck's latency verdicts, the way a merge gate meets them.

1. build the artifacts (a run that times nothing), then record the suites' latency baselines into a
   scratch copy of baselines/ (--update-baselines) on that warm cache;
2. ``--rechecks`` clean reruns (``-k test_latency``), each a fresh pytest process, against them;
3. ``--planted-runs`` reruns with a slowdown planted in the ``--plant`` cases (benchmarks/latency_plant.py).

Every verdict is read from the run's report JSON (reports/<recipe>.json: checks.latency.status).
A clean rerun must have no failed latency check (inconclusive verdicts are counted and reported);
a planted case must fail every time, and no other case may fail. ``--busy`` keeps one core busy
with another process from the first recheck on (the 2-core CI machine's worst case).

    python benchmarks/latency_gate.py --suites suites/test_digits.py --rechecks 5 --planted-runs 5 \
        --plant digits-trt_ptq-onnxruntime=1.0 --busy --out benchmarks/cpu-latency-gate
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(suites, baselines: Path, reports: Path, extra, env=None, record=False) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "-k", "test_latency",
           "--qatcheck-baselines", str(baselines), "--qatcheck-reports", str(reports),
           "--qatcheck-no-progress", *extra]
    if record:
        cmd.append("--update-baselines")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    (reports / "pytest.log").write_text(proc.stdout + proc.stderr)
    return proc.returncode, time.perf_counter() - t


def verdicts(reports: Path) -> dict[str, dict]:
    """case id -> the latency verdict (status, first failure / note, slowdown figures)."""
    out = {}
    for f in sorted(reports.glob("*.json")):
        for c in json.loads(f.read_text())["cases"]:
            chk = c.get("checks", {}).get("latency")
            if chk is None:
                continue
            lat = c.get("latency") or {}
            said = chk["failures"] or chk.get("notes") or [chk["reason"]]
            out[c["case"]["id"]] = {"status": chk["status"], "message": said[0],
                                    "median_ms": lat.get("median_ms"), "ci_rel": lat.get("ci_rel"),
                                    "iterations": lat.get("iterations"),
                                    "latency_s": (c.get("seconds") or {}).get("latency"),
                                    "probe_ms": lat.get("probe_ms"), "attempts": c.get("latency_attempts"),
                                    "paired_ratio": (c.get("latency_paired") or {}).get("ratio")}
    return out


def busy_process() -> subprocess.Popen:
    """Another process holding one core at 100% for as long as it lives."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", nargs="+", required=True)
    p.add_argument("--rechecks", type=int, default=10)
    p.add_argument("--planted-runs", type=int, default=10)
    p.add_argument("--plant", action="append", default=[], metavar="CASE=FACTOR",
                   help="e.g. digits-fp32-torch=0.10 (10%% slower); CASE=runtime:2.0 slows the runner, "
                        "its artifact byte-identical; several --plant share a run")
    p.add_argument("--busy", action="store_true", help="keep one core busy during rechecks and planted runs")
    p.add_argument("--tolerance", type=float, default=None,
                   help="latency tolerance to record with (default: the recipes')")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--state", type=Path, default=None,
                   help="keep the recorded baselines and latency-reference artifacts here; when it already "
                        "holds them, record nothing and go on from them (a benchmark split over machines)")
    p.add_argument("--append", type=Path, default=None,
                   help="an earlier latency-gate.json whose runs this one continues")
    p.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="latency-gate-"))
    state = a.state or work
    baselines, reference = state / "baselines", state / "latency-reference"
    a.pytest_args = [*a.pytest_args, "--qatcheck-latency-reference", str(reference)]
    earlier = json.loads(a.append.read_text()) if a.append else {"runs": [], "log": []}
    log = earlier["log"]

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.append(msg)

    if baselines.is_dir():
        say(f"continuing from the baselines in {baselines}")
    else:
        shutil.copytree(ROOT / "baselines", baselines)
        # the artifacts are built first, by a run that times nothing: the process that builds them
        # times a few percent slow (H200 fp32-torch +3%), and its baselines would hide a regression
        warm = work / "warm"
        warm.mkdir()
        rc, secs = pytest_run(a.suites, baselines, warm, [*a.pytest_args, "--benchmark-disable"])
        say(f"warm-up (builds every artifact, times nothing): rc={rc} in {secs:.0f} s")
        rec = work / "record"
        rec.mkdir()
        rc, secs = pytest_run(a.suites, baselines, rec, a.pytest_args, record=True)
        recorded = verdicts(rec)
        say(f"record: rc={rc} in {secs:.0f} s, {len(recorded)} latency cases")
        (a.out / "record-verdicts.json").write_text(json.dumps(recorded, indent=1))
    if a.tolerance is not None:  # a stored tolerance is what later runs compare with
        for f in baselines.glob("*.json"):
            doc = json.loads(f.read_text())
            for case in doc["cases"].values():
                for entry in case.get("latency", {}).values():
                    entry["median_ms"]["tolerance"] = a.tolerance
            f.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    busy = busy_process() if a.busy else None
    runs = earlier["runs"]
    first = {k: sum(r["kind"] == k for r in runs) for k in ("clean", "planted")}
    try:
        # clean and planted runs interleaved: drift over the session hits both alike, and a run cut
        # short by a time limit still leaves figures of both kinds
        plan = [("clean", first["clean"] + i, {}) for i in range(a.rechecks)]
        planted = [("planted", first["planted"] + i, {"QATCHECK_PLANT": ",".join(a.plant)})
                   for i in range(a.planted_runs if a.plant else 0)]
        order = [r for pair in zip(plan, planted) for r in pair]
        order += plan[len(planted):] + planted[len(plan):]
        for kind, i, env in order:
            rep = work / f"{kind}{i}"
            rep.mkdir()
            extra = [*a.pytest_args, *(["-p", "benchmarks.latency_plant"] if kind == "planted" else [])]
            rc, secs = pytest_run(a.suites, baselines, rep, extra, env=env)
            v = verdicts(rep)
            counts = collections.Counter(x["status"] for x in v.values())
            runs.append({"kind": kind, "i": i, "rc": rc, "seconds": secs, "counts": dict(counts), "verdicts": v})
            say(f"{kind} {i}: rc={rc} {secs:.0f} s {dict(counts)}")
            write(a, runs, log)  # after every run: a run cut short by a time limit leaves its figures
    finally:
        if busy is not None:
            busy.kill()
    print(write(a, runs, log))
    return 0


def write(a, runs, log) -> str:
    summary = summarize(runs, {c.split("=")[0] for c in a.plant})
    summary.update(suites=a.suites, plants=a.plant, busy=a.busy, tolerance=a.tolerance, pytest_args=a.pytest_args)
    (a.out / "latency-gate.json").write_text(json.dumps({"summary": summary, "runs": runs, "log": log}, indent=1))
    md = markdown(summary)
    (a.out / "latency-gate.md").write_text(md)
    return md


def summarize(runs, planted) -> dict:
    clean = [r for r in runs if r["kind"] == "clean"]
    plant = [r for r in runs if r["kind"] == "planted"]
    s = {"clean_runs": len(clean), "planted_runs": len(plant),
         "clean_checks": sum(len(r["verdicts"]) for r in clean),
         "clean_failures": sum(x["status"] == "fail" for r in clean for x in r["verdicts"].values()),
         "clean_inconclusive": sum(x["status"] == "inconclusive" for r in clean for x in r["verdicts"].values()),
         "clean_runs_red": sum(any(x["status"] == "fail" for x in r["verdicts"].values()) for r in clean),
         "clean_failed_cases": sorted({c for r in clean for c, x in r["verdicts"].items() if x["status"] == "fail"}),
         "caught": {c: sum(r["verdicts"].get(c, {}).get("status") == "fail" for r in plant) for c in sorted(planted)},
         "planted_other_failures": sorted({c for r in plant for c, x in r["verdicts"].items()
                                           if x["status"] == "fail" and c not in planted}),
         "planted_other_inconclusive": sum(x["status"] == "inconclusive" for r in plant
                                           for c, x in r["verdicts"].items() if c not in planted)}
    # what the timing costs: pytest's wall time per clean run, the timed cases' seconds and samples
    timed = [x for r in clean for x in r["verdicts"].values() if x.get("iterations")]
    s["clean_run_seconds"] = round(sum(r["seconds"] for r in clean) / max(1, len(clean)), 1)
    s["clean_latency_seconds"] = round(sum(x.get("latency_s") or 0.0 for x in timed) / max(1, len(clean)), 1)
    s["clean_mean_iterations"] = round(sum(x["iterations"] for x in timed) / max(1, len(timed)), 1)
    return s


def markdown(s: dict) -> str:
    lines = [f"latency gate: {', '.join(s['suites'])}{' (one core kept busy)' if s['busy'] else ''}",
             "", "| what | result |", "|---|---|",
             f"| clean reruns | {s['clean_runs']} runs, {s['clean_checks']} latency checks |",
             f"| false alarms (failed checks in clean reruns) | {s['clean_failures']} "
             f"({s['clean_runs_red']} of {s['clean_runs']} runs red) {s['clean_failed_cases'] or ''} |",
             f"| inconclusive in clean reruns | {s['clean_inconclusive']} |",
             f"| clean run: pytest seconds / seconds in latency measurement / samples per case | "
             f"{s['clean_run_seconds']} / {s['clean_latency_seconds']} / {s['clean_mean_iterations']} |"]
    for case, n in s["caught"].items():
        lines.append(f"| planted {case} caught | {n} / {s['planted_runs']} |")
    if s["planted_runs"]:
        lines.append(f"| other cases red in planted runs | {len(s['planted_other_failures'])} "
                     f"{s['planted_other_failures'] or ''} |")
        lines.append(f"| other cases inconclusive in planted runs | {s['planted_other_inconclusive']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
