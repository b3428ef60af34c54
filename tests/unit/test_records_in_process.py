"""Names from records and the resume policy, in process (issue 22, items 4 and 5): what the temp
sweep takes, what a pointer or manifest may name, when an output lies inside a folder, and which
setting changes a resume refuses or records. The same attacks through the real job are in
tests/job/test_hostile_records.py."""

import hashlib
import json
import logging

import pytest
import torch

from job import checkpoint, loop, storage
from job.data import Data
from job.data.sources import TensorSource
from job.errors import DataError
from job.runtime import Runtime
from job.settings import Settings


def test_the_temp_sweep_takes_only_the_jobs_own_temporary_files(tmp_path):
    own = ["history.jsonl.tmp-0badc0de", "checkpoints/step-000000001.pt.tmp-deadbeef",
           storage.tmp_name("summary.json").rsplit("/", 1)[-1]]
    users = ["predictions.tmp-final.jsonl", "my.tmp-notes", "a.tmp-0badc0de.bak", "b.tmp-DEADBEEF", "c.tmp-0badc0d",
             "predictions/x.tmp-", ".tmp-0badc0de"]
    for name in own + users:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert storage.remove_stale_tmp(str(tmp_path)) == len(own)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(users)


@pytest.mark.parametrize("name, plain", [
    ("step-000000001.pt", True), ("best.pt", True), ("a_b-c.d", True),
    ("../best.pt", False), ("..", False), (".", False), ("", False), ("/etc/passwd", False), ("corrupt/x.pt", False),
    ("a\\b.pt", False), (".hidden.pt", False), ("x\n.pt", False), ("x" * 300, False), (None, False), (3, False),
])
def test_a_plain_name_is_a_file_name_and_nothing_more(name, plain):
    assert storage.plain_name(name) is plain


@pytest.mark.parametrize("uri, folder, inside", [
    ("{t}/run/model/model.safetensors", "{t}/run/model", True),
    ("{t}/run/model", "{t}/run/model/", True),
    ("{t}/run/other/../model/config.json", "{t}/run/model", True),
    ("{t}/link/config.json", "{t}/run/model", True),  # a link to the model folder is the model folder
    ("{t}/run/model.jsonl", "{t}/run/model", False),
    ("{t}/run/predictions/x.jsonl", "{t}/run/model", False),
    ("memory://b/run/model/config.json", "memory://b/run/model", True),
    ("memory://b/run/modelx", "memory://b/run/model", False),
    ("memory://b/run/model/config.json", "{t}/run/model", False),
])
def test_within_resolves_links_and_dots(tmp_path, uri, folder, inside):
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run" / "model")
    assert storage.within(uri.format(t=tmp_path), folder.format(t=tmp_path)) is inside


def _committed_run(run: str, step: int) -> bytes:
    blob = checkpoint.serialize({"model": {}, "settings": {}})
    checkpoint.commit(run, f"step-{step:09d}", blob, {"epoch": 1, "seen": 0, "global_step": step}, best=True, keep=2)
    return blob


@pytest.mark.parametrize("file", ["../../victim/checkpoints/best.pt", "{victim}/checkpoints/best.pt",
                                  "corrupt/step-000000001.pt", "step-000000001.json", "best.pt\n"])
