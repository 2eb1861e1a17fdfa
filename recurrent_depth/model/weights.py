"""Reading safetensors weights tensor by tensor, straight into the model's own memory.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (`name -> {dtype, shape,
data_offsets}`, offsets relative to the data that starts at byte 8 + N), then the raw tensor bytes. We parse the
header ourselves so that every way a file can be broken (empty, truncated, garbage header, offsets past the end,
an integer tensor where a weight belongs) becomes a `CheckpointError` naming the file and the tensor, and so that
loading never holds a second full copy of the model: a tensor stored in the target dtype is read directly into
its destination, any other is converted through two staging buffers of `CHUNK_BYTES` (one is read while the other
is converted: `Stager`). A tensor already in the target dtype on the CPU may instead be mapped (`map_tensor`): a view
into a private, copy-on-write mapping of the file, read page by page on first use, as transformers and safetensors
load. Writing likewise casts and writes one tensor at a time (`write_safetensors`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CHUNK_BYTES = 16 << 20  # staging buffer for dtype conversion and the finiteness check (bytes)
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header (bytes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FLOATING = {torch.float64, torch.float32, torch.float16, torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file or tensor."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies: `file`, absolute byte `offset`, `nbytes`, stored `dtype` and `shape`."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors listed in a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    if size < 8:
        raise CheckpointError(f"{file} is empty or truncated ({size} bytes): not a safetensors file")
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{file} is truncated or not a safetensors file: its header claims {n} bytes, "
                                  f"the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not a safetensors file: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file: its header is a {type(header).__name__}")
    header.pop("__metadata__", None)
    return {name: _entry(file, name, info, 8 + n, size) for name, info in header.items()}


def _entry(file: Path, name: str, info: object, start: int, size: int) -> StoredTensor:
    try:
        dtype = _DTYPES[info["dtype"]]  # type: ignore[index]
        shape = tuple(info["shape"])  # type: ignore[index]
        begin, end = info["data_offsets"]  # type: ignore[index]
        ok = all(type(v) is int and v >= 0 for v in (*shape, begin, end))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {info!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{file}: tensor {name!r} of shape {shape} ({dtype}) needs {nbytes} bytes, "
                              f"its offsets span {end - begin}")
    if start + end > size:
        raise CheckpointError(f"{file} is truncated: tensor {name!r} ends at byte {start + end}, "
                              f"the file has {size} bytes")
    return StoredTensor(file, name, dtype, shape, start + begin, nbytes)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names (kept inside the folder), or
    `model.safetensors`."""
    index = folder / INDEX_NAME
    if index.is_file():
        return [folder / name for name in _shard_names(folder, index)]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in checkpoint folder {str(folder)!r}")


def _shard_names(folder: Path, index: Path) -> list[str]:
    try:
        data = json.loads(index.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{index} is not valid JSON: {err}") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no `weight_map` object (tensor name -> shard file)")
    names = set(weight_map.values())
    root = folder.resolve()
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts \
                or not (folder / name).resolve().is_relative_to(root):
            raise CheckpointError(f"{index} names shard {name!r}: shard files must lie inside the checkpoint folder")
        if not (folder / name).is_file():
            raise CheckpointError(f"shard {name!r} listed in {INDEX_NAME} is missing from {str(folder)!r}")
    return sorted(names)


def read_headers(files: Iterable[Path]) -> dict[str, StoredTensor]:
    """All tensors of the given files by name; a tensor stored in two files is an error."""
    entries: dict[str, StoredTensor] = {}
    for file in files:
        for name, entry in read_header(file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {entries[name].file} and {file}")
            entries[name] = entry
    return entries


def check_floating(entry: StoredTensor) -> None:
    if entry.dtype not in _FLOATING:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is stored as {entry.dtype}, a weight must be "
                              f"floating point")


class Stager:
    """What the converting reads of one load share (`load_tensor`): two staging buffers of `CHUNK_BYTES` and one
    reading thread, made once, so that a load of hundreds of tensors neither starts a thread per tensor nor churns
    the allocator with staging buffers (freed and reallocated 16 MiB blocks left about 0.45 GB of the heap held at
    huginn-3.5b). A context manager: the thread ends on exit."""

    def __init__(self) -> None:
        self.buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8) for _ in range(2)]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rdepth-read")

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()


def load_tensor(entry: StoredTensor, dtype: torch.dtype, device: torch.device | str = "cpu",
                drop_cache: bool = False, stager: Stager | None = None) -> torch.Tensor:
    """A fresh tensor on `device` in `dtype` holding the stored values (converted as `Tensor.to` would).

    drop_cache: ask the kernel to drop the file's pages from the page cache once they are read
    (POSIX_FADV_DONTNEED; pages other processes map stay). For a load whose tensors and file do not both fit in
    memory: the cached file otherwise crowds the new tensors, and their pages fault in through reclaim (huginn-3.5b's
    bf16 file loaded as fp32 on a 24 GB machine, one thread, the file cached: 12-17 s with it, 18-31 s without).
    stager: the load's staging buffers and reading thread for a converted tensor (None: made for this one).
    """
    dest = torch.empty(entry.shape, dtype=dtype, device=device)
    if entry.nbytes == 0:
        return dest
    with open(entry.file, "rb", buffering=0) as fh:
        fh.seek(entry.offset)
        if dest.device.type == "cpu" and dest.dtype == entry.dtype:
            _read_exact(fh, dest.view(-1).view(torch.uint8).numpy(), entry)
            if drop_cache:
                _drop_cached(fh, entry.offset, entry.nbytes)
        else:
            with nullcontext(stager) if stager is not None else Stager() as staging:
                _read_converted(fh, dest.view(-1), entry, drop_cache, staging)
    return dest


