"""The producer/learner trainer is the loop it replaced: the same metrics and parameters, bit for bit, over 4 steps
on the tiny model (issue 21). The loop before the split is taken from the git history (`git archive`) and run side
by side with the current one, so the comparison does not depend on numbers stored from another machine."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import skip_or_fail_in_ci, trainer_env
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
BEFORE_SPLIT = "662c5795ab54643021df69e1c5bbef1e97573bdd"  # the last commit with the single train_step
STEPS = 4
SETTINGS = {  # between them, every stage of a step: the shapers, dynamic sampling, KL, D3S, HAPO, RMT
    "hapo_d3s_dapo": ["algorithm.advantage=hapo", "algorithm.hapo.adaptive_temperature=true",
                      "algorithm.hapo.adaptive_clip=true", "algorithm.hapo.redistribution=true",
                      "algorithm.dynamic_sampling.enabled=true", "algorithm.overlong.penalty=true",
                      "algorithm.overlong.buffer=4", "algorithm.d3s.sample_keep_start=0.5",
                      "algorithm.d3s.token_keep_start=0.5", "algorithm.d3s.min_keep=1", "algorithm.num_iterations=2",
                      "optim.schedule=cosine"],
    "rmt_kl_effort": ["algorithm.rmt.curriculum=true", "algorithm.rmt.ntp_weight_start=0.2",
                      "algorithm.rmt.ntp_rows=all", "algorithm.kl_coef=0.05", "algorithm.kl_in=reward",
                      "algorithm.reward_shapers=[{name: rmt_budget, args: {minimum: 2}}, {name: effort}]",
                      "algorithm.loss_agg=seq_mean_token_mean", "rollout.temperature=0.8"],
}


def _source_before_split(dest: Path) -> Path:
    """The package as it was before the split, extracted from the history into `dest`."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        skip_or_fail_in_ci("needs the repository's git history")
    known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BEFORE_SPLIT}^{{commit}}"], check=False)
    if known.returncode != 0:
        skip_or_fail_in_ci(f"commit {BEFORE_SPLIT} is not in this clone (shallow?)")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE_SPLIT, "reasonrl"], check=True,
                             capture_output=True).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _env(source: Path) -> dict:
    return trainer_env(source, REPO / "tests" / "trainers", OMP_NUM_THREADS="1")


def _run(source: Path, model_dir: str, out: Path, extra: list[str]) -> None:
    # run outside the repo: `python -c` and `-m` put the working folder first on sys.path
    which = subprocess.run([sys.executable, "-c", "import reasonrl; print(reasonrl.__file__)"], env=_env(source),
                           cwd=out.parent, capture_output=True, text=True, check=True).stdout
    assert Path(which.strip()).is_relative_to(source)  # this run imports the package it is meant to
    done = subprocess.run([
        sys.executable, "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / "tiny_smoke.yaml"),
        f"model.name_or_path={model_dir}", f"trainer.output_dir={out}", f"trainer.steps={STEPS}",
        f"trainer.save_every={STEPS}", "trainer.eval_at_start=false", "data.num_eval=0",
        "logging.wandb_mode=disabled", "rewards=[{name: 'rewards_for_tests:digit_count'}]",
        "rollout.max_new_tokens=8", *extra,
    ], env=_env(source), cwd=out.parent, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in rows]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_producer_learner_loop_is_the_loop_it_replaced(tiny_model_dir, tmp_path, name):
    before = _source_before_split(tmp_path / "before_split")
    _run(before, tiny_model_dir, tmp_path / "old", SETTINGS[name])
    _run(REPO, tiny_model_dir, tmp_path / "new", SETTINGS[name])
    old, new = _metrics(tmp_path / "old"), _metrics(tmp_path / "new")
    assert [row["step"] for row in new] == list(range(1, STEPS + 1))
    assert new == old  # every metric of every step, exactly
    final = Path("checkpoints") / f"step-{STEPS:06d}" / "model" / "model.safetensors"
    old_w, new_w = load_file(str(tmp_path / "old" / final)), load_file(str(tmp_path / "new" / final))
    assert old_w.keys() == new_w.keys() and all(torch.equal(old_w[k], new_w[k]) for k in old_w)
