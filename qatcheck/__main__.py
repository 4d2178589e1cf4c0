"""``python -m qatcheck``: commands that regenerate qatcheck's reports outside pytest.

    python -m qatcheck sensitivity --recipe qatcheck.zoo.recipes:digits_recipe \\
        [--path onnx|torch] [--calibrator entropy] [--max-samples N] [--only-quantized] \\
        [--budget-points 0.5 | --budget-relative 0.99] [--write-keep FILE] [--reports DIR] \\
        [--cache DIR] [--no-cache]

    python -m qatcheck lint model.onnx [--ignore REGEX ...]

    python -m qatcheck cache [list | prune [--all | --older-than DAYS]] [--cache DIR]

    python -m qatcheck reference [--write docs/reference.md]

    python -m qatcheck localize --recipe MODULE:CALLABLE --mode trt_ptq|partial|torch_ptq|qat|fp16|fp8 \\
        [--path onnx|torch] [--onnx FILE] [--calibrator C] [--max-samples 64] [--floor-cosine 0.99] \\
        [--device cpu] [--reports DIR] [--cache DIR]

    python -m qatcheck crosscheck --recipe MODULE:CALLABLE [--calibrator minmax|entropy|both] \\
        [--mode trt_ptq|partial] [--max-samples N] [--reports reports/crosscheck] [--cache DIR]

    python -m qatcheck baselines diff OLD [NEW] [--dir baselines] [--markdown | --json] [--fail-on-change]

``baselines diff`` compares two versions of the baselines - each a file, a directory of them or a
git revision (its ``--dir``; NEW omitted: the working tree's ``--dir``) - and prints what moved,
in tolerance units, largest first (qatcheck.baselines_diff).

    python -m qatcheck history [--history reports/history.jsonl] [--recipe NAME] [--case GLOB] \\
        [--runs 6] [--png FILE] [--markdown] [--fail-on-drift]

    python -m qatcheck compare RUN_A RUN_B [--history reports/history.jsonl] [--markdown]

``lint`` checks a Q/DQ ONNX against TensorRT's placement rules (qatcheck.quantize.qdq_lint) and exits
1 when it has findings.

Errors a user can act on (unknown recipe spec, calibrator, layer...) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Sequence

from qatcheck.errors import ConfigError, QatcheckError
from qatcheck.modes import of_family


def load_recipe(spec: str):
    """``"package.module:callable"`` -> the Recipe the callable returns (a Recipe object named by
    the spec is accepted as is)."""
    from qatcheck.recipe import Recipe

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"recipe spec {spec!r} must be 'module:callable', e.g. "
                          "'qatcheck.zoo.recipes:digits_recipe'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"recipe spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if n.endswith("recipe") and not n.startswith("_"))
            raise ConfigError(f"recipe spec {spec!r}: module {module_name!r} has no attribute "
                              f"{attr!r}" + (f"; recipe factories there: {', '.join(public)}"
                                             if public else ""))
        obj = getattr(obj, part)
    recipe = obj if isinstance(obj, Recipe) else None
    if recipe is None:
        if not callable(obj):
            raise ConfigError(f"recipe spec {spec!r} names a {type(obj).__name__}, not a callable "
                              "returning a Recipe")
        try:
            recipe = obj()
        except QatcheckError:
            raise
        except Exception as exc:
            raise ConfigError(f"recipe spec {spec!r}: calling {attr}() failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"recipe spec {spec!r} returned {type(recipe).__name__}, not a "
                          "qatcheck.recipe.Recipe")
    return recipe


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=160, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from qatcheck.analysis import sensitivity as S
    from qatcheck.analysis.keeplist import keep_list, write_keep_list
    from qatcheck.analysis.sensitivity_report import table_rows, write_reports
    from qatcheck.workspace import RecipeWorkspace

    budget = None
    if args.budget_points is not None or args.budget_relative is not None:
        budget = S.Budget(points=args.budget_points, relative=args.budget_relative)
    recipe = S.with_calibrator(load_recipe(args.recipe), args.calibrator, args.path)
    ws = RecipeWorkspace(recipe, args.cache, use_cache=not args.no_cache)
    runner = S.SensitivityRunner(ws, args.path, progress=not args.no_progress)
    t0 = time.perf_counter()
    prof = S.profile(runner, args.path, max_samples=args.max_samples,
                     only_quantized=args.only_quantized, progress=not args.no_progress)
    t_prof = time.perf_counter() - t0
    header, rows = table_rows(prof, args.top)
    title = (f"{prof.recipe}: {prof.mode} sensitivity ({prof.path} path, calibrator {prof.calibrator}, "
             f"{prof.samples} samples; fp32 {prof.fp32 * 100:.2f}%, {prof.mode} {prof.ptq * 100:.2f}%)")
    print(_render(header, rows, title), end="")
    src = "cache" if prof.cached else f"{prof.evaluations} evaluations"
    print(f"profile: {t_prof:.2f} s ({src})")
    result = None
    if budget is not None:
        t1 = time.perf_counter()
        result = S.choose_layers(runner, budget, args.path, prof=prof, progress=not args.no_progress)
        print(result.message)
        print(f"budget search: {time.perf_counter() - t1:.2f} s, {len(result.steps)} full "
              f"evaluation(s) of the partial model on {result.samples} samples")
        if result.met:
            print(f"chosen layers: {', '.join(result.layers) if result.layers else '(none)'}")
            if args.write_keep:
                keep = keep_list(prof, result)
                print(f"wrote {write_keep_list(keep, args.write_keep)} (the recipe's keep_precision)")
    for path in write_reports(prof, args.reports, result):
        print(f"wrote {path}")
    return 0 if result is None or result.met else 1


def cmd_localize(args: argparse.Namespace) -> int:
    """Where low precision departs from fp32 (per-layer SQNR / cosine vs fp32): fp16 / trt_ptq /
    partial on their graph (ONNX Runtime), torch_ptq / qat / fp8 (and fp16 with --path torch) in
    PyTorch."""
    from qatcheck.analysis import localize as L
    from qatcheck.workspace import RecipeWorkspace

    ws = RecipeWorkspace(load_recipe(args.recipe), args.cache, device=args.device)
    t0 = time.perf_counter()
    loc = L.localize(ws, args.mode, quantized_onnx=args.onnx, max_samples=args.max_samples,
                     floor=args.floor_cosine, calibrator=args.calibrator, path=args.path)
    seconds = time.perf_counter() - t0
    header, rows = L.table_rows(loc)
    calib = f"calibrator {loc.calibrator}, " if loc.calibrator else ""
    title = (f"{loc.recipe}: {loc.mode} vs fp32 per layer ({calib}"
             f"{loc.samples} samples, {loc.order} order, {loc.path})")
    print(_render(header, rows, title), end="")
    print(L.verdict(loc))
    print(L.worst_line(loc))
    print(f"localize: {seconds:.2f} s (artifacts included)")
    for path in L.write_reports(loc, args.reports):
        print(f"wrote {path}")
    return 0


def cmd_crosscheck(args: argparse.Namespace) -> int:
    """qatcheck's ONNX PTQ vs NVIDIA ModelOpt's on the same fp32 ONNX and calibration batches."""
    from qatcheck.analysis import ptq_crosscheck as X
    from qatcheck.workspace import RecipeWorkspace

    ws = RecipeWorkspace(load_recipe(args.recipe), args.cache, use_cache=not args.no_cache)
    calibrators = X.CALIBRATORS if args.calibrator == "both" else (args.calibrator,)
    for calibrator in calibrators:
        t0 = time.perf_counter()
        check = X.crosscheck(ws, calibrator, mode=args.mode, max_samples=args.max_samples,
                             evaluate=not args.no_eval, threshold=args.threshold)
        header, rows = X.table_rows(check, args.top)
        title = (f"{check.recipe} {check.mode}, calibrator {calibrator}: ModelOpt {check.modelopt_version} "
                 f"({check.modelopt_method}) vs ours, scale ratio ModelOpt/ours, worst first")
        print(_render(header, rows, title), end="")
        for line in X.summary_lines(check):
            print(line)
        for who, items in (("ours", check.scales.only_ours), ("ModelOpt", check.scales.only_modelopt)):
            for p in items:
                print(f"  only {who}: {p.key} ({p.kind}) read by {X._short(p.readers)}")
        print(f"crosscheck: {time.perf_counter() - t0:.2f} s (artifacts included)")
        for path in X.write_reports(check, args.reports):
            print(f"wrote {path}")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    from qatcheck.quantize.qdq_lint import lint_qdq

    failed = 0
    for path in args.onnx:
        report = lint_qdq(path, ignore=args.ignore)
        print(report)
        failed += not report.ok
    return 1 if failed else 0


def cmd_reference(args) -> int:
    from qatcheck.reference_doc import main as reference

    return reference(["--write", str(args.write)] if args.write else [])


def cmd_cache(args) -> int:
    """List the artifact cache's entries (size, age, intact or what is wrong), or prune them."""
    from qatcheck.cache import ArtifactCache
    from qatcheck.results import ResultCache

    cache = ArtifactCache(args.cache)
    results = ResultCache(cache.root / "results")
    if not cache.root.is_dir():
        raise ConfigError(f"no artifact cache at {cache.root} (--cache DIR)")
    if args.action == "prune":
        gone = cache.prune(everything=args.all, older_than_days=args.older_than)
        for e in gone:
            print(f"removed {e.path.name}" + (f" ({e.problem})" if e.problem else ""))
        for tmp in cache.orphans:
            print(f"removed {tmp.relative_to(cache.root)} (temp file of a writer that died mid-write)")
        print(f"{len(gone)} entr{'y' if len(gone) == 1 else 'ies'} removed, {sum(e.size for e in gone) / 1e6:.1f} MB")
        stale = results.prune(everything=args.all, older_than_days=args.older_than)
        print(f"{len(stale)} stored result(s) removed (qatcheck.results: measured again when next needed)")
        return 0
    entries = cache.entries()
    rows = [(e.path.name, f"{e.size / 1e6:.2f}", f"{e.age_days:.1f}", e.problem or "ok") for e in entries]
    print(_render(("entry", "MB", "age (days)", "state"), rows, f"artifact cache {cache.root}"), end="")
    print(f"{len(entries)} entries, {sum(e.size for e in entries) / 1e6:.1f} MB, "
          f"{sum(e.problem is not None for e in entries)} damaged; {len(results.entries())} stored results")
    return 0


