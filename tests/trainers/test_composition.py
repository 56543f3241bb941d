"""Settings in combination (issue 20): one trainer step on the tiny model for every estimator x loss aggregation x
{D3S, HAPO, RMT} on/off x num_iterations, and every ordered pair of reward shapers checked against the papers'
formulas written out by hand here, row by row."""

import itertools
import math

import pytest
import torch

from reasonrl.config import load_config
from reasonrl.rewards import combine
from reasonrl.trainers.grpo import GRPOTrainer
from reasonrl.trainers.optimization import lr_factor

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "hapo")
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "constant")
COMPONENTS = {  # each component's switches, as a user turns it on
    "d3s": ["algorithm.d3s.sample_keep_start=0.5", "algorithm.d3s.token_keep_start=0.5",
            "algorithm.d3s.keep_end=0.5", "algorithm.d3s.min_keep=1"],
    "hapo": ["algorithm.hapo.adaptive_temperature=true", "algorithm.hapo.adaptive_clip=true",
             "algorithm.hapo.redistribution=true"],
    "rmt": ["algorithm.rmt.curriculum=true", "algorithm.rmt.ntp_weight_start=0.1", "algorithm.rmt.ntp_weight_end=0.1",
            "algorithm.rmt.ntp_rows=all"],
}
STEPS = 4
LR = 1e-3


def trainer(tiny_model_dir, tmp_path, *extra):
    config = load_config("recipes/tiny_smoke.yaml", [
        f"model.name_or_path={tiny_model_dir}", f"trainer.output_dir={tmp_path}", "logging.wandb_mode=disabled",
        "rewards=[{name: 'rewards_for_tests:digit_count'}]", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "trainer.eval_at_start=false", "data.num_eval=0", f"trainer.steps={STEPS}",
        "optim.schedule=cosine", f"optim.lr={LR}", "optim.micro_batch_size=3", *extra,
    ])
    return GRPOTrainer(config)


def combinations():
    for estimator, agg, iterations in itertools.product(ESTIMATORS, LOSS_AGGS, (1, 2)):
        for on in itertools.product((False, True), repeat=len(COMPONENTS)):
            yield estimator, agg, iterations, tuple(name for name, flag in zip(COMPONENTS, on) if flag)


@pytest.mark.parametrize("estimator,agg,iterations,components", list(combinations()),
                         ids=lambda v: "+".join(v) if isinstance(v, tuple) else str(v))
def test_one_step_of_every_combination(tiny_model_dir, tmp_path, estimator, agg, iterations, components):
    switches = [s for name in components for s in COMPONENTS[name]]
    tr = trainer(tiny_model_dir, tmp_path, f"algorithm.advantage={estimator}", f"algorithm.loss_agg={agg}",
                 f"algorithm.num_iterations={iterations}", *switches)
    before = [p.detach().clone() for p in tr.policy.parameters()]
    metrics = tr.train_step()
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["optim/grad_norm"])
    # the schedule follows trainer steps: the step trained at lr(0), the next one runs at lr(1), however many
    # optimizer steps the iterations took
    assert metrics["optim/lr"] == pytest.approx(LR)
    expected_next = LR * lr_factor(1, warmup_steps=0, total_steps=STEPS, schedule="cosine")
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(expected_next)
    changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, tr.policy.parameters()))
    assert changed == (metrics["train/skipped"] == 0.0)
    if "d3s" in components:
        assert metrics["d3s/sample_keep_frac"] == pytest.approx(0.5)
        assert 0 < metrics["d3s/token_keep_frac"] < 1
    else:
        assert metrics["d3s/sample_keep_frac"] == 1.0 and metrics["d3s/token_keep_frac"] == 1.0
    assert ("hapo/entropy_pivot" in metrics) == ("hapo" in components)
    assert metrics.get("rmt/ntp_weight", 0.0) == (0.1 if "rmt" in components else 0.0)
    if "rmt" in components:  # the NTP term trains even rows whose advantage is 0
        assert metrics["train/skipped"] == 0.0 and metrics["loss/ntp"] > 0


EPISODES = ["env.source=builtin", "env.id=retry", "env.max_turns=3", "env.max_episode_tokens=96",
            # one character per token: a stop at any letter or digit ends most turns early, so the environment replies
            "rollout.stop=[" + ",".join(f"'{c}'" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
            + "]"]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("components", [c for r in range(len(COMPONENTS) + 1)
                                        for c in itertools.combinations(COMPONENTS, r)],
                         ids=lambda v: "+".join(v) or "plain")
def test_one_step_of_episodes_with_every_component_set(tiny_model_dir, tmp_path, agg, components):
    """Episodes (multi-turn, environment tokens in the completion) with D3S, HAPO and RMT in every combination: a
    finite update that trains the model's tokens only."""
    switches = [s for name in components for s in COMPONENTS[name]]
    tr = trainer(tiny_model_dir, tmp_path, f"algorithm.loss_agg={agg}", *EPISODES, *switches)
    metrics = tr.train_step()
    assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["optim/grad_norm"])
    assert metrics["episode/env_token_share"] > 0 and metrics["episode/turns_mean"] > 1
    model_tokens = metrics["completion/len_mean"] * 8  # 2 prompts x 4 episodes
    assert metrics["train/loss_tokens"] <= model_tokens
    assert ("hapo/entropy_pivot" in metrics) == ("hapo" in components)


