"""Atomic checkpoints: a complete folder appears under its final name or not at all.

Layout of `<output_dir>/checkpoints/step-000010/`:
  model/                 HF folder (config, safetensors, tokenizer): `reasonrl eval` and transformers load it
  adapter/               instead of model/ with model.lora.enabled: peft adapters only (adapter_config.json,
                         adapter_model.safetensors) and the tokenizer; the base weights stay those of model.name_or_path
  trainer_state.json     step, data position, scheduler, eval history, shaper state, optimizer hyper-parameters
  optimizer.safetensors  the optimizer's per-parameter tensors (AdamW's moments and step counts)
  rng_rank{r}.json       python / numpy / torch RNG states of each process (CPU, and its CUDA device if it used one)
`<output_dir>/checkpoints/latest` names the newest complete checkpoint; it is replaced atomically too.

No file of a checkpoint is a pickle, so resuming from a run folder that someone else wrote cannot execute code.
Checkpoints of earlier versions (`trainer_state.pt`, `rng_rank{r}.pt`: pickles) are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step-"
FORMAT = 2  # 1: the pickled trainer_state.pt / rng_rank{r}.pt of earlier versions
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MASTERS_FILE = "master_weights.safetensors"  # DeepSpeed bf16 mode: the float32 masters, by trainable index
LEGACY_STATE_FILE = "trainer_state.pt"


class CheckpointFormatError(ValueError):
    """A checkpoint this version does not load: the pickle format of earlier versions, or an unknown format."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's RNG states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_initialized():  # only this rank's device: asking for every device would open a context on each
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where all ranks write a checkpoint before it is published (same name on every rank)."""
    return checkpoint_root(output_dir) / f".{step_dir_name(step)}.partial"


def write_rank_files(stage: Path, rank: int) -> None:
    (stage / f"rng_rank{rank}.json").write_text(json.dumps(rng_state()))


def write_main_files(stage: Path, *, model, tokenizer, trainer_state: dict, state_dict: dict | None = None,
                     masters: list | None = None) -> None:
    """Main process only: the HF model folder (a LoRA policy: its adapter folder only) and the trainer state, whose
    "optimizer" entry (a torch optimizer state dict) goes to optimizer.safetensors and the rest to JSON.

    state_dict: the weights to write instead of the module's (gathered ZeRO-3 weights; DeepSpeed bf16 mode: the
    float32 masters by name, so the exported model is not rounded). masters: the float32 masters by trainable index
    (DeepSpeed bf16 mode), for `load_masters`."""
    from reasonrl.trainers import lora

    if masters is not None:
        save_file({str(i): t.contiguous() for i, t in enumerate(masters)}, stage / MASTERS_FILE)
    if lora.is_lora_model(model):
        folder = stage / lora.ADAPTER_DIR
        lora.save_adapters(model, folder, state_dict=state_dict)
    else:
        folder = stage / "model"
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)  # state_dict: gathered ZeRO-3
    tokenizer.save_pretrained(folder)
    state = {"format": FORMAT, **trainer_state}
    if state.get("optimizer") is not None:
        tensors, state["optimizer"] = _split_optimizer_state(state["optimizer"])
        save_file(tensors, stage / OPTIMIZER_FILE)
    (stage / STATE_FILE).write_text(json.dumps(state))


def _split_optimizer_state(saved: dict) -> tuple[dict, dict]:
    """(tensors named "<param index>/<key>", the JSON rest) of an optimizer state dict."""
    tensors = {f"{index}/{key}": value.detach().cpu().contiguous()
               for index, entry in saved["state"].items() for key, value in entry.items()}
    keys = {str(index): list(entry) for index, entry in saved["state"].items()}
    return tensors, {"param_groups": saved["param_groups"], "state_keys": keys}


def _join_optimizer_state(rest: dict, tensors: dict) -> dict:
    # torch matches state entries to parameters by integer index: JSON's string keys would silently drop them
    state = {int(index): {key: tensors[f"{index}/{key}"] for key in keys} for index, keys in rest["state_keys"].items()}
    return {"state": state, "param_groups": rest["param_groups"]}


def publish(output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Main process only, after every rank wrote its files: rename into place, point `latest`, prune."""
    root = checkpoint_root(output_dir)
    final = root / step_dir_name(step)
    if final.exists():  # a re-run of the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(staging_dir(output_dir, step), final)
    _write_text_atomic(root / "latest", final.name)
    if keep_last > 0:
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging folders are never listed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def _is_complete(ckpt: Path) -> bool:
    # an old-format checkpoint counts too: resuming it must fail with CheckpointFormatError, not restart from step 0
    return (ckpt / STATE_FILE).is_file() or (ckpt / LEGACY_STATE_FILE).is_file()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by `latest`, else the newest complete folder, else None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            return named
    complete = [p for p in list_checkpoints(output_dir) if _is_complete(p)]
    return complete[-1] if complete else None


def load_masters(ckpt: Path) -> list | None:
    """The float32 master weights a DeepSpeed bf16 run saved (by trainable index), or None."""
    path = ckpt / MASTERS_FILE
    if not path.is_file():
        return None
    tensors = load_file(path)
    return [tensors[str(i)] for i in range(len(tensors))]


def load_trainer_state(ckpt: Path) -> dict:
    """The dict given to `write_main_files` as `trainer_state` (plus "format")."""
    if not (ckpt / STATE_FILE).is_file():
        raise CheckpointFormatError(
            f"{ckpt} is a checkpoint of an earlier reasonrl version ({LEGACY_STATE_FILE}, a pickle, which is not "
            "loaded because unpickling a file can run arbitrary code); its model/ folder still loads as a model "
            "(model.name_or_path), but its optimizer and data position cannot be resumed")
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise CheckpointFormatError(f"{ckpt / STATE_FILE} has format {state.get('format')!r}; this version reads "
                                    f"format {FORMAT}")
    if state.get("optimizer") is not None:
        state["optimizer"] = _join_optimizer_state(state["optimizer"], load_file(ckpt / OPTIMIZER_FILE))
    return state


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    """Rank `rank`'s RNG states; None for a rank the saving run did not have (it resumes with more processes)."""
    path = ckpt / f"rng_rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None
