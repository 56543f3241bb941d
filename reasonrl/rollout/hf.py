"""The simplest engine: batched `transformers` `generate` on the policy model itself."""

from __future__ import annotations

import torch

from reasonrl.rl.losses import token_logprobs_and_entropy
from reasonrl.rollout.base import RolloutOutput, SamplingParams
from reasonrl.rollout.stops import stop_cut, text_decoder


class HFEngine:
    """Generates with the trainer's own model, so `load_weights` has nothing to copy."""

    def __init__(self, model, *, pad_token_id: int, eos_token_ids: list[int], batch_size: int = 64,
                 return_entropy: bool = False, tokenizer=None, synced_gpus: bool = False):
        self.model = model
        # ZeRO-3: every forward gathers parameters from all ranks, so ranks keep stepping until all are done
        self.synced_gpus = synced_gpus
        self.tokenizer = tokenizer  # needed for stop strings only
        self.return_entropy = return_entropy  # token entropies at T=1 come free with the logits (HAPO, D3S use them)
        self.pad_token_id = pad_token_id
        self.eos_token_ids = set(eos_token_ids)
        self.batch_size = batch_size

    def load_weights(self, named_tensors) -> None:
        """The policy and the engine share parameters: nothing to do."""

    @torch.no_grad()
    def generate(self, prompt_ids, params: SamplingParams, max_new_tokens, logits_processors=None) -> RolloutOutput:
        if len(max_new_tokens) != len(prompt_ids):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(prompt_ids)} prompts")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: HFEngine(..., tokenizer=tokenizer)")
        rows = [(ids, budget) for ids, budget in zip(prompt_ids, max_new_tokens) for _ in range(params.n)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        out = RolloutOutput([], [], [], [] if self.return_entropy else None)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), self.batch_size):
                self._generate_chunk(rows[start : start + self.batch_size], params, logits_processors, out)
        finally:
            self.model.train(was_training)
        return out

    def _generate_chunk(self, rows, params, logits_processors, out: RolloutOutput) -> None:
        width = max(len(ids) for ids, _ in rows)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for i, (ids, _) in enumerate(rows):  # left padding
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        greedy = params.temperature == 0
        if params.adaptive_temperature is not None and not greedy:
            logits_processors = [*(logits_processors or []), _adaptive_temperature_processor(params)]
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max(budget for _, budget in rows),
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            pad_token_id=self.pad_token_id,
            eos_token_id=sorted(self.eos_token_ids),
            logits_processor=logits_processors,
            synced_gpus=self.synced_gpus,
            **({"stop_strings": list(params.stop), "tokenizer": self.tokenizer} if params.stop else {}),
            output_scores=True,  # after every processor: the distribution each token was drawn from
            output_logits=out.entropies is not None,  # raw logits, for the entropy at T = 1
            return_dict_in_generate=True,
        )
        generated = result.sequences[:, width:]  # [B, T]
        token_logp = sampled_logprobs(result.scores, generated)
        entropy = None if out.entropies is None else raw_entropies(result.logits, generated)
        for i, (_, budget) in enumerate(rows):
            ids, reason = self._trim(generated[i].tolist(), budget, params.stop)
            out.completion_ids.append(ids)
            out.logprobs.append(token_logp[i, : len(ids)].tolist())
            out.finish_reasons.append(reason)
            if entropy is not None:
                out.entropies.append(entropy[i, : len(ids)].tolist())

    def _trim(self, ids: list[int], budget: int, stops: tuple[str, ...] = ()) -> tuple[list[int], str]:
        """Cut at the first EOS (kept), the first stop string (kept), or this row's own budget."""
        ids, reason = ids[:budget], "length"
        for t, token in enumerate(ids):
            if token in self.eos_token_ids:
                ids, reason = ids[: t + 1], "stop"
                break
        cut = stop_cut(ids, text_decoder(self.tokenizer), stops)
        return (ids[:cut], "stop") if cut is not None else (ids, reason)


def sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] log-softmax of generate's processed scores (one [B, V] per step: logits / T_t after top-k / top-p,
    filtered entries -inf) at the sampled tokens: vLLM's `processed_logprobs`. Step by step, so no [B, T, V] copy."""
    return torch.stack([torch.log_softmax(step.float(), -1).gather(-1, tokens[:, t, None]).squeeze(-1)
                        for t, step in enumerate(scores)], dim=1)


def raw_entropies(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] entropy at T = 1 of the raw logits (one [B, V] per step), as `policy.completion_logprobs` gives it."""
    return torch.stack([token_logprobs_and_entropy(step[:, None], tokens[:, t, None])[1][:, 0]
                        for t, step in enumerate(logits)], dim=1)


def _adaptive_temperature_processor(params: SamplingParams):
    """Runs before generate's own temperature division, so it rescales by temperature / T_t."""
    from reasonrl.rl.hapo import EntropyStats
    from reasonrl.rollout.adaptive_temperature import AdaptiveTemperatureLogitsProcessor

    spec = params.adaptive_temperature
    return AdaptiveTemperatureLogitsProcessor(
        EntropyStats.from_list(list(spec.stats)), tau=spec.tau, base_temperature=params.temperature,
        sign_mode=spec.sign_mode,
    )
