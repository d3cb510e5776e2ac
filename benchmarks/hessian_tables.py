"""The Markdown tables and summary lines of ``hessian_bench.py``: eigenvalues per block against
the Lanczos reference (relative errors, seconds), HVP counts per setting."""

from __future__ import annotations

import statistics


def rel(a: float, ref: float) -> float:
    return abs(a - ref) / abs(ref)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def eigen_table(blocks, ref, ours_p, ours_l, pyh) -> tuple[str, dict]:
    rows = []
    errs = {"power": [], "lanczos": [], "pyhessian": []}
    for b in blocks:
        r = ref["rows"][b.name]["eigenvalue"]
        row = [b.name, str(b.n_params), f"{r:.6g}"]
        for key, res in (("pyhessian", pyh), ("power", ours_p), ("lanczos", ours_l)):
            if res is None:
                row += ["-", "-"]
                continue
            e = res["rows"][b.name]
            errs[key].append(rel(e["eigenvalue"], r))
            row += [f"{e['eigenvalue']:.6g} ({rel(e['eigenvalue'], r):.1e})", f"{e['seconds']:.2f}"]
        rows.append(row)
    total = ["**total**", "", ""]
    for res in (pyh, ours_p, ours_l):
        total += ["", "-" if res is None else f"**{res['seconds']:.1f}**"]
    rows.append(total)
    header = ["block", "params", "reference λ", "PyHessian λ (rel err)", "s",
              "hawq power λ (rel err)", "s", "hawq Lanczos λ (rel err)", "s"]  # fmt: skip
    return md_table(header, rows), errs


def summary(name: str, ref, ours_p, ours_l, pyh, errs) -> str:
    lines = [
        f"{name}: hawq power {ours_p['seconds']:.1f} s, hawq Lanczos {ours_l['seconds']:.1f} s"
    ]
    if pyh is not None:
        lines[0] += f", PyHessian {pyh['seconds']:.1f} s"
        lines.append(
            f"  speed-up vs PyHessian: Lanczos {pyh['seconds'] / ours_l['seconds']:.2f}x, "
            f"power {pyh['seconds'] / ours_p['seconds']:.2f}x"
        )
    for key in ("pyhessian", "power", "lanczos"):
        if errs[key]:
            lines.append(
                f"  rel. error vs reference, {key}: max {max(errs[key]):.1e}, "
                f"median {statistics.median(errs[key]):.1e}"
            )
    lines.append(f"  reference (Lanczos tol 1e-8) took {ref['seconds']:.1f} s; peak cached graphs: "
                 f"hawq Lanczos {ours_l['graph_mb']:.0f} MB")  # fmt: skip
    return "\n".join(lines)


def hvp_table(blocks, runs: dict[str, dict | None]) -> str:
    header = ["block"]
    for setting in runs:
        header += [f"{setting}: {m}" for m in ("PyHessian", "power", "Lanczos", "ref")]
    rows = []
    for b in blocks:
        row = [b.name]
        for res in runs.values():
            for key in ("pyhessian", "power", "lanczos", "ref"):
                r = res.get(key) if res else None
                row.append("-" if r is None else str(r["rows"][b.name]["hvps"]))
        rows.append(row)
    return md_table(header, rows)
