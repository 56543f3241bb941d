import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reasonrl.trainers import checkpoint as ckpt


class _Saveable:
    def save_pretrained(self, path, safe_serialization=True, state_dict=None):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")


def _write(out, step, keep_last=2, trainer_state=None):
    stage = ckpt.staging_dir(out, step)
    stage.mkdir(parents=True)
    ckpt.write_rank_files(stage, 0)
    ckpt.write_main_files(stage, model=_Saveable(), tokenizer=_Saveable(), trainer_state=trainer_state or {"step": step})
    return ckpt.publish(out, step, keep_last)


def test_publish_points_latest_and_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(tmp_path))["step"] == 3


def test_a_crash_while_writing_leaves_the_previous_checkpoint_as_latest(tmp_path):
    _write(tmp_path, 1)
    stage = ckpt.staging_dir(tmp_path, 2)  # step 2 started writing, then the process died
    stage.mkdir(parents=True)
    (stage / ckpt.STATE_FILE).write_bytes(b"truncated")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]


def test_latest_falls_back_to_the_newest_complete_folder(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    (ckpt.checkpoint_root(tmp_path) / "latest").write_text("step-000099")  # dangling pointer
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_python_numpy_and_torch_rng_states_round_trip(tmp_path):
    path = _write(tmp_path, 1)
    expected = random.random(), np.random.rand(3).tolist(), torch.rand(3)  # drawn after the states were saved
    ckpt.set_rng_state(ckpt.load_rank_rng(path, 0))
    assert (random.random(), np.random.rand(3).tolist()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_the_cuda_state_of_the_current_device_is_saved_and_restored(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.arange(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    ckpt.set_rng_state(json.loads(json.dumps(ckpt.rng_state())))
    assert len(restored) == 1 and torch.equal(restored[0], torch.arange(16, dtype=torch.uint8))


def _trained_adamw() -> torch.optim.AdamW:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return optimizer


def test_a_checkpoint_holds_no_pickle_and_restores_the_optimizer_exactly(tmp_path):
    optimizer = _trained_adamw()
    path = _write(tmp_path, 1, trainer_state={"step": 1, "optimizer": optimizer.state_dict(),
                                              "eval_history": [{"step": 1, "accuracy": 0.5}]})
    assert sorted(p.name for p in path.iterdir()) == ["model", "optimizer.safetensors", "rng_rank0.json",
                                                      "trainer_state.json"]
    json.loads((path / "trainer_state.json").read_text())
    json.loads((path / "rng_rank0.json").read_text())
    assert set(load_file(path / "optimizer.safetensors")) == {f"{i}/{k}" for i in (0, 1)
                                                              for k in ("step", "exp_avg", "exp_avg_sq")}
    state = ckpt.load_trainer_state(path)
    assert state["eval_history"] == [{"step": 1, "accuracy": 0.5}]
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1.0)
    fresh.load_state_dict(state["optimizer"])
    for p_saved, p_loaded in zip(optimizer.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        for key, value in optimizer.state[p_saved].items():
            assert torch.equal(fresh.state[p_loaded][key], value), key  # int keys: no moment silently dropped
    assert fresh.param_groups[0]["lr"] == 1e-2 and tuple(fresh.param_groups[0]["betas"]) == (0.8, 0.95)


class _Payload:
    """What a tampered checkpoint would hold: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_trainer_state_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    folder = ckpt.checkpoint_root(tmp_path) / ckpt.step_dir_name(5)  # the layout of earlier versions
    folder.mkdir(parents=True)
    torch.save({"step": 5, "optimizer": _Payload(marker)}, folder / "trainer_state.pt")
    torch.save({"python": _Payload(marker)}, folder / "rng_rank0.pt")
    found = ckpt.latest_checkpoint(tmp_path)  # found, so that resume=auto fails instead of starting over
    assert found == folder
    with pytest.raises(ckpt.CheckpointFormatError, match="earlier reasonrl version"):
        ckpt.load_trainer_state(found)
    assert ckpt.load_rank_rng(found, 0) is None
    assert not marker.exists()


def test_an_unknown_format_is_refused(tmp_path):
    path = _write(tmp_path, 1)
    (path / ckpt.STATE_FILE).write_text(json.dumps({"format": 99, "step": 1}))
    with pytest.raises(ckpt.CheckpointFormatError, match="format 99"):
        ckpt.load_trainer_state(path)
