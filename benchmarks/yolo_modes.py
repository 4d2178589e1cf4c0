"""The YOLO recipe end to end on the CPU: every int8 mode on PyTorch and ONNX Runtime, plus the Q/DQ lint.

Run from the repo root (needs the ``yolo`` extra):

    python benchmarks/yolo_modes.py [--modes fp32,torch_ptq,qat,trt_ptq] [--cache DIR] [--threads N] \
        [--torch-calibrators max,mse] [--onnx-calibrators minmax,entropy]

Uses the library directly, not the pytest harness: a ``RecipeWorkspace``'s builder builds (or
reuses from the artifact cache) each mode's artifacts for ``qatcheck.zoo.recipes:yolo_recipe``, the
torch and onnxruntime backends run them, and ``DetectionTask`` (COCOeval, ``yolov8`` decoder) scores
them on the val split. ``box_match`` compares each case's boxes with a reference on the same
batches: an ONNX Runtime case with the same mode in PyTorch (export parity; ``trt_ptq`` exists only
as ONNX and is compared with PyTorch fp32), a PyTorch int8 case with PyTorch fp32 (quantization
parity). The Q/DQ modes are also built without the placement rules (``QuantSettings.qdq_rules =
None``) to show what the rules change; ``lint`` is ``qatcheck.quantize.qdq_lint.lint_qdq`` on each Q/DQ
ONNX (findings, then Q/DQ pairs). ``--torch-calibrators`` / ``--onnx-calibrators`` add torch_ptq /
trt_ptq rows (ONNX Runtime only) for other calibrators than the recipe's.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.backends.torch_backend import TorchRunner
from qatcheck.quantize.qdq_lint import lint_qdq
from qatcheck.cache import ArtifactCache
from qatcheck.tasks.detection import DetectionTask
from qatcheck.workspace import RecipeWorkspace
from qatcheck.zoo.recipes import yolo_recipe

T0 = time.perf_counter()
TORCH_MODES = ("fp32", "torch_ptq", "qat")


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def run(runner, data, batch_size: int) -> list[list[np.ndarray]]:
    """Raw outputs per eval batch; the last batch is padded to the static batch size and cut back."""
    outs = []
    for x, _ in data.batches(batch_size):
        n = len(x)
        if n < batch_size:
            x = np.concatenate([x, np.repeat(x[:1], batch_size - n, 0)])
        outs.append([o[:n] for o in runner.infer(x)])
    return outs


def score(task: DetectionTask, data, batch_size: int, outs, ref=None) -> dict[str, float]:
    metric = task.metric()
    agree = task.agreement() if ref is not None else None
    for i, (_, targets) in enumerate(data.batches(batch_size)):
        metric.update(outs[i], targets)
        if agree is not None:
            agree.update(ref[i], outs[i])
    result = metric.result()
    if agree is not None:
        result.update(agree.result())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="fp32,torch_ptq,qat,trt_ptq")
    parser.add_argument("--cache", default=".qatcheck_cache")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baseline-rules", action="store_true",
                        help="skip the torch_ptq build without placement rules")
    parser.add_argument("--torch-calibrators", default="", help="extra torch_ptq calibrators to compare")
    parser.add_argument("--onnx-calibrators", default="", help="extra trt_ptq calibrators to compare")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    recipe = yolo_recipe()
    plain = dataclasses.replace(recipe, name="digityolo_norules",
                                quant=dataclasses.replace(recipe.quant, qdq_rules=None))
    cache = ArtifactCache(Path(args.cache))
    variants = [("rules", recipe)] + ([] if args.no_baseline_rules else [("no rules", plain)])
    for cal in filter(None, args.torch_calibrators.split(",")):
        variants.append((f"torch_calibrator={cal}", dataclasses.replace(
            recipe, name=f"digityolo_{cal}", quant=dataclasses.replace(recipe.quant, torch_calibrator=cal))))
    for cal in filter(None, args.onnx_calibrators.split(",")):
        variants.append((f"calibrator={cal}", dataclasses.replace(
            recipe, name=f"digityolo_{cal}", quant=dataclasses.replace(recipe.quant, calibrator=cal))))
    base = RecipeWorkspace(recipe, cache)
    data, bs = base.eval_data, recipe.input.batch_size
    task = DetectionTask.for_dataset(data, recipe.decoder)
    log(f"recipe {recipe.name}: {len(data)} val images, batch {bs}, quant {recipe.quant}")
    rows, torch_outs = [], {}
    for label, r in variants:
        builder = base.derive(r).builder
        for mode in modes:
            if label == "no rules" and mode != "torch_ptq":
                continue
            if label.startswith("torch_calibrator") and mode != "torch_ptq":
                continue
            if label.startswith("calibrator") and mode != "trt_ptq":
                continue
            tag = mode if label == "rules" else f"{mode} ({label})"
            if mode in TORCH_MODES and not label.startswith("torch_calibrator"):
                t = time.perf_counter()
                art = builder.torch_artifact(mode)
                log(f"{tag}: torch artifact ready in {time.perf_counter() - t:.1f}s")
                outs = run(TorchRunner(art.module, art.precision, "cpu"), data, bs)
                torch_outs[tag] = outs
                ref = torch_outs.get("fp32") if mode != "fp32" else None
                m = score(task, data, bs, outs, ref)
                rows.append((tag, "torch", m, "vs torch fp32" if ref is not None else "", None))
                log(f"{tag} torch: {m}")
            t = time.perf_counter()
            art = builder.onnx_artifact(mode)
            log(f"{tag}: onnx artifact ready in {time.perf_counter() - t:.1f}s ({art.path.name})")
            outs = run(OrtRunner(art.path, "CPUExecutionProvider"), data, bs)
            ref_name = tag if tag in torch_outs else "fp32"
            m = score(task, data, bs, outs, torch_outs.get(ref_name))
            lint = lint_qdq(art.path) if art.precision == "int8" else None
            rows.append((tag, "onnxruntime", m, f"vs torch {ref_name}", lint))
            log(f"{tag} onnxruntime: {m}" + (f"\n{lint}" if lint is not None else ""))
    print()
    print(f"YOLO recipe {recipe.name} on the CPU ({torch.get_num_threads()} threads), val split "
          f"({len(data)} images), torch_calibrator={recipe.quant.torch_calibrator}, "
          f"calibrator={recipe.quant.calibrator}, qat={recipe.qat}")
    print("| mode | backend | mAP@.5:.95 | mAP@.5 | box_match | lint findings | Q/DQ pairs (act + weight) |")
    print("|---|---|---|---|---|---|---|")
    for tag, backend, m, ref, lint in rows:
        bm = f"{m['box_match'] * 100:.1f}% ({ref})" if "box_match" in m else "-"
        findings = "-" if lint is None else (str(len(lint.findings)) if lint.ok else
                                             f"{len(lint.findings)} ({', '.join(f'{len(lint.by_kind(k))} {k}' for k in ('add_unquantized_input', 'concat_unquantized_input', 'concat_scale_mismatch') if lint.by_kind(k))})")
        pairs = "-" if lint is None else f"{lint.qdq_pairs} ({lint.activation_pairs} + {lint.weight_pairs})"
        print(f"| {tag} | {backend} | {m['map50_95'] * 100:.2f} | {m['map50'] * 100:.2f} | {bm} | {findings} | {pairs} |")
    log(f"artifact cache {cache.root}: {len(cache.built)} built, {len(cache.reused)} reused")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
