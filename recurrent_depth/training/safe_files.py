"""Reading a training checkpoint's non-safetensors files without running code from them.

`torch.load(weights_only=False)` unpickles arbitrary objects, so a crafted optimizer.pt could run code on `--resume`.
Here every .pt file is read with `weights_only=True` (tensors, numbers, strings, lists, tuples and dicts only); RNG
states are stored in that form (`portable_rng` / `native_rng`); the one file torch's own DCP loader unpickles
(`dcp/.metadata`, FSDP runs) is first read by an unpickler that allows only DCP's own metadata classes.

Two kinds of failure, both `CheckpointError`s naming the file: `CorruptFile` (truncated, garbled, unreadable: resume
falls back to an older checkpoint) and `UnsafeFile` (it asks for Python objects a checkpoint never holds: refused).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

from recurrent_depth.model.checkpoint import CheckpointError


class CorruptFile(CheckpointError):
    """A checkpoint file that is missing, truncated or garbled."""


class UnsafeFile(CheckpointError):
    """A checkpoint file that would run or build arbitrary Python objects when loaded."""


def _unsafe(path: Path, names: list[str]) -> UnsafeFile:
    return UnsafeFile(f"{path} asks for Python objects a training checkpoint never holds ({', '.join(names[:4])}); "
                      "refusing to load it (the file was altered, or not written by rdepth train)")


def check_tensor_file(path: Path) -> None:
    """Raise CorruptFile or UnsafeFile unless `path` is a complete torch.save file of tensors and plain values."""
    if not path.is_file():
        raise CorruptFile(f"{path} is missing")
    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001  (torch raises RuntimeError, ValueError, zip errors...)
        raise CorruptFile(f"{path} is truncated or not a torch.save file ({str(err).splitlines()[0]})") from None
    if names:
        raise _unsafe(path, names)


def load_tensor_file(path: Path, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)`, with the failures named as CorruptFile / UnsafeFile."""
    check_tensor_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  (a truncated record inside an intact zip)
        raise CorruptFile(f"{path} cannot be read ({str(err).splitlines()[0]})") from None


# ---------------------------------------------------------------------------------------------------- RNG states
def portable_rng(state: dict[str, Any]) -> dict[str, Any]:
    """`runtime.rng_state()` with NumPy's legacy state tuple as plain values and a tensor (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def native_rng(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `portable_rng`: what `runtime.set_rng_state` takes."""
    n = state["numpy"]
    version, internal, gauss = state["python"]
    out = dict(state)
    out["python"] = (version, tuple(internal), gauss)
    out["numpy"] = (n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                    n["cached_gaussian"])
    return out


# ------------------------------------------------------------------------------------------------ DCP metadata
def _allowed_dcp_global(module: str, name: str) -> bool:
    """The globals a DCP .metadata pickle names: DCP's metadata dataclasses and enums, torch.Size, dtypes, layouts,
    paths. Nothing that can be called to do anything but build a value."""
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
        obj = getattr(importlib.import_module(module), name, None)
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _Forbidden(Exception):
    """A pickle named a global outside `_allowed_dcp_global`."""


class _DcpMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed_dcp_global(module, name):
            raise _Forbidden(f"{module}.{name}")
        return super().find_class(module, name)


def check_dcp_metadata(folder: Path) -> None:
    """Read every `*.metadata` pickle of a DCP folder with the restricted unpickler before torch's loader (which
    uses plain pickle) sees it."""
    files = sorted(folder.glob("*.metadata")) if folder.is_dir() else []
    if not files:
        raise CorruptFile(f"{folder} holds no DCP .metadata file")
    for f in files:
        with open(f, "rb") as fh:
            try:
                _DcpMetadataUnpickler(fh).load()
            except _Forbidden as err:
                raise _unsafe(f, [str(err)]) from None
            except Exception as err:  # noqa: BLE001  (EOFError, truncated or garbled pickles)
                raise CorruptFile(f"{f} is truncated or garbled ({type(err).__name__}: {err})") from None
