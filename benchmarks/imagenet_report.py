"""What ``imagenet_scale.py`` writes: the markdown report and the measured costs as JSON.

Both are written to a temporary name, then ``os.replace``d.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from imagenet_projection import Costs


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


class Report:
    """Markdown lines, printed as they come and written (atomically) at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self(md_table(header, rows))

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        os.replace(tmp, path)


def save_costs(path: Path, costs: Costs, probes: dict, hooks: tuple, date: str) -> None:
    """The measured costs and (f)'s figures (with the date they were measured), as JSON."""
    loading, scaling = hooks
    out = {"costs": dataclasses.asdict(costs), "probes": probes, "data_loading": loading,
           "ddp_scaling": scaling, "input_and_ddp_measured": date}  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)
