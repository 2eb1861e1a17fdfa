"""End-to-end training runs on tiny configs: loss falls, checkpoints load, prompt/answer and task data, resume after
kill -9 is bit-exact, and 2-process gloo runs (DDP, FSDP2) match one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, cli_env, losses, tiny_tree, write_yaml

from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.runtime import cpu_has_bf16
from recurrent_depth.training.loop import train


def test_debug_run_loss_falls_and_checkpoint_loads(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(train={"steps": 40, "batch_size": 8}, checkpoint={"every": 20, "keep": 1},
                      eval={"every": 20, "depths": [1, 3]})
    result = train(cfg, tmp_path / "run")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert {"loss", "lr", "n_no_grad", "n_grad", "tokens_per_s", "grad_norm"} <= rows[0].keys()
    assert "val_loss@1" in rows[19] and "val_loss@3" in rows[39]
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000040"]  # keep=1 pruned step 20
    folder = tmp_path / "run" / "checkpoints" / "step_00000040"
    model = RecurrentDepthForCausalLM.from_pretrained(folder)
    tok = load_tokenizer(folder)
    assert model.config.vocab_size == len(tok)
    ids = torch.tensor([tok.encode("the quick")])
    with torch.no_grad():
        assert torch.isfinite(model(ids, num_steps=2, init_scale=0.0).logits).all()


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has neither AVX512-BF16 nor AMX")
def test_bf16_matmul_run_learns_differs_from_ieee_and_restores_the_setting(tiny_config, tmp_path: Path) -> None:
    """runtime.fp32_matmul=bf16 (oneDNN bf16 products on the CPU): the loss still falls, the losses differ from the
    exact run's (the setting took effect), and the process-wide setting is back afterwards."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    kw = dict(train={"steps": 40, "batch_size": 8}, model={"n_embd": 64, "intermediate_size": 128})
    exact = train(tiny_config(**kw), tmp_path / "ieee")
    fast = train(tiny_config(**kw, runtime={"fp32_matmul": "bf16"}), tmp_path / "bf16")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert sum(fast.losses[-5:]) / 5 < sum(fast.losses[:5]) / 5 - 0.5
    assert fast.losses != exact.losses
    assert abs(sum(fast.losses[-5:]) - sum(exact.losses[-5:])) / 5 < 0.2


def test_jsonl_answer_only_and_accuracy(tmp_path: Path, corpus: Path) -> None:
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]
    path = tmp_path / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from recurrent_depth.training.config import config_from_dict

    cfg = config_from_dict(tiny_tree(corpus, data={"kind": "jsonl", "paths": [str(path)], "val_fraction": 0.1},
                                     train={"steps": 30, "batch_size": 8}, eval={"depths": [1, 2]},
                                     depth={"sampler": "fixed", "depth": 3, "activation_checkpointing": True}))
    result = train(cfg, tmp_path / "run")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["n_no_grad"], r["n_grad"]) for r in rows} == {(1, 2)}  # fixed depth 3, backprop depth 2
    assert result.losses[-1] < result.losses[0]
    assert {"val_loss@1", "val_acc@1", "val_acc@2"} <= result.final_eval.keys()
    assert 0.0 <= result.final_eval["val_acc@2"] <= 1.0


