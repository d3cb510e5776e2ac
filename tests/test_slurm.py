"""slurm/: launch config, golden sbatch scripts, and real jobs on a one-host Slurm cluster.

The ``slurm_cluster`` fixture starts a real slurmctld + two slurmd (nodes n1, n2) + slurmdbd with
``slurm/local/start_slurm.sh`` in a temp dir (installing the Debian packages when run as root
and they are missing, as in CI) and stops them by PID at the end. Without Slurm and without
root it skips, saying why. Set HAWQ_UPDATE_GOLDEN=1 to rewrite tests/golden/*.sh.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pyarrow.parquet as pq
import pytest
import submitit
from tiny_run import assert_same_outputs

from pipeline.config import load_config
from pipeline.scheduler import run
from pipeline.store import RunStore
from slurm import cli
from slurm.allocation import check_allocation
from slurm.launch import (
    HawqRunJob,
    LaunchError,
    SlurmLaunchConfig,
    make_executor,
    make_job,
    outcome,
    sbatch_script,
    submit_run,
)
from slurm.ray_cluster import NodeResources
from slurm.ray_network import (
    JOB_SLOTS,
    NODES_PER_HOST,
    free_ray_ports,
    interface_address,
    ray_ports,
)
from slurm.run_record import recorded_jobs
from slurm.staged import submit_staged
from slurm.sweep import submit_sweep

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# quickstart, shrunk to seconds: 1 baseline epoch, few HVPs, a small evaluation set
TINY = (
    "baseline.train_epochs=1",
    "hessian.max_iter=5",
    "hessian.trace_min_probes=4",
    "hessian.trace_max_probes=8",
    "data.eval_size=100",
)
TINY_LOCAL = (*TINY, "backend.kind=local", "backend.data_shards=1", "data.hessian_samples=128")


# --------------------------------------------------------------------------- config and scripts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes: 0 must be an integer >= 1"),
        ({"cpus_per_task": 1.5}, "cpus_per_task"),
        ({"gpus_per_node": -1}, "gpus_per_node: -1 must be an integer >= 0"),
        ({"mem_gb": 0}, "mem_gb"),
        ({"time_min": 2, "signal_delay_s": 120}, "shorter than the time limit"),
        ({"job_name": "a b"}, "job_name"),
        ({"partition": "gpu;rm"}, "partition"),
        ({"cluster": "pbs"}, "cluster: 'pbs'"),
        ({"nodes": 2, "cluster": "local"}, "needs cluster='slurm'"),
        ({"tasks_per_node": 2, "cluster": "debug"}, "'debug' runs one task"),
        ({"setup": ("echo a\necho b",)}, "setup[0]"),
        ({"extra_sbatch": {"--account": "x"}}, "extra_sbatch"),
        ({"folder": ""}, "folder"),
    ],
)
def test_launch_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SlurmLaunchConfig(**kwargs)


def _normalised_script(cfg: SlurmLaunchConfig, folder: Path) -> str:
    text = sbatch_script(cfg)
    return text.replace(str(folder), "{FOLDER}").replace(sys.executable, "{PYTHON}")


GOLDEN_CASES = {
    "sbatch_1node.sh": {
        "partition": "debug",
        "cpus_per_task": 2,
        "mem_gb": 4,
        "time_min": 30,
        "job_name": "hawq-quickstart",
        "signal_delay_s": 90,
        "setup": ("source .venv/bin/activate", "export RAY_AUTH_MODE=disabled"),
    },
    "sbatch_2node.sh": {
        "nodes": 2,
        "cpus_per_task": 8,
        "gpus_per_node": 1,
        "mem_gb": 7.5,
        "time_min": 240,
        "requeue": False,
        "account": "hawq-proj",
        "qos": "high",
        "constraint": "a100&ib",
        "exclusive": True,
        "extra_sbatch": {"mail-type": "END", "hold": True},
    },
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_sbatch_script_matches_golden(name, tmp_path):
    folder = tmp_path / "jobs" / "%j"
    cfg = SlurmLaunchConfig(folder=str(folder), **GOLDEN_CASES[name])
    text = _normalised_script(cfg, folder)
    if os.environ.get("HAWQ_UPDATE_GOLDEN") == "1":
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text()


def test_cli_dry_run_shows_command_config_run_dir_and_script(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["submit", str(QUICKSTART), "--run-dir", str(run_dir), "--dry-run"]
    argv += ["--nodes", "2", "--cpus-per-task", "2", "--mem-gb", "4", "--time-min", "30"]
    argv += ["--account", "proj", "--qos", "high", "--constraint", "ib", "--exclusive"]
    argv += ["--sbatch", "mail-type=END", "--sbatch=--hold", "--set", "allocation.compression=6"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"hawq run {QUICKSTART} --run-dir {run_dir} --set allocation.compression=6" in printed
    assert f"# run dir: {run_dir}\n" in printed
    assert f"# Slurm logs: {run_dir}/slurm/%j\n" in printed  # logs inside the run dir
    assert "compression: 6" in printed.split("# resolved config:")[1]
    script = printed.split("# sbatch script:\n")[1]
    assert script == sbatch_script(
        SlurmLaunchConfig(
            nodes=2, cpus_per_task=2, mem_gb=4, time_min=30, account="proj", qos="high",
            constraint="ib", exclusive=True, extra_sbatch={"mail-type": "END", "hold": True},
            folder=str(run_dir / "slurm" / "%j"),
        )
    )  # fmt: skip
    for line in ("--account=proj", "--qos=high", "--constraint=ib", "--exclusive", "--hold",
                 "--mail-type=END", "--nodes=2", "--requeue"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert not run_dir.exists()  # a dry run writes nothing
    assert cli.main([*argv, "--time-min", "1"]) == 2
    assert "signal_delay_s" in capsys.readouterr().err


def test_submit_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--time-min TIME_MIN time limit in minutes (default: 60)",
                     "--cpus-per-task CPUS_PER_TASK CPUs per task (= per node) (default: 1)",
                     "--signal-delay-s", "(default: 120)", "--sbatch KEY[=VALUE]",
                     "default RUN_DIR/slurm/%j"):  # fmt: skip
        assert expected in text


def test_make_job_validates_inputs(tmp_path):
    with pytest.raises(LaunchError, match="does not exist"):
        make_job(tmp_path / "missing.yaml", tmp_path / "run")
    with pytest.raises(ValueError, match="key.path=value"):
        make_job(QUICKSTART, tmp_path / "run", ["not-an-override"])
    two = SlurmLaunchConfig(nodes=2)
    with pytest.raises(ValueError, match="sets the Ray backend itself"):
        make_job(QUICKSTART, tmp_path / "run", ["backend.address=1.2.3.4:6379"], two)
    with pytest.raises(ValueError, match="Fix: --cpus-per-task 2"):  # quickstart: 2 actors
        make_job(QUICKSTART, tmp_path / "run", ["run.seed=1"])
    job = make_job(QUICKSTART, "rel/run", ["run.seed=1"], SlurmLaunchConfig(cpus_per_task=2))
    assert Path(job.run_dir).is_absolute() and Path(job.config_path) == QUICKSTART


def test_checkpoint_requeues_the_same_callable_unless_disabled(tmp_path):
    job = HawqRunJob(config_path=str(QUICKSTART), run_dir=str(tmp_path))
    delayed = job.checkpoint()
    assert delayed is not None and delayed.function is job and not delayed.args
    assert HawqRunJob(config_path="c", run_dir="d", requeue=False).checkpoint() is None


def test_ray_ports_are_pinned_and_disjoint():
    seen: dict[int, tuple[int, int]] = {}
    for job_id in range(JOB_SLOTS):
        for rank in range(NODES_PER_HOST):
            ports = ray_ports(job_id, rank)
            fixed = [v for k, v in vars(ports).items() if k not in ("min_worker", "max_worker")]
            values = [*fixed, *range(ports.min_worker, ports.max_worker + 1)]
            for port in values:
                assert 1024 < port < 32768  # below the ephemeral range
                assert port not in seen, f"{port}: job {job_id} rank {rank} vs {seen[port]}"
                seen[port] = (job_id, rank)
    assert ray_ports(7, 0) == ray_ports(7 + JOB_SLOTS, 0)  # ids wrap around
    head = " ".join(ray_ports(5, 0).args(head=True))
    assert (
        "--port=" in head
        and "=0 " not in head
        and "--port=" not in " ".join(ray_ports(5, 1).args(head=False))
    )


def test_node_resources_follow_the_allocation():
    env = {"SLURM_CPUS_ON_NODE": "8", "SLURM_MEM_PER_NODE": "10240", "CUDA_VISIBLE_DEVICES": "0,1"}
    res = NodeResources.from_allocation(env, tasks_on_node=2)
    assert (res.num_cpus, res.num_gpus) == (4, 2)
    assert res.object_store_bytes == int(5120 * 1024**2 * 0.3)
    res = NodeResources.from_allocation({"SLURM_CPUS_PER_TASK": "3", "SLURM_MEM_PER_NODE": "100"})
    assert (res.num_cpus, res.num_gpus) == (3, 0)
    assert res.object_store_bytes >= 75 * 1024**2  # Ray's minimum
    assert "--object-store-memory=" in " ".join(res.args())


def test_busy_ports_move_to_the_next_free_block():
    preferred = ray_ports(9, 1)
    assert free_ray_ports(9, 1, is_free=lambda p: True) == preferred
    busy = {preferred.max_worker}  # one worker port of the preferred block is taken
    moved = free_ray_ports(9, 1, is_free=lambda p: p not in busy)
    assert moved.gcs == preferred.gcs + 100 and moved.gcs != ray_ports(9, 0).gcs
    assert free_ray_ports(9, 1, skip=2, is_free=lambda p: True).gcs == preferred.gcs + 200
    with socket.socket() as sock:  # a real listener on the preferred GCS port
        sock.bind(("", ray_ports(3, 0).gcs))
        sock.listen()
        assert free_ray_ports(3, 0).gcs != ray_ports(3, 0).gcs


def test_interface_address_and_unknown_interface():
    assert interface_address("lo") == "127.0.0.1"
    with pytest.raises(ValueError, match="interface 'nosuch0' has no IPv4 address.*lo"):
        interface_address("nosuch0")


def test_cpus_follow_affinity_and_the_allocation():
    from pipeline.backends.ray.config import available_cpus, private_temp_dir

    affinity = len(os.sched_getaffinity(0))
    assert available_cpus({}) == affinity
    assert available_cpus({"SLURM_CPUS_ON_NODE": "1"}) == 1
    assert available_cpus({"SLURM_CPUS_ON_NODE": str(affinity + 8)}) == affinity
    res = NodeResources.from_allocation({"SLURM_CPUS_PER_TASK": "16"}, affinity=3)
    assert res.num_cpus == 3
    assert private_temp_dir({"SLURM_JOB_ID": "12"}) == "/tmp/hawq-ray-12-private"
    assert private_temp_dir({}) is None


@pytest.mark.parametrize(
    ("launch", "sets", "flag"),
    [
        ({"nodes": 2, "cpus_per_task": 1}, ["backend.data_shards=2", "backend.block_groups=2"],
         "--cpus-per-task 2"),
        ({"cpus_per_task": 2}, ["backend.kind=ray", "backend.cpus_per_actor=3"],
         "--cpus-per-task 3"),
        ({"nodes": 2, "cpus_per_task": 2}, ["backend.gpus_per_actor=1"], "--gpus-per-node 1"),
        ({"nodes": 2, "cpus_per_task": 2, "mem_gb": 1}, ["data.hessian_samples=200000",
         "hessian.dtype=float64"], "the Ray object store of each node (307 MiB"),
        ({"nodes": 2, "cpus_per_task": 2}, ["distributed.world_size=5"],
         "distributed.world_size=5 workers need 5 CPUs; the job has 4. Fix: more --nodes"),
        ({"nodes": 2, "cpus_per_task": 2}, ["distributed.world_size=2",
         "distributed.gpus_per_worker=1"], "need 2 GPUs; the job has 0"),
        ({"cpus_per_task": 2}, ["distributed.world_size=2", "distributed.cpus_per_worker=3"],
         "--cpus-per-task 3"),
    ],
)  # fmt: skip
def test_grid_that_does_not_fit_the_allocation_names_the_flag(launch, sets, flag):
    cfg = load_config(QUICKSTART, [*TINY, *sets])
    with pytest.raises(ValueError, match=re.escape(flag)):
        check_allocation(cfg, SlurmLaunchConfig(**launch))
    fits = {**launch, "cpus_per_task": 8, "gpus_per_node": 1, "mem_gb": 64}
    check_allocation(cfg, SlurmLaunchConfig(**fits))  # enough of everything: no error


def test_debug_executor_runs_then_resumes_the_pipeline(tmp_path, capsys):
    """cluster='debug' runs the job in-process: a first job runs, a second one (CLI) resumes."""
    run_dir = tmp_path / "run"
    folder = str(tmp_path / "jobs" / "%j")
    cfg = SlurmLaunchConfig(cluster="debug", folder=folder)
    config = tmp_path / "edited.yaml"
    shutil.copy(QUICKSTART, config)
    job = submit_run(config, run_dir, (*TINY_LOCAL, "run.seed=3"), cfg)
    # the queued job holds a snapshot: editing the YAML now does not change it
    config.write_text(config.read_text().replace("compression:", "compression: 2 #"))
    snapshot = run_dir / "slurm" / "submitted-1.yaml"
    assert load_config(snapshot).run.seed == 3
    assert load_config(config).allocation.compression == 2
    assert load_config(snapshot).allocation.compression == 6
    (record,) = recorded_jobs(run_dir)
    assert (record.job_id, record.cluster, record.config) == (job.job_id, "debug", str(snapshot))
    first = outcome(job)
    assert load_config(run_dir / "config.yaml").allocation == load_config(snapshot).allocation
    assert (first.action, first.ray_nodes, first.restarts) == ("run", 0, 0)
    assert [p.action for p in first.result.plan] == ["run"] * len(first.result.plan)
    assert (run_dir / "stages" / "export" / "model_int.safetensors").exists()
    done = RunStore(run_dir).read_manifest()
    argv = ["submit", str(QUICKSTART), "--run-dir", str(run_dir), "--cluster", "debug"]
    sets = [a for o in (*TINY_LOCAL, "run.seed=3") for a in ("--set", o)]
    assert cli.main([*argv, *sets, "--folder", folder, "--wait"]) == 0
    printed = capsys.readouterr().out
    assert f"resume of {run_dir} finished (restarts: 0, ray nodes: 0)" in printed
    assert RunStore(run_dir).read_manifest() == done  # every stage was skipped
    assert [r.config for r in recorded_jobs(run_dir)][1].endswith("submitted-2.yaml")
    assert cli.main(["status", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(debug)") == 2 and "export" in printed and "done" in printed


# --------------------------------------------------------------------------- real Slurm


def _free_port_block(count: int) -> int:
    """A base port whose ``count`` successors are free now (above the ephemeral range)."""
    for base in range(61000 + os.getpid() % 40 * 100, 65000, 100):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """A real one-host Slurm cluster (controller, nodes n1 n2, accounting) for this session."""
    have = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "slurmdbd"))
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not have and not (root and shutil.which("apt-get")):
        pytest.skip("Slurm is not installed and cannot be (needs root and apt-get)")
    if not root:
        pytest.skip("the one-host Slurm cluster runs its daemons as root")
    # not under pytest's tmp dir: that one is 0700 and the mysql/munge users must reach it
    base = Path(tempfile.mkdtemp(prefix="hawq-slurm-"))
    base.chmod(0o755)
    port = _free_port_block(8)
    env = {
        **os.environ,
        "SLURM_BASE": str(base),
        "SLURMCTLD_PORT": str(port),
        "SLURMDBD_PORT": str(port + 1),
        "MARIADB_PORT": str(port + 2),
        "SLURMD_PORT_BASE": str(port + 3),  # nodes on port + 4, port + 5
        "SLURM_CLUSTER_NAME": f"hawq{port}",
    }
    scripts = ROOT / "slurm" / "local"
    t0 = time.monotonic()
    started = subprocess.run(
        ["bash", str(scripts / "start_slurm.sh")], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(scripts / "stop_slurm.sh")], env=env, check=False)
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"start_slurm.sh failed:\n{started.stdout}\n{started.stderr}")
    print(f"\n[slurm_cluster] up in {time.monotonic() - t0:.1f}s\n{started.stdout}")
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "RAY_AUTH_MODE")}
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield base
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        subprocess.run(["bash", str(scripts / "stop_slurm.sh")], env=env, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _slurm_cfg(tmp_path: Path, **kwargs) -> SlurmLaunchConfig:
    kwargs = {"time_min": 10, "signal_delay_s": 60, **kwargs}
    return SlurmLaunchConfig(cluster="slurm", folder=str(tmp_path / "jobs" / "%j"), **kwargs)


def _whoami(x: int) -> tuple[int, str, int, int, str]:
    env = submitit.JobEnvironment()
    return x * 2, env.job_id, env.global_rank, env.num_tasks, os.environ["SLURM_JOB_NODELIST"]


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def _wait_completed(job: submitit.Job, timeout_s: float = 60) -> None:
    """Until sacct says the whole job COMPLETED (every task exited 0); accounting may lag."""
    deadline = time.monotonic() + timeout_s
    while (state := job.watcher.get_state(job.job_id, mode="force")) != "COMPLETED":
        assert time.monotonic() < deadline, f"job {job.job_id}: sacct state {state!r}"
        time.sleep(1)


def test_slurm_runs_a_function_with_the_dry_run_script(slurm_cluster, tmp_path):
    cfg = _slurm_cfg(tmp_path, nodes=2)
    module = sys.modules[__name__]  # jobs cannot import this test module: send it by value
    cloudpickle.register_pickle_by_value(module)
    try:
        job = make_executor(cfg).submit(_whoami, 21)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    results = job.results()
    assert [r[2] for r in results] == [0, 1]
    assert {r[:2] for r in results} == {(42, job.job_id)}
    assert {r[3:] for r in results} == {(2, "n[1-2]")}
    folder = Path(str(cfg.folder).replace("%j", job.job_id))
    submitted = (folder / f"{job.job_id}_submission.sh").read_text()
    assert submitted == sbatch_script(cfg)
    _wait_completed(job)


def _pause_usr2_requeue(job: submitit.Job, marker: Path) -> None:
    """Wait until the job pauses (writes ``marker``), send USR2, wait for the requeue, and let
    the requeued job start at once."""
    _wait_marker(job, marker)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    _wait_requeued(job)


def _wait_marker(job: submitit.Job, marker: Path) -> None:
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert not job.done(), f"job ended before the test hook:\n{_job_report(job)}"
        assert time.monotonic() < deadline, f"job never reached the test hook:\n{_job_report(job)}"
        time.sleep(0.5)


def _wait_requeued(job: submitit.Job) -> None:
    """Until the job is pending again after a requeue; then let it start at once.

    Not within the second its first start was killed: the node revokes the job's credential
    with that second's time stamp and refuses a start whose credential is not newer ("Job N
    already killed, do not launch batch job"); the controller then ends the job FAILED, and
    it never runs again. (Slurm's own requeue delay, which StartTime=now skips, avoids this.)
    """
    deadline = time.monotonic() + 90
    while (state := _squeue_state(job.job_id)) != "PENDING":
        assert time.monotonic() < deadline, f"job not requeued (state {state!r}):\n" + (
            _job_report(job)
        )
        time.sleep(0.5)
    killed_by = math.floor(time.time())  # the kill came before the job was pending again
    time.sleep(max(0.0, killed_by + 1.05 - time.time()))
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)


def _reported(job: submitit.Job, get: Callable[[submitit.Job], Any]) -> Any:
    """``get(job)`` (e.g. :func:`outcome`); if the job failed, the error shows
    :func:`_job_report`."""
    try:
        return get(job)
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        raise AssertionError(f"job {job.job_id} failed: {err}\n{_job_report(job)}") from err


def _job_report(job: submitit.Job) -> str:
    """What Slurm says about ``job``: queue state, ``scontrol``, ``sacct`` (every start), the
    controller's and nodes' log lines naming it (the cluster's logs go with the fixture), and
    the ends of each task's stdout and stderr."""

    def run(*cmd: str) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (out.stdout + out.stderr).strip()

    jid = job.job_id
    names_job = re.compile(rf"(JobId=|[Jj]ob |\[){re.escape(jid)}\b")
    logs = Path(os.environ["SLURM_CONF"]).parents[1] / "log"
    daemons = [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("slurm*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if names_job.search(line)
    ]
    outputs = [
        f"--- {path.name} (tail):\n"
        + "\n".join(path.read_text(errors="replace").splitlines()[-25:])
        for task in range(job.num_tasks)
        for path in (job.task(task).paths.stdout, job.task(task).paths.stderr)
        if path.exists()
    ]
    return "\n".join(
        [
            f"--- squeue: {run('squeue', '-h', '-j', jid, '-o', '%T %r %N')!r}",
            f"--- scontrol show job:\n{run('scontrol', '-o', 'show', 'job', jid)}",
            "--- sacct (every start):\n"
            + run("sacct", "-D", "-P", "-j", jid, "-o", "JobID,State,ExitCode,Start,End,NodeList"),
            "--- Slurm daemon log lines naming the job:",
            *daemons[-40:],
            *outputs,
        ]
    )


def _pause_once(monkeypatch, tmp_path: Path, point: str) -> tuple[Path, tuple[str, ...]]:
    """Pause the job at ``point`` on its first start only (the batch script runs again on
    requeue); returns the marker file and the setup line."""
    marker = tmp_path / "paused"
    monkeypatch.setenv("HAWQ_TEST_PAUSE_AT", point)
    monkeypatch.setenv("HAWQ_TEST_PAUSE_FILE", str(marker))
    return marker, (f"[ -e {marker} ] && unset HAWQ_TEST_PAUSE_AT || true",)


def test_slurm_job_requeued_by_usr2_resumes_the_run(slurm_cluster, tmp_path, monkeypatch):
    """USR2 in the middle of a fine-tuning step (the test hook signals the job itself, as
    Slurm would): the state is saved after that step, submitit checkpoints and requeues, and
    the new start resumes at the saved step; outputs equal an uninterrupted run's."""
    run_dir, marker = tmp_path / "run", tmp_path / "signalled"
    monkeypatch.setenv("HAWQ_TEST_SIGNAL_AT", "finetune:step:2:7")
    monkeypatch.setenv("HAWQ_TEST_PAUSE_FILE", str(marker))
    setup = (f"[ -e {marker} ] && unset HAWQ_TEST_SIGNAL_AT || true",)  # on the requeue
    job = submit_run(QUICKSTART, run_dir, TINY_LOCAL, _slurm_cfg(tmp_path, setup=setup))
    _wait_marker(job, marker)
    _wait_requeued(job)
    assert marker.read_text() == "finetune:step:2:7"
    result = _reported(job, outcome)
    assert (result.action, result.restarts) == ("resume", 1)
    actions = {p.stage: p.action for p in result.result.plan}
    assert actions["baseline"] == actions["hessian"] == "skip"
    assert actions["finetune"] == "resume"
    assert (run_dir / "stages" / "export" / "model_int.safetensors").exists()
    log = job.stderr()
    assert "preemption requested: saving the training state at the next step" in log
    assert "checkpoint: requeueing" in log
    assert "resuming training after stage 2 epoch 0, 7 steps into the next" in log
    # bit for bit what an uninterrupted run of the same config writes (wall-clock aside)
    clean = tmp_path / "clean"
    monkeypatch.delenv("HAWQ_TEST_SIGNAL_AT")  # this process must not signal itself
    run(load_config(QUICKSTART, TINY_LOCAL), clean, progress=False)
    assert assert_same_outputs(clean, run_dir) >= 20


TWO_NODE = (*TINY, "backend.data_shards=2", "data.hessian_samples=256", "hessian.dtype=float64")
_TWO_NODE_RUNS: dict[str, Path] = {}  # an uninterrupted 2-node run, for the requeue test


def test_two_node_ray_cluster_runs_the_pipeline(slurm_cluster, tmp_path):
    """sbatch -N2: rank 0 heads Ray and drives the pipeline on 2 nodes; rank 1 exits after."""
    run_dir = tmp_path / "run"
    overrides = TWO_NODE
    cfg = _slurm_cfg(tmp_path, nodes=2, cpus_per_task=2, mem_gb=2)
    job = submit_run(QUICKSTART, run_dir, overrides, cfg)
    head, worker = job.results()
    assert worker is None
    assert (head.action, head.ray_nodes) == ("run", 2)
    assert (run_dir / "stages" / "export" / "model_int.safetensors").exists()
    folder = Path(str(cfg.folder).replace("%j", job.job_id))
    rendezvous = folder / f"ray-{job.job_id}-0"
    assert (rendezvous / "done").exists()
    address = (rendezvous / "head_address").read_text()
    assert address.endswith(f":{ray_ports(int(job.job_id), 0).gcs}")  # preferred ports free
    # the run dir never stores the (now dead) head's address
    assert load_config(run_dir / "config.yaml").backend.address is None
    assert address not in (run_dir / "config.yaml").read_text()
    _wait_completed(job)  # the worker left on the sentinel: the job did not hang
    _TWO_NODE_RUNS["clean"] = run_dir
    assert "sentinel seen; stopping Ray" in job.task(1).stderr()
    leftovers = subprocess.run(
        ["pgrep", "-f", f"hawq-ray-{job.job_id}-"], capture_output=True, text=True
    ).stdout.split()
    assert not leftovers, f"Ray processes of job {job.job_id} survived: {leftovers}"
    # the Hessian rows equal a single-process run's (same baseline: same seed, one thread)
    local = tmp_path / "local"
    run(load_config(QUICKSTART, [*overrides, "backend.kind=local"]), local, until="hessian")
    got, want = (
        pq.read_table(d / "stages" / "hessian" / "sensitivity.parquet").to_pylist()
        for d in (run_dir, local)
    )
    assert (
        [r["block"] for r in got] == [r["block"] for r in want] == ["conv1", "conv2", "fc1", "fc2"]
    )
    for g, w in zip(got, want, strict=True):
        for col in ("modules", "n_params", "hvps", "converged", "trace_probes", "seed"):
            assert g[col] == w[col], (g["block"], col)
        for col in ("eigenvalue", "residual", "trace", "trace_stderr"):
            assert g[col] == pytest.approx(w[col], rel=1e-8), (g["block"], col)


def test_two_node_job_trains_and_evaluates_data_parallel_on_both_nodes(slurm_cluster, tmp_path):
    """sbatch -N2 with distributed.world_size=2: baseline training, fine-tuning and evaluation
    run on two Ray workers, one on each Ray node of the job (their ``ranks.parquet``)."""
    run_dir = tmp_path / "run"
    overrides = (*TINY, "distributed.world_size=2", "finetune.checkpoint_every_steps=3")
    job = submit_run(
        QUICKSTART, run_dir, overrides, _slurm_cfg(tmp_path, nodes=2, cpus_per_task=2, mem_gb=2)
    )
    head, worker = job.results()
    assert worker is None and (head.action, head.ray_nodes) == ("run", 2)
    assert (run_dir / "stages" / "export" / "model_int.safetensors").exists()
    nodes = set()
    for stage in ("baseline", "finetune", "evaluate"):
        ranks = pq.read_table(run_dir / "stages" / stage / "ranks.parquet").to_pylist()
        assert [(r["world_size"], r["rank"]) for r in ranks] == [(2, 0), (2, 1)], stage
        assert len({r["node"] for r in ranks}) == 2, (stage, ranks)  # one rank per Ray node
        nodes |= {r["node"] for r in ranks}
    assert len(nodes) == 2  # the job's two Ray nodes, the same in every stage
    log = job.stderr()
    assert log.count("data parallel: 2 workers on 2 node(s)") == 3
    _wait_completed(job)


def test_invalid_config_submits_nothing_to_slurm(slurm_cluster, tmp_path, capsys):
    """A config error, or an actor grid the allocation cannot hold, stops `hawq-slurm submit`
    before sbatch: no job, no job folder."""
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    folder = tmp_path / "jobs"
    argv = ["submit", str(QUICKSTART), "--run-dir", str(tmp_path / "run")]
    argv += ["--set", "allocation.compresion=8", "--folder", str(folder / "%j")]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "allocation.compresion: unknown key" in err
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert after == before and not folder.exists()
    # a grid larger than the allocation: the flag to change, nothing submitted or written
    run_dir = tmp_path / "grid"
    argv = ["submit", str(QUICKSTART), "--run-dir", str(run_dir), "--nodes", "2"]
    argv += ["--cpus-per-task", "1", "--set", "backend.data_shards=2", "--set",
             "backend.block_groups=2"]  # fmt: skip
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "needs 4 CPUs" in err and "Fix: --cpus-per-task 2" in err
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert after == before and not run_dir.exists()


def _job_processes(job_id: str) -> list[str]:
    """Processes of the job's Ray nodes or private Ray (their temp dirs name the job)."""
    out = subprocess.run(["pgrep", "-af", f"hawq-ray-{job_id}-"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


def test_cancel_stops_every_process_and_a_one_node_resume_completes(
    slurm_cluster, tmp_path, monkeypatch, capsys
):
    """hawq-slurm status/logs/cancel RUN_DIR on a 2-node job paused in the Hessian stage; then
    the lock of the cancelled job is stale and `hawq resume` on one node (private Ray) ends it."""
    marker, run_dir = tmp_path / "paused", tmp_path / "run"
    monkeypatch.setenv("HAWQ_TEST_PAUSE_AT", "hessian:block:1")
    monkeypatch.setenv("HAWQ_TEST_PAUSE_FILE", str(marker))
    sets = [a for o in (*TINY, "backend.data_shards=2") for a in ("--set", o)]
    argv = ["submit", str(QUICKSTART), "--run-dir", str(run_dir), *sets, "--nodes", "2"]
    argv += ["--cpus-per-task", "2", "--mem-gb", "2", "--time-min", "10", "--signal-delay-s", "60"]
    assert cli.main(argv) == 0
    (record,) = recorded_jobs(run_dir)
    job_id = record.job_id
    assert str(record.folder_path()).startswith(str(run_dir / "slurm"))  # logs in the run dir
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline, f"never paused:\n{record.log_path(0, 'err')}"
        time.sleep(0.5)
    assert _job_processes(job_id)  # its Ray is up (the check below can see it)
    capsys.readouterr()
    assert cli.main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    assert f"job {job_id}" in status and "RUNNING" in status and "hessian" in status
    assert cli.main(["logs", str(run_dir), "--err"]) == 0
    assert "Ray cluster" in capsys.readouterr().out
    assert cli.main(["cancel", str(run_dir)]) == 0
    assert f"cancelled: {job_id}" in capsys.readouterr().out
    deadline = time.monotonic() + 120
    while _squeue_state(job_id) or _job_processes(job_id):
        assert time.monotonic() < deadline, f"left behind: {_job_processes(job_id)}"
        time.sleep(1)
    # the killed driver left its lock; make its pid look alive, so only Slurm can say it is stale
    lock = json.loads((run_dir / "lock").read_text())
    assert lock["job_id"] == job_id
    lock["pid"], lock["start"] = os.getpid(), None
    (run_dir / "lock").write_text(json.dumps(lock))
    assert not RunStore(run_dir).is_locked()  # squeue: the job no longer runs
    monkeypatch.delenv("HAWQ_TEST_PAUSE_AT")
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "resume", str(run_dir)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Slurm job {job_id} is no longer running" in resumed.stderr
    assert (run_dir / "stages" / "export" / "model_int.safetensors").exists()
    assert not (run_dir / "lock").exists()


def test_usr2_in_the_two_node_hessian_requeues_and_skips_finished_work(
    slurm_cluster, tmp_path, monkeypatch
):
    """USR2 while the 2-node job is in the Hutchinson phase (2 probes saved): the job requeues,
    forms a new 2-node Ray cluster, skips the finished blocks and probes, and its outputs equal
    an uninterrupted 2-node run's, bit for bit."""
    run_dir = tmp_path / "run"
    marker, setup = _pause_once(monkeypatch, tmp_path, "hessian:probe-saved:2")
    cfg = _slurm_cfg(tmp_path, nodes=2, cpus_per_task=2, mem_gb=2, setup=setup)
    job = submit_run(QUICKSTART, run_dir, TWO_NODE, cfg)
    _pause_usr2_requeue(job, marker)
    probes = sorted(p.name for p in (run_dir / "stages/hessian/probes").glob("*.parquet"))
    assert len(probes) >= 2
    head, worker = _reported(job, lambda j: j.results())
    assert worker is None and (head.action, head.restarts, head.ray_nodes) == ("resume", 1, 2)
    actions = {p.stage: p.action for p in head.result.plan}
    assert actions["baseline"] == "skip" and actions["hessian"] == "resume"
    log = job.stderr()
    assert "4/4 blocks already done" in log
    assert f"{len(probes)} Hutchinson probe(s) already done" in log
    folder = Path(str(cfg.folder).replace("%j", job.job_id))
    assert (folder / f"ray-{job.job_id}-1" / "head_address").exists()  # a second cluster
    _wait_completed(job)
    assert not _job_processes(job.job_id)
    monkeypatch.delenv("HAWQ_TEST_PAUSE_AT")
    clean = _TWO_NODE_RUNS.get("clean")
    if clean is None:  # run on its own: make the uninterrupted 2-node run here
        clean = tmp_path / "clean"
        outcome(
            submit_run(
                QUICKSTART,
                clean,
                TWO_NODE,
                _slurm_cfg(tmp_path / "c", nodes=2, cpus_per_task=2, mem_gb=2),
            )
        )
    assert assert_same_outputs(clean, run_dir) >= 20


def test_sweep_is_one_job_array_that_computes_the_hessian_once(slurm_cluster, tmp_path):
    """3 compression targets: one array job (<id>_<i>); baseline and Hessian computed by one
    task, restored by the others; each point equals a separate `hawq run`; the summary job
    (afterok on the array) writes the table and the plot."""
    sweep_dir = tmp_path / "sweep"
    sets = [*TINY_LOCAL, "allocation.compression=4,6,8"]
    jobs, summary = submit_sweep(QUICKSTART, sweep_dir, sets, _slurm_cfg(tmp_path))
    array = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array}_{i}" for i in range(3)]
    results = [outcome(j).result for j in jobs]
    for stage in ("baseline", "hessian"):
        assert sorted(stage in r.restored for r in results) == [False, True, True], stage
    assert all("finetune" not in r.restored for r in results)
    assert summary is not None
    summary.result()  # waits for the summary job
    rows = pq.read_table(sweep_dir / "summary.parquet").to_pylist()
    assert [r["point"] for r in rows] == [0, 1, 2]
    assert (sweep_dir / "summary.png").exists()
    for i, c in enumerate((4, 6, 8)):
        alone = tmp_path / f"alone-{c}"
        run(load_config(QUICKSTART, [*TINY_LOCAL, f"allocation.compression={c}"]), alone,
            progress=False)  # fmt: skip
        assert assert_same_outputs(alone, Path(rows[i]["run_dir"])) >= 20


def test_staged_hessian_on_two_nodes_then_the_rest_on_one(slurm_cluster, tmp_path):
    """Per-stage shapes: baseline + Hessian on a 2-node Ray cluster, the other stages in a
    1-node job chained afterok; outputs equal the single 2-node job's, bit for bit."""
    run_dir = tmp_path / "run"
    two = _slurm_cfg(tmp_path, nodes=2, cpus_per_task=2, mem_gb=2)
    one = _slurm_cfg(tmp_path, nodes=1, cpus_per_task=1)
    first, second = submit_staged(QUICKSTART, run_dir, TWO_NODE, two, one)
    head = outcome(first)
    assert head.ray_nodes == 2 and set(head.result.seconds) == {"baseline", "hessian"}
    rest = outcome(second)
    assert (rest.action, rest.ray_nodes) == ("resume", 0)
    assert set(rest.result.seconds) == {"allocate", "order", "finetune", "evaluate", "export"}
    jobs = recorded_jobs(run_dir)
    assert [(j.job_id, j.tasks) for j in jobs] == [(first.job_id, 2), (second.job_id, 1)]
    script = (jobs[1].folder_path() / f"{second.job_id}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{first.job_id}\n" in script
    _wait_completed(second)
    assert not _job_processes(first.job_id)
    if "clean" in _TWO_NODE_RUNS:
        assert assert_same_outputs(_TWO_NODE_RUNS["clean"], run_dir) >= 20


def test_cli_dry_run_of_a_staged_submission(tmp_path, capsys):
    argv = ["submit", str(QUICKSTART), "--run-dir", str(tmp_path / "run"), "--dry-run"]
    argv += ["--hessian-nodes", "2", "--cpus-per-task", "2", "--mem-gb", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "# job 1 (baseline, hessian):" in out and "#SBATCH --nodes=2\n" in out
    assert "# job 2 (the other stages, afterok on job 1): 1 node(s)" in out


def test_a_failing_two_node_job_leaves_no_process(slurm_cluster, tmp_path):
    """The driver fails after the Ray cluster is up (a foreign file appears in the run dir
    before the job starts): the job fails with the run dir's error, every rank stops its Ray."""
    run_dir = tmp_path / "run"
    job = submit_run(
        QUICKSTART,
        run_dir,
        TWO_NODE,
        _slurm_cfg(tmp_path, nodes=2, cpus_per_task=2, mem_gb=2, requeue=False),
    )
    (run_dir / "notes.txt").write_text("not a hawq file")  # the job's prepare refuses the dir
    with pytest.raises(submitit.core.utils.FailedJobError, match="is not empty and holds no hawq"):
        job.results()
    deadline = time.monotonic() + 120
    while _squeue_state(job.job_id) or _job_processes(job.job_id):
        assert time.monotonic() < deadline, f"left behind: {_job_processes(job.job_id)}"
        time.sleep(1)
    assert "Ray cluster" in job.stderr()  # it failed with its cluster up, not before
    assert not (run_dir / "lock").exists()


def test_a_job_pickled_before_the_new_options_still_runs(tmp_path):
    """A requeue re-reads the original pickle: a job pickled by an older hawq (without the
    snapshot, stage cache, until or interface attributes) still has every attribute the job
    reads (class-level defaults)."""
    job = HawqRunJob(config_path=str(QUICKSTART), run_dir=str(tmp_path / "run"))
    for name in ("interface", "snapshot", "stage_cache", "until"):
        del job.__dict__[name]
    old = cloudpickle.loads(cloudpickle.dumps(job))
    assert (old.interface, old.snapshot, old.stage_cache, old.until) == (None, False, None, None)
