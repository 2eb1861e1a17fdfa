"""Checkpoint I/O in Huginn's layout: `config.json` (model_type `huginn_raven`), safetensors with `transformer.*`
names, single file or sharded with `model.safetensors.index.json`, with or without a stored `lm_head.weight`
(ignored when tied), any stored `freqs_cis` ignored on load (recomputed) and written as the exact fp32 table on save.
Nothing is fetched from a hub: the path is a local folder. Every broken file raises `CheckpointError` naming it.

Writes are atomic: a checkpoint is written under a temporary name beside its target and renamed into place, so an
interrupted save never leaves a half-written folder where a checkpoint was.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.model.layers import rope_table
from recurrent_depth.model.weights import (
    CHUNK_BYTES,
    INDEX_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    Stager,
    StoredTensor,
    available_bytes,
    check_floating,
    load_tensor,
    map_tensor,
    non_finite,
    read_headers,
    stored_dtype,
    weight_files,
    write_safetensors,
)
from recurrent_depth.runtime import DTYPES as _DTYPES

__all__ = ["CheckpointError", "load", "read_config", "read_state_dict", "save"]

_FREE_SHARE = 0.9  # of MemFree a load may fill with its tensors and its file's cached pages: others allocate too,
# and the kernel starts reclaiming before free memory runs out
_IGNORED_KEYS = re.compile(r"(^|\.)freqs_cis$")
_HF_ONLY = ("trust_remote_code", "local_files_only", "revision", "cache_dir", "low_cpu_mem_usage", "use_safetensors",
            "attn_implementation", "_from_auto", "_commit_hash", "code_revision", "adapter_kwargs", "token",
            "force_download", "subfolder", "_from_pipeline")


def read_config(path: str | os.PathLike, **overrides: Any) -> RecurrentDepthConfig:
    """Parse `path/config.json` into a validated config (field overrides applied)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in checkpoint folder {str(path)!r}")
    try:
        data = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object of config fields, not a {type(data).__name__}")
    if data.get("model_type", "huginn_raven") != "huginn_raven":
        raise CheckpointError(f"{file}: model_type {data.get('model_type')!r} is not 'huginn_raven'")
    for key in ("model_type", "transformers_version", "_name_or_path"):
        data.pop(key, None)
    data.update(overrides)
    try:
        return RecurrentDepthConfig(**data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: {err}") from err


def _stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Where each tensor of a (possibly sharded) checkpoint lies, `freqs_cis` dropped (we recompute it)."""
    return {n: e for n, e in read_headers(weight_files(path)).items() if not _IGNORED_KEYS.search(n)}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint in their stored dtypes, `freqs_cis` dropped."""
    return {name: load_tensor(e, e.dtype) for name, e in _stored_tensors(Path(path)).items()}


def load_dtype(dtype: Any, stored: Mapping[str, StoredTensor], device: torch.device) -> torch.dtype:
    """`from_pretrained`'s dtype: None -> float32; "auto" -> the stored dtype (transformers' meaning, not
    `runtime.resolve_dtype`'s device policy, which the CLI applies before loading); a name of `runtime.DTYPES` or a
    torch.dtype as given. Raise ValueError for a dtype the model does not run in, or that `device` cannot compute
    in."""
    if dtype is None:
        target = torch.float32
    elif dtype == "auto":
        target = next((e.dtype for e in stored.values() if e.dtype.is_floating_point), torch.float32)
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} or 'auto'")
        target = _DTYPES[dtype]
    else:
        target = dtype
    if target not in set(_DTYPES.values()):
        raise ValueError(f"dtype {target} is not supported: the model runs in float32, bfloat16 or float16")
    if device.type == "cuda" and target == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} ({torch.cuda.get_device_name(device)}) cannot compute in bfloat16; load with "
                         f"dtype=torch.float16 or torch.float32")
    return target


