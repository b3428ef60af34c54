"""The multi-node launcher's own decisions in process: exit codes of killed workers, torchrun's
options and the stop grace it waits for. The launcher with real torchrun agents is tested in
tests/job/test_launch.py."""

import signal

import pytest

from job import launch
from job.errors import EXIT_CODES, PeerLostError, SettingsError
from job.settings import Settings


def test_a_worker_killed_by_a_signal_is_a_lost_peer_and_other_codes_pass_through():
    assert launch.worker_exit_code(-signal.SIGKILL) == PeerLostError.exit_code
    assert launch.worker_exit_code(-signal.SIGSEGV) == PeerLostError.exit_code
    for code in EXIT_CODES:
        if code:
            assert launch.worker_exit_code(code) == code


def test_the_launcher_takes_torchrun_options_and_always_runs_the_job(monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")
    args = launch.parse_args(["--nnodes=2"])
    assert (args.training_script, args.module, args.training_script_args) == ("job", True, [])
    assert (args.nnodes, args.nproc_per_node) == ("2", "3")  # options, and PET_* variables, as torchrun reads them
    with pytest.raises(SettingsError, match="takes torchrun's options only"):
        launch.parse_args(["train.py"])
    with pytest.raises(SystemExit) as unknown:
        launch.parse_args(["--no-such-option"])
    assert unknown.value.code == SettingsError.exit_code  # argparse's own exit code agrees with the table


def test_torchrun_waits_for_the_jobs_stop_grace_before_killing_workers(monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.setenv("JOB_STOP_GRACE_SECONDS", "60")
    assert launch.parse_args([]).shutdown_timeout == 60 + launch.SHUTDOWN_MARGIN_SECONDS
    assert launch.parse_args(["--shutdown-timeout=7"]).shutdown_timeout == 7  # an explicit value wins
    monkeypatch.delenv("JOB_STOP_GRACE_SECONDS")
    default = launch.parse_args([]).shutdown_timeout
    assert default >= Settings.model_fields["stop_grace_seconds"].default + launch.SHUTDOWN_MARGIN_SECONDS
    monkeypatch.setenv("JOB_STOP_GRACE_SECONDS", "soon")  # refused by the job itself, which says so
    assert launch.parse_args([]).shutdown_timeout == default
