"""Same-dtype CPU loads map the checkpoint (private, copy-on-write): same values as a read load, the file is never
written, saving over the mapped folder is safe, and what cannot be mapped is read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.model import weights

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _mapped_from(t: torch.Tensor, file: Path) -> bool:
    """Whether `t`'s bytes lie in a private mapping of `file` (from /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[5]) == file.resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= t.data_ptr() < end:
                return fields[1][3] == "p"  # p: private (copy-on-write), s: shared
    return False


def _logits(model: RecurrentDepthForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, num_steps=2, init_scale=0.0).logits  # init_scale 0: a zero, not random, initial state


def _digest(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def test_mapped_load_equals_read_load_bit_for_bit(saved: Path) -> None:
    mapped = RecurrentDepthForCausalLM.from_pretrained(saved)
    read = RecurrentDepthForCausalLM.from_pretrained(saved, mmap=False)
    file = saved / "model.safetensors"
    assert all(_mapped_from(p, file) for p in mapped.parameters())
    assert not any(_mapped_from(p, file) for p in read.parameters())
    for (name, a), (_, b) in zip(mapped.state_dict().items(), read.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(_logits(mapped, ids), _logits(read, ids), rtol=0, atol=0)


def test_environment_variable_turns_mapping_off(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDEPTH_MMAP", "0")
    model = RecurrentDepthForCausalLM.from_pretrained(saved)
    assert not _mapped_from(model.transformer.wte.weight, saved / "model.safetensors")


def test_writes_to_mapped_parameters_never_reach_the_file(saved: Path) -> None:
    file = saved / "model.safetensors"
    before = _digest(file)
    model = RecurrentDepthForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.train()
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]), num_steps=1).loss.backward()
    opt.step()
    del model, opt
    assert _digest(file) == before
    fresh = RecurrentDepthForCausalLM.from_pretrained(saved, mmap=False)
    reread = weights.load_tensor(weights.read_header(file)["transformer.wte.weight"], torch.float32)
    assert torch.equal(fresh.transformer.wte.weight, reread)


def test_tied_head_is_the_mapped_embedding(saved: Path) -> None:
    model = RecurrentDepthForCausalLM.from_pretrained(saved)
    assert model.config.tie_embeddings
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = 42.0
    assert model.lm_head.weight[0, 0] == 42.0


@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
def test_saving_over_the_mapped_folder_round_trips(saved: Path, max_shard_size: str | None) -> None:
    model = RecurrentDepthForCausalLM.from_pretrained(saved)
    with torch.no_grad():
        model.transformer.prelude[0].attn.proj.weight.mul_(2.0)  # the save must write the model's values
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(saved, max_shard_size=max_shard_size)  # replaces the very files the model maps
    model.save_pretrained(saved)  # and again: the model still maps the first, now deleted, file
    for name, t in model.state_dict().items():  # that mapping stays valid after its file is gone
        assert torch.equal(t, expected[name]), name
    again = RecurrentDepthForCausalLM.from_pretrained(saved)
    for name, t in again.state_dict().items():
        assert torch.equal(t, expected[name]), name
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)