def check_state_dict(model: torch.nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """Match stored tensors (anything with a `.shape`) to the model's parameters; raise CheckpointError naming
    missing, unexpected or mis-shaped tensors. A stored `lm_head.weight` is dropped when the head is tied."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = getattr(model.config, "tie_embeddings", False)
    state = dict(state)
    if tied:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint is missing tensors: {_names(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensors: {_names(unexpected)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                                  f"the config expects {tuple(shape)}")
    return state


def _names(names: list[str], shown: int = 8) -> str:
    more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_memory(path: Path, entries: Mapping[str, StoredTensor], dtype: torch.dtype, device: torch.device) -> None:
    """Raise MemoryError, before anything is allocated, when `device` lacks the room for the model in `dtype`."""
    need = sum(math.prod(e.shape) for e in entries.values()) * dtype.itemsize + 2 * CHUNK_BYTES  # + staging
    free = available_bytes(device)
    if free is not None and need > free:
        where = "MemAvailable in /proc/meminfo" if device.type == "cpu" else "free device memory"
        raise MemoryError(f"loading {str(path)!r} as {str(dtype).removeprefix('torch.')} on {device} needs "
                          f"{need / 2**30:.2f} GiB, but only {free / 2**30:.2f} GiB is available ({where})")


def _crowds_page_cache(entries: Mapping[str, StoredTensor], dtype: torch.dtype) -> bool:
    """Whether new CPU tensors of `dtype` for `entries` plus their stored bytes in the page cache would fill more than
    `_FREE_SHARE` of MemFree (free pages, not counting reclaimable cache): then the file's pages are dropped as they
    are read (`load_tensor`'s drop_cache), instead of the kernel reclaiming cache page by page while the new tensors
    fault in."""
    free = available_bytes(torch.device("cpu"), "MemFree")
    new = sum(math.prod(e.shape) for e in entries.values()) * dtype.itemsize
    return free is not None and new + sum(e.nbytes for e in entries.values()) > _FREE_SHARE * free


def _read_weights(path: Path, entries: Mapping[str, StoredTensor], dtype: torch.dtype, device: torch.device,
                  mmap: bool) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The checked tensors on `device` in `dtype`, and the names of those mapped from their files (where `mmap` and
    the stored dtype and device allow, see `map_tensor`); the others are read into fresh tensors and screened for
    NaN/inf now, at memory speed (a warning names them). Mapped ones are left for `_ScreenAtFirstUse`: screening
    them here would read the whole file at load, which the mapping exists to avoid."""
    for entry in entries.values():
        check_floating(entry)
    maps: dict[Path, torch.UntypedStorage] = {}
    mappable = mmap and device.type == "cpu"
    tensors = {name: t for name, entry in entries.items()
               if mappable and entry.dtype == dtype and (t := map_tensor(entry, maps)) is not None}
    mapped = set(tensors)
    rest = {name: entry for name, entry in entries.items() if name not in mapped}
    check_memory(path, rest, dtype, device)  # mapped pages are the file's cache: the kernel may drop and reread them
    drop = device.type == "cpu" and _crowds_page_cache(rest, dtype)
    with Stager() as stager:  # one reading thread and two staging buffers for the whole load
        read = {name: load_tensor(entry, dtype, device, drop, stager) for name, entry in rest.items()}
    _warn_non_finite(path, read, stacklevel=5)
    return {**tensors, **read}, mapped


def _warn_non_finite(path: Path, tensors: Mapping[str, torch.Tensor], stacklevel: int) -> None:
    """Warn, naming them, when any of `tensors` (loaded from the checkpoint at `path`) holds a NaN or an infinity."""
    bad = non_finite(tensors)
    if bad:
        warnings.warn(f"checkpoint {str(path)!r}: tensors holding NaN or infinite values: {_names(bad)}",
                      stacklevel=stacklevel)


class _ScreenAtFirstUse:
    """Checks a model's mapped tensors for NaN/inf (`_warn_non_finite`) at its first forward, then lets go.

    A mapped load reads no page; the first forward reads them all anyway, and a NaN or an infinity in any weight a
    forward applies reaches its logits (every product and sum propagates it, and a weight acts at every position).
    So the first forward proves what it used: the model tells its `stage_observer` each stage it runs (prelude,
    core, coda, by whichever path), and finite logits from the head clear those stages' tensors and the head's (the
    tied embedding with it). Only the tensors left (the core when it ran no step, an untied embedding table) are
    screened then, at memory speed. Non-finite logits screen every tensor, naming the culprits; so does a second
    embedding before any logits (a forward that computed none). Tensor names are looked up in the model when the
    check runs, so that a `.to()` or a deep copy in between checks what the model then holds."""

    def __init__(self, path: Path, model: torch.nn.Module, names: set[str]) -> None:
        self.path, self.model, self.names = path, model, names
        self.ran: set[str] = set()
        self.embedded = 0
        t = model.transformer
        self.handles = [t.wte.register_forward_pre_hook(self._embed), model.lm_head.register_forward_hook(self._logits)]
        t.stage_observer = self._ran

    def _ran(self, stage: str) -> None:
        self.ran.add(stage)

    def _embed(self, module: torch.nn.Module, args: Any) -> None:
        self.embedded += 1
        self.ran.clear()
        if self.embedded > 1:  # a forward came and went without logits: nothing is proven
            self._screen()

    def _logits(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not (isinstance(output, torch.Tensor) and bool(torch.isfinite(output).all())):
            self._screen()
            return
        t = self.model.transformer
        stages = {"prelude": [t.prelude], "core": [t.core_block, t.adapter], "coda": [t.coda, t.ln_f]}
        used = [module, *(m for stage in self.ran for m in stages[stage])]
        self._screen(proven={id(x) for m in used for x in [*m.parameters(), *m.buffers()]})

    def _screen(self, proven: frozenset[int] | set[int] = frozenset()) -> None:
        """Remove the hooks and screen the mapped tensors the model holds now, but those in `proven` (ids)."""
        for handle in self.handles:
            handle.remove()
        self.model.transformer.stage_observer = None
        owned = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        _warn_non_finite(self.path, {name: x for name, x in owned.items()
                                     if name in self.names and id(x) not in proven}, stacklevel=4)


def load(cls: type, path: Any, *args: Any, dtype: Any = None, torch_dtype: Any = None, device: Any = None,
         device_map: Any = None, config: RecurrentDepthConfig | None = None, mmap: bool | None = None,
         **kwargs: Any) -> Any:
    """Build `cls` from a checkpoint folder. Config overrides may be passed as keywords (e.g. mean_recurrence=16).

    The model is built on the meta device and each tensor is read from its file straight into the parameter it
    becomes, on `device`, in the target dtype: peak memory is the model plus one small staging buffer.
    mmap: a CPU load in the stored dtype maps the files instead (parameters view a private copy-on-write mapping:
    pages are read from the file on first use, writes stay in memory, the file is never written); None reads the
    environment variable RDEPTH_MMAP (0 turns mapping off), default on.
    Weights holding NaN or infinities warn, naming them: read tensors at load, mapped ones at the model's first
    forward (`_ScreenAtFirstUse`), where their pages are read anyway.
    Keywords transformers passes (`trust_remote_code`, `local_files_only`, ...) are accepted and ignored: nothing is
    downloaded and no remote code runs.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {str(path)!r} does not exist (nothing is downloaded: give a path)")
    for hf_only in _HF_ONLY:
        kwargs.pop(hf_only, None)
    cfg = config if isinstance(config, RecurrentDepthConfig) else read_config(path, **kwargs)
    stored = _stored_tensors(path)
    device = device if device is not None else (device_map if isinstance(device_map, str | torch.device) else None)
    device = torch.device(device if device is not None else "cpu")
    target = load_dtype(dtype if dtype is not None else torch_dtype, stored, device)
    with torch.device("meta"):
        model = cls(cfg)
    mmap = os.environ.get("RDEPTH_MMAP", "1") != "0" if mmap is None else mmap
    tensors, mapped = _read_weights(path, check_state_dict(model, stored), target, device, mmap)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    if mapped:
        _ScreenAtFirstUse(path, model, mapped)
    model.transformer.reset_rope()
    model.config.name_or_path = str(path)
    return model.eval()


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB or 500MB")
    unit = (match.group(2) or "B").upper().replace("I", "")
    return int(float(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


def _checkpoint_tensors(model: Any) -> dict[str, torch.Tensor]:
    """The tensors to store (the model's own, not copies), and the exact fp32 RoPE table as `freqs_cis`."""
    state = {name: t.detach() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_embeddings)}
    cfg = model.config  # the exact fp32 table, whatever the model was cast to: the reference reads it as stored
    state["freqs_cis"] = rope_table(cfg.head_dim, cfg.block_size, cfg.rope_base)
    return state


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str | None,
                   dtype: torch.dtype | None) -> None:
    """One file, or shards of at most `max_shard_size` plus an index; model tensors cast to `dtype` while written."""
    keep = {"freqs_cis"}  # the RoPE table stays fp32 in every checkpoint
    nbytes = {name: t.numel() * stored_dtype(t, None if name in keep else dtype).itemsize for name, t in state.items()}
    if max_shard_size is None:
        write_safetensors(folder / WEIGHTS_NAME, state, dtype, keep)
        return
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for name in state:
        if shards[-1] and size + nbytes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / file, {name: state[name] for name in names}, dtype, keep)
        weight_map.update({name: file for name in names})
    total = sum(nbytes.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True))


