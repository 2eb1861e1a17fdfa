"""Training checkpoints: a loadable model folder plus everything needed to continue exactly.

    out/checkpoints/step_00000100/
        config.json, model.safetensors, generation_config.json     model.save_pretrained (full weights)
        tokenizer.json, tokenizer_config.json                      the tokenizer the data was encoded with
        trainer_state.json                                          step, data position, the config
        optimizer.pt                                                AdamW state (single process / DDP)
        dcp/                                                        FSDP2: model + optimiser, sharded (torch DCP)
        rng/rank_00000.pt                                           every RNG of every rank, as plain tensors/values

The folder is written under `.step_XXXXXXXX.tmp`, flushed, then renamed: a kill during a save leaves the previous
checkpoint as the latest complete one. A failed write (disk full, ...) removes the temporary folder and raises
`CheckpointError`; the previous checkpoints stay. Nothing is unpickled beyond tensors and plain values
(`training/safe_files.py`). On resume, `find_resume_checkpoint` checks the newest folder and falls back to older ones
when it is truncated or garbled, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from recurrent_depth.model.checkpoint import CheckpointError, read_config
from recurrent_depth.runtime import Runtime, rng_state, set_rng_state
from recurrent_depth.training.safe_files import (
    CorruptFile,
    check_dcp_metadata,
    check_tensor_file,
    load_tensor_file,
    native_rng,
    portable_rng,
)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.step_\d{8}\.tmp$")
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)  # torch.save reports a failed write as RuntimeError


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def step_of(folder: Path) -> int | None:
    """The step number of a `step_XXXXXXXX` folder name, else None."""
    m = _STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


def _step_folders(out_dir: str | os.PathLike) -> list[Path]:
    """Every `step_XXXXXXXX` folder under out_dir/checkpoints, by step number, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if step_of(p) is not None and p.is_dir()), key=step_of)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step that holds trainer_state.json (written last), or None."""
    done = [p for p in _step_folders(out_dir) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


# ------------------------------------------------------------------------------------------------ verification
def _check_trainer_state(folder: Path) -> None:
    path = folder / "trainer_state.json"
    if not path.is_file():
        raise CorruptFile(f"{path} is missing (the save did not finish)")
    try:
        step = json.loads(path.read_text()).get("step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CorruptFile(f"{path} is not a JSON object ({err})") from None
    if step != step_of(folder):
        raise CorruptFile(f"{path} names step {step!r}, not the folder's {step_of(folder)}")


def _check_model_files(folder: Path) -> None:
    try:
        read_config(folder)
    except (CheckpointError, TypeError, ValueError) as err:
        raise CorruptFile(f"{folder / 'config.json'}: {err}") from None
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise CorruptFile(f"{folder} holds no .safetensors weights")
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as err:
            raise CorruptFile(f"{f} is truncated or garbled ({err})") from None
    try:
        json.loads((folder / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{folder / 'tokenizer.json'} is missing or garbled ({err})") from None


def verify_checkpoint(folder: Path, sharded: bool) -> None:
    """Raise CorruptFile (truncated, garbled or missing file) or UnsafeFile (a crafted pickle) unless every file a
    resume reads is whole. Reads headers and pickles, not the tensors' data: cheap for a large model."""
    _check_trainer_state(folder)
    _check_model_files(folder)
    if sharded:
        check_dcp_metadata(folder / "dcp")
    else:
        check_tensor_file(folder / "optimizer.pt")
    for f in sorted((folder / "rng").glob("*.pt")):
        check_tensor_file(f)


def find_resume_checkpoint(out_dir: str | os.PathLike, sharded: bool,
                           warn: Callable[[str], None]) -> Path | None:
    """The newest step folder that passes `verify_checkpoint`; each one skipped is reported through `warn`. None
    when there is no step folder at all; CheckpointError when there are some and none is whole."""
    problems = []
    for folder in reversed(_step_folders(out_dir)):
        try:
            verify_checkpoint(folder, sharded)
            return folder
        except CorruptFile as err:
            problems.append(f"{folder.name}: {err}")
            warn(f"checkpoint {folder} is incomplete or corrupt, skipping it: {err}")
    if problems:
        raise CheckpointError(f"no complete checkpoint to resume from under {checkpoint_root(out_dir)} ("
                              + "; ".join(problems) + "); start a new run with --overwrite or another --out")
    return None


