"""Atomic checkpoints: a complete folder appears under its final name or not at all.

Layout of `<output_dir>/checkpoints/step-000010/`:
  model/            HF folder (config, safetensors, tokenizer): `reasonrl eval` and transformers load it
  adapter/          instead of model/ with model.lora.enabled: peft adapters only (adapter_config.json,
                    adapter_model.safetensors) and the tokenizer; the base weights stay those of model.name_or_path
  trainer_state.pt  optimizer, scheduler, step, data position, tracker state
  rng_rank{r}.pt    python / torch RNG states of each process
`<output_dir>/checkpoints/latest` names the newest complete checkpoint; it is replaced atomically too.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STEP_PREFIX = "step-"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where all ranks write a checkpoint before it is published (same name on every rank)."""
    return checkpoint_root(output_dir) / f".{step_dir_name(step)}.partial"


def write_rank_files(stage: Path, rank: int) -> None:
    torch.save(rng_state(), stage / f"rng_rank{rank}.pt")


def write_main_files(stage: Path, *, model, tokenizer, trainer_state: dict, state_dict: dict | None = None) -> None:
    """Main process only: the HF model folder (a LoRA policy: its adapter folder only) and the trainer state."""
    from reasonrl.trainers import lora

    if lora.is_lora_model(model):
        folder = stage / lora.ADAPTER_DIR
        lora.save_adapters(model, folder)
    else:
        folder = stage / "model"
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)  # state_dict: gathered ZeRO-3
    tokenizer.save_pretrained(folder)
    torch.save(trainer_state, stage / "trainer_state.pt")


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


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by `latest`, else the newest complete folder, else None."""
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / "trainer_state.pt").is_file():
            return named
    complete = [p for p in list_checkpoints(output_dir) if (p / "trainer_state.pt").is_file()]
    return complete[-1] if complete else None


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_rank_rng(ckpt: Path, rank: int) -> dict | None:
    path = ckpt / f"rng_rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None
