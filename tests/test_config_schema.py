"""``hawq config schema`` / ``show`` against the config dataclasses themselves, docs/config.md
up to date, and the shipped configs' example commands parse with the real CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from tiny_run import REPO

from pipeline.cli import _parser, main
from pipeline.config import RunConfig, load_config
from pipeline.config.loading import apply_overrides
from pipeline.config.schema import REQUIRED, schema, schema_markdown
from pipeline.config.strict import Section

CONFIGS = [*sorted((REPO / "configs").glob("*.yaml")), REPO / "examples/own_model/config.yaml"]


def leaf_fields(cls: type[Section], prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every non-section field of ``cls``, recursively, by dotted key."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = cls.field_types()[f.name]
        if isinstance(tp, type) and issubclass(tp, Section):
            out.update(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def test_schema_covers_every_field_and_nothing_else() -> None:
    rows = schema()
    fields = leaf_fields(RunConfig)
    assert [r.key for r in rows] == list(fields)  # every key once, in declaration order
    for r in rows:
        f = fields[r.key]
        assert len(r.meaning) > 10, f"{r.key} has no meaning"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert r.default == REQUIRED
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert json.loads(r.default) == json.loads(json.dumps(value)), r.key
    by_key = {r.key: r for r in rows}
    assert by_key["hessian.method"].allowed == "lanczos, power"
    assert by_key["allocation.percentile"].type == "float | null"
    assert by_key["allocation.pin"].type == "map[str, int]"
    assert by_key["data.factory"].type == "str | null"


def test_docs_config_md_is_up_to_date() -> None:
    assert (REPO / "docs/config.md").read_text() == schema_markdown(), (
        "regenerate: hawq config schema --markdown > docs/config.md"
    )


def test_config_schema_and_show_commands(tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["-q", "config", "schema"]) == 0
    text = capsys.readouterr().out
    for r in schema():
        assert f"{r.key}: {r.type} = {r.default}" in text
    cfg_file = REPO / "configs/quickstart.yaml"
    assert main(["-q", "config", "show", str(cfg_file), "--set", "allocation.compression=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) == {f.name for f in dataclasses.fields(RunConfig)}
    assert shown["allocation"]["compression"] == 8.0
    assert shown["hessian"]["memory_budget_mb"] == 4096.0  # a default the file does not set
    assert shown["finetune"]["momentum"] == 0.9
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(shown))
    original = load_config(cfg_file, ["allocation.compression=8"])
    assert load_config(tmp_path / "shown.yaml") == original


def _example_commands(text: str) -> list[str]:
    """``hawq ...`` commands in a YAML file's comments (``\\`` continues a line)."""
    lines = [ln.lstrip("#").strip() for ln in text.splitlines() if ln.startswith("#")]
    commands, current = [], None
    for ln in lines:
        if current is not None:
            current += " " + ln.rstrip("\\").strip()
            if not ln.endswith("\\"):
                commands.append(current)
                current = None
        elif re.match(r"^(PYTHONPATH=\S+ )?hawq ", ln):
            current = ln.rstrip("\\").strip()
            if not ln.endswith("\\"):
                commands.append(current)
                current = None
    return commands


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_comments_use_the_real_cli_syntax(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    for cmd in _example_commands(path.read_text()):
        words = shlex.split(cmd)
        words = words[words.index("hawq") + 1 :]
        args = _parser().parse_args(words)  # SystemExit on a syntax the CLI rejects
        if args.command == "run":
            assert Path(REPO / args.config).resolve() == path.resolve(), cmd
            apply_overrides(raw, args.overrides)  # unknown key paths fail here


def test_example_commands_are_found() -> None:
    found = {p.name: _example_commands(p.read_text()) for p in CONFIGS}
    assert found["resnet50_imagenet.yaml"] == [
        "hawq run configs/resnet50_imagenet.yaml --set data.path=/datasets/imagenet "
        "--set model.checkpoint=/weights/resnet50-0676ba61.pth"
    ]
    assert sum(len(v) for v in found.values()) >= 7
