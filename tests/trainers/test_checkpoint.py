import torch

from reasonrl.trainers import checkpoint as ckpt


class _Saveable:
    def save_pretrained(self, path, safe_serialization=True, state_dict=None):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text("{}")


def _write(out, step, keep_last=2):
    stage = ckpt.staging_dir(out, step)
    stage.mkdir(parents=True)
    ckpt.write_rank_files(stage, 0)
    ckpt.write_main_files(stage, model=_Saveable(), tokenizer=_Saveable(), trainer_state={"step": step})
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
    (stage / "trainer_state.pt").write_bytes(b"truncated")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000001"]


def test_latest_falls_back_to_the_newest_complete_folder(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    (ckpt.checkpoint_root(tmp_path) / "latest").write_text("step-000099")  # dangling pointer
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000002"


def test_rng_state_round_trip(tmp_path):
    path = _write(tmp_path, 1)
    expected = torch.rand(3)  # drawn after the state was saved
    ckpt.set_rng_state(ckpt.load_rank_rng(path, 0))
    assert torch.equal(torch.rand(3), expected)
