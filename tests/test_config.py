"""Strict YAML <-> dataclass config: errors name the key path and file, overrides, round trips."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    AllocationSection,
    ConfigError,
    DataConfig,
    HessianSection,
    ModelConfig,
    RunConfig,
    check_paths,
    config_from_dict,
    config_to_yaml,
    load_config,
    section_dict,
)

ROOT = Path(__file__).resolve().parents[1]
# Pipeline run configs (configs/evaluate/ holds the evaluation script's own schema).
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
BASE = {
    "model": {"name": "cifar_resnet20"},
    "data": {"name": "cifar10", "path": "x.npz"},
    "allocation": {"compression": 13},
}


def with_(section: str, **values) -> dict:
    d = copy.deepcopy(BASE)
    d.setdefault(section, {}).update(values)
    return d


def error_of(data: dict, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, **kw)
    return info.value


def names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_every_shipped_config_loads_and_round_trips(tmp_path):
    assert {p.name for p in CONFIGS} >= {
        "quickstart.yaml",
        "resnet20_cifar10.yaml",
        "resnet56_cifar10.yaml",
        "resnet50_imagenet.yaml",
        "inception_v3_imagenet.yaml",
        "fashion_mnist_resnet20.yaml",
    }
    for path in CONFIGS:
        cfg = load_config(path)
        assert config_from_dict(cfg.to_dict()) == cfg, path
        out = tmp_path / path.name
        out.write_text(config_to_yaml(cfg))
        assert load_config(out) == cfg, path
        assert str(ROOT.parent) not in path.read_text(), f"{path}: names a path of this machine"


def test_paper_settings_in_configs():
    r20 = load_config(ROOT / "configs/resnet20_cifar10.yaml")
    assert r20.model.checkpoint == "../shared/data/cifar10/resnet20-12fca82f.th"
    assert r20.allocation.act_bits == 4 and r20.allocation.candidate_bits == (2, 4, 8)
    assert r20.allocation.compression == pytest.approx(13.11)
    assert r20.allocation.pin == {"conv1": 8, "linear": 8}
    r50 = load_config(ROOT / "configs/resnet50_imagenet.yaml")
    inc = load_config(ROOT / "configs/inception_v3_imagenet.yaml")
    assert (r50.allocation.size_limit_mb, inc.allocation.size_limit_mb) == (7.96, 7.57)
    assert r50.data.hessian_samples == inc.data.hessian_samples == 4096
    assert r50.backend.kind == inc.backend.kind == "ray"
    quick = load_config(ROOT / "configs/quickstart.yaml")
    assert (quick.backend.kind, quick.backend.data_shards) == ("ray", 2)
    assert quick.baseline.train_epochs > 0 and quick.data.name == "digits"


@pytest.mark.parametrize(
    ("data", "path", "valid_cls"),
    [
        ({**BASE, "modle": {}}, "modle", RunConfig),
        (with_("model", nme="x"), "model.nme", ModelConfig),
        (with_("hessian", tolerance=1e-3), "hessian.tolerance", HessianSection),
        (with_("allocation", pins={}), "allocation.pins", AllocationSection),
    ],
)
def test_unknown_keys_list_the_valid_keys(data, path, valid_cls):
    err = error_of(data, source="cfg.yaml")
    assert err.path == path and err.file == "cfg.yaml"
    msg = str(err)
    assert msg.startswith(f"cfg.yaml: {path}: unknown key")
    for name in names(valid_cls):
        assert name in msg


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(with_("finetune", epochs=3)))
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: finetune\.epochs: unknown key.*epochs_per_stage"
    ):
        load_config(f)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (with_("data", seed="1"), r"data\.seed: expected int, got str '1'"),
        (with_("data", hessian_samples=1.5), r"data\.hessian_samples: expected int, got float"),
        (with_("hessian", trace="yes"), r"hessian\.trace: expected bool, got str"),
        (with_("hessian", tol=True), r"hessian\.tol: expected float, got bool"),
        (with_("model", checkpoint=3), r"model\.checkpoint: expected str or null, got int"),
        (with_("allocation", candidate_bits=4), r"allocation\.candidate_bits: expected a list"),
        (with_("allocation", tie=[["a", 1]]), r"allocation\.tie\[0\]\[1\]: expected str"),
        ({**BASE, "backend": 3}, r"backend: expected a mapping \(BackendSection\), got int"),
    ],
)
def test_wrong_types_fail_with_the_key_path(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_ints_are_accepted_for_floats():
    cfg = config_from_dict(with_("finetune", lr=1))
    assert cfg.finetune.lr == 1.0 and type(cfg.finetune.lr) is float
    assert type(cfg.allocation.compression) is float


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            with_("allocation", candidate_bits=[2, 4, 9]),
            "allocation.candidate_bits[2]: 9 is outside 2..8",
        ),
        (
            with_("allocation", candidate_bits=[2, 32]),
            "allocation.candidate_bits[1]: 32 is outside",
        ),
        (with_("allocation", act_bits=1), "allocation.act_bits: 1 is outside 2..8"),
        (with_("allocation", pin={"layer1.0.conv1": 9}), "allocation.pin['layer1.0.conv1']: 9"),
        (with_("allocation", size_limit_mb=-1, compression=None), "allocation.size_limit_mb: -1.0"),
        (with_("allocation", compression=None), "allocation.size_limit_mb: set one of"),
        (with_("allocation", size_limit_mb=4.0), "allocation.compression: set either"),
        (with_("data", hessian_samples=0), "data.hessian_samples: 0 must be > 0"),
        (with_("data", hessian_batch_size=-3), "data.hessian_batch_size: -3 must be > 0"),
        (with_("data", path=None), "data.path: data 'cifar10' needs a path"),
        (with_("data", seed=-1), "data.seed: -1 must be in 0"),
        (with_("finetune", momentum=1.0), "finetune.momentum: 1.0 must be in [0, 1)"),
        (with_("hessian", trace_min_probes=1), "hessian.trace_min_probes: 1 must be >= 2"),
        (with_("backend", kind="ray", address="nohost"), "backend.address: 'nohost' must be"),
        (with_("model", name="resnet"), "model.name: 'resnet' is not a model"),
        (with_("model", checkpoint="w.bin"), "model.checkpoint: 'w.bin' must end in"),
        (with_("run", name="a b"), "run.name: 'a b' must be"),
    ],
)
def test_out_of_range_values_name_the_key(data, message):
    assert str(error_of(data)).startswith(message)


def test_bad_choice_lists_the_valid_choices():
    msg = str(error_of(with_("hessian", method="arnoldi")))
    assert (
        msg == "hessian.method: 'arnoldi' is not a valid choice; valid choices: 'lanczos', 'power'"
    )
    msg = str(error_of(with_("data", name="mnist")))
    for choice in ("digits", "fashion_mnist", "cifar10", "imagefolder", "synthetic"):
        assert repr(choice) in msg


def test_missing_required_sections_and_keys():
    assert error_of({"model": BASE["model"], "data": BASE["data"]}).path == "allocation"
    assert error_of(with_("model", name=None)).path == "model.name"
    del_model = {k: v for k, v in BASE.items() if k != "model"}
    assert "required key is missing" in str(error_of(del_model))


def test_cross_section_rules():
    err = error_of(with_("data", name="digits", path=None))
    assert str(err) == "model.in_channels: 3 but data 'digits' has 1"
    err = error_of(with_("backend", data_shards=8))  # 512 samples / 128 -> 4 batches
    assert err.path == "backend.data_shards" and "4 Hessian batches" in str(err)
    err = error_of({**with_("hessian", trace=False), "allocation": {"compression": 4.0}})
    assert err.path == "allocation.sensitivity"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    dup = tmp_path / "dup.yaml"
    dup.write_text("model: {name: mlp}\nmodel: {name: small_cnn}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: duplicate key 'model' at line 2"):
        load_config(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"top\.yaml: top level must be a mapping"):
        load_config(top)


def test_yaml_exponent_floats_and_empty_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(BASE) + "hessian: {tol: 1e-5}\nbackend:\n")
    cfg = load_config(f)
    assert cfg.hessian.tol == 1e-5 and cfg.backend == RunConfig.field_types()["backend"]()


def test_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        f,
        [
            "allocation.candidate_bits=[3, 5]",
            "allocation.pin.layer1.0.conv1=4",
            "hessian.tol=1e-4",
            "data.path=null",
            "data.name=synthetic",
            "data.channels=3",
            "model.kwargs.depth=20",
            "run.name=sweep-1",
        ],
    )
    assert cfg.allocation.candidate_bits == (3, 5)
    assert cfg.allocation.pin == {"layer1.0.conv1": 4}
    assert cfg.hessian.tol == 1e-4 and cfg.data.path is None and cfg.data.name == "synthetic"
    assert cfg.model.kwargs == {"depth": 20} and cfg.run.name == "sweep-1"
    assert load_config(f) == config_from_dict(BASE)  # the file itself is untouched


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("allocation.pinx.a=9", r"override 'allocation\.pinx\.a=9': allocation\.pinx: unknown key"),
        ("hessian.tol.x=1", r"hessian\.tol: is a value, not a section"),
        ("nosuch.x=1", r"nosuch: unknown key; valid keys: run, model, data"),
        ("foo", r"override 'foo': an override must look like"),
        (
            "allocation.candidate_bits=[2, 9]",
            r"override 'allocation\.candidate_bits=\[2, 9\]' \(on c\.yaml\): "
            r"allocation\.candidate_bits\[1\]: 9 is outside 2\.\.8",
        ),
        ("allocation.pin.layer1.0.conv1=1", r"override 'allocation\.pin\.layer1\.0\.conv1=1'"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(BASE, source="c.yaml", overrides=[override])


def test_round_trip_and_section_dict():
    cfg = config_from_dict(
        with_("allocation", pin={"conv1": 8}, tie=[["a", "b"]], candidate_bits=[2, 3, 8])
    )
    d = cfg.to_dict()
    assert d["allocation"]["tie"] == [["a", "b"]] and d["allocation"]["candidate_bits"] == [2, 3, 8]
    assert config_from_dict(d) == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg
    assert section_dict(cfg, "allocation") == d["allocation"]
    assert list(section_dict(cfg, "hessian")) == names(HessianSection)
    with pytest.raises(ConfigError, match="unknown section; valid sections: run, model"):
        section_dict(cfg, "quant")


def test_direct_construction_validates_and_errors_pickle():
    with pytest.raises(ConfigError, match=r"candidate_bits\[1\]: 9 is outside"):
        AllocationSection(candidate_bits=(2, 9), compression=4.0)
    with pytest.raises(ConfigError, match="channels: only applies to data.name: synthetic"):
        DataConfig(name="digits", channels=2)
    err = error_of(with_("data", seed="x"), source="f.yaml")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError) and str(again) == str(err) and again.path == "data.seed"


def test_converters_match_hawq_configs():
    from hawq.allocate import AllocConfig
    from hawq.hessian.table import HessianConfig
    from hawq.qat import QATConfig

    cfg = config_from_dict(
        {
            **with_("allocation", pin={"conv1": 8}, tie=[["a", "b"]], act_bits=4, bops_limit=2.5),
            "hessian": {"method": "power", "tol": 1e-4, "trace_tol": 0.02, "memory_budget_mb": 0},
            "finetune": {"epochs_per_stage": 3, "lr": 0.02, "loss": "distill", "order": "reverse"},
            "run": {"seed": 7},
        }
    )
    h = cfg.hessian.to_hawq()
    assert isinstance(h, HessianConfig)
    shared = set(names(HessianConfig))
    assert shared == set(names(HessianSection)) - {"grouping", "patterns", "dtype"}
    assert {k: getattr(h, k) for k in shared} == {k: getattr(cfg.hessian, k) for k in shared}
    a = cfg.allocation.to_hawq()
    assert isinstance(a, AllocConfig)
    assert a.pins == {"conv1": 8} and a.ties == (("a", "b"),) and a.act_bits == 4
    assert a.compression == 13.0 and a.sensitivity == cfg.allocation.sensitivity
    assert a.bops_limit == 2.5e9  # the config is in GBOPs
    q = cfg.finetune.to_hawq(seed=cfg.run.seed, eval_batch_size=cfg.data.batch_size)
    assert isinstance(q, QATConfig)
    assert (q.epochs, q.lr, q.loss, q.seed, q.eval_batch_size) == (3, 0.02, "distill", 7, 128)
    o = cfg.finetune.order_to_hawq(cfg.allocation, seed=cfg.run.seed)
    assert (o.mode, o.seed, o.blocks_per_stage) == ("reverse", 7, 1)
    assert (o.sensitivity, o.per_channel) == (cfg.allocation.sensitivity, True)
    base = config_from_dict(BASE)
    assert base.finetune.order_to_hawq(base.allocation, seed=0).mode == "descending"
    b = config_from_dict({**BASE, "baseline": {"train_epochs": 6, "lr": 0.05}}).baseline
    t = b.to_hawq(seed=3, eval_batch_size=64)
    assert isinstance(t, QATConfig)
    assert (t.epochs, t.lr, t.step_size, t.seed, t.eval_batch_size) == (6, 0.05, 2, 3, 64)


def test_check_paths(tmp_path):
    cfg = config_from_dict(with_("model", checkpoint=str(tmp_path / "w.th")))
    with pytest.raises(ConfigError, match=r"model\.checkpoint: file .*w\.th' not found"):
        check_paths(cfg)
    cfg = config_from_dict(
        {**BASE, "model": {"name": "small_cnn", "in_channels": 1}, "data": {"name": "digits"}},
        overrides=["data.name=fashion_mnist", f"data.path={tmp_path / 'fm'}"],
    )
    with pytest.raises(ConfigError, match="data.path: .*apt-get install -y dataset-fashion-mnist"):
        check_paths(cfg)
    (tmp_path / "fm").mkdir()
    check_paths(cfg)