# ------------------------------------------------------------------------------------------------------ saving
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
    from recurrent_depth.hf import RecurrentDepthForCausalLM

    with torch.device("meta"):
        copy = RecurrentDepthForCausalLM(model.config)
    copy.load_state_dict(full, assign=True, strict=False)
    copy.tie_weights()
    copy.transformer.reset_rope()  # the RoPE table is a buffer, not in the state dict
    copy.save_pretrained(folder)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror} ({err.filename})" if err.filename else err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _write_phase(rt: Runtime, write: Callable[[], None] | None, tmp: Path, final: Path) -> None:
    """Run this rank's part of a save (None: nothing on this rank), then agree across ranks (this is also the
    barrier between phases). On any rank's failure the temporary folder goes and every rank raises."""
    err = None
    if write is not None:
        try:
            write()
        except _WRITE_ERRORS as exc:
            err = exc
    failed = int(rt.all_reduce_sum(torch.tensor(int(err is not None), device=rt.device)))
    if not failed:
        return
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(final.parent.parent)
    reason = _describe(err) if err is not None else "another rank failed to write its part"
    raise CheckpointError(f"cannot write checkpoint {final}: {reason}. The partial copy was removed; "
                          f"the last complete checkpoint is {previous or 'none (none was written yet)'}") from err


def _prune(root: Path, final: Path, keep: int) -> None:
    """Keep `final` and the keep-1 highest-step checkpoints below it; remove the others (older ones, and folders
    with a higher step: left by a run that was resumed from an earlier checkpoint) and stale temporary folders."""
    step = step_of(final)
    others = [p for p in _step_folders(root.parent) if p != final]
    kept = [p for p in others if step_of(p) < step][-(keep - 1):] if keep > 1 else []
    stale = [p for p in root.iterdir() if _TMP_DIR.match(p.name)]
    for p in [*others, *stale]:
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    tokenizer: Any, state: dict[str, Any], rt: Runtime, sharded: bool, keep: int) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); returns its folder. CheckpointError (on every
    rank) when a write fails: nothing of this checkpoint remains, the earlier ones are untouched."""
    root = checkpoint_root(out_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    full = _full_state_dict(model, sharded)  # collective: every rank takes part

    def shared_files() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _save_model(model, tmp, full)  # replaces tmp atomically, so it goes first
        tokenizer.save_pretrained(str(tmp))
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")

    def rank_files() -> None:
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            msd, osd = get_state_dict(model, optimizer)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(portable_rng(rng_state()), tmp / "rng" / f"rank_{rt.rank:05d}.pt")

    def publish() -> None:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    _write_phase(rt, shared_files if rt.is_main else None, tmp, final)
    _write_phase(rt, rank_files, tmp, final)
    _write_phase(rt, publish if rt.is_main else None, tmp, final)
    if rt.is_main:
        _prune(root, final, keep)
    rt.barrier()
    return final


# ----------------------------------------------------------------------------------------------------- loading
def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "trainer_state.json").read_text())


def _config_differences(folder: Path, model: nn.Module) -> list[str]:
    """`field: checkpoint value vs configured value` for each model field on which the two disagree."""
    from recurrent_depth.training.config import model_field_names

    saved = json.loads((folder / "config.json").read_text())
    now = json.loads(json.dumps(model.config.to_dict()))  # tuples as lists, as in the file
    return [f"model.{k}: {saved[k]!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(model_field_names()) if k in saved and saved[k] != now.get(k)]


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Copy the checkpoint's weights into an (unsharded, unwrapped) model; CheckpointError naming the differing
    config fields when the shapes do not match."""
    from recurrent_depth.model.checkpoint import read_state_dict

    state = read_state_dict(folder)
    own = model.state_dict()
    missing = [k for k in own if k not in state and k != "lm_head.weight"]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        diffs = _config_differences(folder, model)
        detail = ("; ".join(diffs) if diffs else
                  f"missing {missing[:4]}, unexpected {unexpected[:4]}, mis-shaped {mis_shaped[:4]}")
        raise CheckpointError(f"--resume: checkpoint {folder} holds a different model than this config ({detail}). "
                              "Resume with the config it was trained with (its trainer_state.json holds it), or "
                              "start a new run with --overwrite or another --out")
    model.load_state_dict(state, strict=False)


def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime,
                        sharded: bool) -> dict[str, Any]:
    """Restore optimiser (and, when sharded, model) state and this rank's RNGs; returns trainer_state.json."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        check_dcp_metadata(folder / "dcp")  # torch's loader unpickles it without restriction
        msd, osd = get_state_dict(model, optimizer)
        box = {"model": msd, "optim": osd}
        dcp.load(box, checkpoint_id=str(folder / "dcp"))
        set_state_dict(model, optimizer, model_state_dict=box["model"], optim_state_dict=box["optim"])
    else:
        optimizer.load_state_dict(load_tensor_file(folder / "optimizer.pt", map_location=rt.device))
    rng_file = folder / "rng" / f"rank_{rt.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(native_rng(load_tensor_file(rng_file)))
    return read_trainer_state(folder)
