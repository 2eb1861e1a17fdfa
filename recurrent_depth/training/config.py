"""Typed training configuration: nested dataclasses read from YAML, with `key=value` overrides.

    cfg = load_config("configs/debug.yaml", overrides=["train.steps=50", "optim.lr=1e-3"])

Every key is checked before training starts: an unknown key, a value of the wrong type, an impossible combination or
a data path that does not exist raises `ConfigError` naming the key (`data.paths`, `optim.lr`, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from recurrent_depth.data.paths import expand_path
from recurrent_depth.depth_sampler import SamplerName


class ConfigError(ValueError):
    """A training config that cannot run; the message names the key."""


@dataclass
class ModelSection:
    """The network: a preset plus field overrides (any `RecurrentDepthConfig` field, e.g. `n_embd: 64`), or
    `init_from` a checkpoint folder to fine-tune. `vocab_size` defaults to the tokenizer's size."""

    preset: str = "debug"
    init_from: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSection:
    """A built-in reasoning task (`recurrent_depth.tasks`): name, difficulty keywords, example counts. `targets`:
    training rows also label the running state under each prompt character (tasks with a `trace`: cups,
    modular_chain), dense supervision that adds no tokens to the context; validation stays answer-only."""

    name: str = ""
    difficulty: dict[str, Any] = field(default_factory=dict)
    num_train: int = 10000
    num_eval: int = 256
    targets: bool = False


@dataclass
class DataSection:
    """Training data. kind `text`: files/folders (paths; folders searched with `glob`), packed into seq_len blocks;
    `jsonl`: {"prompt", "answer"} lines; `task`: a built-in reasoning task. `{stdlib}` in a path is Python's own
    standard-library folder (an offline corpus). tokenizer: `auto` (BPE trained on the corpus for text, characters
    otherwise), `bpe`, `char`, or a folder / tokenizer.json path."""

    kind: Literal["text", "jsonl", "task"] = "text"
    paths: list[str] = field(default_factory=list)
    glob: str = "**/*.txt"
    max_bytes: int = 0
    val_paths: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    seq_len: int = 128
    tokenizer: str = "auto"
    bpe_vocab_size: int = 1024
    answer_only_loss: bool = True
    # a curriculum over difficulty: the first `curriculum` fraction of the steps draws only rows up to a level that
    # rises from the lowest to the highest (an equal share of those steps per level); needs a `level` on every row
    # (built-in tasks have one; JSONL rows give an integer "level"). 0: off
    curriculum: float = 0.0
    task: TaskSection = field(default_factory=TaskSection)


@dataclass
class TrainSection:
    """Steps and batch: `batch_size` sequences per optimiser step over all ranks, `micro_batch_size` per rank per
    forward; accumulation = batch_size / (micro_batch_size * world_size)."""

    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 0  # 0: batch_size / world_size (no accumulation)
    seed: int = 0


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine or trapezoid (constant, then linear cool-down) decay to min_lr.
    No weight decay on norms, biases and qk_bias."""

    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "trapezoid", "constant"] = "cosine"
    cooldown_steps: int = 0  # trapezoid: length of the final linear decay (0: 20% of the run)


@dataclass
class DepthSection:
    """Depth sampler per step (identical on every rank): `poisson-lognormal-filling` (Huginn), `fixed`, or
    `non-recurrent` (core once). mean_recurrence / backprop_depth default to the model config's."""

    sampler: SamplerName = "poisson-lognormal-filling"
    mean_recurrence: int = 0
    backprop_depth: int = 0
    depth: int = 0  # fixed: total steps (0: mean_recurrence)
    activation_checkpointing: bool = False
    init_scale: float = 1.0  # the random initial state s0's scale in training (1: Huginn's; 0: zeros)
    warmup_steps: int = 0  # depth curriculum: r capped from 1 up to the mean over these first steps (0: none)


@dataclass
class CheckpointSection:
    every: int = 0  # 0: only at the end
    keep: int = 2


@dataclass
class LogSection:
    every: int = 1
    progress: bool = True
    tensorboard: bool = True  # used only when installed


@dataclass
class EvalSection:
    """Validation loss (and answer accuracy for prompt/answer data) at fixed depths, every `every` steps."""

    every: int = 0  # 0: only at the end
    depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    batches: int = 4


