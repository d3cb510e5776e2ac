"""``load_quantized`` of a finished run, ``hawq export --format onnx``, packing and bad input.

Ground truth: the evaluate stage's ``metrics.parquet`` (accuracy and loss of the final model),
the run manifest's stage keys, ``hawq.size.model_size_bytes`` and ``ceil(n b / 8)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import onnx
import pyarrow.parquet as pq
import pytest
import torch
from tiny_run import copy_of_finished_run, finished_run

from hawq.deploy import load_quantized, pack_codes, read_exported, unpack_codes
from hawq.qat import evaluate
from hawq.size import MB
from pipeline.cli import main
from pipeline.data import load_data
from pipeline.export_formats import load_quantized_run
from pipeline.models import model_factory
from pipeline.scheduler import load_run_config
from pipeline.store import RunStore


def test_load_quantized_reproduces_the_evaluated_accuracy_exactly(tmp_path_factory) -> None:
    run = finished_run(tmp_path_factory)
    cfg = load_run_config(run)
    data = load_data(cfg.data)
    model = load_quantized_run(run)
    loss, acc = evaluate(model, (data.eval_x, data.eval_y), batch_size=cfg.data.batch_size)
    final = pq.read_table(run / "stages/evaluate/metrics.parquet").to_pylist()[-1]
    assert final["phase"] == "final"
    assert (acc, loss) == (final["eval_acc"], final["eval_loss"])


def test_export_onnx_cli(tmp_path: Path, tmp_path_factory, capsys) -> None:
    run = copy_of_finished_run(tmp_path_factory, tmp_path / "run")
    dest = tmp_path / "deploy"
    capsys.readouterr()
    assert main(["-q", "export", str(run), "--format", "onnx", "--out", str(dest), "--check"]) == 0
    out = capsys.readouterr().out
    assert "Deployable sizes" in out and "argmax agreement" in out
    assert sorted(p.name for p in dest.iterdir()) == ["model.onnx", "sizes.json"]
    sizes = json.loads((dest / "sizes.json").read_text())
    assert sizes["agreement"] >= 0.999
    # the packed bytes, counted from the exported tensors, equal the size computed from the
    # bit config (same accounting); the codes alone take ceil(n b / 8) bytes per layer
    assert sizes["packed_bytes"]["total"] == round(sizes["computed_size_mb"] * MB)
    layers = pq.read_table(run / "stages/export/layers.parquet").to_pylist()
    assert sizes["packed_bytes"]["weights"] == sum(r["weight_bytes"] for r in layers)
    proto = onnx.load(dest / "model.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    manifest = RunStore(run).read_manifest()
    assert json.loads(meta["hawq.stage_keys"]) == {s: r.key for s, r in manifest.items()}
    _, bc = read_exported(run / "stages/export/model_int.safetensors")
    assert json.loads(meta["hawq.bit_config"]) == bc.to_dict()
    assert sizes["onnx_bytes"] == (dest / "model.onnx").stat().st_size


def test_export_refuses_an_unfinished_run(tmp_path: Path, tmp_path_factory, capsys) -> None:
    run = copy_of_finished_run(tmp_path_factory, tmp_path / "run")
    RunStore(run).forget(["evaluate", "export"])
    before = sorted(p for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["-q", "export", str(run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "evaluate (pending), export (pending) not done" in err and "--finish" in err
    assert sorted(p for p in run.rglob("*")) == before
    assert main(["-q", "export", str(run), "--format", "onnx", "--finish"]) == 0
    assert (run / "deploy" / "model.onnx").is_file()


def test_unknown_format_lists_the_supported_ones(tmp_path_factory, capsys) -> None:
    run = finished_run(tmp_path_factory)
    capsys.readouterr()
    assert main(["-q", "export", str(run), "--format", "tflite"]) == 2
    assert "'tflite' is not supported. Fix: use one of safetensors, onnx" in capsys.readouterr().err


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_codes_round_trip(bits: int) -> None:
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (1001,), generator=torch.Generator().manual_seed(bits))
    data = pack_codes(codes.to(torch.int8), bits)
    assert len(data) == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_codes(data, bits, 1001), codes.to(torch.int8))
    with pytest.raises(ValueError, match="exceed"):
        pack_codes(torch.tensor([-qmax - 1], dtype=torch.int8), bits)  # symmetric: no -2^(b-1)


def test_load_quantized_rejects_bad_tensors(tmp_path_factory) -> None:
    run = finished_run(tmp_path_factory)
    cfg = load_run_config(run)
    tensors, bc = read_exported(run / "stages/export/model_int.safetensors")
    layer = next(k.removesuffix(".weight_int") for k in tensors if k.endswith(".weight_int"))
    bits = int(tensors[f"{layer}.weight_bits"])
    wrong = dict(tensors) | {f"{layer}.weight_bits": torch.tensor(8 if bits != 8 else 4)}
    with pytest.raises(ValueError, match=f"layer {layer}: the tensors hold w"):
        load_quantized(model_factory(cfg.model)(), wrong, bc)
    big = tensors[f"{layer}.weight_int"].clone()
    big.view(-1)[0] = 2 ** (bits - 1)
    with pytest.raises(ValueError, match=f"layer {layer}: weight_int must be int8 codes"):
        load_quantized(model_factory(cfg.model)(), dict(tensors) | {f"{layer}.weight_int": big}, bc)
    extra = dict(tensors) | {"nope.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['nope.weight'\]"):
        load_quantized(model_factory(cfg.model)(), extra, bc)
