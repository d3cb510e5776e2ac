"""The top-level ``hawq`` API and ``examples/``: what the README promises is there and works.

- every name in ``hawq.__all__`` is importable from ``hawq`` and documented (its own docstring
  for classes and functions, fully type-annotated functions; constants described in the docs);
- every ``hawq.<name>`` the README and the examples use is in ``hawq.__all__``;
- ``examples/library_digits.py`` runs the README's library pipeline on digits and prints
  results that make sense (accuracy, per-block curvature, bits meeting the size target,
  fine-tuning accuracy).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys

import pytest
from tiny_run import REPO, subprocess_env

import hawq

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_every_public_name_is_importable_and_documented() -> None:
    assert len(hawq.__all__) == len(set(hawq.__all__)) >= 30
    namespace: dict = {}
    exec(f"from hawq import {', '.join(hawq.__all__)}", namespace)  # noqa: S102
    docs = "\n".join(p.read_text() for p in DOCS)
    for name in hawq.__all__:
        obj = namespace[name]
        assert obj is getattr(hawq, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            assert doc and doc.strip() and len(doc.strip().splitlines()[0]) > 10, name
            assert obj.__module__.startswith("hawq."), name  # hawq's own, not re-exported torch
        else:  # a constant: the docs describe it
            assert re.search(rf"\b{name}\b", docs), f"{name} is not described in README/docs"
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            empty = inspect.Signature.empty
            untyped = [p for p, v in sig.parameters.items() if v.annotation is empty]
            assert not untyped, f"{name}: parameters without type hints: {untyped}"
            assert sig.return_annotation is not empty, f"{name}: no return type"


def test_names_used_by_readme_and_examples_are_public() -> None:
    texts = [REPO / "README.md", *sorted((REPO / "examples").glob("*.py"))]
    used = {m for p in texts for m in re.findall(r"\bhawq\.([A-Za-z_]\w*)\b", p.read_text())}
    used -= {"__version__", "log"}  # the version string; RUN_DIR/hawq.log (a file)
    used = {m for m in used if importlib.util.find_spec(f"hawq.{m}") is None}  # sub-packages
    assert {"analyze", "allocate_model", "run_qat", "quantize_"} <= used
    assert used <= set(hawq.__all__), sorted(used - set(hawq.__all__))


@pytest.mark.slow
def test_library_digits_example_prints_sane_results() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "library_digits.py")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    float_acc = float(re.search(r"^float accuracy: ([\d.]+)$", out, re.M).group(1))
    assert float_acc >= 0.9  # a small CNN on digits
    blocks = re.findall(
        r"^\s*(\d+) n=\s*(\d+) lambda=\s*([-\d.e+]+) trace=\s*([-\d.e+]+) \+- ([\d.e+]+)$",
        out, re.M,
    )  # fmt: skip
    # Conv(1->16, 3x3) 160, Conv(16->32, 3x3) 4640, Linear(512->64) 32832, Linear(64->10) 650
    assert [(b[0], int(b[1])) for b in blocks] == [("0", 160), ("3", 4640), ("7", 32832),
                                                    ("9", 650)]  # fmt: skip
    for _, _, lam, trace, se in blocks:
        assert float(lam) > 0 and float(trace) > 0  # near a minimum: positive curvature
        assert 0 < float(se) < float(trace)
    bits_text, compression = re.search(
        r"^bits: (\{.*\})  weight compression ([\d.]+)x$", out, re.M
    ).groups()
    bits = eval(bits_text, {})  # noqa: S307 - a dict literal printed by the example
    assert set(bits) == {"0", "3", "7", "9"} and set(bits.values()) <= {2, 4, 8}
    assert bits["0"] == bits["9"] == 8  # pinned
    assert float(compression) >= 8.0  # the size target
    evals = re.findall(r"^stage (\d+) epoch (\d+): eval accuracy ([\d.]+)$", out, re.M)
    assert [(s, e) for s, e, _ in evals] == [("0", "0"), ("1", "0")]  # 4 blocks, 2 per stage
    assert float(evals[-1][2]) >= min(0.85, float_acc - 0.05)  # quantized, fine-tuned
