"""The lm-eval adapter: registered, offline on local JSONL tasks, and numerically equal to direct computation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from recurrent_depth.evaluation.decode import greedy_decode  # noqa: E402
from recurrent_depth.evaluation.lm_eval_adapter import RecurrentDepthLM  # noqa: E402
from recurrent_depth.tasks import get_task  # noqa: E402

TASK_YAMLS = {
    "rd_binding_gen": """task: rd_binding_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
metric_list:
  - metric: exact_match
""",
    "rd_binding_mc": """task: rd_binding_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
doc_to_target: "{{{{answer | int}}}}"
metric_list:
  - metric: acc
""",
    "rd_text_ppl": """task: rd_text_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: "{{{{prompt}}}}{{{{answer}}}}"
doc_to_target: "{{{{prompt}}}}{{{{answer}}}}"
metric_list:
  - metric: word_perplexity
""",
}


def _direct_logprob(model, tokenizer, context: str, continuation: str, r: int) -> float:
    ids = [tokenizer.bos_token_id] + tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]), num_steps=r, init_scale=0.0).logits.log_softmax(-1)[0]
    return sum(float(logp[j, ids[j + 1]]) for j in range(len(ids) - 1 - n, len(ids) - 1))


def test_adapter_methods_match_direct_computation(model, tokenizer) -> None:
    lm = RecurrentDepthLM(model=model, tokenizer=tokenizer, num_steps=3, init_scale=0.0, batch_size=2)
    reqs = [("a=3,b=a;b?", "3"), ("12+34=", "46"), ("7+1=", "8"), ("ab,bc;a>c?", "bc")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        assert lp == pytest.approx(_direct_logprob(model, tokenizer, ctx, cont, 3), abs=1e-4)
    text = "12+34=46.\n" * 8
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert rolling == pytest.approx(_direct_logprob(model, tokenizer, "", text, 3), abs=1e-3)
    lm_short = RecurrentDepthLM(model=model, tokenizer=tokenizer, num_steps=3, init_scale=0.0, max_length=16)
    (windowed,) = lm_short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert windowed < 0 and math.isfinite(windowed) and windowed != pytest.approx(rolling, abs=1e-3)
    prompts = ["12+34=", "a=3,b=a;b?"]
    gens = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 3}), i)
                              for i, p in enumerate(prompts)])
    assert gens == greedy_decode(model, tokenizer, prompts, 3, 3, init_scale=0.0, stop=["\n"]).texts


def test_adapter_defaults_to_the_inference_init_scale(model, tokenizer) -> None:
    """Without init_scale the adapter scores from a zero initial state (`inference.defaults.INIT_SCALE`), so a
    log-likelihood equals the direct zero-state computation whatever the seed (the old default 1.0 drew noise)."""
    reqs = [("12+34=", "46"), ("ab,bc;a>c?", "bc")]
    for seed in (1, 2):
        lm = RecurrentDepthLM(model=model, tokenizer=tokenizer, num_steps=3, seed=seed)
        assert lm.init_scale == 0.0
        got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
        for (ctx, cont), (lp, _) in zip(reqs, got):
            assert lp == pytest.approx(_direct_logprob(model, tokenizer, ctx, cont, 3), abs=1e-4)


def test_adapter_device_defaults(model, tokenizer) -> None:
    lm = RecurrentDepthLM(model=model, tokenizer=tokenizer, device="cuda")  # lm-eval's CLI default
    assert lm.model.lm_head.weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model.to("cpu")


def test_adapter_rejects_bad_arguments(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="pretrained"):
        RecurrentDepthLM()
    with pytest.raises(ValueError, match="exit criterion"):
        RecurrentDepthLM(model=model, tokenizer=tokenizer, exit_criterion="bogus")
    with pytest.raises(ValueError, match="unknown recurrent_depth model arguments"):
        RecurrentDepthLM(model=model, tokenizer=tokenizer, num_stepz=3)


def test_simple_evaluate_offline_on_local_jsonl_tasks(checkpoint, tmp_path, monkeypatch) -> None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    rows = get_task("variable_binding").generate(8, "test", seed=0)
    data = tmp_path / "binding.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    for name, text in TASK_YAMLS.items():
        (task_dir / f"{name}.yaml").write_text(text.format(data=data))
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="recurrent_depth", model_args=f"pretrained={checkpoint},num_steps=2,exit_criterion=kl,"
                                            f"exit_threshold=1e-3,init_scale=0",
        tasks=list(TASK_YAMLS), task_manager=manager, limit=8, log_samples=True)
    res = out["results"]
    assert 0.0 <= res["rd_binding_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["rd_binding_mc"]["acc,none"] <= 1.0
    assert res["rd_text_ppl"]["word_perplexity,none"] > 1.0
    samples = out["samples"]["rd_binding_gen"]
    assert len(samples) == 8 and all(isinstance(s["resps"][0][0], str) for s in samples)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
