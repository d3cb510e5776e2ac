"""``hawq-slurm``: submit a hawq run to Slurm; follow, read the logs of, or cancel its jobs.

hawq-slurm submit CONFIG --run-dir D [--set k=v ...] [--nodes N] [--partition P] [--account A]
                  [--qos Q] [--constraint C] [--exclusive] [--sbatch KEY[=VALUE] ...]
                  [--cpus-per-task C] [--gpus-per-node G] [--mem-gb M] [--time-min T]
                  [--interface IF] [--folder F] [--no-requeue] [--setup LINE ...]
                  [--dry-run] [--wait]
hawq-slurm sweep CONFIG --sweep-dir S --set key=v1,v2,... [submit's allocation options]
hawq-slurm status RUN_DIR     the run dir's jobs (Slurm state) and stages
hawq-slurm logs RUN_DIR       the latest job's log (--job, --task, --err)
hawq-slurm cancel RUN_DIR     scancel the run dir's jobs still queued or running
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hawq.optional import MissingExtra, require
from pipeline.cli import VersionAction, add_output_options

log = logging.getLogger(__name__)


class HELP(argparse.HelpFormatter):
    """Shows ``(default: X)`` where there is a meaningful default (not None / False / [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        quiet = (None, False, [], argparse.SUPPRESS)
        if "%(default)" in text or action.default in quiet or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _sbatch_option(text: str) -> tuple[str, str | bool]:
    """``KEY=VALUE`` or ``KEY`` (a flag) -> an ``extra_sbatch`` entry (``--`` optional)."""
    key, eq, value = text.removeprefix("--").partition("=")
    return key, (value if eq else True)


def _command(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, text: str
) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, parents=[common], formatter_class=HELP)


def _add_submit(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "submit", "submit `hawq run CONFIG` (or resume RUN_DIR) as a job")
    p.add_argument("config", help="run config (YAML); a RUN_DIR with a run resumes its own")
    p.add_argument("--run-dir", required=True, help="run directory (on a shared filesystem)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")  # fmt: skip
    _add_launch_options(p, "RUN_DIR")
    p.add_argument("--hessian-nodes", type=int, metavar="N",
                   help="two chained jobs: baseline + Hessian on N nodes (a Ray cluster), then "
                   "the other stages on --nodes nodes (afterok)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="print the hawq command, run dir, config and sbatch script; submit "
                   "nothing")  # fmt: skip
    p.add_argument("--wait", action="store_true", help="wait for the job and print its outcome")


def _add_sweep(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = _command(sub, common, "sweep", "one job array over a grid of settings; shared stages "
                 "computed once")  # fmt: skip
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--sweep-dir", required=True, help="holds points/<i>-<name>/, cache/, summary")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=V1,V2,...", help="a swept key (several values) or a fixed "
                   "override (one value); several swept keys: their product")  # fmt: skip
    _add_launch_options(p, "SWEEP_DIR")
    p.add_argument("--dry-run", action="store_true", help="list the points; submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait for every point, then write the summary")  # fmt: skip


def _add_launch_options(p: argparse.ArgumentParser, where: str) -> None:
    s = p.add_argument_group("allocation (sbatch)")
    s.add_argument("--nodes", type=int, default=1, help="N > 1: a Ray cluster over N nodes")
    s.add_argument("--partition", help="sbatch --partition")
    s.add_argument("--account", help="sbatch --account (charged for the job)")
    s.add_argument("--qos", help="sbatch --qos")
    s.add_argument("--constraint", help="sbatch --constraint (node features, e.g. 'a100&ib')")
    s.add_argument("--exclusive", action="store_true", help="whole nodes (sbatch --exclusive)")
    s.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per task (= per node)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node")
    s.add_argument("--mem-gb", type=float, help="memory per node (Slurm's default if unset)")
    s.add_argument("--time-min", type=int, default=60, help="time limit in minutes")
    s.add_argument("--job-name", default="hawq", help="sbatch --job-name")
    s.add_argument("--sbatch", dest="sbatch", action="append", default=[], type=_sbatch_option,
                   metavar="KEY[=VALUE]", help="any other sbatch option, e.g. --sbatch "
                   "mail-type=END or --sbatch hold (repeatable)")  # fmt: skip
    s.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before the job (e.g. 'source .venv/bin/activate')",
    )
    j = p.add_argument_group("job")
    j.add_argument("--interface", help="network interface for Ray and gloo/nccl (e.g. ib0)")
    j.add_argument("--folder", help="submitit pickles and logs (%%j = job id); "
                   f"default {where}/slurm/%%j")  # fmt: skip
    j.add_argument("--signal-delay-s", type=int, default=120,
                   help="USR2 this long before the time limit: checkpoint and requeue")  # fmt: skip
    j.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="stop instead of requeueing on USR2 / time limit")  # fmt: skip
    j.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="local/debug: submitit's executors on this machine, no Slurm")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hawq-slurm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    add_output_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    add_output_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_submit(sub, common)
    _add_sweep(sub, common)
    for name, text in (
        ("status", "the run dir's Slurm jobs and their states, then its stages"),
        ("logs", "print a job's log (default: the latest job, task 0, stdout)"),
        ("cancel", "scancel the run dir's jobs that are still queued or running"),
    ):
        p = _command(sub, common, name, text)
        p.add_argument("run_dir", help="a run dir submitted with `hawq-slurm submit`")
        if name == "logs":
            p.add_argument("--job", help="job id (default: the latest)")
            p.add_argument("--task", type=int, default=0, help="task (rank)")
            p.add_argument("--err", action="store_true", help="stderr instead of stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("WARNING" if args.quiet else "INFO")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        require("submitit", feature="hawq-slurm")
    except MissingExtra as err:
        print(f"hawq-slurm: error: {err}", file=sys.stderr)
        return 2
    from slurm.launch import LaunchError

    try:
        if args.command == "submit":
            return _submit(args)
        if args.command == "sweep":
            return _sweep(args)
        return _follow(args)
    except (ValueError, LaunchError) as err:
        print(f"hawq-slurm: error: {err}", file=sys.stderr)
        return 2


def _launch_config(args: argparse.Namespace) -> Any:
    from slurm.launch import SlurmLaunchConfig

    return SlurmLaunchConfig(
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclusive=args.exclusive,
        nodes=args.nodes,
        cpus_per_task=args.cpus_per_task,
        gpus_per_node=args.gpus_per_node,
        mem_gb=args.mem_gb,
        time_min=args.time_min,
        job_name=args.job_name,
        folder=args.folder,
        signal_delay_s=args.signal_delay_s,
        requeue=args.requeue,
        setup=tuple(args.setup),
        extra_sbatch=dict(args.sbatch),
        cluster=args.cluster,
        interface=args.interface,
    )


def _submit(args: argparse.Namespace) -> int:
    from slurm.launch import describe_submission, outcome, submit_run

    cfg = _launch_config(args)
    if args.hessian_nodes is not None:
        return _submit_staged(args, cfg)
    if args.dry_run:
        sys.stdout.write(describe_submission(args.config, args.run_dir, args.overrides, cfg))
        return 0
    job = submit_run(args.config, args.run_dir, args.overrides, cfg)
    print(f"submitted job {job.job_id} ({cfg.cluster}); logs: {job.paths.stdout}")
    if args.wait:
        result = outcome(job)
        print(
            f"job {job.job_id}: {result.action} of {result.run_dir} finished "
            f"(restarts: {result.restarts}, ray nodes: {result.ray_nodes})"
        )
    return 0


def _submit_staged(args: argparse.Namespace, cfg: Any) -> int:
    from dataclasses import replace

    from slurm.launch import describe_submission, outcome
    from slurm.staged import submit_staged

    hessian_cfg = replace(cfg, nodes=args.hessian_nodes)
    if args.dry_run:
        text = describe_submission(args.config, args.run_dir, args.overrides, hessian_cfg)
        sys.stdout.write(f"# job 1 (baseline, hessian):\n{text}# job 2 (the other stages, "
                         f"afterok on job 1): {cfg.nodes} node(s)\n")  # fmt: skip
        return 0
    first, second = submit_staged(args.config, args.run_dir, args.overrides, hessian_cfg, cfg)
    print(f"submitted job {first.job_id} (baseline, hessian on {args.hessian_nodes} node(s)) "
          f"and job {second.job_id} (the rest, afterok)")  # fmt: skip
    if args.wait:
        outcome(first)
        result = outcome(second)
        print(f"job {second.job_id}: {result.action} of {result.run_dir} finished")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from slurm.launch import make_job, outcome
    from slurm.sweep import submit_sweep, sweep_points, write_summary

    cfg = _launch_config(args)
    if args.dry_run:
        root = Path(args.sweep_dir).expanduser().absolute()
        for p in sweep_points(args.overrides, root):
            make_job(args.config, p.run_dir, p.overrides, cfg.for_run_dir(root))  # validates
            print(f"point {p.name}: {' '.join(p.overrides)} -> {p.run_dir}")
        return 0
    jobs, summary = submit_sweep(args.config, args.sweep_dir, args.overrides, cfg)
    array = jobs[0].job_id.split("_")[0] if cfg.cluster == "slurm" else None
    print(f"submitted {len(jobs)} points ({cfg.cluster}" + (f", array {array})" if array else ")"))
    if summary is not None:
        print(f"summary job {summary.job_id} (afterok on the array)")
    if args.wait:
        for job in jobs:
            outcome(job)
        if summary is not None:
            summary.result()
        else:
            write_summary(args.sweep_dir)
        print(f"summary: {Path(args.sweep_dir) / 'summary.parquet'}")
    return 0


def _follow(args: argparse.Namespace) -> int:
    """status / logs / cancel: the jobs recorded in ``RUN_DIR/slurm/jobs.json``."""
    from slurm.run_record import recorded_jobs, slurm_states

    jobs = recorded_jobs(args.run_dir)
    if not jobs:
        raise ValueError(
            f"{args.run_dir}: no jobs recorded (no slurm/jobs.json). Fix: pass a run dir "
            "submitted with `hawq-slurm submit`."
        )
    slurm_ids = [j.job_id for j in jobs if j.cluster == "slurm"]
    states = slurm_states(slurm_ids)
    if args.command == "logs":
        record = next((j for j in jobs if j.job_id == args.job), None) if args.job else jobs[-1]
        if record is None:
            raise ValueError(f"job {args.job}: not a job of {args.run_dir}")
        path = record.log_path(args.task, "err" if args.err else "out")
        if not path.exists():
            raise ValueError(f"{path}: no such log (yet). Fix: check `hawq-slurm status`.")
        sys.stdout.write(path.read_text(errors="replace"))
        return 0
    if args.command == "cancel":
        live = [j for j in slurm_ids if states[j] in ACTIVE]
        if live:
            subprocess.run(["scancel", *live], check=True)
        print(f"cancelled: {' '.join(live) or '(no job queued or running)'}")
        return 0
    for j in jobs:
        state = states.get(j.job_id, f"({j.cluster})")
        print(f"job {j.job_id:<12} {state:<12} config {j.config}  logs {j.log_path()}")
    _print_stages(args.run_dir)
    return 0


ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def _print_stages(run_dir: str) -> None:
    if not (Path(run_dir) / "config.yaml").exists():
        print("stages: the run has not started yet")
        return
    from pipeline.cli import main as hawq_main

    hawq_main(["status", run_dir])


if __name__ == "__main__":
    sys.exit(main())
