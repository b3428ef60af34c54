"""Never lose work: kills and signals at any moment, verified checkpoints, resume policies and
numerical faults, with the job as a real subprocess and real signals."""

import json
import signal
import time

import pytest

from conftest import (
    DIGITS,
    assert_same_history,
    read_history,
    reference_history,
    run_job,
    start_job,
    time_unit,
    wait_for_epochs,
)

EPOCHS = 12
# Mid-epoch checkpoints every 5 of the 12 steps per epoch, so kills land on every kind of position.
RECIPE = dict(epochs=EPOCHS, checkpoint_every_steps=5, **DIGITS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_arrays):
    """An uninterrupted run's history, to compare every interrupted-and-resumed run with."""
    return reference_history(tmp_path_factory.mktemp("reference"), digits_arrays, **RECIPE)


@pytest.mark.parametrize("after_epochs, delay", [(1, 0.0), (3, 0.05), (5, 0.13)])
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, digits_dir, reference, after_epochs, delay):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **RECIPE)
    proc = start_job(**settings)
    wait_for_epochs(tmp_path / "r", after_epochs, proc)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    rerun = run_job(**settings)
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from checkpoints/step-" in rerun.stdout
    assert_same_history(read_history(tmp_path / "r"), reference)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_exits_128_plus_signal(tmp_path, digits_dir, reference, signum, code):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **RECIPE)
    proc = start_job(**settings)
    wait_for_epochs(tmp_path / "r", 2, proc)
    before = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["global_step"]
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == code, out
    assert "after saving a checkpoint: checkpoints/step-" in out and "Traceback" not in out
    latest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert latest["global_step"] > before  # a new checkpoint, written on the signal
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["exit_code"] == code
    rerun = run_job(**settings)
    assert rerun.returncode == 0, rerun.stdout
    assert f"global step {latest['global_step']}," in rerun.stdout
    assert_same_history(read_history(tmp_path / "r"), reference)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, digits_dir, reference):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **{**RECIPE, "epochs": 3})
    assert run_job(**settings).returncode == 0
    ckpts = tmp_path / "r" / "checkpoints"
    pointed = json.loads((ckpts / "latest.json").read_text())["file"]
    data = (ckpts / pointed).read_bytes()
    (ckpts / pointed).write_bytes(data[: len(data) // 2])
    rerun = run_job(**{**settings, "epochs": EPOCHS})
    assert rerun.returncode == 0, rerun.stdout
    assert f"checkpoint {pointed.removesuffix('.pt')}.pt failed verification" in rerun.stdout
    assert "instead of" in rerun.stdout
    assert (ckpts / "corrupt" / pointed).exists()
    assert_same_history(read_history(tmp_path / "r"), reference)


def test_history_without_a_readable_checkpoint_is_never_restarted(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **{**DIGITS, "epochs": 1})
    assert run_job(**settings).returncode == 0
    for f in (tmp_path / "r" / "checkpoints").glob("step-*"):
        f.write_bytes(b"garbage")
    result = run_job(**settings)
    assert result.returncode == 3, result.stdout
    assert "no readable checkpoint" in result.stdout and "JOB_RUN_NAME" in result.stdout
    assert len(read_history(tmp_path / "r")) == 1  # nothing already saved was lost


def test_resume_policies(tmp_path, digits_dir):
    common = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), **{**DIGITS, "epochs": 1})
    required = run_job(**common, run_name="fresh", resume="require")
    assert required.returncode == 3 and "JOB_RESUME=require" in required.stdout
    assert run_job(**common, run_name="done").returncode == 0
    never = run_job(**common, run_name="done", resume="never")
    assert never.returncode == 3 and "JOB_RESUME=never" in never.stdout


def test_resume_with_other_data_is_refused(tmp_path, digits_dir, digits_arrays):
    import stage_dataset

    common = dict(output_uri=str(tmp_path / "out"), run_name="r", **{**DIGITS, "epochs": 1})
    assert run_job(data_uri=str(digits_dir), **common).returncode == 0
    other = {k: v[:-10] if k.startswith("train") else v for k, v in digits_arrays.items()}
    stage_dataset.stage(other, str(tmp_path / "other"))
    result = run_job(data_uri=str(tmp_path / "other"), **common)
    assert result.returncode == 3 and "dataset changed" in result.stdout
    result = run_job(data_uri=str(digits_dir), **{**common, "optimizer": "sgd"})
    assert result.returncode == 3 and "JOB_OPTIMIZER was adam, now sgd" in result.stdout


def test_nan_loss_exits_65_and_keeps_the_last_good_checkpoint(tmp_path, digits_dir):
    settings = dict(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **{**DIGITS, "epochs": 2})
    assert run_job(**settings).returncode == 0
    latest_before = (tmp_path / "r" / "checkpoints" / "latest.json").read_text()
    names_before = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    result = run_job(**{**settings, "epochs": 4, "lr": "1e30"})  # an absurd lr: the loss overflows
    assert result.returncode == 65, result.stdout
    assert "diverged" in result.stdout and "epoch 3" in result.stdout
    assert (tmp_path / "r" / "checkpoints" / "latest.json").read_text() == latest_before
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == names_before
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 65
    assert json.loads((tmp_path / "r" / "failure.json").read_text())["exit_code"] == 65


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.35, 0.6, 1.0])
def test_sigterm_anywhere_in_start_up_is_exit_143_without_a_traceback(tmp_path, digits_dir, fraction):
    """The signal lands at a fraction of a time unit (a bare `import torch`) after the first line:
    inside the imports of torch, numpy or torchvision, a settings or logging call, the dataset's
    load. The handler only records it and the job stops at its next stop point: 143 and one line,
    never a traceback from inside an import nor a stop swallowed by a library's `except Exception`."""
    unit = time_unit()
    proc = start_job(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **DIGITS)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "loading PyTorch" in line:
            break
    time.sleep(fraction * unit)
    proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "stopped by signal 15" in out.strip().splitlines()[-1], out


def test_sigterm_before_training_exits_143_at_once(tmp_path, digits_dir):
    proc = start_job(data_uri=str(digits_dir), output_uri=str(tmp_path), run_name="r", **DIGITS)
    lines = []
    for line in proc.stdout:  # the first line comes with the signal handlers in place, as PyTorch starts to load
        lines.append(line)
        if "loading PyTorch" in line:
            break
    proc.send_signal(signal.SIGTERM)  # still importing torch, however fast the machine: nothing to save yet
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    assert "Traceback" not in out and "stopped by signal 15" in out
    assert not (tmp_path / "r" / "checkpoints").exists(), out  # it was before training