def test_a_pointer_naming_anything_but_a_checkpoint_beside_it_is_refused_and_nothing_moves(tmp_path, file):
    victim, run = str(tmp_path / "victim"), str(tmp_path / "r")
    _committed_run(victim, 7)
    _committed_run(run, 5)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    pointer = tmp_path / "r" / "checkpoints" / "latest.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "file": file.format(victim=victim)}))
    before[pointer] = pointer.read_bytes()
    with pytest.raises(DataError, match=r"^checkpoints/latest\.json in .* not a \.pt file in its own folder"):
        checkpoint.load_latest(run)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("file", ["../../victim/checkpoints/best.pt", "../../../../../../../../../../dev/zero",
                                  "/dev/zero", "sub/best.pt"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_before_any_read(tmp_path, file, monkeypatch):
    victim, run = str(tmp_path / "victim"), str(tmp_path / "r")
    blob = _committed_run(victim, 7)
    _committed_run(run, 5)
    manifest = tmp_path / "r" / "checkpoints" / "step-000000005.json"
    forged = {**json.loads(manifest.read_text()), "file": file, "size": len(blob),
              "sha256": hashlib.sha256(blob).hexdigest()}  # the bytes it names would verify
    manifest.write_text(json.dumps(forged))
    reads, real = [], storage.read_bytes
    # only the manifest is really read: a regression must fail here, not read /dev/zero until memory runs out
    fake = lambda uri, **kw: reads.append(uri) or (real(uri, **kw) if uri.endswith(".json") else blob)  # noqa: E731
    monkeypatch.setattr(storage, "read_bytes", fake)
    with pytest.raises(DataError, match=r"^checkpoints/step-000000005\.json in .* not a file in its own folder"):
        checkpoint.read(run, "step-000000005")
    assert reads == [storage.join(run, "checkpoints", "step-000000005.json")]  # the manifest, nothing else


# --- resume policy by kind of setting ------------------------------------------------------------

def _state(settings):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    from job.optim import build_optimizer

    optimizer = build_optimizer(settings, module.parameters())
    return module, loop.TrainState(optimizer, None, torch.arange(8), torch.arange(8, 10))


DATA = Data(TensorSource(torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.int64)), None, ["a", "b"], "fp")
BASE = dict(data_uri="/x", run_name="r", optimizer="sgd", lr=0.1, momentum=0.5, weight_decay=0.0, epochs=2)


def _saved(**changes):
    settings = Settings(**{**BASE, **changes})
    module, state = _state(settings)
    state.progress = loop.Progress(epoch=2, global_step=20)
    return checkpoint.contents(settings, Runtime(torch.device("cpu")), module, state, DATA)


def test_a_resume_refuses_changes_to_what_shapes_the_model_naming_each():
    saved = _saved()
    settings = Settings(**{**BASE, "freeze": "all", "hidden_sizes": "16", "val_fraction": 0.5})
    module, state = _state(settings)
    with pytest.raises(DataError) as error:
        checkpoint.restore(saved, "step-000000020", settings, module, state, DATA, "/out/r")
    message = str(error.value)
    for named in ("JOB_FREEZE was none, now all", "JOB_HIDDEN_SIZES was [32], now [16]",
                  "JOB_VAL_FRACTION was 0.2, now 0.5"):
        assert named in message, message
    assert "\n" not in message


def test_image_size_matters_only_for_image_inputs():
    saved = _saved()
    saved["input_kind"] = "idx"  # IDX images keep their own size: a changed JOB_IMAGE_SIZE changes nothing
    assert checkpoint.settings_changes(saved, Settings(**{**BASE, "image_size": 64})) == ({}, {})
    saved["input_kind"] = "image"
    assert checkpoint.settings_changes(saved, Settings(**{**BASE, "image_size": 64}))[0] == {"image_size": (224, 64)}


def test_a_resume_with_changed_schedule_settings_logs_records_and_applies_them(caplog):
    saved = _saved()
    settings = Settings(**{**BASE, "lr": 0.02, "weight_decay": 0.01, "momentum": 0.9, "epochs": 4})
    module, state = _state(settings)
    with caplog.at_level(logging.INFO, logger="job"):
        checkpoint.restore(saved, "step-000000020", settings, module, state, DATA, "/out/r")
    change = {"epoch": 2, "seen": 0, "global_step": 20, "changes": {
        "epochs": {"old": 2, "new": 4}, "lr": {"old": 0.1, "new": 0.02}, "momentum": {"old": 0.5, "new": 0.9},
        "weight_decay": {"old": 0.0, "new": 0.01}}}
    assert state.settings_changes == [change]
    lines = [r.getMessage() for r in caplog.records if "settings changed" in r.getMessage()]
    assert len(lines) == 1 and "JOB_LR 0.1 -> 0.02" in lines[0] and "JOB_WEIGHT_DECAY 0.0 -> 0.01" in lines[0]
    # load_state_dict brings back the checkpoint's values: the new ones must win
    group = state.optimizer.param_groups[0]
    assert (group["weight_decay"], group["momentum"]) == (0.01, 0.9)
    # the next checkpoint carries the segments on; an unchanged resume from it adds none
    again = checkpoint.contents(settings, Runtime(torch.device("cpu")), module, state, DATA)
    module, state = _state(settings)
    checkpoint.restore(again, "step-000000020", settings, module, state, DATA, "/out/r")
    assert state.settings_changes == [change]


def test_a_checkpoint_file_is_read_no_further_than_its_manifest_says(tmp_path):
    """A step file that grew past its manifest's size (appended to, or swapped for a larger one)
    is read up to that size plus one byte and refused as corrupt; one replaced by a link to a
    device is refused as not a regular file: neither is read without bound."""
    import os

    run = str(tmp_path / "r")
    blob = _committed_run(run, 5)
    step = tmp_path / "r" / "checkpoints" / "step-000000005.pt"
    step.write_bytes(blob + b"\0" * (8 << 20))
    with pytest.raises(checkpoint.Corrupt, match=f"^size {len(blob) + 1} .*expected {len(blob)} bytes"):  # not 8 MB
        checkpoint.read(run, "step-000000005")
    step.unlink()
    os.symlink("/dev/zero", step)
    with pytest.raises(DataError, match="not a regular file"), storage.errors(run, DataError, "read"):
        checkpoint.read(run, "step-000000005")


@pytest.mark.parametrize("field, value", [("settings", "not a dict"), ("progress", {"epoch": "two"}),
                                          ("history", 7), ("split", {"train": None}), ("rng", "x" * 8),
                                          ("model", {"1.weight": torch.zeros(3)}), ("class_names", None)])
def test_a_hand_edited_checkpoint_with_a_malformed_field_is_exit_3_naming_it(field, value):
    """A checkpoint verifies against its manifest when whoever edited it re-signed it: each field
    it holds is still data, and a malformed one is one line (exit 3), never a traceback (exit 1)."""
    saved = _saved()
    saved[field] = value
    settings = Settings(**BASE)
    module, state = _state(settings)
    with pytest.raises(DataError, match=r"^(checkpoints/step-000000020\.pt in /out/r cannot be resumed|the checkpoint)"):
        checkpoint.restore(saved, "step-000000020", settings, module, state, DATA, "/out/r")


@pytest.mark.parametrize("edit", ["a huge architecture", "weights of another shape", "no class names", "not a dict"])
def test_export_of_a_hostile_checkpoint_is_one_line(tmp_path, edit):
    """`python -m job export` on a checkpoint file without a manifest: whatever it declares is
    checked before a model is built (vit_h_14 beside a tiny state would take 2.5 GB)."""
    from job.predict import export_checkpoint

    saved = _saved()
    saved["input_kind"], saved["input_shape"] = "idx", [1, 2, 2]
    if edit == "a huge architecture":
        saved["settings"] = {**saved["settings"], "model": "vit_h_14"}
    elif edit == "weights of another shape":
        saved["model"] = {k: torch.zeros(5, 5) for k in saved["model"]}
    elif edit == "no class names":
        del saved["class_names"]
    else:
        saved = ["not", "a", "dict"]
    path = tmp_path / "lone.pt"
    torch.save(saved, path)
    with pytest.raises(DataError, match="lone.pt is not a (usable )?trainjob checkpoint"):
        export_checkpoint(Settings(**BASE), str(path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_stop_during_the_onnx_step_ends_the_export_it_is_not_a_reason_to_skip_onnx(tmp_path, monkeypatch):
    """`python -m job export` stopped while writing model.onnx exited 0 with "no ONNX model written"
    (the stop was caught as an ONNX failure) and a model.onnx the config disowned."""
    import signal

    from job import export
    from job.errors import Stopped
    from job.stop import StopRequest

    stop = StopRequest()
    storage.configure(Settings(**BASE), stop)
    real = export._onnx_bytes

    def signal_during_onnx(model, example):
        blob = real(model, example)
        stop.record(signal.SIGTERM)  # as the handler does: recorded, seen at the next storage write
        return blob

    monkeypatch.setattr(export, "_onnx_bytes", signal_during_onnx)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    config = {"architecture": "mlp", "num_classes": 2, "class_names": ["a", "b"], "input_shape": [1, 2, 2]}
    try:
        with pytest.raises(Stopped):
            export.write(str(tmp_path / "model"), module, config, [torch.rand(4, 1, 2, 2)])
    finally:
        storage.configure(Settings(**BASE))
    assert not (tmp_path / "model" / "config.json").exists()  # written last: the folder is not a model


def test_export_of_a_checkpoint_that_fails_verification_is_exit_3(tmp_path):
    """A step file truncated by a crash (or one byte longer) is refused in one line naming it, and
    the run's other checkpoints suggested; it was exit 1 with a traceback."""
    from job.predict import export_checkpoint

    run = str(tmp_path / "r")
    blob = _committed_run(run, 5)
    (tmp_path / "r" / "checkpoints" / "step-000000005.pt").write_bytes(blob[:-10])
    with pytest.raises(DataError, match="step-000000005.pt fails verification.*export another checkpoint"):
        export_checkpoint(Settings(**BASE), str(tmp_path / "r" / "checkpoints" / "step-000000005.pt"), None)