def _git(*args: str) -> bytes | None:
    """git's output, or None when it fails (not a repository, no such revision or path, no git)."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], capture_output=True, check=False)
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def read_baselines(spec: str, directory: str) -> tuple[str, dict[str, dict]]:
    """OLD or NEW of ``baselines diff`` -> (how to name it, recipe -> validated document): a
    baseline file (its recipe is the one it names), a directory of ``<recipe>.json`` files, or -
    when no such path exists - a git revision, whose ``directory`` is read with git."""
    from qatcheck import baselines

    path = Path(spec)
    if path.is_file():
        doc = baselines.parse(path.read_bytes(), path)
        return str(path), {doc["recipe"]: doc}
    if path.is_dir():
        return str(path), {p.stem: baselines.load(p, p.stem) for p in sorted(path.glob("*.json"))}
    top = _git("rev-parse", "--show-toplevel")
    if top is None or _git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}") is None:
        where = "" if top is not None else f" ({Path.cwd()} is not in a git repository)"
        raise ConfigError(f"{spec!r} is neither a baseline file, a directory of them nor a git revision{where}")
    root, wanted = Path(top.decode().strip()).resolve(), Path(directory).resolve()
    if not wanted.is_relative_to(root):
        raise ConfigError(f"--dir {directory} is outside the git repository {root}")
    rel = wanted.relative_to(root).as_posix()
    rel = "" if rel == "." else rel  # the repository's root: "REV:" is its tree
    listing = _git("ls-tree", "--full-tree", "-z", f"{spec}:{rel}")  # not only what lies under the cwd
    if listing is None:
        raise ConfigError(f"revision {spec} has no directory {rel or '.'} (--dir names the baselines directory)")
    docs = {}
    for item in filter(None, listing.decode().split("\0")):
        meta, _, name = item.partition("\t")
        _, kind, blob = meta.split()
        if kind == "blob" and name.endswith(".json"):
            raw = _git("cat-file", "blob", blob) or b""
            docs[name[:-5]] = baselines.parse(raw, f"{spec}:{'/'.join(filter(None, (rel, name)))}", name[:-5])
    return f"{spec}:{rel or '.'}", docs


def cmd_baselines_diff(args: argparse.Namespace) -> int:
    """What moved between two versions of the baselines, in tolerance units (qatcheck.baselines_diff)."""
    from qatcheck import baselines_diff as D

    if args.new is None and not Path(args.dir).is_dir():
        raise ConfigError(f"no NEW given, and the working tree has no directory {args.dir} to compare "
                          "OLD with (--dir names it)")
    old_name, old = read_baselines(args.old, args.dir)
    new_name, new = read_baselines(args.new or args.dir, args.dir)
    # a file against a directory or revision: its recipe only; two files: each other, whatever
    # recipes they name (digits.json against digits_entropy.json compares two recipes)
    files = Path(args.old).is_file(), args.new is not None and Path(args.new).is_file()
    if all(files):
        (a, doc_a), (b, doc_b) = *old.items(), *new.items()
        name = a if a == b else f"{a} → {b}"
        old, new = {name: doc_a}, {name: doc_b}
    elif any(files):
        keep = set(old if files[0] else new)
        old, new = ({k: v for k, v in side.items() if k in keep} for side in (old, new))
    diffs = D.diff_stores(old, new)
    if args.markdown:
        print(D.markdown(diffs, old_name, new_name), end="")
    elif args.json:
        print(D.to_json(diffs, old_name, new_name), end="")
    else:
        print(f"baselines {old_name} → {new_name}")
        for d in (d for d in diffs if d.changed):
            print("\n".join(D.summary_lines(d)))
            header, rows = D.table_rows(d)
            if rows:
                print(_render(header, rows, d.recipe), end="")
        same = [d.recipe for d in diffs if not d.changed]
        if same or not diffs:
            print(f"unchanged: {', '.join(same)}" if same else "no baseline file on either side")
    return 1 if args.fail_on_change and any(d.changed for d in diffs) else 0
def cmd_history(args) -> int:
    """Each case's figures over the last runs, and the drifts among them (qatcheck.history)."""
    from qatcheck import history as H
    from qatcheck.report_files import markdown_table

    lines = H.read(args.history)
    for note in lines.notes:
        print(f"note: {note}", file=sys.stderr)
    view = H.select(lines, args.recipe, args.case, source=str(args.history))
    found = H.drifts(view, args.runs)
    header, rows = H.history_table(view, args.runs)
    shown = min(args.runs, len(H.runs(view)))
    title = f"history {args.history}: the last {shown} of {len(H.runs(view))} run(s)"
    verdict = ([d.message for d in found] if found else
               [f"no drift over the last {args.runs} runs (a figure moving the same way further than its tolerance)"])
    if args.markdown:
        print(f"### {title}\n\n" + markdown_table(header, rows) + "\n" + "".join(f"- {v}\n" for v in verdict), end="")
    else:
        print(_render(header, rows, title), end="")
        print("\n".join(verdict))
    if args.png:
        written = H.plot(view, args.runs, args.png)
        print(f"wrote {written}" if written else "(nothing to draw)")
    return 1 if found and args.fail_on_drift else 0


