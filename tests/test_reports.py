"""The report files a user reads (issue 24 item 5): the recipe report's Failures section, its chart
(every metric the task reports, latency only when timed, failing cases red, missing values not
zero) and the size of every report PNG (capped near 2,000 px, however many layers or cases).

Synthetic records and rankings, no model: the end-to-end runs that write these files are in
test_plugin.py (Failures after a tampered baseline, none on the clean rerun) and test_repro.py
(the localization and reproduction lines carried into the Failures section)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qatcheck import report, report_files
from qatcheck.analysis import localize_kernel as K
from qatcheck.analysis import sensitivity as S
from qatcheck.analysis import sensitivity_report
from qatcheck.parity import ParityAccumulator

#: report_files' cap: 18 in at 110 dpi
MAX_PX = int(report_files.PNG_MAX_INCHES * report_files.PNG_DPI)


def _record(mode, backend, verdict="pass", metrics=None, latency=None, checks=None, outcomes=None):
    return {"case": {"id": f"r-{mode}-{backend}", "mode": mode, "backend": backend, "shape": ""},
            "shape": [32, 1, 8, 8], "metrics": metrics or {}, "verdict": verdict,
            "latency": {"median_ms": latency} if latency is not None else None,
            "checks": checks or {}, "outcomes": outcomes or {}}


# ---- the Failures section ---------------------------------------------------------------------

def test_the_failures_section_gives_each_failing_checks_cause_and_a_clean_report_has_none():
    parity = {"status": "fail", "failures": ["output 'logits': cosine 0.79 is below the floor 0.98", "second"],
              "details": ["localize r trt_ptq: damage enters at layer1.conv2 (/layer1/conv2/Conv)",
                          "reproduce outside pytest: polygraphy run /c/m.onnx --onnxrt"]}
    records = [_record("fp32", "torch", checks={"accuracy": {"status": "pass", "failures": []}}),
               _record("trt_ptq", "onnxruntime", "FAIL", checks={"parity": parity,
                                                                 "accuracy": {"status": "pass", "failures": []}}),
               _record("fp16", "onnxruntime", "FAIL", outcomes={"test_accuracy": "failed"})]
    md = report_files.failures_markdown(records)
    lines = md.strip().splitlines()
    assert lines[0] == "## Failures"
    assert lines[2] == "- **r-trt_ptq-onnxruntime** parity: output 'logits': cosine 0.79 is below the floor 0.98"
    assert lines[3:6] == ["  - second", "  - localize r trt_ptq: damage enters at layer1.conv2 (/layer1/conv2/Conv)",
                          "  - reproduce outside pytest: `polygraphy run /c/m.onnx --onnxrt`"]
    assert "r-fp16-onnxruntime** test_accuracy: failed without a check verdict" in md
    assert "r-fp32-torch" not in md and "accuracy: " not in md.split("fp16")[0]  # passing checks: not listed
    assert report_files.failures_markdown(records[:1]) == ""


def test_the_failures_section_is_written_after_the_table_before_the_notes(tmp_path):
    rec = _record("fp32", "onnxruntime", "FAIL", checks={"accuracy": {"status": "fail", "failures": ["top1 *low*"]}})
    md, _, _ = report_files.write(tmp_path, "r", ["Mode"], [["fp32"]], [rec], "\nnote: a note\n", {},
                                  report_files.Run())
    text = md.read_text()
    assert text.index("| fp32 |") < text.index("## Failures") < text.index("note: a note")
    assert r"accuracy: top1 \*low\*" in text  # no stray emphasis on GitHub


# ---- the chart --------------------------------------------------------------------------------

HEADS = [report.ChartMetric("top1", "top-1"), report.ChartMetric("top5", "top-5"),
         report.ChartMetric("landmarks.l2", "landmarks.l2", higher_is_better=False, fraction=False)]


def _heads_records(latency=None):
    return [_record("fp32", "torch", metrics={"top1": 0.99, "landmarks.l2": 0.61}),
            _record("trt_ptq", "onnxruntime", "FAIL", metrics={"top1": 0.91, "landmarks.l2": 0.93}, latency=latency),
            _record("fp16", "onnxruntime", metrics={})]  # measured nothing (its tests skipped)


def _figure(records, metrics=HEADS):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, report.chart_figure(plt, "qatcheck: r", records, metrics)


def test_the_chart_has_a_panel_per_reported_metric_and_latency_only_when_timed():
    panels = report.chart_panels(_heads_records(), HEADS)
    # top-5 has no value in any case: no panel; the head's metric has one, labelled by direction
    assert [p.label for p in panels] == ["top-1 (%)", "landmarks.l2\n(lower is better)"]
    assert panels[0].values == [99.0, 91.0, None]  # missing, not 0
    panels = report.chart_panels(_heads_records(latency=1.5), HEADS)
    assert panels[-1].label == "p50 latency (ms)" and panels[-1].values == [None, 1.5, None]


def test_the_chart_draws_failing_cases_red_and_marks_missing_values():
    plt, fig = _figure(_heads_records())
    try:
        assert len(fig.axes) == 2
        assert [t.get_text() for t in fig.axes[0].texts] == ["99", "91", "n/a"]
        for ax in fig.axes:
            bars = ax.patches
            assert len(bars) == 2  # the case without a value has no bar...
            assert [tuple(b.get_facecolor()[:3]) for b in bars] == [
                pytest.approx(np.array([31, 119, 180]) / 255), pytest.approx(np.array([214, 39, 40]) / 255)]
            assert [t.get_text() for t in ax.texts][-1:] == ["n/a"]  # ...but an n/a mark (after the figures)
        assert "red: failing case" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
    plt, fig = _figure([_record("fp32", "torch")])  # nothing measured: no chart
    assert fig is None


def test_a_chart_of_many_cases_stays_within_the_cap(tmp_path):
    records = [_record(f"mode{i}", "onnxruntime", "FAIL" if i % 7 == 0 else "pass",
                       metrics={"top1": 0.9 + i / 2000, "landmarks.l2": 0.5}, latency=1.0 + i / 100)
               for i in range(150)]
    png = report.chart(tmp_path, "many", "qatcheck: many", records, HEADS)
    w, h = Image.open(png).size
    assert w <= MAX_PX and h <= MAX_PX, (w, h)
    assert report.chart(tmp_path, "many", "t", [_record("fp32", "torch")], HEADS) is None
    assert not png.exists()  # an older chart is not left to mislead


# ---- localization and sensitivity PNGs ----------------------------------------------------------

def _localization(n: int, seed: int = 0) -> K.Localization:
    """A ranking of ``n`` synthetic layers, through the kernel's own rule."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cum, own = ParityAccumulator(), ParityAccumulator()
        ref = rng.standard_normal(64)
        cum.update(ref, ref + rng.standard_normal(64) * 0.01 * (1 + i / n))
        own.update(ref, ref + rng.standard_normal(64) * rng.uniform(1e-3, 0.2))
        rows.append(K.layer_row(i, f"/layer{i}/Conv_output_0", f"/layer{i}/Conv", "Conv", f"layer{i}",
                                cum, own, 40.0, [f"/layer{i - 1}/Conv_output_0"] if i else []))
    return K.localization(rows, 0.9999, [], 0.0, recipe="synthetic", mode="trt_ptq", calibrator="minmax",
                          samples=8, quantized="q.onnx", fp32="f.onnx")


