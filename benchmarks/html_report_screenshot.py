"""A screenshot of the HTML report of real runs with a planted failure (docs/img/html-report.png).

In a scratch git repository, the digits recipe (static shapes; every case timed:
``--qatcheck-latency always``) runs once per commit: ``--runs`` - 1 commits as shipped, then one
that plants the entropy calibrator (trt_ptq loses ~14 points of top-1: its accuracy and parity
checks fail, and the failure is localized). The history file collects every run's lines, so the
page's trend shows the drop at the last commit. Headless Chromium (Debian's ``chromium``) then
takes the screenshot of the last run's ``reports/qatcheck.html``.

Where this tree has no history store yet, the script appends each run's lines itself, in the
history's shared format, from the run's record.

    python benchmarks/html_report_screenshot.py --out docs/img/html-report.png [--work DIR] [--runs 5]
    python benchmarks/html_report_screenshot.py --work DIR --reuse   # the page again, runs not rerun
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
from dataclasses import replace

import pytest

from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import digits_recipe

CALIBRATOR = {calibrator!r}
_shipped = digits_recipe()
pytestmark = pytest.mark.qatcheck_recipe(digits_recipe(
    dynamic_modes=(), quant=replace(_shipped.quant, calibrator=CALIBRATOR or _shipped.quant.calibrator)))
'''

#: a plugin the runs load (-p): the run's record as JSON, for the history lines below
DUMP = '''
import json, os

def pytest_unconfigure(config):
    from qatcheck.plugin import RUN_KEY
    record = config.stash.get(RUN_KEY, None)
    if record is not None:
        with open(os.environ["QATCHECK_RECORD_JSON"], "w") as f:
            json.dump(record.to_dict(), f)
'''


def history_lines(record: dict) -> list[str]:
    """The run's lines in the history's shared format (one per case)."""
    out = []
    for table in record["recipes"]:
        for r in table["records"]:
            case = r["case"]
            out.append(json.dumps({
                "run": record["run_id"], "time": record["finished"], "commit": record["commit"],
                "dirty": record["dirty"], "recipe": table["name"], "case": case["id"], "mode": case["mode"],
                "backend": case["backend"], "shape": case["shape"], "device": r.get("fingerprint_id", ""),
                "metrics": r.get("metrics") or {}, "primary": r.get("primary_metric", ""),
                "tolerance_points": None, "latency_ms": (r.get("latency") or {}).get("median_ms"),
                "parity_cosine": (r.get("parity") or {}).get("cosine"), "verdict": r.get("verdict", ""),
                "checks": {k: v.get("status") for k, v in (r.get("checks") or {}).items()}}))
    return out


def git(work: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(work), *args], check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "html-report.png")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--window", default="1400,2300")
    ap.add_argument("--reuse", action="store_true",
                    help="render and screenshot the runs already in --work again, without running them")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium")
    work = args.work or Path(tempfile.mkdtemp(prefix="qatcheck-html-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        (work / "baselines").mkdir(exist_ok=True)
        shutil.copy(ROOT / "baselines" / "digits.json", work / "baselines" / "digits.json")
        (work / "_dump_record.py").write_text(DUMP)
        (work / ".gitignore").write_text("reports/\ncache/\n_dump_record.py\n__pycache__/\nrecord.json\n"
                                         "chromium-profile/\nshot.png\n")
        git(work, "init", "-q")
    reports, history = work / "reports", work / "reports" / "history.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(work)]),
           "QATCHECK_RECORD_JSON": str(work / "record.json")}
    for i in range(0 if args.reuse else args.runs):
        planted = i == args.runs - 1
        (work / "test_digits.py").write_text(SUITE.format(calibrator="entropy" if planted else ""))
        git(work, "add", "-A")
        git(work, "-c", "user.name=qatcheck", "-c", "user.email=qatcheck@localhost", "commit", "-q",
            "--allow-empty", "-m", "plant: entropy calibrator" if planted else f"change {i + 1}")
        before = history.stat().st_size if history.is_file() else 0
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "test_digits.py", "-q", "-p", "no:cacheprovider", "-p", "_dump_record",
             f"--rootdir={work}", "--qatcheck-cache", str(work / "cache"), "--qatcheck-reports", str(reports),
             "--qatcheck-baselines", str(work / "baselines"), "--qatcheck-latency", "always",
             "--qatcheck-iterations", "30", "--qatcheck-no-progress"],
            cwd=work, env=env, capture_output=True, text=True)
        last = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [proc.stderr[-300:]]
        print(f"run {i + 1}{' (planted)' if planted else ''}: exit {proc.returncode}: {last[0]}")
        if (history.stat().st_size if history.is_file() else 0) == before:  # no history store here
            record = json.loads((work / "record.json").read_text())
            with open(history, "a") as f:
                f.write("".join(line + "\n" for line in history_lines(record)))
    # the last run wrote its page before its own history lines were appended: the trend takes this
    # run from the record either way; render it again so the page is the one a history store makes
    sys.path.insert(0, str(ROOT))
    from qatcheck import html_report
    from qatcheck.run_record import RunRecord

    page = html_report.write(RunRecord.from_dict(json.loads((work / "record.json").read_text())),
                             reports / "qatcheck.html", history)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shot = work / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={work / 'chromium-profile'}", '--host-resolver-rules=MAP * ~NOTFOUND',
                    f"--window-size={args.window}", f"--screenshot={shot}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    # a palette PNG: a page of text and flat colours loses nothing visible, at a third of the size
    # (octree keeps the charts' few-pixel colours; median cut turned an orange device red)
    from PIL import Image

    Image.open(shot).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
        args.out, optimize=True)
    print(f"page {page} ({page.stat().st_size} bytes); screenshot {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
