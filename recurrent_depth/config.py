"""Model configuration: `RecurrentDepthConfig`, Huginn's `config.json` field names, and named presets.

The config reads and writes exactly the fields of Huginn-0125's `config.json` (`model_type: huginn_raven`), so a
checkpoint written by the reference loads here and one written here loads in the reference. Derived fields
(`n_layers`, `head_dim`, `effective_expected_depth`, `init_values`, `padded_vocab_size`) are recomputed from the
others and validated, never trusted from the file.

    cfg = RecurrentDepthConfig.from_name("small", mean_recurrence=16)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from transformers import PretrainedConfig

# Informational fields of Huginn's config: the reference hard-wires these choices; we keep them for round trips and
# reject values we do not implement, so a config that asks for something else fails loudly instead of silently.
_FIXED_CHOICES: dict[str, str] = {
    "architecture_class_name": "RecurrentGPT",
    "block_class_name": "SandwichBlock",
    "norm_class_name": "RMSNorm_llama",
    "mlp_class_name": "GatedMLP",
    "nonlin_name": "SiLU",
    "init_strategy": "takase",
    "state_init": "like-init",
    "injection_type": "linear",
    "sampling_scheme": "poisson-lognormal-filling",
    "activation_checkpoint_impl": "per-iteration",
}

# Keys a Huginn config.json may carry besides the constructor's fields: derived values (recomputed), bookkeeping
# written by transformers or the reference's template (`name`, `hf_config`), and token ids. Any other key warns.
_DERIVED = ("n_layers", "head_dim", "effective_expected_depth", "init_values", "padded_vocab_size",
            "num_key_value_heads", "num_attention_heads", "hidden_size", "num_hidden_layers")
_BOOKKEEPING = frozenset({"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                          "name_or_path", "torch_dtype", "dtype", "name", "hf_config", "bos_token_id", "eos_token_id",
                          "pad_token_id", "tie_word_embeddings"})

PRESETS: dict[str, dict[str, Any]] = {
    # A few thousand parameters: unit tests and `make demo` on a laptop.
    "debug": dict(n_embd=32, n_heads=2, vocab_size=256, intermediate_size=64, block_size=256,
                  n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1,
                  mean_recurrence=4, mean_backprop_depth=2),
    # ~1M parameters: CPU experiments (reasoning tasks, the bundled checkpoint).
    "tiny": dict(n_embd=128, n_heads=4, vocab_size=1024, intermediate_size=352, block_size=512,
                 n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1,
                 mean_recurrence=8, mean_backprop_depth=4),
    "small": dict(n_embd=256, n_heads=4, vocab_size=4096, intermediate_size=704, block_size=1024,
                  n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2,
                  mean_recurrence=32, mean_backprop_depth=8),
    "medium": dict(n_embd=768, n_heads=12, vocab_size=32768, intermediate_size=2048, block_size=2048,
                   n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2,
                   mean_recurrence=32, mean_backprop_depth=8),
    # Exactly Huginn-0125 (3,564,976,800 parameters).
    "huginn-3.5b": dict(n_embd=5280, n_heads=55, vocab_size=65536, intermediate_size=17920, block_size=4096,
                        n_layers_in_prelude=2, n_layers_in_recurrent_block=4, n_layers_in_coda=2,
                        mean_recurrence=32, mean_backprop_depth=8, padding_multiple=4096),
}


def _warn_unknown(fields: dict[str, Any]) -> None:
    """Warn, naming them, about config keys that no Huginn model uses (a typo would otherwise pass silently)."""
    known = _BOOKKEEPING | set(_FIXED_CHOICES) | set(PretrainedConfig().to_dict())
    unknown = sorted(set(fields) - known)
    if unknown:
        warnings.warn(f"config keys {unknown} are not fields of a huginn_raven model: kept, but nothing reads them",
                      UserWarning, stacklevel=3)


class RecurrentDepthConfig(PretrainedConfig):
    """Shape and defaults of a recurrent-depth model (prelude P layers, core C layers iterated r times, coda Cd).

    Field names are Huginn's. `mean_recurrence` is the default r (`num_steps`) at evaluation and the mean of the
    training depth sampler; `mean_backprop_depth` is the number of final iterations that receive gradients.
    """

    model_type = "huginn_raven"
    attribute_map = {"num_attention_heads": "n_heads", "hidden_size": "n_embd", "num_hidden_layers": "n_layers"}

    def __init__(
        self,
        n_embd: int = 5280,
        n_heads: int = 55,
        block_size: int = 4096,
        vocab_size: int = 65536,
        padding_multiple: int = 4096,
        tie_embeddings: bool = True,
        intermediate_size: int = 17920,
        bias: bool = False,
        norm_eps: float = 1e-6,
        n_layers_in_prelude: int = 2,
        n_layers_in_recurrent_block: int = 4,
        n_layers_in_coda: int = 2,
        mean_recurrence: int = 32,
        mean_backprop_depth: int = 8,
        qk_bias: bool = True,
        rope_base: float = 50000,
        init_orthogonal: bool = False,
        test_time_noise: float = 0,
        test_time_noise_type: str = "fixed",
        core_attention_window: int = 0,
        outer_attention_window: int = 0,
        **kwargs: Any,
    ) -> None:
        for derived in _DERIVED:
            kwargs.pop(derived, None)
        _warn_unknown(kwargs)
        choices = {k: kwargs.pop(k, v) for k, v in _FIXED_CHOICES.items()}
        kwargs.pop("auto_map", None)  # the reference's remote-code pointers: we never need them
        kwargs.setdefault("architectures", ["RavenForCausalLM"])
        kwargs.setdefault("tie_word_embeddings", bool(tie_embeddings))
        self.n_embd = n_embd
        self.n_heads = n_heads
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.padding_multiple = padding_multiple
        self.tie_embeddings = tie_embeddings
        self.intermediate_size = intermediate_size
        self.bias = bias
        self.norm_eps = norm_eps
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.n_layers_in_coda = n_layers_in_coda
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.qk_bias = qk_bias
        self.rope_base = rope_base
        self.init_orthogonal = init_orthogonal
        self.test_time_noise = test_time_noise
        self.test_time_noise_type = test_time_noise_type
        # Not Huginn's: 0 (the default, exact Huginn parity) lets the core attend to every earlier position; w > 0
        # limits the core blocks to the last w positions (the query's own included), so information moves at most
        # w - 1 positions per core layer and a longer chain needs more iterations (a looped model's receptive
        # field). The prelude and coda keep full attention unless `outer_attention_window` says otherwise.
        self.core_attention_window = core_attention_window
        # Not Huginn's either: 0 (the default) keeps full attention in the prelude and coda; w > 0 limits them to the
        # last w positions too, so that no layer depends on how far a position lies from the start or how many
        # positions precede it: with both windows set the whole model is translation invariant along the sequence
        # and a row longer than any in training meets only the local contexts it was trained on.
        self.outer_attention_window = outer_attention_window
        for k, v in choices.items():
            setattr(self, k, v)
        self.validate_fields()
        super().__init__(**kwargs)

    # ----------------------------------------------------------------------------------------------- derived
    @property
    def n_layers(self) -> int:
        """Physical layers: prelude + core + coda."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.n_heads  # plain MHA, no GQA

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def effective_expected_depth(self) -> int:
        """Layers applied at the mean recurrence: P + Cd + C * mean_recurrence (sets the output-projection init)."""
        return (self.n_layers_in_prelude + self.n_layers_in_coda
                + self.n_layers_in_recurrent_block * self.mean_recurrence)

    @property
    def init_values(self) -> dict[str, float]:
        std = math.sqrt(2 / (5 * self.n_embd))
        return {"std": std, "out_proj": std / math.sqrt(2 * self.effective_expected_depth),
                "embedding": std, "embed_scale": math.sqrt(self.n_embd)}

    # ------------------------------------------------------------------------------------------- validation
    def validate_fields(self) -> None:
        """Raise ValueError naming the first field that cannot describe a model."""
        positive = ("n_embd", "n_heads", "block_size", "vocab_size", "intermediate_size",
                    "n_layers_in_recurrent_block")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field `{name}` must be a positive integer, got {value!r}")
        for name in ("n_layers_in_prelude", "n_layers_in_coda", "mean_recurrence", "mean_backprop_depth",
                     "core_attention_window", "outer_attention_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config field `{name}` must be a non-negative integer, got {value!r}")
        if self.n_embd % self.n_heads:
            raise ValueError(f"config field `n_embd` ({self.n_embd}) must be divisible by `n_heads` ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config field `n_embd`/`n_heads` gives head_dim {self.head_dim}; RoPE needs it even")
        if not (self.norm_eps > 0):
            raise ValueError(f"config field `norm_eps` must be > 0, got {self.norm_eps!r}")
        if not (self.rope_base > 0):
            raise ValueError(f"config field `rope_base` must be > 0, got {self.rope_base!r}")
        if self.bias:
            raise ValueError("config field `bias`: only bias=False (Huginn's choice) is implemented")
        for name, expected in _FIXED_CHOICES.items():
            if getattr(self, name) != expected:
                got = getattr(self, name)
                raise ValueError(f"config field `{name}`: only {expected!r} is implemented, got {got!r}")

    # ---------------------------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> RecurrentDepthConfig:
        """Build a named preset (`debug`, `tiny`, `small`, `medium`, `huginn-3.5b`), with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        fields.setdefault("padding_multiple", fields["vocab_size"])
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """Huginn's config.json content, derived fields included (as the reference's save_pretrained writes)."""
        out = super().to_dict()
        out.update(n_layers=self.n_layers, head_dim=self.head_dim, num_key_value_heads=self.num_key_value_heads,
                   padded_vocab_size=self.padded_vocab_size, effective_expected_depth=self.effective_expected_depth,
                   init_values=self.init_values, num_attention_heads=self.n_heads)
        for k in ("hidden_size", "num_hidden_layers", "tie_word_embeddings"):
            out.pop(k, None)
        return out

    def estimate_params(self, include_embedding: bool = True) -> int:
        """Unique parameter count, computed from the shapes (equals the built model's count)."""
        d, i = self.n_embd, self.intermediate_size
        block = 3 * d * d + d * d + 2 * i * d + i * d + 4 * d + (2 * d if self.qk_bias else 0)
        n = self.n_layers * block + 2 * d * d + d
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n
