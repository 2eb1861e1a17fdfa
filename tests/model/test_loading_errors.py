"""Broken checkpoint folders, configs and inputs give clear errors naming the file, tensor or field."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from recurrent_depth import RecurrentDepthConfig, RecurrentDepthForCausalLM
from recurrent_depth.model import checkpoint, weights
from recurrent_depth.model.checkpoint import CheckpointError
from tests.conftest import fixture_dir


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug")).save_pretrained(tmp_path / "sh",
                                                                                       max_shard_size="20KB")
    return tmp_path / "sh"


def _load(path: Path, **kwargs) -> RecurrentDepthForCausalLM:
    return RecurrentDepthForCausalLM.from_pretrained(path, **kwargs)


def _edit_index(folder: Path, edit) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_shard_paths_are_confined_to_the_folder(sharded: Path, shard: str) -> None:
    shutil.copy(sorted(sharded.glob("model-*.safetensors"))[0], sharded.parent / "x.safetensors")  # a real file
    _edit_index(sharded, lambda d: d["weight_map"].__setitem__(next(iter(d["weight_map"])), shard))
    with pytest.raises(CheckpointError, match=r"index\.json names shard .*must lie inside the checkpoint folder"):
        _load(sharded)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "has no `weight_map`"),
    ('{"metadata": {}}', "has no `weight_map`"),
    ('{"weight_map": []}', "has no `weight_map`"),
])
def test_malformed_index(sharded: Path, content: str, message: str) -> None:
    (sharded / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        _load(sharded)


def test_missing_shard_is_named(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard '{shard.name}' listed in .* is missing"):
        _load(sharded)


@pytest.mark.parametrize("size", [0, 5, 8, 100, -1])
def test_truncated_or_empty_weights(saved: Path, size: int) -> None:
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:size] if size >= 0 else data[:-1])
    with pytest.raises(CheckpointError, match=r"model\.safetensors (is empty or truncated|is truncated)"):
        _load(saved)


def test_garbage_header(saved: Path) -> None:
    file = saved / "model.safetensors"
    file.write_bytes((20).to_bytes(8, "little") + b"\xff" * 20 + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file: its header is not JSON"):
        _load(saved)


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2, 3]", r"config\.json must hold a JSON object of config fields, not a list"),
    ("not json at all", r"config\.json is not valid JSON"),
    ('"a string"', r"config\.json must hold a JSON object .* not a str"),
    ('{"n_embd": "wide"}', r"config\.json: config field `n_embd` must be a positive integer, got 'wide'"),
    ('{"norm_eps": "x"}', r"config\.json: "),
])
def test_bad_config_json(saved: Path, content: str, message: str) -> None:
    (saved / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        _load(saved)


def test_non_utf8_config(saved: Path) -> None:
    (saved / "config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        _load(saved)


def test_unknown_config_key_warns_naming_it(saved: Path) -> None:
    data = json.loads((saved / "config.json").read_text())
    data["mean_recurence"] = 7  # a typo
    (saved / "config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"\['mean_recurence'\] are not fields"):
        _load(saved)


def test_huginn_configs_do_not_warn(fixture_name: str) -> None:
    data = json.loads((fixture_dir(fixture_name) / "config.json").read_text())
    data.update(name="huginn-0125", hf_config={}, torch_dtype="bfloat16", bos_token_id=65504, pad_token_id=65509,
                eos_token_id=[65505, 65508])  # what the hub's config.json adds to the fixture's keys
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        RecurrentDepthConfig(**data)
        _load(fixture_dir(fixture_name))


def test_wrong_shape_names_tensor_and_both_shapes(saved: Path) -> None:
    state = load_file(str(saved / "model.safetensors"))
    state["transformer.coda.0.mlp.fc.weight"] = torch.zeros(3, 32)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor transformer\.coda\.0\.mlp\.fc\.weight has shape \(3, 32\) in "
                                              r"the checkpoint, the config expects \(128, 32\)"):
        _load(saved)


def test_integer_weight_is_refused(saved: Path) -> None:
    state = load_file(str(saved / "model.safetensors"))
    state["transformer.adapter.weight"] = state["transformer.adapter.weight"].to(torch.int32)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer\.adapter\.weight' is stored as torch\.int32"):
        _load(saved)


def test_tensor_stored_twice_across_shards(sharded: Path) -> None:
    first, second = sorted(sharded.glob("model-*.safetensors"))[:2]
    a, b = load_file(str(first)), load_file(str(second))
    name = next(iter(a))
    save_file({**b, name: a[name]}, str(second))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is stored twice"):
        _load(sharded)


def _poison(saved: Path, value: float, name: str = "transformer.prelude.0.attn.proj.weight") -> None:
    state = load_file(str(saved / "model.safetensors"))
    state[name][0, 0] = value
    save_file(state, str(saved / "model.safetensors"))


_NAMED = r"NaN or infinite values: transformer\.prelude\.0\.attn\.proj\.weight$"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_read_at_load_warn_naming_them(saved: Path, value: float) -> None:
    _poison(saved, value)
    with pytest.warns(UserWarning, match=_NAMED):
        _load(saved, mmap=False)
    with pytest.warns(UserWarning, match=_NAMED):
        _load(saved, dtype=torch.bfloat16)  # converted, so read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_screen_checks_every_chunk(saved: Path, monkeypatch, dtype: torch.dtype) -> None:
    """A NaN in the last of many chunks (the screen confirms a non-finite sum chunk by chunk) still warns."""
    state = load_file(str(saved / "model.safetensors"))
    state["transformer.prelude.0.attn.proj.weight"][-1, -1] = float("nan")
    save_file(state, str(saved / "model.safetensors"))
    monkeypatch.setattr(weights, "CHUNK_BYTES", 64)
    with pytest.warns(UserWarning, match=_NAMED):
        _load(saved, mmap=False, dtype=dtype)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_mapped_weights_warn_at_the_first_forward_only(saved: Path, value: float) -> None:
    """A mapped load leaves the file unread; the first forward (which reads the pages anyway) warns, naming the
    tensor, and later forwards do not screen again."""
    _poison(saved, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _load(saved)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.warns(UserWarning, match=_NAMED), torch.no_grad():
        model(ids, num_steps=1)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        model(ids, num_steps=1)


def _screens(monkeypatch) -> list[set[str]]:
    screened: list[set[str]] = []
    real = checkpoint.non_finite
    monkeypatch.setattr(checkpoint, "non_finite", lambda tensors: screened.append(set(tensors)) or real(tensors))
    return screened


def test_a_finite_first_forward_proves_what_it_used_and_screens_the_rest(saved: Path, monkeypatch) -> None:
    """Mapped tensors are not read at load; a first forward whose logits are finite proves every stage it ran (the
    eager forward and the inference steps alike), and only what it did not use is screened then."""
    screened = _screens(monkeypatch)
    model = _load(saved)
    mapped = {name for name, _ in model.named_parameters()}
    assert not any(screened_now & mapped for screened_now in screened)  # the load read no mapped page
    from recurrent_depth.inference import generate

    screened.clear()
    generate.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=2, num_steps=1)  # the inference steps
    assert screened == [set()] and model.transformer.stage_observer is None  # all proven, once; the hooks gone
    model = _load(saved)
    screened.clear()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), num_steps=0)  # the core ran no step: only its tensors are screened
    assert screened == [{n for n in mapped if n.startswith(("transformer.core_block.", "transformer.adapter."))}]


def test_untied_embedding_rows_are_screened_and_core_poison_found_without_core_steps(saved: Path,
                                                                                    monkeypatch) -> None:
    untied = saved.parent / "untied"
    torch.manual_seed(0)
    RecurrentDepthForCausalLM(RecurrentDepthConfig.from_name("debug", tie_embeddings=False)).save_pretrained(untied)
    screened = _screens(monkeypatch)
    model = _load(untied)
    screened.clear()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), num_steps=1)
    assert screened == [{"transformer.wte.weight"}]  # a forward reads only the rows of its tokens
    _poison(saved, float("nan"), "transformer.core_block.0.mlp.fc.weight")
    with pytest.warns(UserWarning, match=r"NaN or infinite values: transformer\.core_block\.0\.mlp\.fc\.weight$"), \
            torch.no_grad():
        _load(saved)(torch.tensor([[1, 2, 3]]), num_steps=0)


def test_first_use_screen_follows_a_deep_copy(saved: Path) -> None:
    import copy

    _poison(saved, float("nan"))
    model = _load(saved)
    twin = copy.deepcopy(model)
    ids = torch.tensor([[1, 2]])
    for m in (twin, model):  # each warns once, at its own first forward
        with pytest.warns(UserWarning, match=_NAMED), torch.no_grad():
            m(ids, num_steps=1)


def test_empty_input_is_refused(saved: Path) -> None:
    model = _load(saved)
    for shape in [(1, 0), (0, 4)]:
        with pytest.raises(ValueError, match=r"input_ids is empty \(shape"):
            model(torch.zeros(shape, dtype=torch.long), num_steps=1)


def test_hub_name_fails_at_once_without_network() -> None:
    import time

    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    with pytest.raises(OSError, match="'org/name' is not a local checkpoint folder"):
        AutoModelForCausalLM.from_pretrained("org/name")
    assert time.monotonic() - start < 5  # transformers alone retries an unreachable hub for ~25 s


def test_auto_class_still_loads_local_folders(saved: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert isinstance(AutoModelForCausalLM.from_pretrained(saved), RecurrentDepthForCausalLM)


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    from recurrent_depth.data.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer file"):
        load_tokenizer(tmp_path)


def test_too_little_memory_says_how_much_is_needed(saved: Path, monkeypatch) -> None:
    monkeypatch.setattr(weights, "available_bytes", lambda device: 1 << 20)
    monkeypatch.setattr(checkpoint, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(MemoryError, match=r"as float32 on cpu needs 0\.0\d GiB, but only 0\.00 GiB is available "
                                          r"\(MemAvailable"):
        _load(saved)


@pytest.mark.parametrize(("dtype", "message"), [
    (torch.int8, "torch.int8 is not supported"), ("float64", "unknown dtype 'float64'"),
    (torch.float8_e4m3fn, "is not supported"),
])
def test_unsupported_dtype(saved: Path, dtype, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _load(saved, dtype=dtype)


def test_extra_files_are_ignored(saved: Path) -> None:
    (saved / "notes.txt").write_text("hello")
    shutil.copy(saved / "model.safetensors", saved / "model-00009-of-00009.safetensors")
    _load(saved)
