"""Cost model of a run: wall time vs the number of cases and vs the eval set's size, measured.

Runs the built-in detection suite (``detection_recipe``) in fresh pytest processes on the first N
images of its data's train split (val has only 400), into a scratch cache, reports and baselines (nothing of the repository's is
touched), latency off (`--qatcheck-latency never`: the cost of timing is its own knob):

- **cold**: an empty cache - every artifact built, every case measured (once, at the smallest N:
  building does not depend on the eval set, only on the calibration and training data, so cold at
  N is this row's building plus the measure row at N);
- **measure**: the artifacts cached, every case measured again (`--qatcheck-remeasure`) - what a
  change of the eval data or of qatcheck's measuring code costs;
- **warm**: nothing changed - every case reused from the result cache.

For each N with every mode, and at the largest N with fewer modes (fewer cases). Each row's
seconds are the pytest process's wall time (imports included) and the run's own ``cost`` line.

    python benchmarks/cost_model.py --sizes 100 400 1600 --out benchmarks/cost-model.md
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = '''
import pytest
from qatcheck.data import digit_detection as dd
from qatcheck.data.coco import CocoDataset
from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import detection_recipe


def eval_data():  # the train split's first N images: val has 400, train 3,000 (a cost, not a score)
    folder = dd.ensure_split("train")
    return CocoDataset(folder / "images", folder / "instances.json", input_size=(dd.IMAGE_SIZE, dd.IMAGE_SIZE),
                       letterbox=False, max_images={n}, channels=1, mean=(dd.MEAN,), std=(dd.STD,),
                       name="digit_detection.train{n}", cache=True)


# one name for every N: artifacts are keyed on the recipe's name (and never on its eval data)
pytestmark = pytest.mark.qatcheck_recipe(detection_recipe(name="digitdet_cost", eval_data=eval_data))
'''

COST = re.compile(r"^cost (\S+): (\d+) artifact\(s\) built, (\d+) case\(s\) measured, (\d+) reused.*?; ([\d.]+) s(?: \((.*)\))?")


def run(work: Path, n: int, *args: str) -> dict:
    suite = work / f"test_cost_{n}.py"
    suite.write_text(SUITE.format(n=n))
    cmd = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider", f"--rootdir={work}",
           "--qatcheck-cache", str(work / "cache"), "--qatcheck-baselines", str(work / "baselines"),
           "--qatcheck-reports", str(work / "reports"), "--qatcheck-latency", "never", "--qatcheck-no-progress",
           "--update-baselines", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work).stdout
    wall = time.perf_counter() - t0
    line = next((m for m in map(COST.match, out.splitlines()) if m), None)
    if line is None:
        raise SystemExit(f"no cost line in the run of N={n} {args}:\n{out[-3000:]}")
    kinds = dict((k, float(v)) for k, v in (part.split() for part in (line[6] or "").split(", ") if part))
    return {"n": n, "wall": wall, "built": int(line[2]), "measured": int(line[3]), "reused": int(line[4]),
            "spent": float(line[5]), "cases": int(line[3]) + int(line[4]), "build": kinds.get("build", 0.0),
            "eval": kinds.get("eval", 0.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1600])
    p.add_argument("--few-modes", default="fp32,trt_ptq", help="the smaller case set, at the largest size")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        largest = max(a.sizes)
        rows.append(("cold", "all", run(work, min(a.sizes))))  # building does not depend on N
        for n in sorted(a.sizes):
            rows.append(("measure", "all", run(work, n, "--qatcheck-remeasure")))
            rows.append(("warm", "all", run(work, n)))
        for kind, extra in (("measure", ("--qatcheck-remeasure",)), ("warm", ())):
            rows.append((kind, a.few_modes, run(work, largest, "--qatcheck-modes", a.few_modes, *extra)))
    lines = ["| run | modes | eval images | cases | artifacts built | measured | reused | build s | eval s | "
             "cost line s | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {kind} | {modes} | {r['n']} | {r['cases']} | {r['built']} | {r['measured']} | {r['reused']} | "
              f"{r['build']:.1f} | {r['eval']:.1f} | {r['spent']:.1f} | {r['wall']:.1f} |" for kind, modes, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
