"""A single-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's slurm-wlm,
run as root with their configuration, state, sockets and logs in a temporary folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")


def missing_reason() -> str | None:
    """Why a Slurm cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "a test Slurm cluster needs root (slurmd runs jobs as any user)"
    absent = [name for name in DAEMONS if shutil.which(name) is None]
    if absent:
        return (
            f"{', '.join(absent)} not installed: apt-get install slurmctld slurmd slurm-client "
            "munge (make test does it where it can)"
        )
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(folder: Path, partition: str) -> str:
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    return f"""ClusterName=lowlmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: Path, partition: str = "lowlm") -> Path:
    """Start the daemons; returns slurm.conf (export it as SLURM_CONF). Raises RuntimeError with
    the daemons' log tail if the node does not come up."""
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, partition), encoding="utf-8")
    munge = [f"--socket={folder}/munge.socket", f"--key-file={key}"]
    munge += [f"--{name}-file={folder}/munged.{name}" for name in ("log", "pid", "seed")]
    subprocess.run(["munged", "--force", *munge], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf), "-i"], check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, capture_output=True)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True
        ).stdout.strip()
        if state == "idle":
            return conf
        time.sleep(1)
    logs = "".join((folder / f"{d}.log").read_text()[-1500:] for d in ("slurmctld", "slurmd"))
    raise RuntimeError(f"the test Slurm node did not come up:\n{logs}")


def stop(folder: Path) -> None:
    """Cancel the test cluster's jobs, then stop the daemons this module started (by the ids in
    their pid files)."""
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
    deadline = time.time() + 30
    while time.time() < deadline:  # slurmd must outlive its jobs' step daemons
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
        if queue.returncode != 0 or not queue.stdout.strip():
            break
        time.sleep(0.5)
    pids = []
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
        path = folder / pid_file
        if path.exists():
            try:
                pids.append(int(path.read_text().split()[0]))
                os.kill(pids[-1], signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    deadline = time.time() + 15
    while pids and time.time() < deadline:  # they write their state files on the way out
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
