"""The report of a finished tiny run: valid self-contained HTML, plots that show S (with error
bars), W and A bits with pins, accuracy with Wilson intervals, the Pareto target; the
run-level summary and the --json outputs carry the numbers of the Parquet files; the log file."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from tiny_run import REPO, copy_of_finished_run, finished_run

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.models import model_factory
from pipeline.report import GLOSSARY, plot_data
from pipeline.store import RunStore

PIN = "fc3"  # the tiny MLP's last layer, pinned to 8 bits below
VOID = {"meta", "img", "br", "hr", "link", "input"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The tiny run, re-run from the allocation with a pin (so the report has one)."""
    run = copy_of_finished_run(tmp_path_factory, tmp_path_factory.mktemp("report") / "run")
    cfg = finished_run(tmp_path_factory).parent / "tiny.yaml"
    assert main(["-q", "run", str(cfg), "--run-dir", str(run), "--set",
                 f"allocation.pin.{PIN}=8"]) == 0  # fmt: skip
    return run


def table(run: Path, stage: str, name: str) -> list[dict]:
    return pq.read_table(run / "stages" / stage / name).to_pylist()


class StrictHTML(HTMLParser):
    """Collects tags, checks that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.errors.append(f"external resource {value}")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data) -> None:
        self.text.append(data)


def test_report_html_is_valid_and_self_contained(run_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["-q", "report", str(run_dir)]) == 0
    page = (run_dir / "report/report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = StrictHTML()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.tags.count("table") == 3 and "script" not in parser.tags
    assert len(parser.images) == 4
    for src in parser.images:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert png in [(run_dir / "report" / f"{n}.png").read_bytes()
                       for n in ("sensitivity", "bits", "pareto", "accuracy")]  # fmt: skip
    text = " ".join(parser.text)
    for key in GLOSSARY:
        assert key in text
    final = table(run_dir, "evaluate", "metrics.parquet")[-1]
    assert f"{final['eval_acc']:#.4g}" in text


def test_sensitivity_plot_shows_the_S_the_allocation_used(run_dir: Path) -> None:
    d = plot_data(RunStore(run_dir))["sensitivity"]
    sens = table(run_dir, "hessian", "sensitivity.parquet")
    assert d.blocks == [r["block"] for r in sens]
    # ground truth from the raw Hessian rows: trace / n (the config's allocation.sensitivity)
    assert d.sensitivity == pytest.approx([r["trace"] / r["n_params"] for r in sens], rel=1e-12)
    assert d.sensitivity_err == pytest.approx(
        [r["trace_stderr"] / r["n_params"] for r in sens], rel=1e-12
    )
    assert d.eigenvalue == [r["eigenvalue"] for r in sens] and d.trace == [r["trace"] for r in sens]
    assert "trace / n" in d.sensitivity_label and "allocation" in d.sensitivity_label
    bits = {r["block"]: r for r in table(run_dir, "allocate", "bits.parquet")}
    # the allocation's own S column agrees (what it ranked the blocks by)
    assert [bits[b]["sensitivity"] for b in d.blocks] == pytest.approx(d.sensitivity)


def test_bits_plot_shows_weight_and_activation_bits_and_pins(run_dir: Path) -> None:
    d = plot_data(RunStore(run_dir))["bits"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    bits = {m: r["bits"] for r in table(run_dir, "allocate", "bits.parquet") for m in r["modules"]}
    assert d.layers == ["fc1", "fc2", "fc3"]
    assert d.weight_bits == [bits[m] for m in d.layers]
    assert d.act_bits == [cfg["allocation"].get("act_bits", 8)] * 3
    assert d.pinned == [m == PIN for m in d.layers] and d.weight_bits[-1] == 8
    assert set(d.weight_bits) - {8}  # the allocation chose something below 8 elsewhere


def wilson_by_root(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Independent: the two p with (k/n - p)^2 = z^2 p (1 - p) / n (roots of a quadratic)."""
    ph = k / n
    roots = np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph])
    return float(min(roots.real)), float(max(roots.real))


