"""The training loop: `train(cfg, out_dir, resume=False, overwrite=False)`.

    from recurrent_depth.training import load_config, train
    result = train(load_config("configs/debug.yaml"), "runs/debug")

Per optimiser step: draw (n_no_grad, n_grad) from the depth sampler seeded by the step (identical on every rank),
run the global batch as micro-batches (rank r takes its slice of each), clip, step AdamW, log to metrics.jsonl
(+ TensorBoard when installed), evaluate at fixed depths and checkpoint on schedule. An `out_dir` holding an earlier
run is refused unless `resume` (continue from its newest whole checkpoint, falling back past corrupt ones) or
`overwrite` (delete its files first); see training/run_dir.py. Launch with torchrun for DDP or
FSDP2 (`runtime.parallel`); `python -m recurrent_depth train ...` is the entry point.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.data.build import DataBundle, build_data
from recurrent_depth.data.loader import TokenDataset, eval_batches, training_indices
from recurrent_depth.data.paths import expand_path
from recurrent_depth.depth_sampler import DepthSampler, make_sampler
from recurrent_depth.hf import RecurrentDepthForCausalLM
from recurrent_depth.model.checkpoint import CheckpointError
from recurrent_depth.progress import Progress
from recurrent_depth.runtime import Runtime, fp32_matmul, init_runtime, seed_everything, tune_cpu_allocator
from recurrent_depth.training import checkpoint as ckpt
from recurrent_depth.training.config import ConfigError, TrainConfig
from recurrent_depth.training.optim import build_optimizer, lr_at
from recurrent_depth.training.parallel import (
    apply_activation_checkpointing,
    clip_grad_norm,
    compile_blocks,
    gradient_sync,
    parallelize,
)
from recurrent_depth.training.run_dir import check_out_dir, remove_run, run_files
from recurrent_depth.training.step import IGNORE, forward_backward, initial_states, token_loss_sum


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    is_main: bool = True


# --------------------------------------------------------------------------------------------------- set-up
def _say(message: str) -> None:
    """A notice for the user on stderr (stdout carries the run's JSON summary)."""
    print(f"rdepth train: {message}", file=sys.stderr, flush=True)


PROGRESS_EVERY_S = 30.0  # off a terminal: seconds between two progress lines (the first and last step always show)


def _status(done: int, total: int, start: int, elapsed_s: float, fields: str) -> str:
    """The progress line after optimiser step `done` of `total` (this run began at `start`, `elapsed_s` ago), with
    the time left at this run's mean step time."""
    eta = timedelta(seconds=round(elapsed_s / max(done - start, 1) * (total - done)))
    return f"train step {done}/{total} ({100 * done // max(total, 1)}%) {fields} eta={eta}"


def _on_main(rt: Runtime, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its error, re-raised) on every rank."""
    result, error = None, None
    if rt.is_main:
        try:
            result = fn()
        except (ValueError, OSError) as err:
            error = err
    result, text = rt.broadcast_object((result, str(error) if error is not None else None))
    if error is not None:
        raise error
    if text is not None:
        raise CheckpointError(text)
    return result


def _resume_point(out: Path, sharded: bool) -> Path | None:
    """The checkpoint to resume from. None (said on stderr) for a new or empty folder; an error for a folder that
    holds a run but no checkpoint, which starting afresh would overwrite."""
    folder = ckpt.find_resume_checkpoint(out, sharded, _say)
    if folder is None:
        found = run_files(out)
        if found:
            raise ConfigError(f"--resume: {str(out)!r} holds a run ({', '.join(found)}) but no checkpoint under "
                              f"{str(ckpt.checkpoint_root(out))!r} to resume from; pass --overwrite (instead of "
                              "--resume) to start it again")
        _say(f"--resume: no checkpoint in {str(out)!r} yet; starting a new run at step 0")
    return folder


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, sharded: bool, rt: Runtime) -> Path | None:
    """Check (every rank) and clear (rank 0, with `overwrite`) the output folder; the checkpoint to resume from."""
    check_out_dir(out, resume, overwrite)
    rt.barrier()
    if overwrite:
        _on_main(rt, lambda: remove_run(out))
    return _on_main(rt, lambda: _resume_point(out, sharded)) if resume else None


def _data(cfg: TrainConfig, rt: Runtime, resume_from: Path | None) -> DataBundle:
    """Datasets on every rank, with one tokenizer: from the checkpoint when resuming, else built by rank 0 and
    shared (BPE training need not be deterministic across processes)."""
    from recurrent_depth.data.build import load_tokenizer_path

    tok = load_tokenizer_path(resume_from) if resume_from is not None else None
    if tok is None and rt.distributed:
        bundle = build_data(cfg.data, cfg.train.seed) if rt.is_main else None
        text = rt.broadcast_object(bundle.tokenizer.backend_tokenizer.to_str() if rt.is_main else None)
        if rt.is_main:
            return bundle
        from tokenizers import Tokenizer

        from recurrent_depth.data.tokenizer import _wrap

        tok = _wrap(Tokenizer.from_str(text))
    return build_data(cfg.data, cfg.train.seed, tok)


def _model_config(cfg: TrainConfig, vocab: int) -> RecurrentDepthConfig:
    fields = dict(cfg.model.fields)
    if fields.get("vocab_size", vocab) < vocab:
        raise ConfigError(f"`model.vocab_size` ({fields['vocab_size']}) is smaller than the tokenizer's {vocab}")
    fields.setdefault("vocab_size", vocab)
    try:
        return RecurrentDepthConfig.from_name(cfg.model.preset, **fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"`model`: {err}") from None


def build_model(cfg: TrainConfig, vocab: int, rt: Runtime) -> RecurrentDepthForCausalLM:
    """A fresh model (seeded: identical on every rank) or the `model.init_from` checkpoint, on rt.device."""
    if cfg.model.init_from is not None:
        model = RecurrentDepthForCausalLM.from_pretrained(expand_path(cfg.model.init_from), dtype=torch.float32)
        if model.config.vocab_size < vocab:
            raise ConfigError(f"`model.init_from`: vocab_size {model.config.vocab_size} < tokenizer size {vocab}")
    else:
        seed_everything(cfg.train.seed)
        model = RecurrentDepthForCausalLM(_model_config(cfg, vocab))
    return model.to(rt.device)


def build_sampler(cfg: TrainConfig, model_cfg: RecurrentDepthConfig) -> DepthSampler:
    d = cfg.depth
    return make_sampler(d.sampler, d.mean_recurrence or model_cfg.mean_recurrence,
                        d.backprop_depth or model_cfg.mean_backprop_depth or 1, d.depth, d.warmup_steps)


def micro_batches(cfg: TrainConfig, rt: Runtime) -> tuple[int, int]:
    """(micro batch per rank, accumulation steps) for the global batch; ConfigError when they do not divide."""
    t = cfg.train
    micro = t.micro_batch_size or t.batch_size // rt.world_size
    if micro < 1 or t.batch_size % (micro * rt.world_size):
        raise ConfigError(f"`train.batch_size` ({t.batch_size}) must be a multiple of `train.micro_batch_size` "
                          f"({micro}) times the number of ranks ({rt.world_size})")
    return micro, t.batch_size // (micro * rt.world_size)


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, data: TokenDataset, num_steps: list[int], batch_size: int, max_batches: int,
             rt: Runtime) -> dict[str, float]:
    """Validation loss per token at each fixed recurrence count in `num_steps` (`eval.depths`; zero initial state),
    plus exact-match answer accuracy (all answer tokens are the argmax under teacher forcing) for prompt/answer
    data."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    batches = eval_batches(data, batch_size, max_batches)
    for depth in num_steps:
        loss_sum, count, correct, total = 0.0, 0, 0, 0
        for b in batches:
            ids, labels = b.inputs.to(rt.device), b.labels.to(rt.device)
            with rt.autocast():
                logits = model(ids, num_steps=depth, init_scale=0.0).logits
            loss_sum += float(token_loss_sum(logits, labels))
            count += int((labels != IGNORE).sum())
            if b.answer_labels is not None:
                ans = b.answer_labels.to(rt.device)
                mask = ans != IGNORE
                ok = ((logits.argmax(-1) == ans) | ~mask).all(-1) & mask.any(-1)
                correct += int(ok.sum())
                total += int(mask.any(-1).sum())
        out[f"val_loss@{depth}"] = loss_sum / max(count, 1)
        if total:
            out[f"val_acc@{depth}"] = correct / total
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """metrics.jsonl on rank 0 (truncated to `start_step` when resuming) and TensorBoard when installed."""

    def __init__(self, out_dir: Path, start_step: int, rt: Runtime, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = rt.is_main
        self.tb = None
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file() and start_step > 0:  # keep what the checkpoint covers; drop a line cut by a kill
            for ln in self.path.read_text().splitlines():
                try:
                    if json.loads(ln).get("step", 0) <= start_step:
                        kept.append(ln)
                except json.JSONDecodeError:
                    continue
        self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train as configured, writing checkpoints and metrics.jsonl under `out_dir`; with `resume`, continue from
    the latest complete checkpoint there (exactly: same data order, depths, initial states and optimiser state);
    with `overwrite`, delete an earlier run there first. An earlier run with neither is a ConfigError."""
    out = Path(out_dir)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    rt = init_runtime(cfg.runtime.device, cfg.runtime.dtype)
    if rt.device.type == "cpu":
        tune_cpu_allocator()
    try:
        with fp32_matmul(cfg.runtime.fp32_matmul, rt.device):
            return _train(cfg, out, resume, overwrite, rt)
    finally:
        rt.close()


def _train(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, rt: Runtime) -> TrainResult:
    t = cfg.train
    micro, accum = micro_batches(cfg, rt)
    sharded = cfg.runtime.parallel == "fsdp" and rt.distributed
    resume_from = prepare_out_dir(out, resume, overwrite, sharded, rt)
    data = _data(cfg, rt, resume_from)
    if rt.is_main:
        for note in data.notes:
            _say(note)
    model = build_model(cfg, len(data.tokenizer), rt)
    if resume_from is not None:
        ckpt.load_model_weights(model, resume_from)
    sampler = build_sampler(cfg, model.config)
    model.depth_sampler = sampler  # what a train-mode forward without num_steps draws from (the loop passes them)
    model.train()
    if cfg.depth.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.runtime.compile:
        compile_blocks(model, fuse_core=not sharded)
    train_model = parallelize(model, cfg.runtime.parallel, rt)
    optimizer = build_optimizer(model, cfg.optim)
    start = 0
    if resume_from is not None:
        start = int(ckpt.load_training_state(resume_from, model, optimizer, rt, sharded)["step"])
        if rt.is_main:
            _say(f"resuming from step {start} ({resume_from})")
    log = MetricsLog(out, start, rt, cfg.log.tensorboard)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    result = TrainResult(out_dir=out, steps=t.steps, is_main=rt.is_main)
    with Progress(after_s=0.0, every_s=PROGRESS_EVERY_S, enabled=rt.is_main and cfg.log.progress) as progress:
        seq_len = data.train.seq_len
        tokens_seen = 0
        # A plain transformer (the core run once) starts from a zero state, as it is evaluated: a random s0 would be
        # noise at the adapter's input that nothing later can average out, handicapping the baseline. So does a run
        # with depth.init_scale 0.
        zero_state = cfg.depth.sampler == "non-recurrent" or cfg.depth.init_scale == 0
        t0 = time.perf_counter()
        for step in range(start, t.steps):
            lr = lr_at(step, cfg.optim, t.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            n, k = sampler.sample(step=step)
            rows = training_indices(step, t.batch_size, data.train, t.seed, cfg.data.curriculum, t.steps)
            batch = data.train.rows(rows)
            n_tokens = int((batch.labels != IGNORE).sum())
            scale = rt.world_size / max(n_tokens, 1)
            loss_sum = torch.zeros((), device=rt.device)
            for a in range(accum):
                lo = (a * rt.world_size + rt.rank) * micro
                sl = slice(lo, lo + micro)
                s0 = (torch.zeros(len(rows[sl]), seq_len, model.config.n_embd, device=rt.device) if zero_state
                      else initial_states(model.config, rows[sl], seq_len, step, t.seed, rt.device,
                                          cfg.depth.init_scale))
                with gradient_sync(train_model, a == accum - 1):
                    loss_sum += forward_backward(train_model, batch.inputs[sl].to(rt.device),
                                                 batch.labels[sl].to(rt.device), s0, (n, k), scale, rt.autocast)
            grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(rt.all_reduce_sum(loss_sum)) / max(n_tokens, 1)
            result.losses.append(loss)
            done = step + 1
            tokens_seen += t.batch_size * seq_len
            elapsed = time.perf_counter() - t0
            tok_s = tokens_seen / max(elapsed, 1e-9)
            fields = f"loss={loss:.4f} tok_s={tok_s:,.0f} depth={n}+{k}"
            progress.update(_status(done, t.steps, start, elapsed, fields), keep=done == t.steps)
            record: dict[str, Any] = {}
            if done % cfg.log.every == 0 or done == t.steps:
                record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "n_no_grad": n, "n_grad": k,
                          "depth": n + k, "tokens_per_s": tok_s, "elapsed_s": elapsed}
            if data.val is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or done == t.steps):
                ev = evaluate(model, data.val, cfg.eval.depths, micro, cfg.eval.batches, rt)
                record = {"step": done, **record, **ev}
                result.final_eval = ev
            if record:
                log.write(record)
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == t.steps:
                state = {"data_position": done, "config": cfg.to_dict(), "loss": loss}
                result.checkpoint = ckpt.save_checkpoint(out, done, model, optimizer, data.tokenizer, state, rt,
                                                          sharded, cfg.checkpoint.keep)
    log.close()
    return result