def map_tensor(entry: StoredTensor, maps: dict[Path, torch.UntypedStorage]) -> torch.Tensor | None:
    """A CPU tensor viewing `entry`'s bytes through a private (MAP_PRIVATE, copy-on-write) mapping of its file, or
    None where it cannot be mapped (empty, or an offset that is not a multiple of the element size: read it instead).

    Nothing is read now: pages come from the file on first use. Writes to the tensor go to this process's own copy
    of the page and never to the file. The mapping lives as long as any tensor viewing it, and stays valid when the
    file is replaced by a rename (the atomic save) or unlinked; rewriting the file in place would show through in
    pages not yet written to, so nothing here ever writes a checkpoint in place. `maps` holds one mapping per file.
    """
    if entry.nbytes == 0 or entry.offset % entry.dtype.itemsize:
        return None
    storage = maps.get(entry.file)
    if storage is None:
        size = entry.file.stat().st_size
        storage = maps[entry.file] = torch.UntypedStorage.from_file(str(entry.file), shared=False, nbytes=size)
    return torch.empty(0, dtype=entry.dtype).set_(storage, entry.offset // entry.dtype.itemsize, entry.shape)


def _read_exact(fh: BinaryIO, buf: Any, entry: StoredTensor) -> None:
    """Fill the writable buffer `buf` (a numpy view of a tensor's bytes) from the file's current position."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = fh.readinto(view[done:done + (1 << 30)])
        if not got:
            raise CheckpointError(f"{entry.file} is truncated: tensor {entry.name!r} could not be read in full")
        done += got


def _read_converted(fh: BinaryIO, flat: torch.Tensor, entry: StoredTensor, drop_cache: bool,
                    stager: Stager) -> None:
    """Fill `flat` (the destination, any dtype) from the file's current position, converting chunk by chunk: the
    stager's thread reads chunk i + 1 into its second buffer while this thread converts chunk i into `flat` (a file
    read and a conversion into fresh pages each take a large part of a converting load; both release the GIL). The
    reads stay in file order, one at a time."""
    size = entry.dtype.itemsize
    per = max(1, CHUNK_BYTES // size)  # elements per chunk
    n = flat.numel()

    def read(i: int) -> torch.Tensor:
        count = min(per, n - i)
        part = stager.buffers[(i // per) % 2][: count * size].view(entry.dtype)
        _read_exact(fh, part.view(torch.uint8).numpy(), entry)
        if drop_cache:
            _drop_cached(fh, entry.offset + i * size, count * size)
        return part

    if n <= per:
        flat.copy_(read(0))
        return
    pending = stager.pool.submit(read, 0)
    for i in range(0, n, per):
        part = pending.result()
        if i + per < n:
            pending = stager.pool.submit(read, i + per)  # into the other buffer: `part` is not overwritten
        flat[i:i + part.numel()].copy_(part)


def _drop_cached(fh: BinaryIO, offset: int, nbytes: int) -> None:
    """Drop bytes [offset, offset + nbytes) of `fh`'s file from the page cache, where the OS has posix_fadvise."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fh.fileno(), offset, nbytes, os.POSIX_FADV_DONTNEED)


def write_safetensors(file: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None,
                      keep: Collection[str] = ()) -> None:
    """Write `tensors` as a safetensors file, floating ones (except those named in `keep`) cast to `dtype` (None: as
    they are) one tensor at a time, so that saving a cast copy never holds a second full model in memory."""
    codes = {v: k for k, v in _DTYPES.items()}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        out = stored_dtype(t, None if name in keep else dtype)
        nbytes = t.numel() * out.itemsize
        header[name] = {"dtype": codes[out], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, t in tensors.items():
            if t.numel():
                cpu = t.detach().to("cpu", stored_dtype(t, None if name in keep else dtype)).contiguous()
                fh.write(memoryview(cpu.reshape(-1).view(torch.uint8).numpy()))


def stored_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype `t` is written in: `dtype` for a floating tensor when one is given, else its own."""
    return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity. A sum screens each tensor at memory speed (NaN and inf
    propagate into it); only a non-finite sum (or an overflowing fp16 one) is confirmed element-wise, in chunks."""
    bad = []
    for name, t in tensors.items():
        flat = t.detach().reshape(-1)
        if bool(torch.isfinite(flat.sum())):
            continue
        per = max(1, CHUNK_BYTES // max(1, t.element_size()))
        if any(not bool(torch.isfinite(flat[i:i + per]).all()) for i in range(0, flat.numel(), per)):
            bad.append(name)
    return bad


def available_bytes(device: torch.device, field: str = "MemAvailable") -> int | None:
    """Memory free for new tensors on `device` (bytes): /proc/meminfo's `field` on the CPU (MemAvailable: free plus
    reclaimable page cache; MemFree: free pages only), the allocator's free memory on a GPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
