"""`RecurrentDepthForCausalLM`: the network plus tied LM head, as a transformers `PreTrainedModel`.

Keyword-compatible with the reference's `RavenForCausalLM.forward`, loads and saves Huginn checkpoints
(`recurrent_depth.model.checkpoint`), and generates through transformers' `GenerationMixin` with a KV cache that
keeps one entry per (recurrence step, layer). Calls with the reference's custom generation keywords (exit criteria,
speculative drafting, warm start) are routed to `recurrent_depth.inference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from recurrent_depth.config import RecurrentDepthConfig
from recurrent_depth.depth_sampler import DepthSampler, PoissonLogNormalFilling
from recurrent_depth.inference.cache import KVCache
from recurrent_depth.inference.compat import generate_reference_style
from recurrent_depth.inference.fused import FusedRunner
from recurrent_depth.model import checkpoint
from recurrent_depth.model.init import init_weights
from recurrent_depth.model.model import RecurrentDepthModel, parse_num_steps

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Keyword arguments that transformers' generate may pass and that do not change our forward.
_IGNORED_KWARGS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "cache_position",
                             "output_details", "input_embeds", "inputs_embeds", "logits_to_keep",
                             "num_logits_to_keep", "token_type_ids"})
# The reference's custom generation keywords: any of them routes `generate` to our engine.
_ENGINE_KWARGS = frozenset({"criterion", "exit_threshold", "exit_evaluator", "continuous_compute", "draft_steps",
                            "lookahead_for_draft", "verification_threshold", "cache_lookup_strategy", "min_steps"})


@dataclass
class RecurrentDepthOutput(ModelOutput):
    """loss (scalar, if labels), logits (B, T, V) fp32, latent_states ln_f(s_r) (B, T, d), cache (KV cache)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: Any = None
    latent_states: Tensor | None = None
    hidden_states: Tensor | None = None

    @property
    def past_key_values(self) -> Any:
        return self.cache


class RecurrentDepthForCausalLM(PreTrainedModel, GenerationMixin):
    """A Huginn-layout recurrent-depth language model with a tied LM head."""

    config_class = RecurrentDepthConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["SandwichBlock"]
    _tied_weights_keys = ({"lm_head.weight": "transformer.wte.weight"} if TRANSFORMERS_MAJOR >= 5
                          else ["lm_head.weight"])
    _supports_sdpa = True

    def __init__(self, config: RecurrentDepthConfig) -> None:
        super().__init__(config)
        self.transformer = RecurrentDepthModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # The depth drawn by a train-mode forward without num_steps: the reference's sampler by default; training
        # hands in its configured one (and a generator, None meaning torch's global RNG as the reference draws).
        self.depth_sampler: DepthSampler = PoissonLogNormalFilling(config.mean_recurrence, config.mean_backprop_depth)
        self.depth_generator: torch.Generator | None = None
        self.transformer.stage_runner = FusedRunner()  # cached CPU inference through the fused op when it applies
        self.post_init()

    # ------------------------------------------------------------------------------------ transformers glue
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Huginn's takase initialisation (`recurrent_depth.model.init`); a no-op on the meta device."""
        if self.transformer.wte.weight.device.type == "meta":
            return
        values = self.config.init_values
        init_weights(self, values["std"], values["out_proj"], generator)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:  # transformers' per-module hook: init_weights does it all
        return

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache is made in prepare_inputs_for_generation

    # ------------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor,
        num_steps: int | tuple[int, int] | Tensor | None = None,
        input_states: Tensor | None = None,
        init_scale: float = 1.0,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool = False,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> RecurrentDepthOutput:
        """The network's forward (`RecurrentDepthModel.forward`: prelude, r recurrences of the core, coda), then the
        head and the loss.

        num_steps: recurrence count r (core applications, not layers). None: `mean_recurrence` in eval mode, a draw
            from the training depth sampler in train mode; int r: r steps; (n, k): n steps without autograd, then k
            with it. r = 0 decodes the initial state directly.
        input_states: initial latent state s0 (B, T, d); otherwise drawn with std scaled by `init_scale` (0: zeros).
        attention_mask: (B, past + T), 1 for tokens and 0 for (left) padding; positions count real tokens only.
        labels: (B, T) targets aligned with the logits (no shift inside, as in the reference), -100 ignored.
        use_cache / past_key_values / cache: a `KVCache` (made if use_cache and none given) read and extended.
        """
        unknown = set(kwargs) - _IGNORED_KWARGS
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {sorted(unknown)}")
        self._check_input_ids(input_ids)
        kv = cache if cache is not None else past_key_values
        if kv is None and use_cache:
            kv = KVCache()
        hidden, latents = self.transformer(input_ids, self._depth(num_steps), input_states, init_scale,
                                           attention_mask, position_ids, kv)
        logits = self.lm_head(hidden).float()  # fp32 for softmax and loss
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(input_ids.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return RecurrentDepthOutput(loss=loss, logits=logits, cache=kv, latent_states=latents)

    def _depth(self, num_steps: int | tuple[int, int] | Tensor | None) -> tuple[int, int]:
        """(n_no_grad, n_grad): a draw from `self.depth_sampler` in train mode when no depth is given (the
        reference's randomized depth), else `num_steps` parsed (None: `mean_recurrence`)."""
        if num_steps is None and self.training:
            return self.depth_sampler.sample(generator=self.depth_generator)
        return parse_num_steps(num_steps, self.config.mean_recurrence)

    def _check_input_ids(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq) tensor, got {getattr(input_ids, 'shape', input_ids)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (the vocabulary), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    # ---------------------------------------------------------------------------------------- generation
    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Any = None,
                                      attention_mask: Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """Feed only the tokens the cache has not seen, with our recurrent KV cache (never transformers' own)."""
        kv = kwargs.pop("cache", None) or past_key_values
        if not isinstance(kv, KVCache):
            kv = KVCache()
        model_inputs: dict[str, Any] = {"input_ids": input_ids[:, kv.get_seq_length():], "cache": kv,
                                        "attention_mask": attention_mask, "use_cache": True}
        for name in ("num_steps", "init_scale", "input_states"):
            if name in kwargs:
                model_inputs[name] = kwargs[name]
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict[str, Any], *args: Any,
                                            **kwargs: Any) -> dict[str, Any]:
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        # transformers 5 names the cache `cache`, 4.x `past_key_values`
        name = "cache" if TRANSFORMERS_MAJOR >= 5 else "past_key_values"
        model_kwargs.pop("cache", None)
        model_kwargs.pop("past_key_values", None)
        model_kwargs[name] = outputs.cache
        return model_kwargs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate, or our engine when the reference's custom keywords are given."""
        if _ENGINE_KWARGS & set(kwargs):
            return generate_reference_style(self, *args, **kwargs)
        return super().generate(*args, **kwargs)

    # ---------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, **kwargs: Any) -> RecurrentDepthForCausalLM:
        """Load a Huginn-layout checkpoint folder (see `recurrent_depth.model.checkpoint.load`)."""
        return checkpoint.load(cls, path, *args, **kwargs)

    def save_pretrained(self, path: Any, *args: Any, **kwargs: Any) -> None:
        """Write a Huginn-layout checkpoint folder (see `recurrent_depth.model.checkpoint.save`)."""
        checkpoint.save(self, path, *args, **kwargs)

    def num_parameters(self, exclude_embeddings: bool = False, **_: Any) -> int:
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "wte" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total