def write_config(cfg: RecurrentDepthConfig, folder: Path, dtype: torch.dtype) -> None:
    data = cfg.to_dict()
    data["model_type"] = "huginn_raven"
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    data.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = {k: v for k, v in gen.items() if v is not None}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def atomic_folder(target: Path) -> _AtomicFolder:
    """Context manager yielding a temporary folder that replaces `target` only if the block succeeds."""
    return _AtomicFolder(target)


class _AtomicFolder:
    def __init__(self, target: Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for file in self.tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def save(model: Any, path: str | os.PathLike, *args: Any, max_shard_size: int | str | None = None,
         dtype: torch.dtype | None = None, safe_serialization: bool = True, **kwargs: Any) -> None:
    """Write `model` as a Huginn-layout checkpoint folder at `path`, atomically.

    max_shard_size: None for one `model.safetensors`; a size ("2GB", bytes) for shards plus an index.
    dtype: cast tensors (e.g. torch.bfloat16, as the hub checkpoint) or keep the model's.
    """
    if not safe_serialization:
        raise ValueError("only safetensors checkpoints are written (safe_serialization=False is not supported)")
    state = _checkpoint_tensors(model)
    stored = dtype or next(iter(state.values())).dtype
    with atomic_folder(Path(path)) as tmp:
        _write_weights(state, tmp, max_shard_size, dtype)
        write_config(model.config, tmp, stored)
