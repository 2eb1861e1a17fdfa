"""lm-evaluation-harness (0.4.x) adapter: a registered model class `recurrent_depth` for any checkpoint folder.

Importing this module imports lm-eval and registers the class (that is why `recurrent_depth.evaluation` does not
import it). Model arguments (lm-eval's `model_args` string or dict):

    pretrained=PATH      checkpoint folder (model files + tokenizer.json)      [required]
    num_steps=R          recurrence depth (default: the config's mean_recurrence)
    exit_criterion=NAME  per-token adaptive exit for generate_until (a name in `inference.exit.EXIT_CRITERIA`;
    exit_threshold=X     threshold default: the criterion's); log-likelihoods use fixed depth r
    batch_size=N, max_length=N (default block_size), init_scale=X (default `inference.defaults.INIT_SCALE`, 0: a
    zero initial state), seed=0, add_bos=True, device (default: cuda if available, else cpu)

Python:
    import recurrent_depth.evaluation.lm_eval_adapter  # registers "recurrent_depth"
    lm_eval.simple_evaluate(model="recurrent_depth", model_args="pretrained=ckpt,num_steps=16", tasks=[...])
Command line (lm-eval's own CLI, with the class registered first):
    python -m recurrent_depth.evaluation.lm_eval_adapter run --model recurrent_depth \\
        --model_args pretrained=ckpt,num_steps=16 --tasks my_task --include_path tasks/
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from recurrent_depth.evaluation.decode import greedy_decode
from recurrent_depth.inference.defaults import INIT_SCALE


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


@register_model("recurrent_depth", "rdepth")
class RecurrentDepthLM(TemplateLM):
    """lm-eval model over a recurrent-depth checkpoint, at a fixed test-time depth (and optional adaptive exit)."""

    def __init__(self, pretrained: str | None = None, num_steps: int | None = None,
                 exit_criterion: str | None = None, exit_threshold: float | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, init_scale: float = INIT_SCALE, seed: int = 0, add_bos: bool = True,
                 device: str | None = None, model: Any = None, tokenizer: Any = None, **unused: Any) -> None:
        super().__init__()
        if model is None:
            if not pretrained:
                raise ValueError("recurrent_depth lm-eval model needs pretrained=<checkpoint folder>")
            from recurrent_depth.data.tokenizer import load_tokenizer
            from recurrent_depth.hf import RecurrentDepthForCausalLM

            tokenizer = load_tokenizer(pretrained)
            model = RecurrentDepthForCausalLM.from_pretrained(pretrained)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with model=")
        unknown = {k for k in unused if k not in ("trust_remote_code", "dtype", "parallelize")}
        if unknown:
            raise ValueError(f"unknown recurrent_depth model arguments {sorted(unknown)}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI passes cuda by default
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.num_steps = int(num_steps) if num_steps is not None else int(model.config.mean_recurrence)
        if self.num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps!r}")
        self.exit_criterion = None if exit_criterion in (None, "", "none") else str(exit_criterion)
        self.exit_threshold = None if exit_threshold in (None, "") else float(exit_threshold)
        if self.exit_criterion is not None:
            from recurrent_depth.inference.exit import make_exit_criterion

            make_exit_criterion(self.exit_criterion, self.exit_threshold)  # fail now on a bad name / threshold
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else int(model.config.block_size)
        self.init_scale, self.seed, self.add_bos = float(init_scale), int(seed), _as_bool(add_bos)

    # ---------------------------------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.add_bos else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy one) for token-id pairs, at num_steps.

        Inputs are cut from the left to max_length; each row draws its initial state from a generator seeded with
        `seed` alone, so a score does not depend on what else is in its batch."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        d = self.model.config.n_embd
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = []
            for i in chunk:
                ctx, cont = pairs[i]
                if not cont:
                    raise ValueError("an empty continuation cannot be scored")
                seqs.append((ctx + cont)[-(self.max_length + 1):][:-1])
            width = max(len(s) for s in seqs)
            ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
            s0 = torch.zeros(len(chunk), width, d)
            for row, s in enumerate(seqs):  # right padding: causal attention never lets real tokens see it
                ids[row, : len(s)] = torch.tensor(s)
                gen = torch.Generator().manual_seed(self.seed)
                s0[row, : len(s)] = self.model.transformer.initial_state(torch.zeros(1, len(s), d), self.init_scale,
                                                                         gen)[0]
            logits = self.model(ids.to(self._device), num_steps=self.num_steps,
                                input_states=s0.to(self._device)).logits
            logp = F.log_softmax(logits, dim=-1).cpu()
            for row, i in enumerate(chunk):
                cont = pairs[i][1][-len(seqs[row]):] if len(pairs[i][1]) > len(seqs[row]) else pairs[i][1]
                n, end = len(cont), len(seqs[row])
                target = torch.tensor(cont)
                window = logp[row, end - n: end]  # (n, V): position j predicts token j + 1
                results[i] = (float(window.gather(1, target[:, None]).sum()),
                              bool((window.argmax(dim=-1) == target).all()))
        return results

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        pairs = []
        for _, ctx, cont in requests:
            if self.add_bos and (not ctx or ctx[0] != self.tokenizer.bos_token_id):
                ctx = [self.tokenizer.bos_token_id, *ctx]
            pairs.append((ctx, cont))
        results = self._score(pairs)
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
            total = sum(lp for lp, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (with the adaptive exit, if configured) until a stop string or max_gen_toks."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            _, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(kwargs.get("max_gen_toks", 64))), []).append(i)
        out = [""] * len(requests)
        for (until, max_toks), idx in groups.items():
            prompts = [requests[i].args[0] for i in idx]
            longest = max(len(self.tok_encode(p)) for p in prompts) + int(self.add_bos)
            block = int(self.model.config.block_size)
            budget = max(1, min(max_toks, block - min(longest, block // 2)))  # long prompts are cut from the left
            res = greedy_decode(self.model, self.tokenizer, prompts, self.num_steps, budget,
                                exit_criterion=self.exit_criterion, exit_threshold=self.exit_threshold,
                                batch_size=self.batch_size, add_bos=self.add_bos, stop=until,
                                init_scale=self.init_scale, seed=self.seed, truncate=True)
            for i, text in zip(idx, res.texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