def test_builtin_reasoning_task(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recurrent_depth.training.config import config_from_dict

    cfg = config_from_dict(tiny_tree(corpus, data={"kind": "task", "paths": [],
                                                   "task": {"name": "addition", "difficulty": {"digits": [1, 2]},
                                                            "num_train": 64, "num_eval": 16}},
                                     train={"steps": 4}, depth={"sampler": "non-recurrent"}))
    import recurrent_depth.training.loop as loop

    seen: list[float] = []  # the plain transformer starts from a zero state, as it is evaluated, not from noise
    real = loop.forward_backward
    monkeypatch.setattr(loop, "forward_backward", lambda m, x, y, s0, *a: seen.append(float(s0.abs().max()))
                        or real(m, x, y, s0, *a))
    result = train(cfg, tmp_path / "run")
    assert seen == [0.0] * 4
    assert all(json.loads(ln)["depth"] == 1 for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert "val_acc@1" in result.final_eval
    tok = load_tokenizer(result.checkpoint)
    assert set("0123456789+=") <= set(tok.get_vocab())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed:\n{proc.stderr.read()}")
        if metrics.is_file():
            done = [ln for ln in metrics.read_text().splitlines() if ln.endswith("}")]
            if done and json.loads(done[-1])["step"] >= step:
                return
        time.sleep(0.02)
    raise AssertionError("the run did not reach the step in time")


def test_resume_after_kill_is_bit_exact(tmp_path: Path, corpus: Path) -> None:
    steps = 150
    tree = tiny_tree(corpus, train={"steps": steps}, checkpoint={"every": 5, "keep": 2})
    cfg_path = write_yaml(tmp_path / "cfg.yaml", tree)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recurrent_depth", "train", "--config", str(cfg_path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_step(out, 12, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = losses(out)
    assert max(partial) < steps  # it really was interrupted
    res = subprocess.run([*cmd, "--resume"], env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    resumed = losses(out)

    # the uninterrupted run also in a fresh process: same environment (threads, MKL mode) as the other two
    ref_out = tmp_path / "uninterrupted"
    res = subprocess.run([*cmd[:-1], str(ref_out)], env=cli_env(), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    reference = losses(ref_out)
    assert sorted(resumed) == list(range(1, steps + 1))
    assert resumed == reference  # bit for bit (fp32 CPU)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_process_gloo_matches_single_process(tmp_path: Path, corpus: Path, mode: str) -> None:
    tree = tiny_tree(corpus, train={"steps": 4, "batch_size": 4, "micro_batch_size": 2},
                     checkpoint={"every": 2}, eval={"depths": [2]})
    from recurrent_depth.training.config import config_from_dict

    single = train(config_from_dict(tree), tmp_path / "single")  # 2 accumulation micro-batches of 2
    cfg_path = write_yaml(tmp_path / "cfg.yaml", {**tree, "runtime": {**tree["runtime"], "parallel": mode}})
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "recurrent_depth", "train", "--config", str(cfg_path), "--out", str(out)]
    res = subprocess.run(cmd, env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    dist_losses = losses(out)
    torch.testing.assert_close(torch.tensor([dist_losses[s] for s in range(1, 5)]), torch.tensor(single.losses),
                               rtol=1e-5, atol=1e-6)
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    torch.testing.assert_close(final["val_loss@2"], single.final_eval["val_loss@2"], rtol=1e-5, atol=1e-6)
    a = RecurrentDepthForCausalLM.from_pretrained(out / "checkpoints" / "step_00000004").state_dict()
    b = RecurrentDepthForCausalLM.from_pretrained(tmp_path / "single" / "checkpoints" / "step_00000004").state_dict()
    for name in a:  # Adam's normalised step turns summation-order differences in the near-zero qk_bias gradients
        # into parameter differences of up to 2.2e-5 after 4 steps (FSDP, AMD EPYC); an lr-sized step is 1e-2
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)
    if mode == "fsdp":
        assert (out / "checkpoints" / "step_00000004" / "dcp" / ".metadata").is_file()


def test_resumed_metrics_drop_steps_after_the_checkpoint_and_cut_lines(tmp_path: Path) -> None:
    from recurrent_depth.runtime import Runtime
    from recurrent_depth.training.loop import MetricsLog

    lines = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 6)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    log = MetricsLog(tmp_path, 3, Runtime(torch.device("cpu"), torch.float32), tensorboard=False)
    log.write({"step": 4, "loss": 0.5})
    assert losses(tmp_path) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 0.5}


def test_curriculum_run_draws_easy_rows_first_and_resumes_the_same(tmp_path: Path, corpus: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from recurrent_depth.training.config import config_from_dict

    tree = tiny_tree(corpus, data={"kind": "task", "paths": [], "curriculum": 0.5, "seq_len": 24,
                                   "task": {"name": "addition", "difficulty": {"digits": [1, 3]}, "num_train": 64,
                                            "num_eval": 8}},
                     train={"steps": 12}, checkpoint={"every": 3, "keep": 5})
    import recurrent_depth.data.loader as loader
    import recurrent_depth.training.loop as loop

    drawn: list[list[int]] = []
    real = loader.curriculum_indices
    monkeypatch.setattr(loader, "curriculum_indices", lambda *a: drawn.append(a[3]) or real(*a))
    widths: list[int] = []
    real_rows = loop.TokenDataset.rows
    monkeypatch.setattr(loop.TokenDataset, "rows", lambda self, i: widths.append(
        self.levels[i].max().item() if self.levels is not None else -1) or real_rows(self, i))
    train(config_from_dict(tree), tmp_path / "full")
    assert drawn == [1, 1, 2, 2, 3, 3]  # 3 levels over the first half of 12 steps
    assert widths[:2] == [1, 1] and max(widths[:4]) <= 2 and max(widths[6:12]) == 3
    # resumed from step 6 (checkpoints after it removed), the run reads the same batches: the same losses
    import shutil

    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for ckpt in (tmp_path / "cut" / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[-1]) > 6:
            shutil.rmtree(ckpt)
    train(config_from_dict(tree), tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_depth_init_scale_scales_the_training_initial_state(tiny_config, tmp_path: Path, scale: float,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """depth.init_scale multiplies each row's random s0 (0: zeros, as the non-recurrent sampler); the default 1 keeps
    Huginn's draw unchanged, and a bad value is a ConfigError naming the key."""
    import recurrent_depth.training.loop as loop
    from recurrent_depth.training.config import ConfigError

    seen: list[torch.Tensor] = []
    real = loop.forward_backward
    monkeypatch.setattr(loop, "forward_backward", lambda m, x, y, s0, *a: seen.append(s0.clone()) or real(m, x, y, s0,
                                                                                                           *a))
    kw = dict(train={"steps": 2, "batch_size": 4})
    train(tiny_config(**kw), tmp_path / "default")
    train(tiny_config(**kw, depth={"init_scale": scale}), tmp_path / "scaled")
    default, scaled = seen[:2], seen[2:]
    assert all(bool(s.abs().max() > 0) for s in default)
    for d, s in zip(default, scaled, strict=True):
        assert torch.equal(s, d * scale)
    with pytest.raises(ConfigError, match="depth.init_scale"):
        train(tiny_config(**kw, depth={"init_scale": -1.0}), tmp_path / "bad")


def test_depth_warmup_starts_training_at_one_recurrence(tiny_config, tmp_path: Path) -> None:
    """depth.warmup_steps: the run's recorded depths follow the ramp (step t of 6 at most 1 + t * 3 // 6 recurrences,
    mean 3), where the same run without it draws deeper; a negative value is a ConfigError naming the key."""
    import json

    from recurrent_depth.training.config import ConfigError

    def depths(out: Path) -> list[int]:
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        return [r["depth"] for r in rows if "depth" in r]

    kw = dict(train={"steps": 6, "batch_size": 4})
    train(tiny_config(**kw), tmp_path / "free")
    train(tiny_config(**kw, depth={"warmup_steps": 6}), tmp_path / "ramp")
    ramp, free = depths(tmp_path / "ramp"), depths(tmp_path / "free")
    assert len(ramp) == 6 and ramp[0] == 1
    assert all(d <= 1 + t * 3 // 6 for t, d in enumerate(ramp))
    assert ramp != free and all(r == min(f, 1 + t * 3 // 6) for t, (r, f) in enumerate(zip(ramp, free)))
    with pytest.raises(ConfigError, match="depth.warmup_steps"):
        train(tiny_config(**kw, depth={"warmup_steps": -1}), tmp_path / "bad")