@dataclass
class RuntimeSection:
    device: str = "auto"
    dtype: str = "auto"
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    threads: int = 0  # torch CPU threads (0: torch's default)
    # torch.compile: the core step as one fused graph (fp32, no FSDP; training/fused.py), other blocks one by one;
    # a one-off warm-up (about a minute on a CPU), then faster steps (BENCHMARKS.md, Training step)
    compile: bool = False
    # fp32 matrix products: "ieee" (exact fp32, the default), "bf16" on a CPU (bf16 inner products with fp32
    # accumulation through oneDNN: AMX / AVX512-BF16; about 3-4x the GEMM speed, inputs rounded to 8 bits of
    # mantissa), "tf32" on CUDA. Weights, activations, optimiser state and the attention kernel stay fp32.
    fp32_matmul: Literal["ieee", "bf16", "tf32"] = "ieee"


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    depth: DepthSection = field(default_factory=DepthSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ type checking
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or ConfigError naming `key`. Ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"`{key}` must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"`{key}` has an invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"`{key}` must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"`{key}`: unsupported type {_type_name(tp)}")


def model_field_names() -> set[str]:
    """The `RecurrentDepthConfig` fields a config may set under `model` (its constructor's named arguments)."""
    from recurrent_depth.config import RecurrentDepthConfig

    params = inspect.signature(RecurrentDepthConfig.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"`{prefix or 'config'}` must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = dict(raw)
    if cls is ModelSection:  # model fields may be written flat beside `preset`
        flat = {k: raw.pop(k) for k in list(raw) if k not in names}
        allowed = model_field_names()
        for k in list(flat) + list(raw.get("fields") or {}):
            if k not in allowed:
                raise ConfigError(f"unknown key `{prefix}.{k}`: not a model field (see RecurrentDepthConfig)")
        raw["fields"] = {**(raw.get("fields") or {}), **flat}
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in names:
            raise ConfigError(f"unknown key `{key}`; valid keys here: {names}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------- loading
def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"`--set {dotted}`: `{p}` is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML: 3, 1e-3, true, [1, 2], text) to a raw config tree."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"`--set {item}`: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"`--set {item}`: the value is not valid YAML ({getattr(err, 'problem', err)})") from None
        if isinstance(value, str) or value is None:
            value = text if text != "null" else None
        _set(tree, key.strip(), value)
    return tree


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks and existence of data paths; raises ConfigError naming the key."""
    d, t, o = cfg.data, cfg.train, cfg.optim
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "data.seq_len": d.seq_len,
                "log.every": cfg.log.every, "checkpoint.keep": cfg.checkpoint.keep}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"`{key}` must be > 0, got {v}")
    nonneg = {"train.micro_batch_size": t.micro_batch_size, "optim.warmup_steps": o.warmup_steps,
              "optim.cooldown_steps": o.cooldown_steps, "checkpoint.every": cfg.checkpoint.every,
              "eval.every": cfg.eval.every, "eval.batches": cfg.eval.batches, "data.max_bytes": d.max_bytes,
              "depth.mean_recurrence": cfg.depth.mean_recurrence, "depth.backprop_depth": cfg.depth.backprop_depth,
              "depth.warmup_steps": cfg.depth.warmup_steps,
              "depth.depth": cfg.depth.depth, "runtime.threads": cfg.runtime.threads}
    for key, v in nonneg.items():
        if v < 0:
            raise ConfigError(f"`{key}` must be >= 0, got {v}")
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"`optim.lr` must be > 0 and `optim.min_lr` in [0, lr], got lr={o.lr}, min_lr={o.min_lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"`optim.betas` must be two numbers in [0, 1), got {o.betas}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"`data.val_fraction` must be in [0, 1), got {d.val_fraction}")
    if any(x < 0 for x in cfg.eval.depths):
        raise ConfigError(f"`eval.depths` must be non-negative, got {cfg.eval.depths}")
    if not (isinstance(cfg.depth.init_scale, int | float) and 0 <= cfg.depth.init_scale < float("inf")):
        raise ConfigError(f"`depth.init_scale` must be a finite number >= 0 (the scale of the random initial state; "
                          f"1: Huginn's, 0: zeros), got {cfg.depth.init_scale!r}")
    if not 0 <= d.curriculum < 1:
        raise ConfigError(f"`data.curriculum` must be a fraction of the steps in [0, 1), got {d.curriculum}")
    if d.curriculum and d.kind == "text":
        raise ConfigError("`data.curriculum` needs rows with a difficulty `level` (data.kind task or jsonl); "
                          "plain text has none")
    if d.kind == "task":
        if not d.task.name:
            raise ConfigError("`data.task.name` is required when `data.kind` is task")
    else:
        if not d.paths:
            raise ConfigError(f"`data.paths` must list at least one file or folder for data.kind={d.kind}")
        for key, paths in (("data.paths", d.paths), ("data.val_paths", d.val_paths)):
            for p in paths:
                if not expand_path(p).exists():
                    raise ConfigError(f"`{key}`: {p!r} does not exist")
    tok = d.tokenizer
    if tok not in ("auto", "bpe", "char"):
        path = expand_path(tok)
        if not (path.is_file() or (path / "tokenizer.json").is_file()):
            raise ConfigError(f"`data.tokenizer`: {tok!r} is neither auto/bpe/char nor a tokenizer.json or a folder "
                              "holding one")
    if cfg.model.init_from is not None and not (expand_path(cfg.model.init_from) / "config.json").is_file():
        raise ConfigError(f"`model.init_from`: no checkpoint (config.json) at {cfg.model.init_from!r}")
    from recurrent_depth.config import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"`model.preset` must be one of {sorted(PRESETS)}, got {cfg.model.preset!r}")
    if cfg.runtime.fp32_matmul != "ieee":
        from recurrent_depth.runtime import check_fp32_matmul, default_device

        device = default_device().type if cfg.runtime.device == "auto" else cfg.runtime.device
        try:
            check_fp32_matmul(cfg.runtime.fp32_matmul, device.split(":")[0])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return cfg


def config_from_dict(tree: dict[str, Any], overrides: list[str] | None = None) -> TrainConfig:
    """Build and validate a TrainConfig from a raw mapping plus `key=value` overrides."""
    tree = apply_overrides(dict(tree or {}), list(overrides or []))
    return validate(_build(TrainConfig, tree, ""))


def _read_yaml(path: Path) -> Any:
    """The parsed file; ConfigError naming the file, line and column of a syntax error."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config file (or start from the defaults when `path` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        tree = _read_yaml(p)
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return config_from_dict(tree, overrides)
