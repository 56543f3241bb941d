"""One training step of every token-level component on a fixed batch, for the rank-split equivalence test.

Run in-process (1 rank, the whole batch) by the test, and as `accelerate launch --num_processes 2` (each rank
its half of the rows) by the same test; both save the parameter change of an SGD(lr=1) step per configuration.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.batch import RolloutBatch
from reasonrl.config import AlgorithmConfig, OptimConfig
from reasonrl.trainers.prepare import d3s_rollout_keep, d3s_token_mask, hapo_entropy_stats, hapo_h_hat
from reasonrl.trainers.step import train_on_batch

PAD, ROWS, WIDTH, GROUP = 0, 8, 6, 2


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def full_inputs(episodes: bool = False):
    """The batch, advantages, entropies and old log-probs; `episodes`: each row's 3rd and 4th tokens are
    environment tokens (input only)."""
    batch, advantages, entropy, old_logp = _completions()
    if episodes:
        batch.sampled_mask = batch.completion_mask.clone()
        batch.sampled_mask[:, 2:4] = False
    return batch, advantages, entropy, old_logp


def _completions():
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (ROWS // GROUP,),
                                                                                             generator=g)]
    lengths = torch.randint(1, WIDTH + 1, (ROWS,), generator=g)
    mask = torch.arange(WIDTH)[None] < lengths[:, None]
    batch = RolloutBatch(prompt_ids=[p for p in prompts for _ in range(GROUP)],
                         completion_ids=torch.randint(1, 40, (ROWS, WIDTH), generator=g).masked_fill(~mask, PAD),
                         completion_mask=mask, rollout_logprobs=None, finish_reasons=["stop"] * ROWS, group_size=GROUP)
    advantages = torch.randn(ROWS, generator=g)
    entropy = torch.rand(ROWS, WIDTH, generator=g) * 3 * mask
    old_logp = -torch.rand(ROWS, WIDTH, generator=g) * 3
    return batch, advantages, entropy, old_logp


def configurations() -> dict[str, AlgorithmConfig]:
    configs = {}
    for mode in ("token_mean", "seq_mean_token_mean", "constant"):
        configs[f"agg_{mode}"] = AlgorithmConfig(loss_agg=mode, dual_clip=2.0)
    hapo = AlgorithmConfig(eps_high=0.2)
    hapo.hapo.adaptive_clip = hapo.hapo.redistribution = True
    configs["hapo"] = hapo
    d3s = AlgorithmConfig()
    d3s.d3s.sample_keep_start, d3s.d3s.sample_scope, d3s.d3s.token_keep_start = 0.5, "cross", 0.5
    configs["d3s_batch_tokens"] = d3s
    both = AlgorithmConfig(entropy_coef=0.01)
    both.hapo.adaptive_clip = both.hapo.redistribution = True
    both.d3s.token_keep_start = 0.4
    configs["hapo_d3s_entropy"] = both
    for name in ("agg_seq_mean_token_mean", "hapo_d3s_entropy"):  # the same components on episodes
        configs[f"episodes_{name}"] = configs[name]
    return configs


def one_step(acc, algo: AlgorithmConfig, micro: int, episodes: bool = False) -> dict[str, torch.Tensor]:
    batch, all_adv, entropy, old_logp = full_inputs(episodes)
    per_rank = ROWS // acc.num_processes
    rows = torch.arange(acc.process_index * per_rank, (acc.process_index + 1) * per_rank)
    keep = d3s_rollout_keep(all_adv, algo.d3s, keep_fraction=algo.d3s.sample_keep_start, group_size=GROUP)[rows]
    local, adv, ent, old = batch.select_rows(rows), all_adv[rows], entropy[rows], old_logp[rows]
    local.loss_mask = local.model_mask() & keep[:, None]
    local.loss_mask = d3s_token_mask(acc, adv, ent, local.loss_mask, keep_fraction=algo.d3s.token_keep_start,
                                     scope=algo.d3s.token_scope)
    h_hat = None
    if algo.hapo.adaptive_clip:
        stats = hapo_entropy_stats(acc, ent, local.model_mask(), pivot=algo.hapo.entropy_pivot)
        h_hat = hapo_h_hat(ent, stats, sign_mode=algo.hapo.sign_mode)
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train_on_batch(model, opt, sched, acc, local, adv, algo=algo, optim=OptimConfig(micro_batch_size=micro,
                   max_grad_norm=1e9), pad_id=PAD, temperature=1.0, norm_constant=WIDTH, old_logp=old, h_hat=h_hat)
    core = acc.unwrap_model(model)
    return {name: before[name] - p.detach() for name, p in core.named_parameters()}


def run_all(acc, micro: int) -> dict[str, dict[str, torch.Tensor]]:
    return {name: one_step(acc, algo, micro, episodes=name.startswith("episodes_"))
            for name, algo in configurations().items()}


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    result = run_all(accelerator, micro=1)  # 4 rows per rank, one per micro-batch
    if accelerator.is_main_process:
        torch.save(result, sys.argv[1])
