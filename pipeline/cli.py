"""The ``hawq`` command: run, config, resume, status, report, export, pack-data.

Exit codes: 0 ok; 2 bad input (config, data, checkpoint, run dir, arguments), with a one-line
message on stderr that names the problem and the fix; 1 an unexpected error (traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("hawq")

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class VersionAction(argparse.Action):
    """``--version``: the installed package's version (pyproject.toml's), torch's and Python's."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        import platform

        import torch

        import hawq

        print(f"{parser.prog} {hawq.__version__} (torch {torch.__version__}, "
              f"Python {platform.python_version()})")  # fmt: skip
        parser.exit()


def add_output_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v`` / ``-q`` / ``--log-level``, before (``top``) and after the subcommand alike.

    On a subcommand the defaults are SUPPRESS, so an option given before it is not reset.
    """

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("output options (before or after the command)")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="DEBUG",
                   default=default(None), help="debug logging")  # fmt: skip
    g.add_argument("-q", "--quiet", action="store_true", default=default(False),
                   help="warnings only, no progress bars")  # fmt: skip
    g.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=default(None),
                   help="logging level (default INFO)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hawq",
        description="Hessian-aware mixed-precision quantization pipeline.",
        epilog="Example: hawq run configs/quickstart.yaml && hawq report runs/quickstart",
    )
    p.add_argument("--version", action=VersionAction)
    add_output_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    add_output_options(common, top=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, parents=[common])

    r = command("run", "run (or continue) the pipeline for a config")
    r.add_argument("config", help="YAML config file")
    r.add_argument("--run-dir", help="run directory (default: run.run_dir or runs/<run.name>)")
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set allocation.compression=8 (repeatable)",
    )
    r.add_argument("--until", metavar="STAGE", help="stop after this stage")

    c = command("config", "print a resolved config, or every config key").add_subparsers(
        dest="config_command", required=True, metavar="WHAT"
    )
    r = c.add_parser("show", help="the config with every default filled in (YAML)")
    r.add_argument("config", help="YAML config file")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")  # fmt: skip
    r = c.add_parser("schema", help="every key: type, default, allowed values, meaning")
    r.add_argument("--markdown", action="store_true", help="as docs/config.md")

    r = command("resume", "continue a run from its run dir")
    r.add_argument("run_dir")
    r.add_argument("--until", metavar="STAGE", help="stop after this stage")
    r.add_argument(
        "--repair", action="store_true", help="delete truncated/corrupt files and recompute them"
    )

    r = command("status", "stages done / running / pending, and what runs next")
    r.add_argument("run_dir")
    r.add_argument("--json", action="store_true", help="as JSON, with the run summary")

    r = command("report", "tables, PNG plots and report.html")
    r.add_argument("run_dir")
    r.add_argument("--out", help="folder for the PNGs and report.html (default: RUN_DIR/report)")
    r.add_argument("--json", action="store_true", help="the summary and tables as JSON only")

    r = command("export", "export a finished run (safetensors or ONNX)")
    r.add_argument("run_dir")
    r.add_argument("--out", help="folder for the exported files (onnx default: RUN_DIR/deploy)")
    r.add_argument("--format", default="safetensors", help="safetensors (default) or onnx")
    r.add_argument("--finish", action="store_true", help="first run the stages not yet done")
    r.add_argument("--check", action="store_true", help="onnx: compare with PyTorch on eval data")

    r = command("pack-data", "pack an ImageFolder into Parquet shards (data.path of a run)")
    r.add_argument("src_dir", metavar="SRC_DIR", help="ImageFolder root: <split>/<class>/<image>")
    r.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) folder for the pack")
    r.add_argument("--shard-size", type=int, default=1024, metavar="N",
                   help="images per shard (default 1024)")  # fmt: skip
    r.add_argument("--bad-images", choices=("fail", "skip"), default="fail",
                   help="empty or non-image files: fail (default) or leave them out")  # fmt: skip
    return p


def _setup_logging(quiet: bool, level: str | None) -> None:
    logging.basicConfig(
        level=level or ("WARNING" if quiet else "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _check_until(until: str | None) -> None:
    from pipeline.stages import STAGES

    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise _BadArgs(f"--until {until!r} is not a stage. Fix: use one of {', '.join(names)}.")


class _BadArgs(ValueError):
    pass


def _print_outcome(outcome) -> None:
    from pipeline.report import format_table

    rows = []
    for p in outcome.plan:
        ran = p.action == "skip" or p.stage in outcome.seconds
        action, why = (p.action, p.reason) if ran else ("pending", "stopped before (--until)")
        rows.append([p.stage, action, outcome.seconds.get(p.stage), p.key, why])
    headers = ["stage", "action", "seconds", "key", "why"]
    print(format_table(f"Run {outcome.run_dir}", headers, rows))
    print(f"\nNext: hawq report {outcome.run_dir}")


def _cmd_config(args: argparse.Namespace) -> None:
    if args.config_command == "show":
        from pipeline.config import config_to_yaml, load_config

        print(config_to_yaml(load_config(args.config, args.overrides)), end="")
    else:
        from pipeline.config.schema import schema_markdown, schema_text

        print(schema_markdown() if args.markdown else schema_text(), end="")


def _cmd_status(run_dir: str, as_json: bool) -> None:
    from pipeline.report import format_table
    from pipeline.scheduler import status

    rows, nxt = status(run_dir)
    if as_json:
        from pipeline.run_summary import json_ready, run_summary
        from pipeline.store import RunStore

        stages = [dataclasses.asdict(r) for r in rows]
        summary = run_summary(RunStore(Path(run_dir)))
        out = {"run_dir": run_dir, "stages": stages, "next": nxt, "summary": summary}
        print(json.dumps(json_ready(out), indent=2))
        return
    table = [[r.stage, r.state, r.progress, r.seconds, r.summary] for r in rows]
    print(format_table(f"Run {run_dir}", ["stage", "state", "progress", "seconds", "what"], table))
    running = [r for r in rows if r.state == "running"]
    if running:
        print(f"\nrunning: {running[0].stage}")
    print(f"next: {nxt}" if nxt else "\nall stages done")


def _cmd_export(args: argparse.Namespace, progress: bool) -> None:
    from pipeline.atomic import atomic_write_bytes, read_parquet
    from pipeline.export_formats import (
        ExportError,
        check_format,
        print_onnx_export,
        require_finished,
    )
    from pipeline.report import format_table
    from pipeline.scheduler import load_run_config, resume
    from pipeline.store import RunStore

    run_dir, out = args.run_dir, args.out
    try:
        check_format(args.format)
        if out is not None and Path(out).exists() and not Path(out).is_dir():
            raise _BadArgs(f"--out {out} is a file. Fix: pass a folder.")
        load_run_config(run_dir)  # a clear error for a wrong path
        if args.finish:
            resume(run_dir, progress=progress, until="export")
        require_finished(run_dir)
        if args.format == "onnx":
            print_onnx_export(run_dir, out, check=args.check)
            return
    except ExportError as exc:
        raise _BadArgs(str(exc)) from None
    store = RunStore(Path(run_dir))
    files = sorted(p for p in store.stage_files("export") if p.name != "progress.json")
    layers = read_parquet(store.stage_dir("export") / "layers.parquet").to_pylist()
    rows = [[r["module"], r["weight_bits"], r["act_bits"], r["n_weights"], r["weight_bytes"]]
            for r in layers]  # fmt: skip
    print(format_table("Exported layers", ["module", "w bits", "a bits", "weights", "bytes"], rows))
    if out is not None:
        dest = Path(out)
        for f in files:
            atomic_write_bytes(dest / f.name, f.read_bytes())
        files = [dest / f.name for f in files]
    print("\n" + "\n".join(str(f) for f in files))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hawq`` console script."""
    args = _parser().parse_args(argv)
    _setup_logging(args.quiet, args.log_level)
    from hawq.optional import MissingExtra
    from pipeline.atomic import StoreError
    from pipeline.backends.ray import default_auth_mode
    from pipeline.config import ConfigError
    from pipeline.pack_data import PackError

    default_auth_mode()  # before any Ray cluster is started or joined

    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    try:
        if args.command == "run":
            from pipeline.config import load_config
            from pipeline.scheduler import run

            _check_until(args.until)
            cfg = load_config(args.config, args.overrides)
            _print_outcome(run(cfg, args.run_dir, progress=progress, until=args.until))
        elif args.command == "resume":
            from pipeline.scheduler import resume

            _check_until(args.until)
            outcome = resume(args.run_dir, progress=progress, until=args.until, repair=args.repair)
            _print_outcome(outcome)
        elif args.command == "config":
            _cmd_config(args)
        elif args.command == "status":
            _cmd_status(args.run_dir, args.json)
        elif args.command == "report":
            from pipeline.report import report
            from pipeline.scheduler import load_run_config

            load_run_config(args.run_dir)  # a clear error for a wrong path
            if args.json:
                from pipeline.report import report_json

                print(json.dumps(report_json(args.run_dir), indent=2))
            else:
                print(report(args.run_dir, args.out))
        elif args.command == "export":
            _cmd_export(args, progress)
        elif args.command == "pack-data":
            from pipeline.pack_data import pack_data

            manifest = pack_data(
                args.src_dir, args.out_dir, shard_size=args.shard_size, bad_images=args.bad_images
            )
            for split, info in sorted(manifest["splits"].items()):
                print(f"{split}: {info['count']} images, {len(info['shards'])} shard(s)")
            print(args.out_dir)
    except (ConfigError, StoreError, _BadArgs, MissingExtra, PackError) as exc:
        print(f"hawq: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hawq: interrupted; continue with `hawq resume RUN_DIR`", file=sys.stderr)
        return 130
    if args.command != "config":
        log.info("%s finished in %.1fs", args.command, time.perf_counter() - t0)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
