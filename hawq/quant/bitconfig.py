"""Per-layer bit widths: ``LayerBits`` and ``BitConfig`` with dict/YAML/JSON/Parquet round-trips.

``BitConfig.layers`` maps keys to ``LayerBits``. A key is either a fully qualified module name
(``"layer1.0.conv1"``) or, with the prefix ``"re:"`` (as torchao's module-FQN configs do), a
regular expression matched with ``re.fullmatch`` (``"re:layer3\\..*"``). ``resolve(fqn)``: an
exact name wins; else the first matching regex in insertion order; else the defaults.
``act`` is the bit width of the layer's *input* activation (32 = float).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hawq.quant.primitives import CLIP_KEYS
from hawq.validation import check_bits, check_clip_bits, check_number, check_percentile

REGEX_PREFIX = "re:"
_FIELDS = (
    "weight_bits",
    "act_bits",
    "per_channel",
    "percentile",
    "clip_bits",
    "mse_clip",
    "act_momentum",
    "layers",
)

__all__ = ["REGEX_PREFIX", "BitConfig", "LayerBits", "atomic_write"]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file in the same directory, then ``os.replace`` it into place."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class LayerBits:
    """Weight and input-activation bit widths of one layer (2..8, or 32 for float)."""

    weight: int
    act: int

    def __post_init__(self) -> None:
        check_bits("LayerBits.weight", self.weight)
        check_bits("LayerBits.act", self.act)


def _as_layer_bits(key: str, v: Any) -> LayerBits:
    if isinstance(v, LayerBits):
        return v
    if isinstance(v, Mapping) and set(v) == {"weight", "act"}:
        return LayerBits(weight=v["weight"], act=v["act"])
    if isinstance(v, list | tuple) and len(v) == 2:
        return LayerBits(*v)
    raise ValueError(
        f"layers[{key!r}] must be LayerBits, {{'weight': w, 'act': a}} or (w, a), got {v!r}"
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class BitConfig:
    """Default bits, per-layer overrides (exact names or ``re:`` patterns), quantizer options.

    per_channel: weight scales per output channel (else one per tensor).
    percentile: clip weights at this percentile of |w| (None = max|w|), in (0, 100].
    mse_clip: clip each channel at the MSE-optimal ratio of max|w| (``mse_clip_ratios``).
    clip_bits: clip (percentile or MSE) only at weight bits <= clip_bits (None = all widths).
    act_momentum: EMA weight on the old activation range, in [0, 1).
    """

    weight_bits: int = 8
    act_bits: int = 8
    layers: Mapping[str, LayerBits] = field(default_factory=dict)
    per_channel: bool = True
    percentile: float | None = None
    clip_bits: int | None = None
    mse_clip: bool = False
    act_momentum: float = 0.99

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits)
        check_bits("act_bits", self.act_bits)
        for name in ("per_channel", "mse_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "percentile", check_percentile("percentile", self.percentile))
        check_clip_bits("clip_bits", self.clip_bits)
        if self.mse_clip and self.percentile is not None:
            raise ValueError("set either percentile or mse_clip (MSE-optimal clipping), not both")
        m = check_number("act_momentum", self.act_momentum, low=0, high=1, high_open=True)
        object.__setattr__(self, "act_momentum", m)
        if not isinstance(self.layers, Mapping):
            raise ValueError(
                f"layers must be a mapping of module name -> LayerBits, got "
                f"{type(self.layers).__name__}"
            )
        layers: dict[str, LayerBits] = {}
        patterns: list[tuple[re.Pattern[str], LayerBits]] = []
        for key, v in self.layers.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"layers keys must be non-empty strings, got {key!r}")
            lb = _as_layer_bits(key, v)
            layers[key] = lb
            if key.startswith(REGEX_PREFIX):
                try:
                    patterns.append((re.compile(key[len(REGEX_PREFIX) :]), lb))
                except re.error as exc:
                    raise ValueError(f"layers key {key!r} is not a valid regex: {exc}") from exc
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "_patterns", tuple(patterns))

    def __eq__(self, other: object) -> bool:
        """Equal fields, and ``layers`` in the same order (regex keys resolve in order)."""
        if not isinstance(other, BitConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict() and list(self.layers) == list(other.layers)

    __hash__ = None  # type: ignore[assignment]

    @property
    def clip_options(self) -> dict[str, Any]:
        """The weight-clipping keyword arguments of ``hawq.quant.primitives.quantize_weight``."""
        return {k: getattr(self, k) for k in CLIP_KEYS}

    @property
    def default(self) -> LayerBits:
        """The bits of a layer that no key matches."""
        return LayerBits(self.weight_bits, self.act_bits)

    def resolve(self, fqn: str) -> LayerBits:
        """Bits of module ``fqn``: exact name, else first matching ``re:`` key, else default."""
        if fqn in self.layers and not fqn.startswith(REGEX_PREFIX):
            return self.layers[fqn]
        for pat, lb in self._patterns:  # type: ignore[attr-defined]
            if pat.fullmatch(fqn):
                return lb
        return self.default

    # -- dict / YAML / JSON ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict; ``from_dict(to_dict())`` equals ``self``."""
        return {
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "per_channel": self.per_channel,
            "percentile": self.percentile,
            "clip_bits": self.clip_bits,
            "mse_clip": self.mse_clip,
            "act_momentum": self.act_momentum,
            "layers": {k: {"weight": v.weight, "act": v.act} for k, v in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitConfig:
        """Strict inverse of ``to_dict`` (unknown keys raise ``ValueError``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a bit config must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown bit config keys {unknown}; valid keys: {list(_FIELDS)}")
        return cls(**dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> BitConfig:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> BitConfig:
        return cls.from_dict(yaml.safe_load(text))

    # -- Parquet -----------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        """One row per ``layers`` key (columns module, weight_bits, act_bits); the rest of the
        config as JSON in the schema metadata key ``hawq.quant.bitconfig``."""
        rest = {k: v for k, v in self.to_dict().items() if k != "layers"}
        schema = pa.schema(
            [("module", pa.string()), ("weight_bits", pa.int32()), ("act_bits", pa.int32())],
            metadata={"hawq.quant.bitconfig": json.dumps(rest)},
        )
        return pa.table(
            {
                "module": list(self.layers),
                "weight_bits": [v.weight for v in self.layers.values()],
                "act_bits": [v.act for v in self.layers.values()],
            },
            schema=schema,
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> BitConfig:
        meta = table.schema.metadata or {}
        rest = json.loads(meta[b"hawq.quant.bitconfig"]) if b"hawq.quant.bitconfig" in meta else {}
        missing = {"module", "weight_bits", "act_bits"} - set(table.column_names)
        if missing:
            raise ValueError(f"bit config table lacks columns {sorted(missing)}")
        cols = table.to_pydict()
        layers = {
            m: LayerBits(int(w), int(a))
            for m, w, a in zip(cols["module"], cols["weight_bits"], cols["act_bits"], strict=True)
        }
        return cls.from_dict({**rest, "layers": layers})

    # -- files (written atomically) -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``.yaml``/``.yml``, ``.json`` or ``.parquet`` (by suffix), atomically."""
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix in (".yaml", ".yml"):
            atomic_write(path, self.to_yaml().encode())
        elif suffix == ".json":
            atomic_write(path, self.to_json().encode())
        elif suffix == ".parquet":
            sink = pa.BufferOutputStream()
            pq.write_table(self.to_table(), sink)
            atomic_write(path, sink.getvalue().to_pybytes())
        else:
            raise ValueError(f"path suffix must be .yaml, .yml, .json or .parquet, got {path!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BitConfig:
        """Read a file written by ``save`` (format from the suffix)."""
        suffix = os.path.splitext(os.fspath(path))[1].lower()
        if suffix in (".yaml", ".yml"):
            with open(path, encoding="utf-8") as f:
                return cls.from_yaml(f.read())
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                return cls.from_json(f.read())
        if suffix == ".parquet":
            return cls.from_table(pq.read_table(path))
        raise ValueError(f"path suffix must be .yaml, .yml, .json or .parquet, got {path!r}")
