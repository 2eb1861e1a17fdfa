"""Training checkpoints: a loadable model folder plus everything needed to continue exactly.

    out/checkpoints/step_00000100/
        config.json, model.safetensors, generation_config.json     model.save_pretrained (full weights)
        tokenizer.json, tokenizer_config.json                      the tokenizer the data was encoded with
        trainer_state.json                                          step, data position, the config
        optimizer.pt                                                AdamW state (single process / DDP)
        dcp/                                                        FSDP2: model + optimiser, sharded (torch DCP)
        rng/rank_00000.pt                                           every RNG of every rank

The folder is written under `.step_XXXXXXXX.tmp`, flushed, then renamed: a kill during a save leaves the previous
checkpoint as the latest complete one. `latest_checkpoint` ignores temporary folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recurrent_depth.runtime import Runtime, rng_state, set_rng_state

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under out_dir/checkpoints, or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: p.name) if done else None


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _full_state_dict(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_model(model: nn.Module, folder: Path, full: dict[str, torch.Tensor] | None) -> None:
    """model.save_pretrained into `folder`; from a gathered full state dict when the model is sharded."""
    if full is None:
        model.save_pretrained(folder)
        return
    from recurrent_depth.model import RecurrentDepthForCausalLM

    with torch.device("meta"):
        copy = RecurrentDepthForCausalLM(model.config)
    copy.load_state_dict(full, assign=True, strict=False)
    copy.tie_weights()
    copy.transformer.reset_rope()  # the RoPE table is a buffer, not in the state dict
    copy.save_pretrained(folder)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    tokenizer: Any, state: dict[str, Any], rt: Runtime, sharded: bool, keep: int) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); returns its folder."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    full = _full_state_dict(model, sharded)  # collective: every rank takes part
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _save_model(model, tmp, full)  # replaces tmp atomically, so it goes first
        tokenizer.save_pretrained(str(tmp))
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rt.barrier()
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rt.rank:05d}.pt")
    rt.barrier()
    if rt.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    rt.barrier()
    return final


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "trainer_state.json").read_text())


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Copy the checkpoint's weights into an (unsharded, unwrapped) model."""
    from recurrent_depth.model.checkpoint import read_state_dict

    state = read_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                        sharded: bool) -> dict[str, Any]:
    """Restore optimiser (and, when sharded, model) state and this rank's RNGs; returns trainer_state.json."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        box = {"model": msd, "optim": osd}
        dcp.load(box, checkpoint_id=str(folder / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    else:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=rt.device, weights_only=False))
    rng_file = folder / "rng" / f"rank_{rt.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(folder)