def test_a_localization_png_of_300_layers_is_capped_and_says_it_shows_the_top_ones(tmp_path):
    loc = _localization(300)
    [png] = [f for f in K.write_reports(loc, tmp_path) if f.suffix == ".png"]
    w, h = Image.open(png).size
    assert w <= MAX_PX and h <= MAX_PX, (w, h)  # 16,500 px wide before
    import matplotlib.pyplot as plt

    fig = K._plot(loc, plt)
    try:
        shown = [t.get_text() for t in fig.axes[1].get_xticklabels()]
        assert len(shown) <= K.PLOT_LAYERS + 2 and loc.named in shown
        assert set(shown) >= {loc.row(t).layer for t in loc.worst}  # the worst are among them
        assert f"top {len(shown)} of 300 layers" in fig.axes[0].get_title()
    finally:
        plt.close(fig)
    fig = K._plot(_localization(12), plt)  # a small model: every layer, no note
    try:
        assert len(fig.axes[1].get_xticklabels()) == 12 and "top " not in fig.axes[0].get_title()
    finally:
        plt.close(fig)


def test_a_sensitivity_png_of_300_layers_is_capped(tmp_path):
    layers = [S.LayerSensitivity(f"layer{i}", [f"/layer{i}/Conv"], 0.9, 0.99, 0.1, rank=i + 1,
                                 excluded_sqnr_db=40.0 - i / 10) for i in range(300)]
    prof = S.Profile("synthetic", "onnx", "trt_ptq", "minmax", "top1", 64, 0.95, 0.9, 0.99, layers)
    [png] = [f for f in sensitivity_report.write_reports(prof, tmp_path) if f.suffix == ".png"]
    w, h = Image.open(png).size
    assert w <= MAX_PX and h <= MAX_PX, (w, h)
    md = (tmp_path / "synthetic-sensitivity.md").read_text()
    assert "layer299" in md  # the table keeps every layer


def test_top_rows_keeps_the_worst_and_the_named_in_their_order():
    rows = list(range(10))
    assert report_files.top_rows(rows, 20, lambda r: r) == rows
    assert report_files.top_rows(rows, 3, lambda r: -r, keep=lambda r: r == 0) == [0, 7, 8, 9]
    assert report_files.shown_of(4, 10, "layers") == "top 4 of 10 layers" and report_files.shown_of(10, 10, "x") == ""
