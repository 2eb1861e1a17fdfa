"""Typed training config: YAML + overrides, and bad configs fail before training starts, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import REPO, run_cli, tiny_tree, write_yaml

from recurrent_depth.training.config import ConfigError, apply_overrides, config_from_dict, load_config


def test_overrides_are_typed(corpus: Path) -> None:
    cfg = config_from_dict(tiny_tree(corpus), ["train.steps=30", "optim.lr=3e-4", "eval.depths=[1, 8]",
                                               "optim.schedule=trapezoid", "model.n_embd=32", "log.progress=false"])
    assert cfg.train.steps == 30 and cfg.optim.lr == 3e-4 and cfg.eval.depths == [1, 8]
    assert cfg.optim.schedule == "trapezoid" and cfg.model.fields["n_embd"] == 32 and cfg.log.progress is False


@pytest.mark.parametrize(("override", "key"), [
    ("train.stepz=3", "train.stepz"),
    ("optimizer.lr=1", "optimizer"),
    ("model.n_embed=64", "model.n_embed"),
    ("train.steps=ten", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("optim.lr=fast", "optim.lr"),
    ("log.progress=3", "log.progress"),
    ("optim.schedule=linear", "optim.schedule"),
    ("eval.depths=4", "eval.depths"),
    ("data.paths=[/nonexistent/corpus]", "data.paths"),
    ("data.tokenizer=/nonexistent/tok", "data.tokenizer"),
    ("model.preset=huge", "model.preset"),
    ("train.batch_size=0", "train.batch_size"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("runtime.fp32_matmul=tf32", "runtime.fp32_matmul"),  # tiny_tree runs on the CPU: tf32 is CUDA's
    ("runtime.fp32_matmul=fp16", "runtime.fp32_matmul"),
])
def test_bad_values_name_the_key(corpus: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        config_from_dict(tiny_tree(corpus), [override])


def test_bf16_products_need_a_cpu_that_has_them(corpus: Path, monkeypatch) -> None:
    from recurrent_depth import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"runtime\.fp32_matmul.*AVX512-BF16 or AMX"):
        config_from_dict(tiny_tree(corpus), ["runtime.fp32_matmul=bf16"])


def test_task_kind_needs_a_task_name(corpus: Path) -> None:
    with pytest.raises(ConfigError, match="data.task.name"):
        config_from_dict(tiny_tree(corpus, data={"kind": "task", "paths": []}))


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.steps=1"])


def test_shipped_configs_load() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "debug.yaml" in names and len(names) >= 4
    for name in names:
        if name.startswith("gpu") or "3.5b" in name:
            cfg = load_config(REPO / "configs" / name, ['data.paths=["{stdlib}"]'])
        else:
            cfg = load_config(REPO / "configs" / name)
        assert cfg.train.steps > 0


def test_cli_fails_before_training_and_names_the_key(corpus: Path, tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", tiny_tree(corpus, train={"stepz": 3}))
    out = tmp_path / "out"
    res = run_cli("train", "--config", str(cfg), "--out", str(out))
    assert res.returncode == 2
    assert "train.stepz" in res.stderr
    assert not out.exists()


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  batch_size: [1, 2\noptim: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML at line \d+, column \d+"):
        load_config(path)
    path.write_bytes(b"train: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set eval.depths=\[1, 2.*not valid YAML"):
        apply_overrides({}, ["eval.depths=[1, 2"])


def test_cli_reports_invalid_yaml_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\n")
    res = run_cli("train", "--config", str(path), "--out", str(tmp_path / "out"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "bad.yaml" in res.stderr and "line" in res.stderr
