"""fp16 of a real ONNX model: PP-OCRv4 text detection (issue 21, item 9).

The model is ``ch_PP-OCRv4_det_infer.onnx`` from the ``rapidocr-onnxruntime==1.4.4`` wheel (never
committed; fetch it without its dependencies)::

    pip download --no-deps rapidocr-onnxruntime==1.4.4 -d /tmp/rapidocr
    unzip -o -q /tmp/rapidocr/rapidocr_onnxruntime-1.4.4-py3-none-any.whl -d /tmp/rapidocr/whl
    python benchmarks/ppocr_fp16.py \\
        --model /tmp/rapidocr/whl/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx

An ONNX-only recipe (``onnx_file``) over six skimage.data images (astronaut, coffee, chelsea, rocket,
page, text) letterboxed to 1x3x640x640 and normalised the PP-OCR way (ImageNet mean / std). The task
is the probability map: ``text_px`` (fraction of pixels above DB's 0.3 threshold) and, against the
reference, ``pixel_agreement`` (fraction of pixels on the same side of 0.3).

Printed, on ONNX Runtime (CPU):

* **before**: the plain conversion qatcheck used until issue 21 (``convert_float_to_float16`` with
  ``keep_io_types``, nothing folded or kept) vs the fp32 graph: cosine and pixel agreement, then
  fp16 localization of that graph (``qatcheck.analysis.localize.localize_graphs``): the first tensor
  where fp16 departs from fp32, and the node named;
* **after**: the recipe's ``fp16`` case through a qatcheck session (the artifact qatcheck builds now),
  its parity, and what the conversion folded / kept in fp32 (the artifact's info, as the report says);
  fp16 localization of that graph too.

Measured (2-core CPU, ONNX Runtime 1.32, 6 images; each localization ~630 s on a busy machine)::

    before (plain convert_float_to_float16): cosine 0.33092, max-abs 1.0000, pixel agreement 86.10%
      localization (plain conversion, 330 tensors compared):
        localize ppocr_det fp16 (6 samples, floor cosine 0.99): damage enters at p2o.BatchNormalization.1
        (batch_norm_0.tmp_3): own SQNR -24.0 dB, SQNR 45.9 -> -24.1 dB, cosine 0.7527; first below the
        floor: p2o.BatchNormalization.1 (batch_norm_0.tmp_3), cosine 0.7527
        worst five by own SQNR: p2o.BatchNormalization.1 (-24.0 dB), p2o.Conv.1 (58.4 dB), p2o.Conv.6
        (61.4 dB), p2o.Conv.2 (62.4 dB), p2o.Add.214 (63.7 dB)
    after (qatcheck's fp16 artifact 6a9b3697dc5466ea): cosine 0.99986, max-abs 0.2946, pixel agreement 99.99%
      note: fp16 ONNX: 3 node(s) folded in fp32 before the conversion, as TensorRT folds them at build
      time: BatchNormalization p2o.BatchNormalization.0 into Conv p2o.Conv.0; BatchNormalization
      p2o.BatchNormalization.1 into Conv p2o.Conv.61; BatchNormalization p2o.BatchNormalization.2 into Mul/Add
      localization (qatcheck's fp16, 328 tensors compared): no layer below the floor; largest
      contribution p2o.Conv.1 (depthwise_conv2d_0.tmp_0): own SQNR 58.4 dB
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SIZE = 640
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "page", "text")
THRESHOLD = 0.3  # PP-OCR's DB binarisation threshold


def images() -> np.ndarray:
    """Six skimage.data images, longest side resized to 640, zero-padded (after normalisation) to
    640x640, NCHW float32."""
    import skimage.data
    from skimage.transform import resize

    out = []
    for name in IMAGES:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3].astype(np.float32) / 255.0
        h, w = img.shape[:2]
        s = SIZE / max(h, w)
        img = resize(img, (round(h * s), round(w * s)), anti_aliasing=True).astype(np.float32)
        canvas = np.zeros((SIZE, SIZE, 3), np.float32)
        canvas[:img.shape[0], :img.shape[1]] = (img - MEAN) / STD
        out.append(canvas.transpose(2, 0, 1))
    return np.stack(out)


class _TextPx:
    def __init__(self) -> None:
        self.on = self.n = 0

    def update(self, outputs, targets) -> None:
        p = np.asarray(outputs[0])
        self.on += int((p > THRESHOLD).sum())
        self.n += p.size

    def result(self) -> dict:
        return {"text_px": self.on / max(self.n, 1)}


class _PixelAgreement:
    def __init__(self) -> None:
        self.same = self.n = 0

    def update(self, ref, out) -> None:
        r, o = np.asarray(ref[0]) > THRESHOLD, np.asarray(out[0]) > THRESHOLD
        self.same += int((r == o).sum())
        self.n += r.size

    def result(self) -> dict:
        return {"pixel_agreement": self.same / max(self.n, 1)}


class TextMapTask:
    name, primary_metric, metric_names, agreement_name = "ppocr_det", "text_px", ("text_px",), "pixel_agreement"

    def metric(self):
        return _TextPx()

    def agreement(self):
        return _PixelAgreement()


def recipe(model: Path):
    from qatcheck.data.base import ArrayDataset
    from qatcheck.recipe import onnx_file
    from qatcheck.recipe import InputSpec, Recipe
    from qatcheck.tasks import TASK_FACTORIES, register_task

    if "ppocr_det" not in TASK_FACTORIES:
        register_task("ppocr_det", lambda recipe, eval_data: TextMapTask())
    x = images()
    data = ArrayDataset("skimage6", x, np.zeros(len(x), np.int64))
    return Recipe(name="ppocr_det", task="ppocr_det", model=onnx_file(model), eval_data=lambda: data,
                  calib_data=lambda: data, input=InputSpec(name="x", shape=(1, 3, SIZE, SIZE)),
                  output_names=("sigmoid_0.tmp_0",), modes=("fp32", "fp16"), backends=("onnxruntime",))


def parity(fp16_path, fp32_path, x: np.ndarray) -> dict:
    from qatcheck.backends.onnxruntime_backend import OrtRunner
    from qatcheck.parity import ParityAccumulator

    half = OrtRunner(fp16_path, "CPUExecutionProvider", input_name="x")
    full = OrtRunner(fp32_path, "CPUExecutionProvider", input_name="x")
    acc, agree = ParityAccumulator(), _PixelAgreement()
    for i in range(len(x)):
        r, o = full.infer(x[i:i + 1]), half.infer(x[i:i + 1])
        acc.update(r[0], o[0])
        agree.update(r, o)
    return {**acc.result(), **agree.result()}


def localization(fp16_path, fp32_path, x: np.ndarray, label: str) -> None:
    """fp16 localization on the ONNX path (every tensor of both graphs, ~330 here): about 10 minutes
    for 6 samples on a busy 2-core CPU."""
    from qatcheck.analysis.localize import localize_graphs, verdict

    t0 = time.perf_counter()
    loc = localize_graphs(fp16_path, fp32_path, [(x[i:i + 1], None, 1) for i in range(len(x))],
                          input_name="x", floor=0.99, recipe="ppocr_det", mode="fp16")
    print(f"  localization ({label}, {len(loc.rows)} tensors compared, {time.perf_counter() - t0:.1f} s):")
    print(f"    {verdict(loc)}")
    first = loc.row(loc.first_below_floor) if loc.first_below_floor else None
    if first is not None:
        print(f"    first tensor below the floor: {first.tensor} ({first.op} {first.node}), cosine {first.cosine:.4f}")
    print("    worst five by own SQNR: " + ", ".join(
        f"{loc.row(t).node} {loc.row(t).op} ({loc.row(t).own_sqnr_db:.1f} dB)" for t in loc.worst))


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # each result shows while the next one runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="ch_PP-OCRv4_det_infer.onnx")
    parser.add_argument("--cache", type=Path, default=None, help="artifact cache (default: a temp dir)")
    parser.add_argument("--localize-samples", type=int, default=6,
                        help="images the localizations run on (default all 6; 0: no localization)")
    args = parser.parse_args()

    from qatcheck.measurement import Case
    from qatcheck.session import Options, QatcheckSession

    tmp = Path(tempfile.mkdtemp(prefix="ppocr_fp16-"))
    r = recipe(args.model)
    session = QatcheckSession(Options(cache_dir=args.cache or tmp / "cache", reports_dir=tmp / "reports",
                                      baselines_dir=tmp / "baselines", progress=False))
    session.register(r)
    builder = session.builder(r.name)
    fp32 = builder.onnx_artifact("fp32").path
    x = images()

    # before: the plain conversion (what qatcheck's convert_fp16 was)
    from onnxruntime.transformers.float16 import convert_float_to_float16
    import onnx

    plain = tmp / "ppocr_det-fp16-plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(plain))
    before = parity(plain, fp32, x)
    print(f"before (plain convert_float_to_float16): cosine {before['cosine']:.5f}, max-abs "
          f"{before['max_abs']:.4f}, pixel agreement {before['pixel_agreement']:.2%}")
    if args.localize_samples:
        localization(plain, fp32, x[:args.localize_samples], "plain conversion")

    # after: the recipe's fp16 case, as a qatcheck run measures it
    m = session.measure(Case(r.name, "fp16", "onnxruntime"))
    art = builder.onnx_artifact("fp16")
    print(f"after (qatcheck's fp16 artifact {art.digest}): cosine {m.parity['cosine']:.5f}, max-abs "
          f"{m.parity['max_abs']:.4f}, pixel agreement {m.parity['pixel_agreement']:.2%} "
          f"(vs {m.parity_reference})")
    for note in m.notes:
        print(f"  note: {note}")
    if args.localize_samples:
        localization(art.path, fp32, x[:args.localize_samples], "qatcheck's fp16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
