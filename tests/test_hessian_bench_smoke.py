"""Smoke run of benchmarks/hessian_bench.py at toy sizes: every section it can run without
timing targets ((h) probe chunks, (e) traces, (b) eigenvalues against the tight-tolerance
reference and PyHessian, (d) HVP counts, (a) HVP/gradient time) writes its table. Timings are
not asserted (the machine is shared); the eigenvalues are, against the reference."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from shared_data import CIFAR10, needs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = needs("cifar10_subset.npz", "resnet20-12fca82f.th")


def test_hessian_bench_runs_every_section_at_toy_size(tmp_path: Path) -> None:
    pytest.importorskip("pyhessian")
    from hessian_bench import main

    out = tmp_path / "bench.md"
    main(
        ["--data", str(CIFAR10), "--batch-size", "8", "--batches", "1", "--blocks", "2",
         "--threads", "1", "--reps", "1", "--skip-multi", "--trace-batches", "1",
         "--trace-probes", "4", "--chunk", "2", "--chunk-probes", "2", "--chunk-batches", "1",
         "--out", str(out)]
    )  # fmt: skip
    text = out.read_text()
    for section in ("## (h)", "## (e)", "## (b)", "## (d)", "## (a)"):
        assert section in text, section
    # (b): one row per block; hawq's power and Lanczos eigenvalues within 1e-2 of the reference
    b = text.split("## (b)")[1].split("## (d)")[0]
    rows = [r for r in b.splitlines() if r.startswith("| conv1") or r.startswith("| linear")]
    assert len(rows) == 2
    for row in rows:
        errs = [float(e) for e in re.findall(r"\(([0-9.]+e[-+][0-9]+)\)", row)]
        assert len(errs) == 3  # PyHessian, power, Lanczos
        assert max(errs[1:]) < 1e-2, row
