"""fp16's GradScaler and the CUDA random state in checkpoints, and the run's compile cache, in
process (issue 23): a round trip through a checkpoint's bytes restores the scaler, an older
checkpoint without these keys still resumes, a hostile entry is exit 3 in one line, and a compile
cache that cannot be used only means compiling from scratch. The compiled job itself, and its
up-front exit 2, are in tests/job/test_compile.py."""

import io
import logging
import os
import shutil

import pytest
import torch

from job import checkpoint, compiling, loop, run
from job.data import Data
from job.data.sources import TensorSource
from job.errors import DataError
from job.runtime import Runtime
from job.settings import Settings

BASE = dict(data_uri="/x", run_name="r", optimizer="sgd", lr=0.1, epochs=2)
DATA = Data(TensorSource(torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.int64)), None, ["a", "b"], "fp")


def _state(scaler: torch.amp.GradScaler | None):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    return module, loop.TrainState(optimizer, scaler, torch.arange(8), torch.arange(8, 10))


def _round_trip(saved: dict) -> dict:
    """What a resume reads: the checkpoint's bytes loaded as checkpoint.read loads them."""
    return torch.load(io.BytesIO(checkpoint.serialize(saved)), map_location="cpu", weights_only=True)


def _trained_scaler() -> tuple[torch.nn.Module, loop.TrainState]:
    """A model trained two fp16-style steps: the scaler's growth tracker is at 2 of 3, and one
    overflowing step halved the scale, as a long run's scaler stands."""
    module, state = _state(torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3))
    assert state.scaler is not None
    for x in (torch.ones(4, 1, 2, 2), torch.full((4, 1, 2, 2), float("inf")), torch.ones(4, 1, 2, 2),
              torch.ones(4, 1, 2, 2)):
        state.optimizer.zero_grad()
        state.scaler.scale(module(x).sum()).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    return module, state


