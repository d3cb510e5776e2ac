"""The QAT uniform arm in docs/results.md (benchmarks/results_studies.py, results_doc.py): paired
with HAWQ only at the same size (weight bits within 2%), and its acceptance line."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from paired_stats import paired_bootstrap  # noqa: E402
from results_doc import _uniform_qat_in, acceptance  # noqa: E402
from results_studies import fmt_paired, qat_md  # noqa: E402

N_IMAGES = 300
SEEDS = (0, 1, 2)
BLOCKS = ("conv1", "layer1.0", "layer2.0", "linear")


def _results(uniform_wc: float, uniform_p: float, seed: int = 0) -> dict:
    """QAT results of HAWQ (8.04x) and uniform-4 (``uniform_wc``) with random per-image
    correctness: HAWQ right with probability 0.9, uniform-4 with ``uniform_p``."""
    rng = np.random.default_rng(seed)
    runs = []
    for name, kind, p, wc, bits in (
        ("hawq-ilp-eigenvalue", "hawq", 0.9, 8.04, (8, 2, 8, 8)),
        ("uniform-4", "uniform", uniform_p, uniform_wc, (8, 4, 4, 8)),
    ):
        for s in SEEDS:
            c = (rng.random(N_IMAGES) < p).astype(int)
            runs.append(
                {
                    "name": name,
                    "kind": kind,
                    "seed": s,
                    "bits": dict(zip(BLOCKS, bits, strict=True)),
                    "weight_compression": wc,
                    "omega": 1.0,
                    "acc": float(c.mean()),
                    "correct": "".join(map(str, c)),
                }
            )
    return {
        "experiment": {"name": "r20", "config": "configs/r20.yaml"},
        "overrides": ["x=1"],
        "float_acc": 0.91,
        "alloc": {"act_bits": 4, "input_act_bits": 8, "last_act_bits": 8},
        "qat": {"solver": "ilp", "sensitivity": "eigenvalue", "runs": runs},
    }


def _matrix(res: dict, name: str) -> np.ndarray:
    by = {r["seed"]: r["correct"] for r in res["qat"]["runs"] if r["name"] == name}
    return np.array([[int(ch) for ch in by[s]] for s in SEEDS], dtype=float)


def _uniform_line(res: dict) -> str:
    accs = [r["acc"] for r in res["qat"]["runs"] if r["name"] == "uniform-4"]
    m, sd = statistics.mean(accs), statistics.stdev(accs)
    gap = 100 * (res["float_acc"] - m)
    verdict = "meets" if gap <= 1.5 else "MISSES"
    wc = res["qat"]["runs"][-1]["weight_compression"]
    return (
        f"  - QAT uniform W4/A4 (first/last W8/A8, 8-bit input) at {wc:.2f}x: {100 * m:.2f} +- "
        f"{100 * sd:.2f}% (mean +- sd) over 3 seeds, {gap:.2f} points under float (the "
        f"1.5-point target: {verdict})."
    )


def test_uniform_of_the_same_size_is_paired_with_hawq() -> None:
    res = _results(uniform_wc=7.97, uniform_p=0.9)  # weight bits +0.9%: the same size
    text, pairs = qat_md(res)
    diff = _matrix(res, "hawq-ilp-eigenvalue") - _matrix(res, "uniform-4")
    label, r = next((b, r) for b, r in pairs if b.startswith("uniform-4"))
    assert label == "uniform-4 (the same size: weight bits +0.9%)"
    assert r.mean == pytest.approx(diff.mean(), abs=1e-12)  # seeds x images, paired
    assert r == paired_bootstrap(diff)
    assert f"| {label} | {fmt_paired(r)} |" in "\n".join(text)
    lines = acceptance(res, None, pairs)
    assert f"  - QAT at 8.04x HAWQ vs {label}: {fmt_paired(r)}" in "\n".join(lines)
    assert lines[-1] == _uniform_line(res)


def test_uniform_of_another_size_is_compared_with_float_only() -> None:
    res = _results(uniform_wc=7.97, uniform_p=0.85)
    for run in res["qat"]["runs"]:
        if run["kind"] == "hawq":
            run["weight_compression"] = 13.14  # HAWQ at 13x: uniform-4 is 65% larger
    text, pairs = qat_md(res)
    assert not any("uniform" in label for label, _ in pairs)
    body = "\n".join(text)
    assert "uniform-4 at 7.97x (weight bits +65% vs HAWQ's 13.14x)" in body
    assert "Not the same size as HAWQ" in body
    lines = acceptance(res, None, pairs)
    assert not any("vs uniform" in line for line in lines)
    assert lines[-1] == _uniform_line(res) and lines[-1].endswith("target: MISSES).")


def test_uniform_acceptance_meets_the_target_within_one_and_a_half_points() -> None:
    res = _results(uniform_wc=7.97, uniform_p=0.9)
    for run in res["qat"]["runs"]:  # float 0.91 and uniform-4 at 0.90 exactly: 1.00 points
        if run["kind"] == "uniform":
            run["acc"] = 0.90 + 0.01 * (run["seed"] - 1)
    assert acceptance(res, None, [])[-1] == _uniform_line(res)
    assert _uniform_line(res).endswith("1.00 points under float (the 1.5-point target: meets).")


def test_the_ptq_line_points_to_the_experiment_that_trained_uniform_4() -> None:
    with_arm = _results(uniform_wc=7.97, uniform_p=0.9)
    ptq_only = {k: v for k, v in with_arm.items() if k != "qat"} | {
        "experiment": {"name": "r20_ptq", "config": "configs/r20.yaml"}
    }
    other_model = ptq_only | {"overrides": ["x=2"]}
    assert _uniform_qat_in(ptq_only, [ptq_only, with_arm]) == "r20"
    assert _uniform_qat_in(with_arm, [ptq_only, with_arm]) == "r20"
    assert _uniform_qat_in(other_model, [other_model, with_arm]) is None


def test_hawq_alone_has_no_empty_comparison_table() -> None:
    res = _results(uniform_wc=7.97, uniform_p=0.9)
    res["qat"]["runs"] = [r for r in res["qat"]["runs"] if r["kind"] == "hawq"]
    text, pairs = qat_md(res)
    body = "\n".join(text)
    assert pairs == [] and "HAWQ minus the comparison" not in body
    assert "| hawq-ilp-eigenvalue | 8.04x |" in body  # the per-seed table is still there
    full = _results(uniform_wc=7.97, uniform_p=0.9)
    assert "HAWQ minus the comparison" in "\n".join(qat_md(full)[0])
