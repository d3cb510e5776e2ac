"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel holding every
package of hawq/, pipeline/ and slurm/; a fresh venv with only the base requirements (versions
from constraints.txt) runs the library against dense-Hessian ground truth and the local
pipeline, while ray, submitit, matplotlib, scikit-learn and tqdm are not importable there.

Slow (a venv with torch; pip's cache makes reruns faster) but part of the suite: CI runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from tiny_run import write_config

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("hawq", "pipeline", "slurm")
OPTIONAL = ("ray", "submitit", "matplotlib", "sklearn", "tqdm", "torchvision")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def packages_on_disk() -> set[str]:
    """Every package (a folder with ``__init__.py``) of the three layers, as dotted names."""
    return {
        ".".join(init.parent.relative_to(ROOT).parts)
        for layer in LAYERS
        for init in (ROOT / layer).rglob("__init__.py")
    }


def packages_in(names: list[str], prefix: str = "") -> set[str]:
    """Dotted packages of an archive's member names (``__init__.py`` under ``prefix``)."""
    found = set()
    for name in names:
        rel = name.removeprefix(prefix)
        if rel.endswith("/__init__.py") and rel.split("/")[0] in LAYERS:
            found.add(rel.removesuffix("/__init__.py").replace("/", "."))
    return found


def clean_env() -> dict[str, str]:
    """The environment without this checkout on the path (the venv must use what it installed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1")
    return env


def check(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel of a copy of the source tree (the build leaves the checkout untouched)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, src / layer, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp / "out"
    check([sys.executable, "-m", "build", "--outdir", str(out), str(src)], 900, env=clean_env())
    return out


@pytest.fixture(scope="module")
def base_venv(dist: Path, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel and the base requirements only, pinned by constraints.txt."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    t0 = time.perf_counter()
    check([sys.executable, "-m", "venv", str(venv)], 300)
    (wheel,) = dist.glob("*.whl")
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
    # The library's users bring any torch in the supported range: here the CPU build 2.13.0
    # (from the local disk; no torchvision), every other package at its tested version.
    pins = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if not line.startswith(("torch==", "torchvision==", "nvidia-", "cuda-", "triton=="))
    ]
    constraints = venv.parent / "constraints-cpu.txt"
    constraints.write_text("\n".join([*pins, "torch==2.13.0", ""]))
    check([*pip, "-c", str(constraints), str(wheel)], 1500, env=clean_env())
    print(f"fresh venv with the base install in {time.perf_counter() - t0:.0f}s")
    return venv


def test_sdist_and_wheel_hold_every_package(dist: Path) -> None:
    expected = packages_on_disk()
    assert {"hawq", "hawq.models", "pipeline.backends", "pipeline.stages"} <= expected
    version = PYPROJECT["version"]
    (wheel,) = dist.glob(f"hawq-{version}-py3-none-any.whl")
    (sdist,) = dist.glob(f"hawq-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        assert packages_in(z.namelist()) == expected
        assert not [n for n in z.namelist() if n.startswith(("tests/", "benchmarks/"))]
        meta = z.read(f"hawq-{version}.dist-info/METADATA").decode()
        scripts = z.read(f"hawq-{version}.dist-info/entry_points.txt").decode()
    with tarfile.open(sdist) as t:
        assert packages_in(t.getnames(), f"hawq-{version}/") == expected
    requires = [ln.removeprefix("Requires-Dist: ") for ln in meta.splitlines()]
    assert set(PYPROJECT["dependencies"]) <= set(requires)  # ranges, no extras leaking in
    assert "Requires-Python: >=3.11" in meta.splitlines()
    assert "hawq = pipeline.cli:main" in scripts and "hawq-slurm = slurm.cli:main" in scripts


LIBRARY_SCRIPT = r"""
import importlib.util, json, sys
import torch
from torch import nn
from torch.func import functional_call, hessian
import hawq

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()
x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
loss_fn = nn.CrossEntropyLoss()
config = hawq.HessianConfig(
    seed=0, tol=1e-10, trace_tol=0.01, trace_max_probes=400, trace_min_probes=50
)
table = hawq.analyze(model, loss_fn, [(x, y)], config, progress=True).to_pylist()

params = dict(model.named_parameters())
dense = {}
for block in ("0", "2"):
    name = block + ".weight"
    def loss_of(w, name=name):
        return loss_fn(functional_call(model, {**params, name: w}, (x,)), y)
    h = hessian(loss_of)(params[name].detach()).reshape(params[name].numel(), -1)
    dense[block] = {"eig": torch.linalg.eigvalsh(h)[-1].item(), "trace": h.trace().item()}

alloc = hawq.allocate_model(
    model, table, hawq.AllocConfig(method="ilp", candidate_bits=(4, 8), compression=5.5)
)
weights = {b: model.get_submodule(b).weight.detach().clone() for b in ("0", "2")}
hawq.quantize_(model, alloc.bit_config)
quantized = {}
for b, w in weights.items():
    qmax = 2 ** (alloc.bits[b] - 1) - 1
    s = w.abs().amax(dim=1, keepdim=True) / qmax
    q = model.get_submodule(b).quantized_weight().detach()
    quantized[b] = (q - torch.round(w / s) * s).abs().max().item()
print(json.dumps({
    "hawq_file": hawq.__file__, "version": hawq.__version__,
    "rows": table, "dense": dense, "bits": alloc.bits, "compression": alloc.compression,
    "quantized_error": quantized, "type0": type(model[0]).__name__,
    "importable": {m: importlib.util.find_spec(m) is not None for m in {optional}},
    "loaded": sorted(
        m for m in {optional} + ("pipeline", "slurm", "safetensors") if m in sys.modules
    ),
}))
"""


def test_base_install_runs_the_library(base_venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "library.py"
    script.write_text(LIBRARY_SCRIPT.replace("{optional}", repr(OPTIONAL)))
    proc = check([str(base_venv / "bin/python"), str(script)], 600, cwd=tmp_path, env=clean_env())
    out = json.loads(proc.stdout.splitlines()[-1])
    assert Path(out["hawq_file"]).is_relative_to(base_venv)  # the installed copy, not the checkout
    assert out["version"] == PYPROJECT["version"]
    assert out["importable"] == dict.fromkeys(OPTIONAL, False)
    assert out["loaded"] == []  # the library imports no pipeline, slurm or safetensors either
    for row in out["rows"]:  # against the dense float64 Hessian of each block
        truth = out["dense"][row["block"]]
        assert row["eigenvalue"] == pytest.approx(truth["eig"], rel=1e-6)
        assert abs(row["trace"] - truth["trace"]) <= 4 * row["trace_stderr"] + 1e-9
    # 24 + 12 weights, bits (4, 8) or (4, 4) reach 5.5x (6x, 8x); (8, 4) and (8, 8) do not;
    # the ILP's least perturbation among them keeps 8 bits where it can: (4, 8).
    assert out["bits"] == {"0": 4, "2": 8}
    assert out["compression"] == pytest.approx(32 * 36 / (4 * 24 + 8 * 12))
    assert out["type0"] == "QuantLinear"
    assert max(out["quantized_error"].values()) < 1e-12  # round(w / s) * s, s = max|w| / qmax


def test_base_install_runs_the_pipeline_and_names_the_extras(
    base_venv: Path, tmp_path: Path
) -> None:
    hawq, env = str(base_venv / "bin/hawq"), clean_env()
    version = check([hawq, "--version"], 120, env=env).stdout.split()
    assert version[:2] == ["hawq", PYPROJECT["version"]]
    cfg = write_config(tmp_path / "tiny.yaml", {"data": {"name": "synthetic"}})
    run_dir = tmp_path / "run"
    check([hawq, "run", str(cfg), "--run-dir", str(run_dir), "-q"], 600, env=env)
    assert (run_dir / "stages/export/model_int.safetensors").is_file()
    report = check([hawq, "report", str(run_dir)], 120, env=env).stdout
    assert "Allocation" in report
    assert "Plots: skipped, matplotlib is not installed. Fix: pip install 'hawq[report]'" in report
    for data, backend, extra in (("digits", "local", "digits"), ("synthetic", "ray", "ray")):
        changes = {"data": {"name": data}, "backend": {"kind": backend}}
        cfg = write_config(tmp_path / f"{extra}.yaml", changes)
        new_dir = tmp_path / f"run-{extra}"
        args = [hawq, "run", str(cfg), "--run-dir", str(new_dir)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 2, proc.stderr
        assert f"Fix: pip install 'hawq[{extra}]'" in proc.stderr
        assert not new_dir.exists()  # refused before any work
    slurm = [str(base_venv / "bin/hawq-slurm"), "submit", str(cfg), "--run-dir", str(run_dir)]
    proc = subprocess.run(slurm, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "Fix: pip install 'hawq[slurm]'" in proc.stderr