def test_a_skipped_step_still_advances_the_schedule(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(combine.REWARD_REGISTRY, "accuracy", lambda completions, **_: [1.0] * len(completions))
    tr = trainer(tiny_model_dir, tmp_path, "rewards=[{name: accuracy}]", "algorithm.num_iterations=2")
    lrs = []
    for _ in range(2):
        metrics = tr.train_step()
        assert metrics["train/skipped"] == 1.0  # equal rewards in every group: nothing to learn
        lrs.append(metrics["optim/lr"])
    factors = [lr_factor(s, warmup_steps=0, total_steps=STEPS, schedule="cosine") for s in range(3)]
    assert lrs == pytest.approx([LR * factors[0], LR * factors[1]])
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(LR * factors[2])


# ---------------------------------------------------------------------------------------------- reward shapers
MAX_NEW = 6
SHAPERS = {
    "overlong": "{name: overlong, args: {buffer: 3, factor: 0.5}}",
    "rmt_additive": "{name: rmt_budget, args: {initial: 4, minimum: 2, weight: 0.5}}",
    "rmt_multiplicative": "{name: rmt_budget, args: {initial: 4, minimum: 2, mode: multiplicative}}",
    "effort": "{name: effort, args: {levels: [0.5, 1.0]}}",
}
ACCURACY_WEIGHT, FORMAT_VALUE = 2.0, 0.25


def even_length_is_correct(completions, **_):
    return [float(len(c) % 2 == 0) for c in completions]


def constant_format(completions, **_):
    return [FORMAT_VALUE] * len(completions)


def by_hand(names, scored, lengths):
    """R = R_correct * (product of the gates) + (sum of the added terms), row by row, at step 0 (no statistics yet):
    DAPO overlong penalty, RMT budget B = initial (length reward l/B up to B, 2 - l/B after, 0 beyond 2B), e1 gate
    1[l <= r * T] with T the mean length of the group's untruncated rows (0 when truncated)."""
    g = scored.group_size
    rows = [scored.rows[i // g] for i in range(len(lengths))]
    truncated = [reason == "length" for reason in scored.batch.finish_reasons]
    accuracy = scored.per_func["accuracy"]
    out = []
    for i, (row, l) in enumerate(zip(rows, lengths.tolist())):
        c, added = ACCURACY_WEIGHT * accuracy[i], FORMAT_VALUE
        for name in names:
            if name == "overlong":
                limit = row.get("max_new_tokens", MAX_NEW)
                start = limit - 3
                added += 0.0 if l <= start else (-0.5 if l > limit else (start - l) / 3 * 0.5)
            elif name.startswith("rmt"):
                r_len = l / 4 if l <= 4 else max(0.0, 2 - l / 4)
                if name == "rmt_additive":
                    added += 0.5 * r_len * (c > 0)
                else:
                    c *= r_len
            else:
                group = range(i // g * g, i // g * g + g)
                kept = [lengths[j].item() for j in group if not truncated[j]]
                mean = sum(kept) / len(kept) if kept else MAX_NEW
                c *= float(l <= row["effort"] * mean and not truncated[i])
        out.append(c + added)
    return out


SHAPER_PAIRS = [pair for pair in itertools.permutations(SHAPERS, 2) if sum(n.startswith("rmt") for n in pair) < 2]


@pytest.mark.parametrize("names", SHAPER_PAIRS, ids="+".join)
def test_every_pair_of_shapers_gives_the_formula(tiny_model_dir, tmp_path, monkeypatch, names):
    """Every ordered pair of shapers (one budget shaper at a time: the trainer reads one budget)."""
    monkeypatch.setitem(combine.REWARD_REGISTRY, "accuracy", even_length_is_correct)
    shapers = ", ".join(SHAPERS[name] for name in names)
    # stop at a-l (kept in the completion), so that the random model's lengths vary
    tr = trainer(tiny_model_dir, tmp_path, f"rollout.max_new_tokens={MAX_NEW}", "rollout.group_size=4",
                 f"rollout.stop=[{','.join('abcdefghijkl')}]", "rollout.prompts_per_step=4",
                 f"rewards=[{{name: accuracy, weight: {ACCURACY_WEIGHT}}}, "
                 "{name: 'test_composition:constant_format'}]", f"algorithm.reward_shapers=[{shapers}]")
    scored, _ = tr.producer.collect(0)
    lengths = scored.batch.completion_mask.sum(-1).float()
    rewards, _ = tr.producer.shape_rewards(scored, lengths, 0)
    expected = by_hand(names, scored, lengths)
    assert rewards.tolist() == pytest.approx(expected, abs=1e-6)
    # the case is not degenerate: lengths vary, some rows are truncated, some correct
    assert len(set(lengths.tolist())) > 1 and "length" in scored.batch.finish_reasons
    assert 0 < sum(scored.per_func["accuracy"]) < len(lengths)
