"""The ResNet-50 projection arithmetic (benchmarks/imagenet_projection.py), hand-computed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import imagenet_projection as proj  # noqa: E402

MB = 2**20


def _costs() -> proj.Costs:
    # batch of 4 samples; one gradient takes 2 s, i.e. 2 images/s on this device
    return proj.Costs(
        batch=4, grad=2.0, hvp={"a": 1.0, "b": 0.5}, rebuild={"a": 3.0}, build=2.0, joint=4.0,
        rebuild_joint=6.0, lanczos={"a": 10, "b": 6}, block_params={"a": 100, "b": 50},
        per_sample_bytes=10 * MB, fixed_bytes=5 * MB, float_step=3.0, qat_step=4.0,
        eval_float=1.0, eval_qat=1.5,
    )  # fmt: skip


def test_all_cached_on_one_device_is_hvps_times_samples():
    c = _costs()
    t = proj.Target(name="x", devices=1, grad_images_per_s=2.0, graph_memory_bytes=10**12)
    w = proj.Workload(samples=8, trace_probes=3)
    a = proj.analysis_seconds(c, t, w)
    # per sample an HVP of block a costs 1/2 gradient = 1/4 s: 10 HVPs x 8 samples x 1/4 s
    assert a["cached_fraction"] == 1.0
    assert a["eigen"] == pytest.approx(10 * 8 * 0.25 + 6 * 8 * 0.125)
    assert a["trace"] == pytest.approx(3 * 8 * 1.0)  # a joint HVP: 2 gradients = 1 s/sample
    assert a["build"] == pytest.approx(8 * 0.5) and a["comm"] == 0.0
    assert a["total"] == pytest.approx(20 + 6 + 24 + 4)


def test_memory_limits_the_cached_batches_and_the_rest_is_rebuilt():
    c = _costs()
    # room for (45 - 5) / 10 = 4 samples = 1 batch of the 8 samples
    t = proj.Target(name="x", devices=1, grad_images_per_s=2.0, graph_memory_bytes=45 * MB)
    a = proj.analysis_seconds(c, t, proj.Workload(samples=8, trace_probes=1))
    assert a["cached_fraction"] == 0.5
    # block b's rebuild: its HVP + the mean extra of the measured rebuilds (3 - 1 = 2 s)
    assert a["eigen"] == pytest.approx(10 * (4 * 0.25 + 4 * 0.75) + 6 * (4 * 0.125 + 4 * 0.625))
    assert a["trace"] == pytest.approx(4 * 1.0 + 4 * 1.5)


def test_devices_split_the_samples_pay_an_allreduce_per_hvp_and_train_at_the_efficiency():
    c = _costs()
    one = proj.Target(name="1", devices=1, grad_images_per_s=2.0, graph_memory_bytes=10**12)
    two = proj.Target(name="2", devices=2, grad_images_per_s=2.0, graph_memory_bytes=10**12,
                 allreduce_bytes_per_s=1e3, allreduce_latency_s=0.5)  # fmt: skip
    w = proj.Workload(samples=8, trace_probes=3)
    a1, a2 = proj.analysis_seconds(c, one, w), proj.analysis_seconds(c, two, w)
    assert a2["eigen"] == pytest.approx(a1["eigen"] / 2)
    # 16 + 3 all-reduces; ring moves 2 (D-1)/D = 1x the bytes: (10*100 + 6*50 + 3*150) * 4
    assert a2["comm"] == pytest.approx(19 * 0.5 + (1000 + 300 + 450) * 4 / 1e3)
    half = proj.Target(name="2", devices=2, grad_images_per_s=2.0, graph_memory_bytes=10**12,
                  efficiency=0.5, allreduce_latency_s=0.0)  # fmt: skip
    # the training efficiency leaves the analysis (its own all-reduce model) alone ...
    assert proj.analysis_seconds(c, half, w)["eigen"] == pytest.approx(a2["eigen"])
    # ... and halves the training and evaluation rates: 2 devices at e = 0.5 take 1 device's time
    w = proj.Workload(train_images=100, eval_images=10, qat_stages=2)
    p1, p_half = proj.pipeline_seconds(c, one, w, 0.0), proj.pipeline_seconds(c, half, w, 0.0)
    assert p_half["total"] == pytest.approx(p1["total"]) and p1["total"] > 0
    assert p_half["baseline (1 float epoch)"] == pytest.approx(100 * 1.5 / 2)


def test_pipeline_epochs_and_the_input_pipeline_cap():
    c = _costs()
    t = proj.Target(name="x", devices=1, grad_images_per_s=2.0, graph_memory_bytes=10**12)
    w = proj.Workload(train_images=100, eval_images=10, qat_stages=2, eval_float_passes=1,
                 eval_qat_passes=2)  # fmt: skip
    p = proj.pipeline_seconds(c, t, w, analysis=7.0)
    # a float step is 1.5 gradients: 100 images x 1.5 / 2 images/s; QAT 2 gradients
    assert p["baseline (1 float epoch)"] == pytest.approx(75.0)
    assert p["finetune (2 QAT epochs)"] == pytest.approx(2 * 100.0)
    assert p["evaluation (3 passes)"] == pytest.approx((0.5 + 2 * 0.75) * 10 / 2)
    assert p["total"] == pytest.approx(75 + 200 + 10 + 7)
    slow = proj.Target(name="x", devices=1, grad_images_per_s=2.0, graph_memory_bytes=10**12,
                  loader_images_per_s=0.5)  # fmt: skip
    capped = proj.pipeline_seconds(c, slow, w, 0.0)
    assert capped["baseline (1 float epoch)"] == pytest.approx(200.0)  # 100 images at 0.5/s
    assert capped["finetune (2 QAT epochs)"] == pytest.approx(2 * 200.0)
    # evaluation forwards (4 and 2.67 images/s) are loader-bound too: 3 passes of 10 at 0.5/s
    assert capped["evaluation (3 passes)"] == pytest.approx(3 * 10 / 0.5)


def test_hms():
    assert (proj.hms(45), proj.hms(90), proj.hms(3 * 3600 + 61)) == (
        "45 s",
        "1.5 min",
        "3 h 01 min",
    )


def test_section_f_figures_survive_json_and_feed_the_projection():
    import json

    from imagenet_input_ddp import from_json, loading_rows, workers_needed

    saved = json.loads(json.dumps({"images_per_s": {0: 30.0, 1: 20.0, 2: 36.0}}))
    loading = from_json(saved)
    assert loading["images_per_s"] == {0: 30.0, 1: 20.0, 2: 36.0}  # integer keys again
    scaling = from_json(json.loads(json.dumps({"efficiency": {2: 0.8}})))
    assert proj.efficiency_at(scaling, 8) == 0.8 and proj.efficiency_at(scaling, 1) is None
    assert workers_needed(loading, 150.0) == 8  # 150 / 20 per worker, rounded up
    # training at 4 / 3 = 1.33 images/s (float) is slower than every loader: the model is
    rows = loading_rows(loading, _costs(), gpu_rate=33.0)
    assert [r[4] for r in rows] == ["model", "model", "model"]
    assert [r[5] for r in rows] == ["loader", "loader", "model"]  # 30, 20 < 33 <= 36 images/s
    assert from_json(None) is None


def test_probe_chunks_rebuild_each_uncached_graph_once_per_chunk():
    c = _costs()
    # 4 of the 8 samples cached (as above); joint HVP 2 gradients, its rebuild 1 gradient more
    t = proj.Target(name="x", devices=1, grad_images_per_s=2.0, graph_memory_bytes=45 * MB)
    seconds = {
        k: proj.analysis_seconds(c, t, proj.Workload(samples=8, trace_probes=4, probe_chunk=k))
        for k in (1, 2, 4, 3)
    }
    # every probe: 8 samples x 2 gradients; per chunk: 4 rebuilt samples x 1 gradient; / 2 img/s
    assert seconds[1]["trace"] == pytest.approx((4 * 8 * 2 + 4 * 4 * 1) / 2)  # the K=1 model
    assert seconds[1]["trace"] == pytest.approx(4 * (4 * 1.0 + 4 * 1.5))
    assert seconds[2]["trace"] == pytest.approx((4 * 8 * 2 + 2 * 4 * 1) / 2)
    assert seconds[4]["trace"] == pytest.approx((4 * 8 * 2 + 1 * 4 * 1) / 2)
    # 4 probes in chunks of 3: 2 chunks, 6 probes computed
    assert seconds[3]["trace"] == pytest.approx((6 * 8 * 2 + 2 * 4 * 1) / 2)
    two = proj.Target(name="2", devices=2, grad_images_per_s=2.0, graph_memory_bytes=10**12,
                      allreduce_bytes_per_s=1e3, allreduce_latency_s=0.5)  # fmt: skip
    a = proj.analysis_seconds(c, two, proj.Workload(samples=8, trace_probes=4, probe_chunk=2))
    # 16 Lanczos all-reduces + 1 per chunk; the bytes of all 4 probes
    assert a["comm"] == pytest.approx(18 * 0.5 + (1000 + 300 + 4 * 150) * 4 / 1e3)


def test_trace_variants_divide_the_probes_by_the_measured_deflation_ratio():
    work = proj.Workload(trace_probes=200)
    variants = proj.trace_variants(work, median_probes=7770, chunk=8)
    counts = [(w.trace_probes, w.probe_chunk) for w in variants.values()]
    assert counts == [(200, 1), (200, 8), (38, 8), (7770, 1), (1467, 8)]  # 200/5.4, 7770/5.3
