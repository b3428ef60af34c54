"""Data-parallel training under real torchrun processes (gloo on CPU): sharding, reduced metrics,
two-node rendezvous, lost workers, collective stops, and resume across process counts."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import torch

from conftest import DIGITS, ROOT, _free_port, job_env, read_history, run_job, time_unit, wait_for_epochs

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(*args, timeout=600, env_extra=None, **settings) -> subprocess.CompletedProcess:
    env = {**job_env(**settings), **(env_extra or {})}
    return subprocess.run([*TORCHRUN, *args, "-m", "job"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start_torchrun(*args, **settings) -> subprocess.Popen:
    return subprocess.Popen([*TORCHRUN, *args, "-m", "job"], env=job_env(**settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=rank among the agent's children."""
    deadline = time.monotonic() + 300  # a hang guard: the agent starts its workers when it gets the CPU
    while time.monotonic() < deadline:
        for task in os.listdir(f"/proc/{agent_pid}/task"):
            for child in open(f"/proc/{agent_pid}/task/{task}/children").read().split():
                try:
                    env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank}")


def test_two_processes_shard_the_data_and_match_one_process(tmp_path, digits_dir):
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), epochs=3, **DIGITS)
    single = run_job(run_name="single", batch_size=100, **common)
    assert single.returncode == 0, single.stdout
    # the same global batch: 2 processes x 50
    double = torchrun("--standalone", "--nproc-per-node=2", run_name="double", batch_size=50, log_level="debug", **common)
    assert double.returncode == 0, double.stdout
    h1, h2 = read_history(tmp_path / "single"), read_history(tmp_path / "double")
    assert [r["epoch"] for r in h2] == [1, 2, 3]  # one history, written once
    assert abs(h2[-1]["val_accuracy"] - h1[-1]["val_accuracy"]) <= 0.02, (h1[-1], h2[-1])
    summary = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert len(list((tmp_path / "double" / "checkpoints").glob("step-*.pt"))) == 2  # one set, not one per rank

    # each rank saw its own half of the training set in epoch 1 (the debug log line of each rank)
    shards = {int(m[1]): set(json.loads(m[2])) for m in
              re.finditer(r"rank (\d) epoch 1 from sample 0 shard (\[[\d, ]*\])", double.stdout)}
    assert sorted(shards) == [0, 1]
    train = set(torch.load(tmp_path / "double" / "checkpoints" / "last.pt", weights_only=True)["split"]["train"].tolist())
    assert shards[0] | shards[1] == train
    assert len(shards[0] & shards[1]) <= 1  # an odd count pads one sample, as DistributedSampler does
    assert abs(len(shards[0]) - len(shards[1])) == 0