def test_accuracy_plot_has_wilson_intervals_and_a_sane_axis(run_dir: Path) -> None:
    d = plot_data(RunStore(run_dir))["accuracy"]
    metrics = table(run_dir, "evaluate", "metrics.parquet")
    n = metrics[0]["eval_samples"]
    assert n == 300 and d.eval_samples == n and d.metric == "accuracy (%)"
    assert d.labels[0] == "float" and d.labels[1] == "ptq" and d.labels[-1] == "final"
    assert d.labels[2].startswith("ft 1\nfc")
    for r, v, lo, hi in zip(metrics, d.values, d.low, d.high, strict=True):
        k = round(r["eval_acc"] * n)
        assert v == pytest.approx(100 * k / n)
        ref = wilson_by_root(k, n)
        assert (lo, hi) == pytest.approx((100 * ref[0], 100 * ref[1]), abs=1e-9)
        assert (r["eval_acc_low"], r["eval_acc_high"]) == pytest.approx(ref, abs=1e-11)
        assert d.ylim[0] <= lo < v < hi <= d.ylim[1]
    assert d.ylim[0] >= 0 and d.ylim[1] <= 100 and d.ylim[1] - d.ylim[0] < 60


def test_pareto_plot_labels_sizes_and_marks_the_target(run_dir: Path) -> None:
    d = plot_data(RunStore(run_dir))["pareto"]
    pareto = table(run_dir, "allocate", "pareto.parquet")
    summary = table(run_dir, "allocate", "summary.parquet")[0]
    assert d.size_mb == [r["size_mb"] for r in pareto]
    for label, r in zip(d.labels, pareto, strict=True):
        assert label == f"{r['size_mb']:.3g} MB, {r['weight_compression']:.3g}x"
    assert d.chosen[:2] == (summary["size_mb"], summary["total_omega"])
    # the target, independently: the model at exactly 5x weight compression (the config's)
    cfg = load_config(run_dir / "config.yaml")
    model = model_factory(cfg.model)()
    weights = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight"))
    bits = {m: r["bits"] for r in table(run_dir, "allocate", "bits.parquet") for m in r["modules"]}
    chosen_bits = sum(model.get_submodule(m).weight.numel() * b for m, b in bits.items())
    expected = summary["size_mb"] + (32 * weights / 5.0 - chosen_bits) / 8 / 2**20
    assert d.target_size_mb == pytest.approx(expected, rel=1e-9)
    assert summary["size_mb"] <= d.target_size_mb


def test_summary_parquet_and_json_outputs(run_dir: Path, capsys) -> None:
    summary = pq.read_table(run_dir / "summary.parquet").to_pylist()[0]
    metrics = {r["phase"]: r for r in table(run_dir, "evaluate", "metrics.parquet")}
    alloc = table(run_dir, "allocate", "summary.parquet")[0]
    assert summary["final_acc"] == metrics["final"]["eval_acc"]
    assert summary["float_acc"] == metrics["float"]["eval_acc"]
    assert summary["size_mb"] == alloc["size_mb"]
    assert summary["weight_compression"] == alloc["weight_compression"] >= 5.0
    assert summary["layers"] == ["fc1", "fc2", "fc3"] and summary["weight_bits"][-1] == 8
    assert summary["stages_done"] == summary["stages_total"] == 7
    capsys.readouterr()
    assert main(["-q", "status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["next"] is None and [s["state"] for s in status["stages"]] == ["done"] * 7
    assert status["summary"] == summary
    assert main(["-q", "report", str(run_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["summary"] == summary
    phases = table(run_dir, "evaluate", "metrics.parquet")
    assert [r["eval_acc"] for r in rep["phases"]] == [r["eval_acc"] for r in phases]
    assert rep["allocation"][0]["target_size_mb"] == alloc["target_size_mb"]
    sens = table(run_dir, "hessian", "sensitivity.parquet")
    assert [r["trace"] for r in rep["blocks"]] == [r["trace"] for r in sens]
    assert all(not math.isnan(v) for v in summary.values() if isinstance(v, float))


def test_the_run_log_is_appended_in_the_run_dir(run_dir: Path) -> None:
    text = (run_dir / "hawq.log").read_text()
    assert text.count("pipeline.scheduler: [1/7] baseline: ") == 1  # the first run
    assert "pipeline.scheduler: baseline: skip (done" in text  # the second, appended
    assert "allocate: rerun (settings changed: allocation.pin" in text


def test_readme_glossary_lists_every_column() -> None:
    readme = (REPO / "README.md").read_text()
    glossary = readme[readme.index("## Glossary") :]
    for key in GLOSSARY:
        assert f"`{key}`" in glossary, key
