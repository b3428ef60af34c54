"""The multi-node entrypoint, `python -m job.launch`: real torchrun agents and workers (gloo on
CPU) whose exit code is the job's, as a podFailurePolicy or a JobSet failure policy reads it: a
settings error exits 2, SIGTERM 143 after the checkpoint, a SIGKILLed worker 75 (a lost peer),
and Kubeflow Trainer's PET_* variables run the job unchanged."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import DIGITS, ROOT, _free_port, job_env, read_history, wait_for, wait_for_epochs
from job.errors import EXIT_CODES, DataError, PeerLostError, SettingsError
from test_distributed import worker_pid

LAUNCH = [sys.executable, "-m", "job.launch"]
STOPPED_BY_SIGTERM = 128 + signal.SIGTERM


def run_launcher(*args, env_extra=None, timeout=600, **settings) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], env={**job_env(**settings), **(env_extra or {})}, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_launcher(*args, **settings) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, *args], env=job_env(**settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("error, settings", [
    (SettingsError, {"lr": "-1"}),
    (DataError, {"data_uri": "{tmp}/no-such-dataset"}),
])
def test_a_fail_fast_error_of_the_workers_is_the_launchers_exit_code(tmp_path, error, settings):
    settings = {k: v.format(tmp=tmp_path) for k, v in settings.items()}
    result = run_launcher("--standalone", "--nproc-per-node=2",
                          **{"data_uri": str(tmp_path), "output_uri": str(tmp_path / "out"), **settings})
    assert result.returncode == error.exit_code, result.stdout[-3000:]
    assert EXIT_CODES[error.exit_code][1] == "fail at once"
    assert f"the first to fail; exit {error.exit_code}: {EXIT_CODES[error.exit_code][0]}" in result.stdout


def test_sigterm_to_the_launcher_checkpoints_exits_143_and_the_rerun_resumes(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=40, **DIGITS)
    agent = start_launcher("--standalone", "--nproc-per-node=2", **settings)
    wait_for_epochs(tmp_path / "r", 2, agent)
    agent.send_signal(signal.SIGTERM)  # what tini forwards from the kubelet
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == STOPPED_BY_SIGTERM and STOPPED_BY_SIGTERM in EXIT_CODES, out[-3000:]
    assert out.count("stopped by signal 15 after saving a checkpoint: checkpoints/step-") == 2, out[-3000:]  # both ranks
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["exit_code"] == STOPPED_BY_SIGTERM
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    rerun = run_launcher("--standalone", "--nproc-per-node=2", **{**settings, "epochs": latest["epoch"] + 1})
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"global step {latest['global_step']}," in rerun.stdout
    assert [r["epoch"] for r in read_history(tmp_path / "r")] == list(range(1, latest["epoch"] + 2))


def test_a_sigkilled_worker_is_a_lost_peer_exit_75(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=40,
                    dist_timeout_seconds=20, **DIGITS)
    agent = start_launcher("--standalone", "--nproc-per-node=2", **settings)
    wait_for_epochs(tmp_path / "r", 2, agent)
    os.kill(worker_pid(agent.pid, 1), signal.SIGKILL)
    out, _ = agent.communicate(timeout=600)
    assert agent.returncode == PeerLostError.exit_code, out[-3000:]
    assert EXIT_CODES[PeerLostError.exit_code][1] == "retry"
    assert "worker rank 1 (local rank 1) was killed by signal 9 (SIGKILL): a lost process, the first to fail" in out
    assert (tmp_path / "r" / "checkpoints" / "latest.json").exists()  # what the retry resumes from


def rendezvous_of_two(port: int) -> list[str]:
    """torchrun options for a c10d rendezvous of two nodes on 127.0.0.1:port (one agent: it waits)."""
    return ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t"]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_a_rendezvous_that_never_completes_is_a_lost_peer_exit_75(tmp_path):
    result = run_launcher(*rendezvous_of_two(_free_port()), "--rdzv-conf=join_timeout=2",
                          data_uri=str(tmp_path), output_uri=str(tmp_path / "out"))
    assert result.returncode == PeerLostError.exit_code, result.stdout[-3000:]
    assert "the rendezvous failed (RendezvousTimeoutError)" in result.stdout


@pytest.mark.parametrize("node", ["c10d-host", "static-master", "static-node-1"])
def test_sigterm_while_waiting_for_the_rendezvous_exits_143_with_nothing_to_save(tmp_path, node):
    """A static rendezvous (Kubeflow Trainer's PET_MASTER_*) waits inside C++, where the Python
    handler does not run: the stop was seen only after torchrun's 15 minutes and the wait logged
    nothing. Node 1 here has no master to reach; the master and the c10d host have no peer."""
    port = _free_port()
    options = {
        "c10d-host": rendezvous_of_two(port),
        "static-master": ["--nnodes=2", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={port}"],
        "static-node-1": ["--nnodes=2", "--node-rank=1", "--master-addr=127.0.0.1", f"--master-port={port}"],
    }[node]
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([*LAUNCH, *options], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 env=job_env(data_uri=str(tmp_path), output_uri=str(tmp_path / "out"),
                                             log_every_seconds="1"))
    waiting = f"so far for the rendezvous at 127.0.0.1:{port}"
    wait_for(lambda: waiting in log.read_text(), agent, what="the launcher's waiting line")
    agent.send_signal(signal.SIGTERM)
    try:  # torchrun's own wait would last 900 s
        agent.wait(timeout=120)
    finally:
        agent.kill()
    out = log.read_text()
    assert agent.returncode == STOPPED_BY_SIGTERM, out[-3000:]
    assert "launcher stopped by signal 15" in out and "nothing to save (exit 143)" in out, out[-3000:]


def test_kubeflow_trainer_pet_variables_run_the_trainjob_command_unchanged(tmp_path, digits_dir):
    """Trainer's torch plugin sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR
    and PET_MASTER_PORT (a static rendezvous) and runs the TrainJob's command: here by hand."""
    trainjob = yaml.safe_load(open(os.path.join(ROOT, "k8s", "overlays", "trainjob", "trainjob.yaml")))
    command = trainjob["spec"]["trainer"]["command"]
    assert command[:2] == ["/usr/bin/tini", "--"] and command[2] == "python"
    pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(_free_port())}
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="t", epochs=2, **DIGITS)
    result = subprocess.run([sys.executable, *command[3:]], env={**job_env(**settings), **pet}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["epochs_completed"] == 2