def test_a_checkpoint_round_trip_restores_the_grad_scaler():
    module, state = _trained_scaler()
    assert state.scaler is not None
    before = state.scaler.state_dict()
    assert before["scale"] == 512.0 and before["_growth_tracker"] == 2  # not a fresh scaler's 65536 and 0
    saved = _round_trip(checkpoint.contents(Settings(**BASE), Runtime(torch.device("cpu")), module, state, DATA))
    assert saved["cuda_rng"] is None  # trained on the CPU

    fresh_module, fresh = _state(torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3))
    checkpoint.restore(saved, "step-000000004", Settings(**BASE), fresh_module, fresh, DATA, "/out/r")
    assert fresh.scaler is not None and fresh.scaler.state_dict() == before
    # and it goes on as the saved one would: one more good step reaches the growth interval
    for scaler, net, optimizer in ((state.scaler, module, state.optimizer),
                                   (fresh.scaler, fresh_module, fresh.optimizer)):
        scaler.scale(net(torch.ones(4, 1, 2, 2)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    assert fresh.scaler.state_dict() == state.scaler.state_dict() == {**before, "scale": 1024.0, "_growth_tracker": 0}


def test_an_older_checkpoint_without_scaler_or_cuda_state_still_resumes(caplog):
    module, state = _state(None)
    saved = checkpoint.contents(Settings(**BASE), Runtime(torch.device("cpu")), module, state, DATA)
    del saved["scaler"], saved["cuda_rng"]  # as trainjob wrote them before issue 23
    fresh_module, fresh = _state(torch.amp.GradScaler("cpu"))
    with caplog.at_level(logging.INFO, logger="job"):
        checkpoint.restore(_round_trip(saved), "step-000000004", Settings(**BASE), fresh_module, fresh, DATA, "/out/r")
    assert fresh.scaler is not None and fresh.scaler.state_dict()["scale"] == 65536.0
    assert any("no GradScaler state" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_written_on_a_gpu_says_its_cuda_state_is_not_restored_on_the_cpu(caplog):
    module, state = _state(None)
    saved = checkpoint.contents(Settings(**BASE), Runtime(torch.device("cpu")), module, state, DATA)
    saved["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)  # what torch.cuda.get_rng_state() returns
    fresh_module, fresh = _state(None)
    with caplog.at_level(logging.INFO, logger="job"):
        checkpoint.restore(_round_trip(saved), "step-000000004", Settings(**BASE), fresh_module, fresh, DATA, "/out/r")
    lines = [r.getMessage() for r in caplog.records if "CUDA random state was not restored" in r.getMessage()]
    assert len(lines) == 1 and "written on a GPU" in lines[0], lines


SCALER = {"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2}


@pytest.mark.parametrize("field, value", [
    ("scaler", "not a dict"), ("scaler", {}), ("scaler", {**SCALER, "scale": "x"}),
    ("scaler", {**SCALER, "scale": float("nan")}), ("scaler", {**SCALER, "scale": 0.0}),
    ("scaler", {**SCALER, "growth_factor": 0.5}), ("scaler", {**SCALER, "backoff_factor": 1.5}),
    ("scaler", {**SCALER, "growth_interval": 0}), ("scaler", {**SCALER, "_growth_tracker": -1}),
    ("scaler", {**SCALER, "_growth_tracker": True}), ("cuda_rng", "x" * 8), ("cuda_rng", torch.zeros(4)),
])
@pytest.mark.parametrize("fp16", [True, False])
def test_a_hostile_scaler_or_cuda_state_is_exit_3_in_one_line(field, value, fp16):
    """GradScaler.load_state_dict takes a text or NaN scale as it is: the run would fail at its
    first step (exit 1) or skip every step after. Checked, whether or not this run uses fp16."""
    module, state = _state(None)
    saved = checkpoint.contents(Settings(**BASE), Runtime(torch.device("cpu")), module, state, DATA)
    saved[field] = value
    fresh_module, fresh = _state(torch.amp.GradScaler("cpu") if fp16 else None)
    with pytest.raises(DataError, match=r"^checkpoints/step-000000004\.pt in /out/r cannot be resumed: ") as error:
        checkpoint.restore(_round_trip(saved), "step-000000004", Settings(**BASE), fresh_module, fresh, DATA, "/out/r")
    assert "\n" not in str(error.value) and error.value.exit_code == 3


# --- the run's compile cache -------------------------------------------------------------------


def test_an_unreadable_compile_cache_means_compiling_from_scratch(tmp_path, caplog, capfd):
    cache = compiling.CompileCache(str(tmp_path / "r" / "compile" / "cache.bin"), in_run=True)
    with caplog.at_level(logging.INFO, logger="job"):
        cache.load()  # none saved yet
        os.makedirs(tmp_path / "r" / "compile")
        (tmp_path / "r" / "compile" / "cache.bin").write_bytes(b"not what save_cache_artifacts wrote")
        cache.load()
    messages = [r.getMessage() for r in caplog.records]
    assert any("no compile cache in the run yet" in m for m in messages), messages
    assert any("is unreadable" in m and "compiling from scratch" in m for m in messages), messages
    assert not cache.loaded
    assert "Traceback" not in capfd.readouterr().err  # torch logs one for such bytes; the job's log stays one line


def test_by_default_no_compile_cache_goes_into_the_run():
    """The cache is code: only JOB_COMPILE_CACHE=run saves it with the run (and loads it)."""
    cache = compiling.CompileCache("/out/r/compile/cache.bin")
    cache.active, cache.epochs = True, 0
    assert cache.take(1) is None and not cache.active


def test_the_compile_cache_is_taken_once_after_this_process_trains_an_epoch():
    cache = compiling.CompileCache("/out/r/compile/cache.bin", in_run=True)
    assert cache.take(5) is None  # not compiling
    cache.active, cache.epochs = True, 3  # resumed with 3 epochs in the history
    assert cache.take(3) is None  # a mid-epoch checkpoint: the epoch's graphs are not all compiled yet
    cache.take(4)
    assert not cache.active and cache.take(5) is None


def test_the_compile_probe_names_a_compiler_that_cannot_build(tmp_path):
    assert compiling.build_probe(shutil.which("g++") or "g++", "c++", str(tmp_path)) is None
    problem = compiling.build_probe(shutil.which("false") or "/bin/false", "c++", str(tmp_path))
    assert problem is not None and "cannot build a Python extension here (exit 1)" in problem
    assert os.listdir(tmp_path) == []  # the probe leaves nothing in the cache
