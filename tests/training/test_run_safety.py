"""The output folder and checkpoints lose nothing: an earlier run is refused or replaced cleanly, pruning keeps the
checkpoint just written, a failed save leaves the previous one, resume never unpickles code, falls back past a
corrupt newest checkpoint and says where it resumes, and bad paths or shapes give errors that name them."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import losses, run_cli, tiny_tree, write_yaml

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.data.tokenizer import char_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.model.checkpoint import CheckpointError
from recurrent_depth.runtime import Runtime, rng_state, set_rng_state
from recurrent_depth.training import checkpoint as ckpt
from recurrent_depth.training.config import ConfigError
from recurrent_depth.training.loop import train
from recurrent_depth.training.safe_files import UnsafeFile, check_dcp_metadata, native_rng, portable_rng

CPU = Runtime(torch.device("cpu"), torch.float32)


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


class _Marker:
    """Unpickling this creates `path`: what a crafted checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


# ------------------------------------------------------------------------------------------ earlier runs in --out
def test_a_new_run_over_an_earlier_one_is_refused_and_loses_nothing(tiny_config, corpus: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(train={"steps": 6}), out)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_tree(corpus, train={"steps": 4}))
    res = run_cli("train", "--config", str(cfg), "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert str(out) in res.stderr and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert "metrics.jsonl" in res.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    assert _names(out) == ["step_00000006"]


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(train={"steps": 12}, checkpoint={"every": 4, "keep": 2}), out)
    (out / "notes.txt").write_text("mine")
    result = train(tiny_config(train={"steps": 8}, checkpoint={"keep": 1}), out, overwrite=True)
    assert result.checkpoint == out / "checkpoints" / "step_00000008" and result.checkpoint.is_dir()
    assert _names(out) == ["step_00000008"]
    assert sorted(losses(out)) == list(range(1, 9))
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 8
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_exclude_each_other(tiny_config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        train(tiny_config(), tmp_path / "run", resume=True, overwrite=True)


def _tiny_parts():
    cfg = RecurrentDepthConfig.from_name("debug", n_embd=16, n_heads=2, intermediate_size=32, vocab_size=16,
                                         n_layers_in_recurrent_block=1)
    model = RecurrentDepthForCausalLM(cfg)
    return model, torch.optim.AdamW(model.parameters()), char_tokenizer("abc")


def _fake_checkpoint(root: Path, step: int) -> None:
    (root / f"step_{step:08d}").mkdir(parents=True)
    (root / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_pruning_orders_by_step_and_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    model, opt, tok = _tiny_parts()
    root = tmp_path / "checkpoints"
    for step in (4, 150):  # 150: left by an abandoned, later run
        _fake_checkpoint(root, step)
    (root / ".step_00000006.tmp").mkdir()  # a save killed half-way
    folder = ckpt.save_checkpoint(tmp_path, 8, model, opt, tok, {}, CPU, sharded=False, keep=1)
    assert folder.is_dir() and _names(tmp_path) == ["step_00000008"]
    _fake_checkpoint(root, 150)
    ckpt.save_checkpoint(tmp_path, 12, model, opt, tok, {}, CPU, sharded=False, keep=2)
    assert _names(tmp_path) == ["step_00000008", "step_00000012"]


# --------------------------------------------------------------------------------------------- failed saves
def test_a_disk_full_save_leaves_the_previous_checkpoint_and_says_so(tiny_config, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_00000008" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        train(tiny_config(train={"steps": 8}, checkpoint={"every": 4, "keep": 2}), out)
    assert "step_00000004" in str(err.value) and "step_00000008" in str(err.value)
    assert _names(out) == ["step_00000004"]  # no temporary folder left
    ckpt.verify_checkpoint(out / "checkpoints" / "step_00000004", sharded=False)


# -------------------------------------------------------------------------------------------- safe loading
def test_rng_states_round_trip_bit_for_bit_through_a_weights_only_file(tmp_path: Path) -> None:
    import random

    torch.save(portable_rng(rng_state()), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(native_rng(torch.load(tmp_path / "rng.pt", weights_only=True)))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng/rank_00000.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_not_run(tiny_config, tmp_path: Path, victim: str) -> None:
    out = tmp_path / "run"
    train(tiny_config(train={"steps": 4}), out)
    marker = tmp_path / "pwned"
    torch.save({"state": _Marker(marker)}, out / "checkpoints" / "step_00000004" / victim)
    with pytest.raises(UnsafeFile, match=victim.split("/")[-1]) as err:
        train(tiny_config(train={"steps": 8}), out, resume=True)
    assert "io.open" in str(err.value)  # names what it asked for
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_is_checked_before_torch_unpickles_it(tmp_path: Path) -> None:
    import pickle

    import torch.distributed.checkpoint as dcp

    lin = torch.nn.Linear(3, 3)
    dcp.save({"model": lin.state_dict()}, checkpoint_id=str(tmp_path / "dcp"))
    check_dcp_metadata(tmp_path / "dcp")  # a genuine one passes
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(UnsafeFile, match="io.open"):
        check_dcp_metadata(tmp_path / "dcp")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ resume and errors
@pytest.mark.parametrize("damage", ["truncated weights", "no trainer_state.json", "garbled trainer_state.json"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tiny_config, tmp_path: Path, capsys,
                                                                    damage: str) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(train={"steps": 8}, checkpoint={"every": 4, "keep": 2})
    train(cfg, out)
    reference = losses(out)
    newest = out / "checkpoints" / "step_00000008"
    if damage == "truncated weights":
        data = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "no trainer_state.json":
        (newest / "trainer_state.json").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"step": 8, "data_pos')
    capsys.readouterr()
    result = train(cfg, out, resume=True)
    err = capsys.readouterr().err
    assert "step_00000008 is incomplete or corrupt" in err, err
    assert f"resuming from step 4 ({out / 'checkpoints' / 'step_00000004'})" in err
    assert len(result.losses) == 4 and losses(out) == reference  # steps 5-8 again, exactly
    ckpt.verify_checkpoint(newest, sharded=False)  # rewritten whole


def test_resume_when_every_checkpoint_is_corrupt_is_an_error(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(train={"steps": 4}), out)
    (out / "checkpoints" / "step_00000004" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no complete checkpoint.*optimizer.pt.*--overwrite"):
        train(tiny_config(train={"steps": 8}), out, resume=True)


def test_resume_in_a_new_folder_says_it_starts_at_step_0(tiny_config, tmp_path: Path, capsys) -> None:
    out = tmp_path / "new"
    result = train(tiny_config(train={"steps": 2}), out, resume=True)
    assert len(result.losses) == 2
    assert f"no checkpoint in {str(out)!r} yet; starting a new run at step 0" in capsys.readouterr().err


def test_resume_of_a_run_without_a_checkpoint_is_an_error(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ConfigError, match="holds a run .*metrics.jsonl.* but no checkpoint.*--overwrite"):
        train(tiny_config(), out, resume=True)
    assert losses(out) == {1: 3.0}


def test_resume_with_a_changed_model_names_the_fields(tiny_config, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(train={"steps": 2}), out)
    wider = tiny_config(train={"steps": 4}, model={"n_embd": 32, "intermediate_size": 64})
    with pytest.raises(CheckpointError) as err:
        train(wider, out, resume=True)
    msg = str(err.value)
    assert "model.n_embd: 16 in the checkpoint, 32 now" in msg and "model.intermediate_size" in msg
    assert "size mismatch" not in msg and str(out / "checkpoints" / "step_00000002") in msg


@pytest.mark.parametrize("where", ["under", "is"])
def test_out_on_a_file_is_an_error_naming_it(tiny_config, tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    out = blocker / "run" if where == "under" else blocker
    with pytest.raises(ConfigError, match=f"{blocker}' is a file"):
        train(tiny_config(), out)
    assert blocker.read_text() == "keep me"


def test_the_cli_summary_names_a_checkpoint_that_exists(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "cfg.yaml", tiny_tree(corpus, train={"steps": 6}, checkpoint={"keep": 1}))
    assert run_cli("train", "--config", str(cfg), "--out", str(out)).returncode == 0
    cfg2 = write_yaml(tmp_path / "cfg2.yaml", tiny_tree(corpus, train={"steps": 3}, checkpoint={"keep": 1}))
    res = run_cli("train", "--config", str(cfg2), "--out", str(out), "--overwrite")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert Path(summary["checkpoint"]).is_dir() and summary["checkpoint"].endswith("step_00000003")


def test_training_reports_prompt_answer_rows_left_out_for_seq_len(corpus: Path, tmp_path: Path, capsys) -> None:
    from recurrent_depth.training.config import config_from_dict

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    rows[5] = {"prompt": "1" * 40 + "=", "answer": "1"}
    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config_from_dict(tiny_tree(corpus, data={"kind": "jsonl", "paths": [str(path)], "val_fraction": 0.1},
                                     train={"steps": 1}))
    train(cfg, tmp_path / "run")
    assert "data: 1 of 90 train examples are longer than data.seq_len=16 tokens" in capsys.readouterr().err