def test_two_nodes_rendezvous_through_pet_variables(tmp_path, digits_dir):
    port = _free_port()
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="nodes", epochs=2, **DIGITS)
    agents = []
    for node in range(2):
        env = {**job_env(**settings), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_RDZV_BACKEND": "c10d",
               "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": "nodes",
               "JOB_CACHE_DIR": str(tmp_path / f"cache-{node}")}
        agents.append(subprocess.Popen([*TORCHRUN, "-m", "job"], env=env, cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs
    assert json.loads((tmp_path / "nodes" / "summary.json").read_text())["world_size"] == 2


def test_nodes_given_different_settings_all_exit_2_naming_them(tmp_path, digits_dir):
    """A node given another JOB_LR used to fail with 1 on one node and 75 (a lost peer) on the
    other: a retry loop for a mistake. Now every rank refuses at the start, naming the setting;
    where each node caches (JOB_CACHE_DIR) may differ."""
    port = _free_port()
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="nodes", epochs=2, **DIGITS)
    agents = []
    for node, lr in enumerate(("0.1", "0.2")):
        env = {**job_env(**{**settings, "lr": lr}), "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
               "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}", "PET_RDZV_ID": "nodes",
               "JOB_CACHE_DIR": str(tmp_path / f"cache-{node}")}
        agents.append(subprocess.Popen([sys.executable, "-m", "job.launch"], env=env, cwd=ROOT, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # the manifests' launcher
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [2, 2], outputs
    assert "rank 1 has other settings than rank 0: JOB_LR" in outputs[1], outputs[1]
    assert all("Traceback" not in out for out in outputs), outputs
    assert not (tmp_path / "nodes" / "checkpoints").exists()


def test_a_killed_worker_fails_the_job_in_bounded_time_and_the_rerun_resumes(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=40,
                    dist_timeout_seconds=20, **DIGITS)
    unit = time_unit()  # measured before and after (the run is too short to pause it for this)
    agent = start_torchrun("--standalone", "--nproc-per-node=2", **settings)
    wait_for_epochs(tmp_path / "r", 2, agent)
    killed_at = time.monotonic()
    os.kill(worker_pid(agent.pid, 1), signal.SIGKILL)
    out, _ = agent.communicate(timeout=600)
    took = time.monotonic() - killed_at
    unit = max(unit, time_unit())
    assert agent.returncode != 0
    # within JOB_DIST_TIMEOUT_SECONDS (the surviving rank's collective gives up), then its record,
    # torchrun's teardown of the workers and its exit: less than a unit each
    assert took < 20 + 4 * unit, (took, unit)
    # torchrun names the lost worker; the surviving rank says it lost its peers
    assert re.search(r"rank\W+1 \(local_rank: 1\)\s+exitcode\s*:\s*-9", out), out[-3000:]
    assert "ERROR rank 0 lost contact with the other ranks" in out and "(exit 75" in out
    rerun = torchrun("--standalone", "--nproc-per-node=2", **{**settings, "epochs": 4})
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from checkpoints/step-" in rerun.stdout
    assert [r["epoch"] for r in read_history(tmp_path / "r")] == [1, 2, 3, 4]


def test_sigterm_to_one_rank_stops_all_ranks_with_one_checkpoint(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", epochs=40, **DIGITS)
    agent = start_torchrun("--standalone", "--nproc-per-node=2", **settings)
    wait_for_epochs(tmp_path / "r", 2, agent)
    os.kill(worker_pid(agent.pid, 1), signal.SIGTERM)
    out, _ = agent.communicate(timeout=300)
    # both ranks log it (torchrun's failure table repeats each rank's one-line message: not counted)
    logged = [line for line in out.splitlines() if " WARNING rank " in line]
    assert sum("stopped by signal 15 after saving a checkpoint: checkpoints/step-" in line for line in logged) == 2, \
        out[-3000:]
    assert sum("(exit 143" in line for line in logged) == 2
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["exit_code"] == 143
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    rerun = run_job(**{**settings, "epochs": latest["epoch"] + 1})
    assert rerun.returncode == 0 and f"global step {latest['global_step']}," in rerun.stdout, rerun.stdout


def test_resume_across_process_counts(tmp_path, digits_dir):
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), **DIGITS)
    assert torchrun("--standalone", "--nproc-per-node=2", run_name="a", epochs=2, **common).returncode == 0
    one = run_job(run_name="a", epochs=3, **common)
    assert one.returncode == 0 and "written by 2 process(es)" in one.stdout, one.stdout
    assert run_job(run_name="b", epochs=2, **common).returncode == 0
    two = torchrun("--standalone", "--nproc-per-node=2", run_name="b", epochs=3, **common)
    assert two.returncode == 0 and "written by 1 process(es)" in two.stdout, two.stdout
    for run in ("a", "b"):
        assert [r["epoch"] for r in read_history(tmp_path / run)] == [1, 2, 3]


def test_feature_cache_works_under_torchrun(tmp_path):
    from test_transfer import RECIPE, make_tree, weights_file

    make_tree(str(tmp_path / "data"), per_class=8, bad=False)
    settings = dict(data_uri=str(tmp_path / "data"), output_uri=str(tmp_path / "out"), run_name="f",
                    pretrained=weights_file(str(tmp_path / "w.pt")), cache_dir=str(tmp_path / "cache"), **RECIPE)
    result = torchrun("--standalone", "--nproc-per-node=2", **settings)
    assert result.returncode == 0, result.stdout
    assert "feature cache: computing backbone features" in result.stdout
    summary = json.loads((tmp_path / "out" / "f" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["epochs_completed"] == 2
    assert list((tmp_path / "out" / "f" / "cache").glob("features-*.pt"))  # rank 0 published the cache
