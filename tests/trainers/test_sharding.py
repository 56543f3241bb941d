"""The same global batches train the same way under every launch layout: 1 process, DDP on 2 processes, DeepSpeed
ZeRO-2 and ZeRO-3 on 2 processes, and ZeRO-2 across two accelerate "machines" on loopback (machine_rank 0 and 1,
main_process_ip 127.0.0.1), each with the repo's launch config from recipes/accelerate/.

Tolerance: fp32 reductions run in a different order per layout, so losses agree to 1e-5 relative and parameters to
5e-6 absolute after 3 batches x 2 optimizer steps at lr 3e-3 with clipping active (measured differences: <= 1e-6).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharding_worker import BUCKET_BYTES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = str(HERE / "sharding_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    assert done.returncode == 0, f"{what} failed:\n{done.stderr[-4000:]}"


def _one_process(args: list[str]) -> None:
    _check(subprocess.run([sys.executable, WORKER, *args], check=False, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=600), "1 process")


def _two_processes(layout: str, args: list[str]) -> None:
    cmd = [*LAUNCH, "--config_file", f"recipes/accelerate/{layout}.yaml", "--num_processes", "2", WORKER, *args]
    _check(subprocess.run(cmd, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600), layout)


def _two_machines(args: list[str], port: int) -> None:
    port = str(port)
    procs = [subprocess.Popen([*LAUNCH, "--config_file", "recipes/accelerate/multinode.yaml", "--num_machines", "2",
                               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", port, WORKER, *args],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=600)
        _check(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), f"machine {rank}")


def _assert_same_training(result: dict, reference: dict, name: str) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5,
                               atol=1e-7, msg=f"{name}: loss curve")
    torch.testing.assert_close(torch.tensor(result["grad_norms"]), torch.tensor(reference["grad_norms"]), rtol=1e-5,
                               atol=1e-7, msg=f"{name}: gradient norms")
    assert result["params"].keys() == reference["params"].keys()
    for key, value in reference["params"].items():
        torch.testing.assert_close(result["params"][key], value, rtol=0, atol=5e-6, msg=f"{name}: {key}")
    ours, theirs = result["optimizer"]["state"], reference["optimizer"]["state"]
    assert ours.keys() == theirs.keys() and len(ours) == len(reference["params"])
    for i in theirs:
        assert float(ours[i]["step"]) == float(theirs[i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[i][key], theirs[i][key], rtol=1e-4, atol=1e-7, msg=f"{name}: {key}[{i}]")


def test_every_layout_trains_like_one_process(tiny_model_dir, tmp_path, free_port):
    from transformers import AutoModelForCausalLM

    args = lambda name: [tiny_model_dir, str(tmp_path / f"{name}.pt"), "3"]
    _one_process(args("one"))
    reference = torch.load(tmp_path / "one.pt", weights_only=False)
    assert reference["num_processes"] == 1 and reference["zero_stage"] is None
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    moved = max((reference["params"][k] - initial[k]).abs().max().item() for k in reference["params"])
    assert moved > 1e-2, "training barely moved the parameters: the comparison below would prove nothing"
    for layout, stage in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        _two_processes(layout, args(layout))
        result = torch.load(tmp_path / f"{layout}.pt", weights_only=False)
        assert result["num_processes"] == 2 and result["zero_stage"] == stage
        _assert_same_training(result, reference, layout)
        if stage == 3:  # the weights were gathered a bucket at a time: never the whole model on a rank
            assert result["most_materialized_bytes"] <= BUCKET_BYTES < result["model_bytes"] / 4
    _two_machines(args("two_machines"), free_port())
    result = torch.load(tmp_path / "two_machines.pt", weights_only=False)
    assert result["num_processes"] == 2 and result["zero_stage"] == 2
    _assert_same_training(result, reference, "two machines (ZeRO-2)")


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_optimizer_state_resumes_under_another_layout(tiny_model_dir, tmp_path, layout):
    """2 steps in 1 process, then the 3rd under ZeRO on 2 processes from the saved model and optimizer state, equals
    3 steps in 1 process (and equals it only with the state: a fresh optimizer gives a different 3rd step)."""
    from transformers import AutoModelForCausalLM

    _one_process([tiny_model_dir, str(tmp_path / "three.pt"), "3"])
    _one_process([tiny_model_dir, str(tmp_path / "two.pt"), "2"])
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = model.load_state_dict(two["params"], strict=False)  # the tiny model's LM head is tied to the embeddings
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}
    model.save_pretrained(tmp_path / "after2")
    torch.save(two["optimizer"], tmp_path / "optimizer2.pt")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model_dir) / name).is_file():
            (tmp_path / "after2" / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    _two_processes(layout, [str(tmp_path / "after2"), str(tmp_path / "resumed.pt"), "3", "2",
                            str(tmp_path / "optimizer2.pt")])
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    three = torch.load(tmp_path / "three.pt", weights_only=False)
    _one_process([str(tmp_path / "after2"), str(tmp_path / "fresh.pt"), "3", "2", "none"])
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=False)
    assert max((fresh["params"][k] - v).abs().max().item() for k, v in three["params"].items()) > 1e-4
    assert resumed["zero_stage"] == int(layout[-1])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(three["losses"][2:]), rtol=1e-5,
                               atol=1e-7)
    for key, value in three["params"].items():
        torch.testing.assert_close(resumed["params"][key], value, rtol=0, atol=5e-6, msg=key)
    for i, entry in three["optimizer"]["state"].items():
        assert float(resumed["optimizer"]["state"][i]["step"]) == float(entry["step"]) == 6.0
        torch.testing.assert_close(resumed["optimizer"]["state"][i]["exp_avg_sq"], entry["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-7)


def test_zero2_bf16_trains_like_one_process_mixed_precision_and_resumes_its_float32_masters(tiny_model_dir, tmp_path):
    """DeepSpeed's bf16 mode on 2 processes (bf16 weight copies, float32 masters in the optimizer) against 1 process
    of bf16 autocast over float32 weights: the same training within bf16 rounding (the two compute the residual
    stream in bf16 and float32). Its module weights are its masters rounded to bf16, and a resume that puts the saved
    masters back continues exactly as the uninterrupted run, where one from the bf16 weights alone does not."""
    bf16 = {**ENV, "SHARDING_DTYPE": "bfloat16"}
    out = lambda name: str(tmp_path / f"{name}.pt")

    def launch(args, layout="zero2"):
        cmd = [*LAUNCH, "--config_file", f"recipes/accelerate/{layout}.yaml", "--num_processes", "2", WORKER, *args]
        _check(subprocess.run(cmd, check=False, cwd=REPO, env=bf16, capture_output=True, text=True, timeout=600),
               f"{layout} bf16")

    _check(subprocess.run([sys.executable, WORKER, tiny_model_dir, out("one"), "3"], check=False, cwd=REPO, env=bf16,
                          capture_output=True, text=True, timeout=600), "1 process bf16")
    launch([tiny_model_dir, out("zero2"), "3"])
    one, zero2 = (torch.load(out(n), weights_only=False) for n in ("one", "zero2"))
    assert one["param_dtype"] == "torch.float32" and zero2["param_dtype"] == "torch.bfloat16"
    assert zero2["zero_stage"] == 2 and all(m.dtype == torch.float32 for m in zero2["masters"])
    for (name, weight), master in zip(zero2["params"].items(), zero2["masters"]):
        assert torch.equal(weight, master.reshape(weight.shape).to(torch.bfloat16)), name
    torch.testing.assert_close(torch.tensor(zero2["losses"]), torch.tensor(one["losses"]), rtol=0.02, atol=1e-3)
    torch.testing.assert_close(torch.tensor(zero2["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=0.02, atol=0)
    from transformers import AutoModelForCausalLM

    initial = torch.cat([p.detach().reshape(-1) for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()])
    ours, theirs = torch.cat([m.reshape(-1) for m in zero2["masters"]]), torch.cat([m.reshape(-1) for m in one["masters"]])
    assert torch.linalg.vector_norm(ours - theirs) < 0.1 * torch.linalg.vector_norm(theirs - initial)

    # 2 steps, save (masters, optimizer, the model from the masters), resume the 3rd step
    launch([tiny_model_dir, out("two"), "2"])
    two = torch.load(out("two"), weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [n for n, _ in model.named_parameters()]
    model.load_state_dict(dict(zip(names, (m.reshape(p.shape) for m, p in zip(two["masters"], model.parameters())))),
                          strict=False)
    model.save_pretrained(tmp_path / "after2")
    torch.save(two["optimizer"], tmp_path / "optimizer2.pt")
    torch.save(two["masters"], tmp_path / "masters2.pt")
    launch([str(tmp_path / "after2"), out("resumed"), "3", "2", str(tmp_path / "optimizer2.pt"),
            str(tmp_path / "masters2.pt")])
    launch([str(tmp_path / "after2"), out("rounded"), "3", "2", str(tmp_path / "optimizer2.pt")])
    resumed, rounded = (torch.load(out(n), weights_only=False) for n in ("resumed", "rounded"))
    for got, want in zip(resumed["masters"], zero2["masters"]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert max((got - want).abs().max().item() for got, want in zip(rounded["masters"], zero2["masters"])) > 1e-5


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_the_trainer_checkpoints_and_resumes_deepspeed_bf16_with_its_float32_masters(tiny_model_dir, tmp_path, layout):
    """model.dtype=bfloat16 under ZeRO: a checkpoint holds the float32 masters (the model folder and
    master_weights.safetensors agree), and the resumed run finds them (no warning) and goes on to the next step."""
    from safetensors.torch import load_file

    out = tmp_path / "run"

    def train(steps: int) -> str:
        cmd = [*LAUNCH, "--config_file", f"recipes/accelerate/{layout}.yaml", "--num_processes", "2", "-m",
               "reasonrl.trainers.grpo", "--config", "recipes/tiny_smoke.yaml", f"model.name_or_path={tiny_model_dir}",
               "model.dtype=bfloat16", f"trainer.output_dir={out}", f"trainer.steps={steps}", "trainer.save_every=1",
               "trainer.keep_last=2", "logging.wandb_mode=disabled"]
        done = subprocess.run(cmd, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
        _check(done, f"{layout} bf16 trainer")
        return done.stdout

    assert "precision: bf16 autocast over float32 master weights" in train(2)
    step2 = out / "checkpoints" / "step-000002"
    masters = load_file(step2 / "master_weights.safetensors")
    (model_file,) = (step2 / "model").glob("*.safetensors")
    weights = load_file(model_file)
    assert all(w.dtype == torch.float32 for w in weights.values())
    from transformers import AutoModelForCausalLM

    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()]
    assert len(masters) == len(names)
    for i, name in enumerate(names):
        assert torch.equal(masters[str(i)].reshape(weights[name].shape), weights[name]), name
    log = train(3)
    assert "warning:" not in log and (out / "checkpoints" / "step-000003" / "master_weights.safetensors").is_file()
