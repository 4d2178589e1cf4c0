"""The recipe author's reference (``docs/reference.md``), generated from the code's own docstrings
and field comments, so it cannot drift from them (``tests/test_reference_doc.py`` fails when the
file is stale). ``python -m qatcheck reference --write docs/reference.md`` regenerates it.

What a recipe author had to read the source for (issue 12), and where each now is: every field of
``Recipe`` and its settings with its default; the built-in datasets and loaders (sizes,
normalisation); the QAT loss signature; which output a task scores and how parity combines several
outputs; the custom-task protocol; the detection API; the sensitivity ranking.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap
from pathlib import Path

#: (section title, why a recipe author reads it, the objects it documents as "module:name")
SECTIONS = [
    ("The recipe and its settings", "what a recipe says, field by field, with every default",
     ["qatcheck.recipe:Recipe", "qatcheck.recipe:InputSpec", "qatcheck.recipe:QuantSettings",
      "qatcheck.recipe:QATSettings", "qatcheck.recipe:Tolerances", "qatcheck.recipe:ParityThresholds",
      "qatcheck.recipe:onnx_file"]),
    ("Datasets and loaders", "what eval, calibration and training data are, and the built-in sets",
     ["qatcheck.data.base:Dataset", "qatcheck.data.base:ArrayDataset", "qatcheck.data.digits:digits_split",
      "qatcheck.data.digit_detection:digit_detection_split", "qatcheck.data.imagefolder:imagefolder_dataset",
      "qatcheck.data.coco:CocoDataset", "qatcheck.data.coco:coco_val2017", "qatcheck.tasks.heads:HeadTargets"]),
    ("Tasks, outputs and parity", "which output is scored, how several outputs are judged, custom tasks",
     ["qatcheck.tasks.base:Task", "qatcheck.tasks.base:MetricAccumulator",
      "qatcheck.tasks.base:AgreementAccumulator", "qatcheck.tasks.base:MetricSpec", "qatcheck.tasks:register_task",
      "qatcheck.tasks.heads:HeadsTask", "qatcheck.tasks.classification:ClassificationTask",
      "qatcheck.evaluate:combined_parity"]),
    ("Detection", "decoders, detections and COCO evaluation",
     ["qatcheck.tasks.detection:DetectionTask", "qatcheck.tasks.detection:Decoder",
      "qatcheck.tasks.detection:make_decoder", "qatcheck.tasks.detection:Detections",
      "qatcheck.tasks.detection:coco_evaluate"]),
    ("Sensitivity and partial quantization", "how layers are ranked and chosen for keep_precision",
     ["qatcheck.analysis.sensitivity:profile", "qatcheck.analysis.sensitivity:choose_layers",
      "qatcheck.analysis.keeplist:load_keep_list"]),
]


def _field_comments(cls) -> dict[str, str]:
    """``#:`` comments written above a dataclass field in its source (Sphinx's convention)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    src = textwrap.dedent("".join(lines))
    out: dict[str, str] = {}
    src_lines = src.splitlines()
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment, i = [], node.lineno - 2
            while i >= 0 and src_lines[i].strip().startswith("#:"):
                comment.insert(0, src_lines[i].strip()[2:].strip())
                i -= 1
            if comment:
                out[node.target.id] = " ".join(comment)
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):  # a settings object documented on its own below
        return f"`{type(value).__name__}()` (its defaults: below)"
    text = repr(value)
    if callable(value) and not isinstance(value, type):
        text = getattr(value, "__name__", text)
    return f"`{text}`" if len(text) < 120 else f"`{text[:117]}...`"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _entry(path: str, root: Path) -> str:
    module_name, name = path.split(":")
    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    source = Path(inspect.getsourcefile(obj)).resolve().relative_to(root)
    kind = "class" if inspect.isclass(obj) else "function"
    head = f"### `{name}`\n\n{kind} in [`{source}`](../{source})"
    if getattr(obj, "_is_protocol", False):  # a protocol is its source: every member and comment
        body = textwrap.dedent(inspect.getsource(obj))
        out = [head, "", _doc(obj), "", "```python", body.rstrip(), "```"]
    elif kind == "function" or not dataclasses.is_dataclass(obj):
        sig = _signature(obj) if kind == "function" else ""
        out = [head + (f": `{name}{sig}`" if sig else ""), "", _doc(obj)]
    else:
        out = [head, "", _doc(obj), "", "| field | default | meaning |", "|---|---|---|"]
        comments = _field_comments(obj)
        for f in dataclasses.fields(obj):
            meaning = comments.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{f.name}` | {_default(f).replace('|', chr(92) + '|')} | {meaning} |")
    return "\n".join(out) + "\n"


def render() -> str:
    root = Path(__file__).resolve().parents[1]
    parts = ["# qatcheck reference for recipe authors", "",
             "Generated from the code (`python -m qatcheck reference --write docs/reference.md`); "
             "`tests/test_reference_doc.py` fails when it is stale. The pages in docs/ explain the ideas; "
             "this is every field, default and protocol.", ""]
    parts += [f"- [{title}](#{title.lower().replace(' ', '-').replace(',', '')}): {why}"
              for title, why, _ in SECTIONS]
    for title, why, objects in SECTIONS:
        parts += ["", f"## {title}", "", f"*{why}*", ""]
        parts += [_entry(p, root) for p in objects]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qatcheck reference", description=__doc__)
    p.add_argument("--write", type=Path, help="write the reference here (default: print it)")
    a = p.parse_args(argv)
    text = render()
    if a.write:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(text)
        print(f"wrote {a.write}")
    else:
        print(text, end="")
    return 0