def _rewrite_with_header_length(file: Path, remainder: int) -> None:
    """Rewrite `file` with its JSON header padded so that its length is `remainder` mod 8: with an odd remainder
    every fp32 tensor's data lies at an offset that is not a multiple of 4."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), separators=(",", ":")).encode()
    header += b" " * ((remainder - len(header)) % 8)
    file.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])


def test_misaligned_tensors_are_read_instead(saved: Path) -> None:
    file = saved / "model.safetensors"
    expected = RecurrentDepthForCausalLM.from_pretrained(saved, mmap=False).state_dict()
    _rewrite_with_header_length(file, remainder=1)
    entry = weights.read_header(file)["transformer.wte.weight"]
    assert entry.offset % 4 and weights.map_tensor(entry, {}) is None
    model = RecurrentDepthForCausalLM.from_pretrained(saved)
    assert not any(_mapped_from(p, file) for p in model.parameters())
    for name, t in model.state_dict().items():
        assert torch.equal(t, expected[name]), name


def test_aligned_entry_maps_and_misaligned_one_does_not(tmp_path: Path) -> None:
    """Within one file: a bf16 tensor at an even offset maps, an fp32 one at offset 2 mod 4 is refused."""
    file = tmp_path / "mixed.safetensors"
    a, b = torch.tensor([1.5], dtype=torch.bfloat16), torch.tensor([1.0, -2.0, 3.0])
    header = {"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
              "b": {"dtype": "F32", "shape": [3], "data_offsets": [2, 14]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(len(raw).to_bytes(8, "little") + raw + a.view(torch.uint8).numpy().tobytes()
                     + b.view(torch.uint8).numpy().tobytes())
    entries = weights.read_header(file)
    mapped = weights.map_tensor(entries["a"], {})
    assert mapped is not None and torch.equal(mapped, a) and _mapped_from(mapped, file)
    assert weights.map_tensor(entries["b"], {}) is None
    assert torch.equal(weights.load_tensor(entries["b"], torch.float32), b)


def test_converting_load_reads(saved: Path, tmp_path: Path) -> None:
    """bf16 stored, fp32 wanted: converted into fresh memory, not mapped."""
    source = RecurrentDepthForCausalLM.from_pretrained(saved)
    source.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    file = tmp_path / "bf16" / "model.safetensors"
    model = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "bf16")
    assert all(p.dtype == torch.float32 and not _mapped_from(p, file) for p in model.parameters())
    for name, t in model.state_dict().items():
        if name != "transformer.rope":
            assert torch.equal(t, source.state_dict()[name].to(torch.bfloat16).float()), name
    same = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and _mapped_from(p, file) for p in same.parameters())


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 100, 1001])
@pytest.mark.parametrize("drop_cache", [False, True])
def test_chunked_conversion_equals_a_cast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, numel: int,
                                          drop_cache: bool) -> None:
    """A converting read in many chunks (the next one read on a second thread while this one converts; 8 bf16 per
    chunk here) gives exactly `Tensor.to`'s values, whatever the remainder, and reads each tensor's own bytes."""
    monkeypatch.setattr(weights, "CHUNK_BYTES", 16)
    a = torch.randn(numel).to(torch.bfloat16)
    b = torch.randn(3, 5).to(torch.bfloat16)
    file = tmp_path / "two.safetensors"
    weights.write_safetensors(file, {"a": a, "b": b})
    entries = weights.read_header(file)
    for name, expected in (("a", a), ("b", b)):
        got = weights.load_tensor(entries[name], torch.float32, drop_cache=drop_cache)
        assert got.dtype == torch.float32 and torch.equal(got, expected.float()), name


@pytest.mark.parametrize("crowded", [True, False])
def test_a_load_that_crowds_memory_drops_the_files_pages_as_it_reads(saved: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     crowded: bool) -> None:
    """bf16 read as fp32: where the new tensors plus the file's bytes exceed MemFree, every byte a tensor was
    read from is dropped from the page cache (POSIX_FADV_DONTNEED) and the values are unchanged; with room, none."""
    import math
    import os

    from recurrent_depth.model import checkpoint

    source = RecurrentDepthForCausalLM.from_pretrained(saved)
    source.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    stored = {n: e for n, e in weights.read_header(tmp_path / "bf16" / "model.safetensors").items()
              if n != "freqs_cis"}
    new_bytes = sum(math.prod(e.shape) for e in stored.values()) * 4
    free = {"MemAvailable": 1 << 40, "MemFree": new_bytes + (1 if crowded else 1 << 40)}
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device, field="MemAvailable": free[field])
    advised: list[tuple[int, int, int]] = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: advised.append((offset, n, advice))
                        or real(fd, offset, n, advice))
    model = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    if crowded:
        assert {a for _, _, a in advised} == {os.POSIX_FADV_DONTNEED}
        assert sum(n for _, n, _ in advised) == sum(e.nbytes for e in stored.values())
        assert all(any(e.offset <= o and o + n <= e.offset + e.nbytes for e in stored.values()) for o, n, _ in advised)
    else:
        assert advised == []
    for name, t in model.state_dict().items():
        if name != "transformer.rope":
            assert torch.equal(t, source.state_dict()[name].to(torch.bfloat16).float()), name
