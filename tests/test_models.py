"""Model factory: built-ins, import paths, optional torchvision, checkpoints, accuracy."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from shared_data import CIFAR10, needs

from hawq.models import cifar_resnet
from pipeline.config import ConfigError, DataConfig, ModelConfig
from pipeline.data import load_data
from pipeline.models import (
    TORCHVISION_HINT,
    build_model,
    load_checkpoint,
    loss_fn_for,
    model_factory,
    read_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = CIFAR10


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    ("cfg", "shape", "n_params"),
    [
        # ResNet-20: 0.27M parameters (He et al. 2016, table 6).
        (ModelConfig(name="cifar_resnet20"), (3, 32, 32), 269_722),
        (ModelConfig(name="cifar_resnet32", in_channels=1), (1, 28, 28), None),
        # mlp 64 -> 32 -> 10: 64*32+32 + 32*10+10 parameters.
        (
            ModelConfig(name="mlp", in_channels=1, image_size=8, kwargs={"hidden": [32]}),
            (1, 8, 8),
            2410,
        ),
        (ModelConfig(name="small_cnn", in_channels=1), (1, 8, 8), None),
        (ModelConfig(name="small_cnn", in_channels=1), (1, 28, 28), None),
        (ModelConfig(name="small_cnn", in_channels=3, num_classes=7), (3, 32, 32), None),
    ],
)
def test_factory_builds_and_pickles(cfg, shape, n_params):
    factory = model_factory(cfg)
    clone = pickle.loads(pickle.dumps(factory))
    torch.manual_seed(0)
    a = factory()
    torch.manual_seed(0)
    b = clone()
    assert same_state(a, b)
    out = b.eval()(torch.randn(2, *shape))
    assert out.shape == (2, cfg.num_classes)
    if n_params is not None:
        assert sum(p.numel() for p in a.parameters()) == n_params


def test_import_path_models():
    cfg = ModelConfig(name="hawq.models.resnet_cifar:cifar_resnet", kwargs={"depth": 20})
    torch.manual_seed(0)
    user = model_factory(cfg)()
    torch.manual_seed(0)
    assert same_state(user, cifar_resnet(20))
    cannot = r"model\.name: cannot import 'hawq\.nosuch:f' \(No module named 'hawq\.nosuch'\)"
    with pytest.raises(ConfigError, match=cannot + r"\. Fix: pip install your package"):
        model_factory(ModelConfig(name="hawq.nosuch:f"))
    with pytest.raises(
        ConfigError, match=r"model\.name: module 'hawq\.models' has no callable 'x'\. Fix"
    ):
        model_factory(ModelConfig(name="hawq.models:x"))
    with pytest.raises(
        ConfigError, match=r"model\.name: builtins:dict returned dict, not nn\.Module"
    ):
        build_model(ModelConfig(name="builtins:dict"))
    with pytest.raises(ConfigError, match=r"model\.kwargs: .*rejected the kwargs"):
        build_model(ModelConfig(name="small_cnn", in_channels=1, kwargs={"depth": 3}))
    with pytest.raises(ConfigError, match=r"model\.kwargs: cifar_resnet20 takes no kwargs"):
        build_model(ModelConfig(name="cifar_resnet20", kwargs={"depth": 3}))


def test_torchvision_is_optional():
    cfg = ModelConfig(name="torchvision:resnet18", num_classes=5)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ConfigError) as info:
            model_factory(cfg)
        assert info.value.path == "model.name" and TORCHVISION_HINT in str(info.value)
        assert TORCHVISION_HINT == "pip install torch==2.14.1 torchvision==0.29.1"
    else:
        model = build_model(cfg).eval()
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
        with pytest.raises(ConfigError, match="torchvision has no model 'nonet'"):
            build_model(ModelConfig(name="torchvision:nonet"))


def test_checkpoint_formats_round_trip(tmp_path):
    torch.manual_seed(1)
    src = cifar_resnet(20)
    state = src.state_dict()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "a.th"
    )
    torch.save(state, tmp_path / "b.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "c.safetensors")
    for name in ("a.th", "b.pt", "c.safetensors"):
        torch.manual_seed(2)
        loaded = build_model(ModelConfig(name="cifar_resnet20", checkpoint=str(tmp_path / name)))
        assert same_state(loaded, src), name


def test_bad_checkpoints_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"model\.checkpoint: '.*corrupt\.pth' could not be read"):
        read_state_dict(corrupt)
    with pytest.raises(ConfigError, match=r"'.*missing\.pt' not found"):
        read_state_dict(tmp_path / "missing.pt")
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ConfigError, match=r"meta\.pt' is not a state dict"):
        read_state_dict(tmp_path / "meta.pt")
    torch.save(cifar_resnet(20).state_dict(), tmp_path / "r20.pt")
    with pytest.raises(ConfigError, match=r"r20\.pt' does not fit CifarResNet: 180 missing"):
        load_checkpoint(cifar_resnet(56), tmp_path / "r20.pt")
    with pytest.raises(ConfigError, match=r"r20\.pt' does not fit .*1 shape \(linear\.weight"):
        load_checkpoint(
            cifar_resnet(20, num_classes=100), tmp_path / "r20.pt", ignore=[r"linear\.bias"]
        )


@needs("cifar10_subset.npz", "resnet20-12fca82f.th")
def test_pretrained_resnet20_accuracy():
    """README: the pretrained ResNet-20 scores about 91.6% on the 932 test images."""
    data = load_data(
        DataConfig(name="cifar10", path=str(SHARED / "cifar10_subset.npz"), hessian_samples=128)
    )
    assert len(data.eval_y) == 932
    model = build_model(
        ModelConfig(name="cifar_resnet20", checkpoint=str(SHARED / "resnet20-12fca82f.th"))
    ).eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in data.eval_batches(256)])
    acc = (pred == data.eval_y).float().mean().item()
    assert acc > 0.88, acc


def test_small_cnn_learns_digits():
    """Trained from scratch for a few epochs, the quickstart model beats 90% on held-out digits."""
    data = load_data(DataConfig(name="digits", hessian_samples=128))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="small_cnn", in_channels=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = loss_fn_for(ModelConfig(name="small_cnn", in_channels=1))
    for epoch in range(6):
        model.train()
        for x, y in data.train_batches(64, seed=0, epoch=epoch):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(data.eval_x).argmax(1) == data.eval_y).float().mean().item()
    assert acc > 0.9, acc


def test_loss_is_picklable_cross_entropy():
    loss = pickle.loads(pickle.dumps(loss_fn_for(ModelConfig(name="mlp", image_size=8))))
    logits, y = torch.randn(5, 10), torch.tensor([0, 3, 9, 2, 2])
    assert torch.equal(loss(logits, y), F.cross_entropy(logits, y))
