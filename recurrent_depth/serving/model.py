"""The served model: a checkpoint folder (model files + tokenizer.json) loaded once, with its chat template.

Chat template: the checkpoint's own (`chat_template` in tokenizer_config.json, or chat_template.jinja), rendered with
transformers' `apply_chat_template`; without one, the documented default `DEFAULT_CHAT_TEMPLATE`:

    system: You are terse.
    user: Hi!
    assistant:

(one `role: content` line per message, then `assistant:`), with "\\nuser:" and "\\nsystem:" as extra stop strings so
that a model continuing the transcript stops at the next turn.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recurrent_depth.data.tokenizer import load_tokenizer
from recurrent_depth.hf import RecurrentDepthForCausalLM

DEFAULT_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
DEFAULT_TEMPLATE_STOPS = ("\nuser:", "\nsystem:")


def find_chat_template(folder: str | Path) -> str | None:
    """The checkpoint's chat template, if it ships one (tokenizer_config.json or chat_template.jinja)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(template, list):  # named templates: take "default"
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


@dataclass
class ServedModel:
    """A model, its tokenizer and chat template, and the name clients use for it."""

    model: RecurrentDepthForCausalLM
    tokenizer: Any
    model_id: str
    chat_template: str = DEFAULT_CHAT_TEMPLATE
    template_stop: tuple[str, ...] = DEFAULT_TEMPLATE_STOPS
    eos_ids: tuple[int, ...] = ()  # end-of-sequence ids from the checkpoint's generation_config.json
    created: int = field(default_factory=lambda: int(time.time()))
    num_steps: int | None = None  # the depth of requests that name none (`rdepth serve --num-steps`; None: mean)

    def __post_init__(self) -> None:
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary has only "
                             f"{self.model.config.vocab_size}")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    @property
    def default_num_steps(self) -> int:
        return self.model.config.mean_recurrence if self.num_steps is None else self.num_steps

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: the tokenizer's EOS and any the checkpoint's generation config names."""
        eos = self.tokenizer.eos_token_id
        return tuple(dict.fromkeys(([] if eos is None else [int(eos)]) + list(self.eos_ids)))

    def tokenize(self, text: str) -> list[int]:
        """A text prompt's ids with the tokenizer's BOS in front, as training rows start (token-id prompts are
        taken as given)."""
        from recurrent_depth.data.tokenizer import encode_prompt

        return encode_prompt(self.tokenizer, text)

    def tokenize_chat(self, text: str) -> list[int]:
        """A rendered conversation: the template already placed any special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def card(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "recurrent_depth",
                "max_model_len": cfg.block_size, "mean_recurrence": cfg.mean_recurrence,
                "parameters": self.model.num_parameters()}


def read_eos_ids(folder: str | Path) -> tuple[int, ...]:
    """`eos_token_id` (an id or a list) from generation_config.json, if the checkpoint has one."""
    file = Path(folder) / "generation_config.json"
    try:
        value = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def load_served_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      model_id: str | None = None) -> ServedModel:
    """Load a checkpoint folder (config.json + safetensors + tokenizer.json) for serving."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (pass a checkpoint folder to --model)")
    tokenizer = load_tokenizer(folder)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = RecurrentDepthForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()
    template = find_chat_template(folder)
    name = model_id or folder.resolve().name
    if template is None:
        return ServedModel(model, tokenizer, name, eos_ids=read_eos_ids(folder))
    return ServedModel(model, tokenizer, name, template, (), eos_ids=read_eos_ids(folder))
