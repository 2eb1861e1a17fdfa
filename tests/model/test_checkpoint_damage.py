"""Property: a damaged checkpoint folder either loads with exactly the weights its files hold, or raises
`CheckpointError` (never a KeyError, struct.error, SafetensorError, JSONDecodeError or the like).

Each example copies a small valid checkpoint (single-file or sharded), applies one random damage (truncate a file at
a random offset, store a tensor in another dtype, delete a file, add a file, replace a JSON file with garbage, remove
a tensor, point the index outside the folder), maybe adds a stray file, and loads it. Every damage states what loading
must do: fail, succeed (with the expected weights updated), or either ("maybe", e.g. a JSON file cut only in its final
newline).
The examples are derandomized (the same 50 on every run); explore more with
`pytest tests/model/test_checkpoint_damage.py --hypothesis-seed=N` after removing `derandomize`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.model.checkpoint import CheckpointError

OK, MAYBE, FAIL = 0, 1, 2
_READ = {"config.json", "model.safetensors", "model.safetensors.index.json"}  # plus the shards an index names


@functools.cache
def _pristine() -> tuple[Path, dict[str, torch.Tensor]]:
    """Two valid checkpoints of one model (`single`, `sharded`) and the weights they hold."""
    root = Path(tempfile.mkdtemp(prefix="rdepth-damage-"))
    torch.manual_seed(0)
    model = RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug"))
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    return root, {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def _is_read(folder: Path, file: Path) -> bool:
    if file.name in _READ:
        return file.name != "model.safetensors" or not (folder / "model.safetensors.index.json").exists()
    return re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", file.name) is not None  # a shard the index names


def _rewrite(file: Path, edit) -> bool:
    """Apply `edit` to the tensors of a readable safetensors file; False (and no change) when it is unreadable."""
    try:
        state = load_file(str(file))
    except Exception:  # already damaged by an earlier step, which decided the outcome
        return False
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})
    return True


def truncate(data: st.DataObject, folder: Path, expected: dict) -> int:
    file = data.draw(st.sampled_from(sorted(folder.iterdir())))
    raw = file.read_bytes()
    if not raw:
        return OK if not _is_read(folder, file) else FAIL
    file.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    if not _is_read(folder, file):
        return OK
    return MAYBE if file.suffix == ".json" else FAIL


def change_dtype(data: st.DataObject, folder: Path, expected: dict) -> int:
    if not _weight_files(folder):
        return OK
    file = data.draw(st.sampled_from(_weight_files(folder)))
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]))
    names: list[str] = []

    def edit(state: dict) -> None:  # only floating tensors: an integer one was already declared broken
        floating = sorted(n for n, t in state.items() if t.dtype.is_floating_point)
        if floating:
            names.append(data.draw(st.sampled_from(floating)))
            state[names[0]] = state[names[0]].to(dtype)

    if not _rewrite(file, edit) or not names or not _is_read(folder, file) or names[0] == "freqs_cis":
        return OK
    if not dtype.is_floating_point:
        return FAIL
    expected[names[0]] = expected[names[0]].to(dtype).float()
    return OK


def delete(data: st.DataObject, folder: Path, expected: dict) -> int:
    file = data.draw(st.sampled_from(sorted(folder.iterdir())))
    read = _is_read(folder, file)
    file.unlink()
    return FAIL if read else OK


def add_file(data: st.DataObject, folder: Path, expected: dict) -> int:
    name = data.draw(st.sampled_from(["notes.txt", "model-99999-of-99999.bin", "pytorch_model.bin", "tokenizer.json"]))
    (folder / name).write_bytes(data.draw(st.binary(max_size=64)))
    return OK


def garbage_json(data: st.DataObject, folder: Path, expected: dict) -> int:
    name = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]))
    garbage = data.draw(st.one_of(st.binary(max_size=64), st.lists(st.integers(), max_size=3).map(json.dumps),
                                  st.sampled_from(["null", "3", '"x"', "{}", '{"weight_map": {"a": 1}}'])))
    (folder / name).write_bytes(garbage.encode() if isinstance(garbage, str) else garbage)
    return FAIL if _is_read(folder, folder / name) else OK


def remove_tensor(data: st.DataObject, folder: Path, expected: dict) -> int:
    if not _weight_files(folder):
        return OK
    file = data.draw(st.sampled_from(_weight_files(folder)))
    names: list[str] = []

    def edit(state: dict) -> None:
        if state:
            names.append(data.draw(st.sampled_from(sorted(state))))
            del state[names[0]]

    if not _rewrite(file, edit) or not names or not _is_read(folder, file):
        return OK
    return OK if names[0] == "freqs_cis" else FAIL


def escape_index(data: st.DataObject, folder: Path, expected: dict) -> int:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return OK
    try:
        content = json.loads(index.read_text())
        weight_map = content["weight_map"]
        name = data.draw(st.sampled_from(sorted(weight_map)))
    except Exception:  # already damaged
        return FAIL
    weight_map[name] = data.draw(st.sampled_from(["../single/model.safetensors", "/etc/hostname", "a/../../x"]))
    index.write_text(json.dumps(content))
    return FAIL


DAMAGES = [truncate, change_dtype, delete, add_file, garbage_json, remove_tensor, escape_index]


@settings(max_examples=50, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(["single", "sharded"]), damage=st.sampled_from(DAMAGES), extra=st.booleans(),
       data=st.data())
def test_damaged_checkpoint_loads_right_or_fails_clearly(layout: str, damage, extra: bool,
                                                         data: st.DataObject) -> None:
    root, weights = _pristine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        shutil.copytree(root / layout, folder)
        expected = dict(weights)
        outcome = damage(data, folder, expected)
        if extra:  # a stray file beside the damage changes nothing
            add_file(data, folder, expected)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = RecurrentDepthForCausalLM.from_pretrained(folder)
        except CheckpointError:
            assert outcome != OK, "a checkpoint that should load was refused"
            return
        assert outcome != FAIL, "a broken checkpoint loaded"
        state = model.state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
