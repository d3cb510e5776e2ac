"""``hawq-slurm``: submit a hawq run to Slurm (or print the sbatch script with ``--dry-run``).

hawq-slurm submit CONFIG --run-dir D [--set k=v ...] [--nodes N] [--partition P]
                  [--cpus-per-task C] [--gpus-per-node G] [--mem-gb M] [--time-min T]
                  [--folder F] [--no-requeue] [--setup LINE ...] [--dry-run] [--wait]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hawq.optional import MissingExtra, require
from pipeline.cli import VersionAction, add_output_options

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hawq-slurm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    add_output_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    add_output_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "submit", help="submit `hawq run CONFIG` (or resume RUN_DIR) as a job", parents=[common]
    )
    p.add_argument("config", help="run config (YAML); a RUN_DIR with a run resumes its own")
    p.add_argument("--run-dir", required=True, help="run directory (on a shared filesystem)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1, help="N > 1: a Ray cluster over N nodes")
    p.add_argument("--partition")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--mem-gb", type=float)
    p.add_argument("--time-min", type=int, default=60)
    p.add_argument("--job-name", default="hawq")
    p.add_argument("--folder", help="submitit logs (%%j = job id; default runs/slurm/%%j)")
    p.add_argument("--signal-delay-s", type=int, default=120)
    p.add_argument("--no-requeue", dest="requeue", action="store_false")
    p.add_argument("--setup", action="append", default=[], metavar="LINE")
    p.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its outcome")
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
    from slurm.launch import (
        LaunchError,
        SlurmLaunchConfig,
        make_job,
        outcome,
        sbatch_script,
        submit_run,
    )

    folder = {} if args.folder is None else {"folder": args.folder}
    try:
        cfg = SlurmLaunchConfig(
            partition=args.partition,
            nodes=args.nodes,
            cpus_per_task=args.cpus_per_task,
            gpus_per_node=args.gpus_per_node,
            mem_gb=args.mem_gb,
            time_min=args.time_min,
            job_name=args.job_name,
            **folder,
            signal_delay_s=args.signal_delay_s,
            requeue=args.requeue,
            setup=tuple(args.setup),
            cluster=args.cluster,
        )
        if args.dry_run:
            make_job(args.config, args.run_dir, args.overrides, cfg)  # validates the inputs
            sys.stdout.write(sbatch_script(cfg))
            return 0
        job = submit_run(args.config, args.run_dir, args.overrides, cfg)
        print(f"submitted job {job.job_id} ({cfg.cluster}); logs: {job.paths.stdout}")
        if args.wait:
            result = outcome(job)
            print(
                f"job {job.job_id}: {result.action} of {result.run_dir} finished "
                f"(restarts: {result.restarts}, ray nodes: {result.ray_nodes})"
            )
    except (ValueError, LaunchError) as err:
        print(f"hawq-slurm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