def cmd_compare(args) -> int:
    """Per-case deltas between two runs (history run ids, report directories or report JSONs)."""
    from qatcheck import history as H
    from qatcheck.report_files import markdown_table

    (la, a), (lb, b) = H.load_side(args.run_a, args.history), H.load_side(args.run_b, args.history)
    for note in dict.fromkeys(getattr(a, "notes", []) + getattr(b, "notes", [])):
        print(f"note: {note}", file=sys.stderr)
    cmp = H.compare(a, b, la, lb)
    header, rows = H.comparison_table(cmp)
    title = f"A {la}  vs  B {lb}"
    if args.markdown:
        print(f"### {title}\n\n" + markdown_table(header, rows) + "".join(f"\n{n}\n" for n in H.comparison_notes(cmp)), end="")
    else:
        print(_render(header, rows, title), end="")
        print("".join(n + "\n" for n in H.comparison_notes(cmp)), end="")
    return 0


def _outputs(p: argparse.ArgumentParser, reports: str | None = "reports") -> None:
    """Where a subcommand writes: its report directory (None: it writes none) and the artifact cache."""
    if reports is not None:
        p.add_argument("--reports", default=reports, help=f"report directory (default {reports}/)")
    p.add_argument("--cache", default=".qatcheck_cache", help="artifact cache (default .qatcheck_cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qatcheck", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sensitivity", help="per-layer sensitivity profile and budgeted partial "
                       "quantization (writes reports/<recipe>-sensitivity.{json,png})")
    s.add_argument("--recipe", required=True, help="'module:callable' returning a Recipe, e.g. "
                   "qatcheck.zoo.recipes:digits_recipe")
    s.add_argument("--path", choices=("onnx", "torch"), default="onnx",
                   help="onnx: trt_ptq on ONNX Runtime (default); torch: torch_ptq in PyTorch")
    s.add_argument("--calibrator", default=None, help="override the recipe's calibrator for the "
                   "chosen path (onnx: minmax/entropy/percentile; torch: max/entropy/mse/percentile)")
    s.add_argument("--max-samples", type=int, default=256,
                   help="eval samples the profile runs on (default 256; 0 = all)")
    s.add_argument("--only-quantized", action="store_true",
                   help="also profile each layer quantized alone (doubles the evaluations)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--budget-points", type=float, default=None,
                   help="allowed drop vs fp32 in percentage points (e.g. 0.5)")
    g.add_argument("--budget-relative", type=float, default=None,
                   help="fraction of fp32 to keep (e.g. 0.99)")
    s.add_argument("--top", type=int, default=None, help="show only the N most sensitive layers")
    s.add_argument("--write-keep", default=None, metavar="FILE",
                   help="with a budget: write the chosen layers and why to FILE (JSON a recipe reads "
                        "with qatcheck.analysis.keeplist.load_keep_list)")
    _outputs(s)
    s.add_argument("--no-cache", action="store_true", help="recompute everything")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_sensitivity)
    loc = sub.add_parser("localize", help="per-layer SQNR / cosine of a low-precision model vs fp32 "
                         "(fp16 / Q/DQ graphs on ONNX Runtime, torch_ptq / qat / fp8 in PyTorch); names "
                         "the layer where damage enters (writes reports/<recipe>-localize-<mode>."
                         "{json,md,png})")
    loc.add_argument("--recipe", required=True, help="'module:callable' returning a Recipe")
    loc.add_argument("--mode", default="trt_ptq",
                     help="the low-precision model (default trt_ptq): fp16 / trt_ptq / partial are "
                          "localized on their ONNX on ONNX Runtime, tensor by tensor; torch_ptq / qat / "
                          "fp8 on their fake-quant module in PyTorch, module by module")
    loc.add_argument("--path", choices=("onnx", "torch"), default=None,
                     help="where to localize a mode that has both (fp16: its graph by default; "
                          "torch: the model in half in PyTorch)")
    loc.add_argument("--onnx", default=None, metavar="FILE",
                     help="onnx path: localize this ONNX (fp16 or Q/DQ) instead of the mode's artifact")
    loc.add_argument("--calibrator", default=None, help="override the mode's calibrator")
    loc.add_argument("--max-samples", type=int, default=64,
                     help="eval samples (default 64; 0 = all)")
    loc.add_argument("--floor-cosine", type=float, default=0.99,
                     help="a layer whose cosine vs fp32 is below this is damaged (default 0.99)")
    loc.add_argument("--device", default="cpu",
                     help="torch path: where the models run (and are built when not cached; "
                          "default cpu)")
    _outputs(loc)
    loc.set_defaults(func=cmd_localize)
    x = sub.add_parser("crosscheck", help="qatcheck's ONNX PTQ vs NVIDIA ModelOpt's on the same fp32 "
                       "ONNX and calibration data: per-site scale ratios, placement differences, "
                       "metric of each graph (writes reports/crosscheck/<recipe>-<mode>-<calibrator>"
                       ".{json,md,png})")
    x.add_argument("--recipe", required=True, help="'module:callable' returning a Recipe")
    x.add_argument("--calibrator", choices=("minmax", "entropy", "both"), default="both",
                   help="minmax (ModelOpt max) or entropy (ModelOpt entropy); default both")
    x.add_argument("--mode", choices=of_family("int8_graph"), default="trt_ptq",
                   help="the graph to build both ways (partial keeps QuantSettings.keep_precision)")
    x.add_argument("--max-samples", type=int, default=0,
                   help="eval samples the metrics run on (default 0 = all)")
    x.add_argument("--no-eval", action="store_true", help="compare scales and placement only")
    x.add_argument("--threshold", type=float, default=1.10,
                   help="a scale ratio beyond this either way is a disagreement (default 1.10)")
    x.add_argument("--top", type=int, default=12, help="rows of the printed table (default 12)")
    _outputs(x, reports="reports/crosscheck")
    x.add_argument("--no-cache", action="store_true", help="rebuild both graphs")
    x.set_defaults(func=cmd_crosscheck)
    lint = sub.add_parser("lint", help="check Q/DQ ONNX graphs: Concat inputs with different scales, "
                          "Adds with an unquantized input (exit 1 on findings)")
    lint.add_argument("onnx", nargs="+", help="Q/DQ ONNX file(s)")
    lint.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                      help="skip Adds / Concats whose node name matches (repeatable)")
    lint.set_defaults(func=cmd_lint)
    c = sub.add_parser("cache", help="list the artifact cache's entries, or prune them")
    c.add_argument("action", choices=("list", "prune"), nargs="?", default="list")
    _outputs(c, reports=None)
    c.add_argument("--all", action="store_true", help="prune: every entry (default: damaged ones only)")
    c.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="prune: also intact entries older than DAYS")
    c.set_defaults(func=cmd_cache)
    bl = sub.add_parser("baselines", help="review baseline files")
    bsub = bl.add_subparsers(dest="action", required=True)
    d = bsub.add_parser("diff", help="what moved between two versions of the baselines, old -> new, the "
                        "change and the change in tolerance units, largest first (exit 0 changed or not)")
    d.add_argument("old", metavar="OLD", help="a baseline file, a directory of them, or a git revision "
                   "(HEAD~1, main, a sha: its --dir is read)")
    d.add_argument("new", metavar="NEW", nargs="?", default=None,
                   help="the same kinds (default: the working tree's --dir)")
    d.add_argument("--dir", default="baselines",
                   help="the baselines directory a revision is read from, and NEW's default (default baselines)")
    fmt = d.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="Markdown, for a pull request's description")
    fmt.add_argument("--json", action="store_true", help="the change records as JSON")
    d.add_argument("--fail-on-change", action="store_true", help="exit 1 when anything changed")
    d.set_defaults(func=cmd_baselines_diff)
    h = sub.add_parser("history", help="each case's primary metric and p50 latency over the last runs "
                       "(reports/history.jsonl), and the drifts: a figure moving the same bad way run "
                       "after run, further in total than its tolerance, though each run passed")
    h.add_argument("--history", default="reports/history.jsonl", help="the history file (default reports/history.jsonl)")
    h.add_argument("--recipe", default=None, help="only this recipe's cases")
    h.add_argument("--case", default=None, metavar="GLOB", help="only cases whose id matches, e.g. '*trt_ptq*'")
    h.add_argument("--runs", type=int, default=6, metavar="N", help="the drift window: the last N runs (default 6)")
    h.add_argument("--png", default=None, metavar="FILE", help="also draw the metric and p50 latency per case over the runs")
    h.add_argument("--markdown", action="store_true", help="print Markdown (a CI job summary) instead of a table")
    h.add_argument("--fail-on-drift", action="store_true", help="exit 1 when a drift is found")
    h.set_defaults(func=cmd_history)
    cm = sub.add_parser("compare", help="per-case deltas between two runs: metric, p50 latency (same device "
                        "only), parity cosine, verdict")
    for name in ("run_a", "run_b"):
        cm.add_argument(name, metavar=name.upper(), help="a run of the history (-1 the last, -2 the one before, "
                        "its id or a unique part of it), or a report directory / report JSON file")
    cm.add_argument("--history", default="reports/history.jsonl", help="the history file (default reports/history.jsonl)")
    cm.add_argument("--markdown", action="store_true", help="print a Markdown table")
    cm.set_defaults(func=cmd_compare)
    r = sub.add_parser("reference", help="the recipe author's reference (docs/reference.md), from the code")
    r.add_argument("--write", type=Path, default=None, help="write it here (default: print it)")
    r.set_defaults(func=cmd_reference)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_samples", None) == 0:
        args.max_samples = None
    try:
        return args.func(args)
    except QatcheckError as exc:
        print(f"qatcheck {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
