"""The localization kernel: what both localization paths share, so that they differ only in how
they produce the pairs of tensors they compare (issue 22).

- :mod:`qatcheck.analysis.localize` (ONNX path: a low-precision graph vs the fp32 graph on ONNX
  Runtime, tensor by tensor) and :mod:`qatcheck.analysis.localize_torch` (PyTorch path: module by
  module, with forward hooks) each feed, per row, the fp32 and low-precision values into
  :class:`~qatcheck.parity.ParityAccumulator` s (end to end, and the layer alone on fp32 inputs)
  and hand them to :func:`layer_row`;
- :func:`localization` applies the rule (:func:`conclude`: where the damage enters, the first row
  below the floor, the worst five) and makes the :class:`Localization`;
- the verdict line, the table, the reports (:func:`write_reports`: JSON, Markdown, PNG), the lines a
  failed parity check adds (:func:`failure_lines`) and the session's budget for automatic
  localizations (:class:`AutoLocalization`) are the same for both;
- which modes take which path is a question to the mode table
  (:func:`qatcheck.modes.localization_paths`): :func:`onnx_modes`, :func:`torch_modes`,
  :func:`path_for`.

The rule, and why own SQNR is the contribution: see :mod:`qatcheck.analysis.localize`.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qatcheck.errors import ConfigError
from qatcheck.modes import MODE_SPECS, localization_paths, spec as mode_spec
from qatcheck.parity import SQNR_CAP_DB, ParityAccumulator
from qatcheck.report_files import markdown_table, shown_of, top_rows, write_bundle

__all__ = ["LayerRow", "Localization", "layer_row", "localization", "conclude", "check_floor", "RULE",
           "onnx_modes", "torch_modes", "modes", "PATHS", "path_for", "with_mode_calibrator", "calibrator_of",
           "AutoLocalization", "localize_command", "failure_floor", "failure_lines", "verdict",
           "worst_line", "table_rows", "markdown_report", "write_reports"]

#: +-dB cap of every SQNR (qatcheck.parity's): an exact layer's own SQNR
_CAP_DB = SQNR_CAP_DB


#: where a mode is localized: its ONNX graph on ONNX Runtime, or its PyTorch module
PATHS = ("onnx", "torch")


def onnx_modes() -> tuple[str, ...]:
    """Modes localized on their ONNX graph (ONNX Runtime), from the mode table
    (:func:`qatcheck.modes.localization_paths`): low precision and made from the fp32 export (the
    fp16 conversion, the ONNX-level PTQ graphs), so every compared tensor keeps its name AND its
    meaning."""
    return tuple(n for n in MODE_SPECS if "onnx" in localization_paths(n))


def torch_modes() -> tuple[str, ...]:
    """Modes localized in PyTorch (:mod:`qatcheck.analysis.localize_torch`), from the mode table:
    low precision with a PyTorch form. The exports of the quantized ones keep BatchNorm unfused,
    so ``/stem/conv/Conv_output_0`` there is the pre-BN conv output while the fp32 export's (BN
    folded) is post-BN - same name and shape, different values (measured on digits: cosine 0.93 at
    stem.conv against 0.99995 at stem.relu right after it). Their modules keep the fp32 model's
    module names instead, so they are compared module by module."""
    return tuple(n for n in MODE_SPECS if "torch" in localization_paths(n))


def modes() -> tuple[str, ...]:
    """Every mode that can be localized (table order)."""
    return tuple(n for n in MODE_SPECS if localization_paths(n))



RULE = ("contribution = own SQNR: the layer of the low-precision graph (fp16, or with its input "
        "and weight Q/DQ) run on fp32 inputs vs the fp32 output, lowest first; named = the lowest "
        "own SQNR among the first layer whose cosine vs fp32 < floor and its ancestors; none when no layer "
        "is below the floor")


@dataclass
class LayerRow:
    index: int  # topological (ONNX) / execution (torch) position among the compared rows
    tensor: str  # the row's key: the ONNX tensor, or the module name (``name#2``: second call)
    node: str  # the ONNX node, or the module (or quantizer) name
    op: str  # the ONNX op type, or the module's class
    layer: str  # PyTorch module name (the node name for a top-level op)
    sqnr_db: float  # end to end (cumulative) vs fp32
    cosine: float  # end to end (cumulative) vs fp32
    input_sqnr_db: float  # SQNR of the worst input (cap: exact input)
    drop_db: float  # input_sqnr_db - sqnr_db
    own_nsr: float  # 10^(-own_sqnr_db/10): the layer's own error energy / signal energy
    own_sqnr_db: float  # the contribution (ranking key): the layer alone, on fp32 inputs
    inputs: list[str] = field(default_factory=list)  # compared rows this one depends on directly
    rank: int = 0  # by contribution, 1 = largest
    #: torch path: own SQNR measured after this module (the BatchNorm right after a conv, fp32's:
    #: deployment folds it into the conv), None when measured on the row's own output
    own_after: str | None = None
    #: torch path, a layer whose weights differ from fp32's (qat): its quantized output vs the SAME
    #: module with its quantizers off, on the fp32 input - the quantization alone, without the
    #: fine-tuning drift; None where the weights are fp32's (own SQNR already is that)
    quant_only_sqnr_db: float | None = None


@dataclass
class Localization:
    recipe: str
    mode: str
    calibrator: str | None
    samples: int
    floor: float
    quantized: str  # the quantized artifact (Q/DQ ONNX, or the torch state file)
    fp32: str  # the fp32 reference (ONNX, or the recipe's PyTorch model)
    rows: list[LayerRow]
    named: str | None  # the named layer (module name), None when no layer is below the floor
    named_tensor: str | None
    first_below_floor: str | None  # tensor of the first row with cosine < floor
    worst: list[str]  # tensors of the worst five contributors
    skipped: list[str]  # intermediate tensors (modules) present in one model only, or other shapes
    seconds: float = 0.0
    rule: str = RULE
    path: str = "onnxruntime"  # onnxruntime | torch
    order: str = "topological"  # the rows' order: topological (ONNX graph) | execution (torch)
    #: how the rows were measured and what they are compared with (one or two sentences)
    method: str = ""

    def row(self, tensor: str) -> LayerRow:
        for r in self.rows:
            if r.tensor == tensor:
                return r
        raise KeyError(tensor)

    def ranked(self) -> list[LayerRow]:
        return sorted(self.rows, key=lambda r: r.rank)

    def to_json(self) -> dict:
        return asdict(self)



def _nsr(db: float) -> float:
    return 10.0 ** (-db / 10.0)


def check_floor(floor: float) -> None:
    if not 0.0 < floor <= 1.0:
        raise ConfigError(f"floor cosine must be in (0, 1]; got {floor}")


def conclude(rows: list[LayerRow], floor: float
             ) -> tuple[LayerRow | None, LayerRow | None, list[str]]:
    """The rule, on rows in topological / execution order whose ``inputs`` name the rows they
    depend on directly: ranks them by own SQNR (in place; ties: the earlier row first) and returns
    (the named row or None, the first row below the floor or None, the worst five's tensors)."""
    for rank, r in enumerate(sorted(rows, key=lambda r: (r.own_sqnr_db, r.index)), start=1):
        r.rank = rank
    by_tensor = {r.tensor: r for r in rows}
    first = next((r for r in rows if r.cosine < floor), None)
    named = None
    if first is not None:
        cone, stack = set(), [first.tensor]
        while stack:
            t = stack.pop()
            if t in cone or t not in by_tensor:
                continue
            cone.add(t)
            stack.extend(by_tensor[t].inputs)
        named = min((by_tensor[t] for t in cone), key=lambda r: r.rank)
    worst = [r.tensor for r in sorted(rows, key=lambda r: r.rank)[:5]]
    return named, first, worst



def layer_row(index: int, tensor: str, node: str, op: str, layer: str, cum: ParityAccumulator,
              own: ParityAccumulator | None, input_sqnr_db: float, inputs: list[str],
              **extra) -> LayerRow:
    """One row from what a path accumulated for it: ``cum`` the row's value end to end vs fp32,
    ``own`` the layer alone on fp32 inputs vs fp32 (None: an exact layer, the cap),
    ``input_sqnr_db`` the worst of its inputs'. ``extra``: the torch path's ``own_after`` /
    ``quant_only_sqnr_db``."""
    sq = cum.sqnr_db()
    own_db = own.sqnr_db() if own is not None else _CAP_DB
    return LayerRow(index=index, tensor=tensor, node=node, op=op, layer=layer, sqnr_db=sq,
                    cosine=cum.cosine(), input_sqnr_db=input_sqnr_db, drop_db=input_sqnr_db - sq,
                    own_nsr=_nsr(own_db), own_sqnr_db=own_db, inputs=inputs, **extra)


def localization(rows: list[LayerRow], floor: float, skipped: list[str], t0: float, **fields) -> Localization:
    """The :class:`Localization` of ``rows`` (topological / execution order): the rule applied
    (:func:`conclude`), ``skipped`` without repeats, the seconds since ``t0``
    (``time.perf_counter``); ``fields``: the rest (recipe, mode, path, method...)."""
    named, first, worst = conclude(rows, floor)
    return Localization(floor=floor, rows=rows, named=named.layer if named else None,
                        named_tensor=named.tensor if named else None,
                        first_below_floor=first.tensor if first else None, worst=worst,
                        skipped=list(dict.fromkeys(skipped)), seconds=time.perf_counter() - t0, **fields)


def path_for(recipe, mode: str, path: str | None = None) -> str:
    """Where ``mode`` is localized: ``path`` when given and possible, else its graph where it is
    made from the fp32 export (and always for an ONNX-only recipe), else its PyTorch module."""
    from qatcheck.recipe import NO_TORCH, is_onnx_only

    if mode not in modes():
        raise ConfigError(f"localize: mode {mode!r} is not a low-precision mode; choose one of "
                          f"{', '.join(modes())}")
    if path is not None and path not in PATHS:
        raise ConfigError(f"localize: path {path!r}: choose one of {', '.join(PATHS)}")
    can = list(localization_paths(mode))
    if recipe is not None and is_onnx_only(recipe):
        can = [p for p in can if p == "onnx"]
        if not can:
            raise ConfigError(f"localize: mode {mode!r} of Recipe({recipe.name}): {NO_TORCH}")
    if path is None:
        return can[0]
    if path not in can:
        raise ConfigError(f"localize: mode {mode!r} cannot be localized on the {path} path; it can on "
                          f"{' / '.join(can)}")
    return path


def with_mode_calibrator(recipe, mode: str, calibrator: str | None):
    """The recipe with ``mode``'s calibrator (its row's ``calibrator_field``) replaced."""
    from dataclasses import replace

    if calibrator is None:
        return recipe
    field_ = mode_spec(mode).calibrator_field
    if field_ is None:
        raise ConfigError(f"localize: mode {mode!r} is not calibrated; --calibrator does not apply")
    return replace(recipe, quant=replace(recipe.quant, **{field_: calibrator}))


def calibrator_of(recipe, mode: str) -> str | None:
    field_ = mode_spec(mode).calibrator_field
    return getattr(recipe.quant, field_) if field_ else None



class AutoLocalization:
    """The automatic localizations of one test session (one process; each pytest-xdist worker has
    its own): each distinct artifact is localized once - a failed case whose artifact is
    byte-identical to one already localized (``partial`` keeping nothing is ``trt_ptq``) gets the
    first one's lines, saying so - and together they take at most ``budget_s`` seconds
    (``--qatcheck-localize-budget``; None: no limit). A localization stops reading eval batches
    when the budget runs out (the batch under way finishes); once it is spent, a failure gets the
    command that localizes its case instead."""

    def __init__(self, budget_s: float | None = None) -> None:
        self.budget_s = budget_s
        self.spent = 0.0
        #: key (what the localization compared: the artifacts' digests, floor, samples) -> (the
        #: case it was made for, its lines)
        self.done: dict[tuple, tuple[str, list[str]]] = {}

    def lines(self, case_id: str, key: tuple, localize, reports_dir: str | Path, command: str) -> list[str]:
        """The failure message's lines for ``case_id``: ``localize(until)`` runs the localization
        over ``until(batches)`` (the budget's cut), unless ``key`` was localized already or the
        budget is spent; ``command`` localizes the case outside pytest."""
        if key in self.done:
            first, lines = self.done[key]
            return [f"(the localization of {first}: this case's artifact is byte-identical, so it was "
                    "not localized again)", *lines]
        left = None if self.budget_s is None else self.budget_s - self.spent
        if left is not None and left <= 0:
            return [f"(not localized: this run's --qatcheck-localize-budget of {self.budget_s:g} s is spent; "
                    f"localize it with: {command})"]
        t0 = time.monotonic()
        cut: list[int] = []

        def until(batches):
            for i, batch in enumerate(batches):
                if i and left is not None and time.monotonic() - t0 > left:
                    cut.append(i)
                    return
                yield batch

        try:
            loc = localize(until)
            lines = failure_lines(loc, reports_dir)
        finally:
            self.spent += time.monotonic() - t0
        if cut:
            lines.append(f"(localized on its first {loc.samples} samples only: the "
                         f"--qatcheck-localize-budget of {self.budget_s:g} s ran out; all of them: {command})")
        self.done[key] = (case_id, lines)
        return lines


def localize_command(view, max_samples: int, floor: float, *extra: str) -> str:
    """``python -m qatcheck localize ...`` for a failed case (a CaseView), where pytest did not localize it."""
    import shlex

    case = view.case
    args = ["python", "-m", "qatcheck", "localize", "--recipe", f"<module:function returning Recipe({case.recipe})>",
            "--mode", case.mode, *extra, "--max-samples", str(max_samples), "--floor-cosine", f"{floor:g}",
            "--cache", str(view.cache_dir), "--reports", str(view.reports_dir)]
    return " ".join(shlex.quote(a) for a in args)


def failure_floor(view) -> float:
    """The per-layer floor of an automatic localization: the case's parity cosine floor."""
    thresholds = view.thresholds
    return thresholds.min_cosine if thresholds is not None else 0.99


def failure_lines(loc: Localization, reports_dir: str | Path) -> list[str]:
    """Write the reports; the lines a failed parity check adds to its message."""
    files = write_reports(loc, reports_dir)
    return [verdict(loc), f"per-layer table: {files[1] if len(files) > 1 else files[0]}"]



# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

def _where(r: LayerRow) -> str:
    """``layer (tensor)``, or just the layer when the row's key is its name (torch path)."""
    return r.layer if r.tensor == r.layer else f"{r.layer} ({r.tensor})"


def verdict(loc: Localization) -> str:
    head = f"localize {loc.recipe} {loc.mode} ({loc.samples} samples, floor cosine {loc.floor:g}): "
    worst = loc.row(loc.worst[0]) if loc.worst else None
    if loc.named is None:
        w = (f"; largest contribution {_where(worst)}: own SQNR {worst.own_sqnr_db:.1f} dB"
             if worst else "")
        return head + "no layer below the floor" + w
    r = loc.row(loc.named_tensor)
    f = loc.row(loc.first_below_floor)
    return (head + f"damage enters at {_where(r)}: own SQNR {r.own_sqnr_db:.1f} dB, "
            f"SQNR {r.input_sqnr_db:.1f} -> {r.sqnr_db:.1f} dB, cosine {r.cosine:.4f}; first "
            f"below the floor: {_where(f)}, cosine {f.cosine:.4f}")


def worst_line(loc: Localization) -> str:
    return "worst five by contribution: " + ", ".join(
        f"{loc.row(t).layer} ({loc.row(t).own_sqnr_db:.1f} dB)" for t in loc.worst)


def table_rows(loc: Localization) -> tuple[list[str], list[list[str]]]:
    quant_only = any(r.quant_only_sqnr_db is not None for r in loc.rows)
    header = ["#", "layer", "tensor" if loc.path == "onnxruntime" else "call", "op", "SQNR dB",
              "cosine", "in SQNR dB", "drop dB", "own SQNR dB"]
    header += ["quant-only dB"] if quant_only else []
    header += ["rank", ""]
    rows = []
    for r in loc.rows:
        mark = []
        if r.tensor == loc.named_tensor:
            mark.append("NAMED")
        if r.tensor == loc.first_below_floor:
            mark.append("first < floor")
        elif r.cosine < loc.floor:
            mark.append("< floor")
        if r.own_after:
            mark.append(f"own after {r.own_after}")
        row = [str(r.index), r.layer, r.tensor, r.op, f"{r.sqnr_db:.2f}", f"{r.cosine:.5f}",
               f"{r.input_sqnr_db:.2f}", f"{r.drop_db:.2f}", f"{r.own_sqnr_db:.2f}"]
        if quant_only:
            row.append("" if r.quant_only_sqnr_db is None else f"{r.quant_only_sqnr_db:.2f}")
        rows.append(row + [str(r.rank), ", ".join(mark)])
    return header, rows


def markdown_report(loc: Localization) -> str:
    out = [f"# {loc.recipe}: {loc.mode} damage localization\n",
           f"{loc.method}.\n", f"First {loc.samples} eval samples"
           + (f", calibrator {loc.calibrator}" if loc.calibrator else "") + f"; rows in {loc.order} order.\n",
           f"Rule: {loc.rule}.\n", f"**{verdict(loc)}**\n", markdown_table(*table_rows(loc))]
    worst = [loc.row(t) for t in loc.worst]
    out.append("\nWorst five by contribution: " + ", ".join(
        f"{r.layer} ({r.own_sqnr_db:.1f} dB)" for r in worst) + "\n")
    if loc.skipped:
        what = "tensors" if loc.path == "onnxruntime" else "module calls"
        out.append(f"\nNot compared (in one model only, or another shape): {len(loc.skipped)} {what}"
                   + (f": {', '.join(loc.skipped[:12])}" if loc.path != "onnxruntime" else "") + ".\n")
    return "\n".join(out)


#: layers the PNG shows at most (the width grows 0.45 in a layer: 32 keep it under report_files'
#: cap, ~2,000 px); a larger model shows its worst by contribution - the table has them all
PLOT_LAYERS = 32


def _plot(loc: Localization, plt):
    # the worst by contribution (rank 1 = largest), and the rows the verdict names, in graph order
    rows = top_rows(loc.rows, PLOT_LAYERS, lambda r: r.rank,
                    keep=lambda r: r.tensor in (loc.named_tensor, loc.first_below_floor))
    xs = np.arange(len(rows))
    colors = ["tab:red" if r.tensor == loc.named_tensor else "tab:blue" for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 7), sharex=True)
    a1.bar(xs, [r.sqnr_db for r in rows], color=colors)
    # with rows left out, neighbours on the axis are not neighbours in the graph: points, no line
    a1.plot(xs, [r.input_sqnr_db if r.input_sqnr_db < _CAP_DB else np.nan for r in rows],
            "k.--" if len(rows) == len(loc.rows) else "k.", lw=0.8, label="worst input SQNR")
    a1.set_ylabel("SQNR vs fp32 (dB)")
    a1.legend(loc="upper right", fontsize=8)
    shown = shown_of(len(rows), len(loc.rows), "layers by contribution (own SQNR); the table has all")
    a1.set_title(verdict(loc) + (f"\n{shown}" if shown else ""), fontsize=8, wrap=True)
    # exact layers (no Q/DQ of their own: ReLU, pooling...) have no bar
    a2.bar(xs, [r.own_sqnr_db if r.own_sqnr_db < _CAP_DB else np.nan for r in rows], color=colors)
    a2.set_ylabel("own SQNR (dB, lower = adds more;\nno bar: exact)")
    a2.set_xticks(xs)
    a2.set_xticklabels([r.layer or r.node for r in rows], rotation=75, ha="right", fontsize=7)
    a2.set_xlabel(f"{loc.order} order")
    fig.tight_layout()
    return fig


def write_reports(loc: Localization, reports_dir: str | Path) -> list[Path]:
    """``<recipe>-localize-<mode>.json``, ``.md`` and ``.png`` in ``reports_dir`` (``-torch`` after
    the mode for the PyTorch path of a mode that has both)."""
    # a mode localized on both paths (fp16) keeps the torch path's reports apart
    both = loc.path == "torch" and loc.mode in onnx_modes()
    stem = f"{loc.recipe}-localize-{loc.mode}" + ("-torch" if both else "")
    return write_bundle(Path(reports_dir) / stem, json_doc={**loc.to_json(), "verdict": verdict(loc)},
                        markdown=markdown_report(loc), plot=lambda plt: _plot(loc, plt))
