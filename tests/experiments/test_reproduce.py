"""The seed-claim experiment (experiments/reproduce.py) end to end at a micro scale, the claim judge on constructed
results, the bundled-checkpoint resolution, and bundle + `rdepth demo` on a freshly bundled model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from recurrent_depth.cli.main import main
from recurrent_depth.cli.reproduce import load_experiment

reproduce = load_experiment()
MICRO = replace(reproduce.QUICK, steps=4, n_train=200, n_eval=8, text_steps=3, text_max_chars=30_000,
                multipliers=(1, 2), seeds=(0,), lr_factors=(1.0,), jobs=2, core_window=2,
                outer_window=3, looped_lr=1e-3, lookup_steps=4)


def test_micro_run_writes_results_with_one_claim_per_target(tmp_path: Path) -> None:
    res = reproduce.run(tmp_path, quick=True, scale=MICRO, log=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"] for c in saved["claims"]] == [c["claim"] for c in res["claims"]]
    assert len(saved["claims"]) == 12  # nine on the main task, three on the multi-hop lookup family
    assert all(c["claim"].startswith("Multi-hop lookup (binding_chain)") for c in saved["claims"][9:])
    for claim in saved["claims"]:
        assert set(claim) == {"claim", "target", "measured", "held"} and isinstance(claim["held"], bool)
    assert [b["multiplier"] for b in saved["baselines"]] == [1, 2]
    assert saved["baselines"][1]["params"] > 1.5 * saved["baselines"][0]["params"]
    arms = {p.name for p in (tmp_path / "arms").iterdir() if p.is_dir()}
    # sweep_fraction 1: the first seed's baseline is the sweep's run itself, not trained twice
    assert arms == {"recurrent-s0", "fixed-depth-s0", "sweep-1x-lr1", "sweep-2x-lr1", "flops-1x-s0", "cot", "text",
                    "lookup-s0"}
    assert saved["baselines"][0]["arms"] == ["baseline-1x-lr1-s0"]
    # core_window and outer_window reach the recurrent and fixed-depth arms only; the run-once baselines keep global
    # attention
    configs = {arm: [json.loads(c.read_text()) for c in (tmp_path / "arms" / arm).rglob("config.json")]
               for arm in ("recurrent-s0", "fixed-depth-s0", "sweep-1x-lr1", "cot", "lookup-s0")}
    windows = {arm: {(c.get("core_attention_window", 0), c.get("outer_attention_window", 0))
                     for c in found if "n_layers_in_recurrent_block" in c}
               for arm, found in configs.items()}
    assert windows == {"recurrent-s0": {(2, 3)}, "fixed-depth-s0": {(2, 3)}, "sweep-1x-lr1": {(0, 0)}, "cot": {(0, 0)},
                       "lookup-s0": {(7, 3)}}
    trees = {arm: json.loads((tmp_path / "arms" / arm / "config.json").read_text()) for arm in configs}
    lrs = {arm: tree["optim"]["lr"] for arm, tree in trees.items()}
    assert lrs == {"recurrent-s0": 1e-3, "fixed-depth-s0": 1e-3, "sweep-1x-lr1": MICRO.lr, "cot": MICRO.lr,
                   "lookup-s0": 1e-3}
    # the lookup arm trains on its own task with Huginn's sampler
    assert trees["lookup-s0"]["data"]["task"]["name"] == "binding_chain"
    assert trees["lookup-s0"]["data"]["task"]["difficulty"] == {"reach": 2}
    assert trees["lookup-s0"]["depth"]["sampler"] == trees["recurrent-s0"]["depth"]["sampler"]
    lookup = saved["lookup"]
    assert lookup["trained_levels"] == [1, 2, 3, 4] and lookup["ood_levels"] == [5, 6, 7, 8]
    assert 3 in lookup["depths"] and len(lookup["depth"]["ood"]) == len(lookup["depths"])
    assert saved["flops"]["steps"] > MICRO.steps  # the equal-FLOPs arm trains longer than the 1x baseline
    md = (tmp_path / "results.md").read_text()
    assert "QUICK smoke run" in md and "| r = 1 |" in md
    assert "## The multi-hop lookup family" in md
    for plot in ("depth.png", "levels.png", "exit.png", "perplexity.png", "baselines.png", "lookup-levels.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert reproduce.rejudge(tmp_path)["claims"] == saved["claims"]


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_second_round_keeps_each_size_best_lr_and_trains_it_at_every_seed(fraction: float) -> None:
    scale = replace(MICRO, seeds=(0, 1, 2), lr_factors=(0.5, 1.0, 2.0), steps=40, sweep_fraction=fraction)
    data = reproduce.task_data(scale)
    jobs, first = {}, {}
    val = {1: {0.5: 0.2, 1.0: 0.6, 2.0: 0.4}, 2: {0.5: 0.7, 1.0: 0.7, 2.0: 0.1}}  # size 2: a tie, the lower lr wins
    for m in (1, 2):
        for f in scale.lr_factors:
            name = f"sweep-{m}x-lr{f:g}"
            jobs[name] = reproduce.train_tree(scale, reproduce.model_fields(scale, m), {"sampler": "non-recurrent"},
                                              data, round(40 * fraction), 16, lr=scale.lr * f)
            first[name] = {"val_accuracy": val[m][f]}
    meta = {"cores": {1: 1, 2: 2}, "data": data, "flops_steps": 100, "seq_len": 16}
    more, chosen, aliases = reproduce.second_round(scale, first, meta, jobs)
    assert chosen == {1: 1.0, 2: 0.5}
    full = ["baseline-1x-lr1-s0", "baseline-1x-lr1-s1", "baseline-1x-lr1-s2", "baseline-2x-lr0.5-s0",
            "baseline-2x-lr0.5-s1", "baseline-2x-lr0.5-s2"]
    if fraction == 1.0:  # the sweep's run is the first seed's full run
        assert aliases == {"baseline-1x-lr1-s0": "sweep-1x-lr1", "baseline-2x-lr0.5-s0": "sweep-2x-lr0.5"}
        full = [n for n in full if n not in aliases]
    else:
        assert aliases == {}
    assert sorted(more) == full + ["flops-1x-s0"]
    assert more["baseline-2x-lr0.5-s2"]["train"] == {**jobs["sweep-2x-lr0.5"]["train"], "seed": 2, "steps": 40}
    assert more["baseline-2x-lr0.5-s2"]["optim"]["lr"] == scale.lr * 0.5
    flops = more["flops-1x-s0"]
    assert flops["train"]["steps"] == 100 and flops["optim"]["lr"] == scale.lr * 1.0
    assert flops["model"] == jobs["sweep-1x-lr1"]["model"]  # the 1x transformer, trained longer
    # baseline_seeds: the baselines' full runs at those seeds only (the looped arms keep `seeds`)
    fewer, _, _ = reproduce.second_round(replace(scale, baseline_seeds=(0, 1)), first, meta, jobs)
    assert sorted(fewer) == [n for n in full if not n.endswith("-s2")] + ["flops-1x-s0"]


def _curve(accs: dict[int, float], levels: dict[int, dict[int, float]] | None = None) -> list[dict]:
    return [{"num_steps": r, "accuracy": a, "accuracy_min": a, "accuracy_max": a,
             "accuracy_by_level": (levels or {}).get(r, {})} for r, a in accs.items()]


def _summary(x: float) -> dict:
    return {"mean": x, "min": x, "max": x, "std": 0.0, "n": 2}


def _results(ood: dict[int, float], baselines: dict[int, float], test_best: float = 0.97, flops: float = 0.2,
             fixed: float = 0.3, cot=(0.5, 6.0), exit_drop=0.0, saved=0.5, ppl=None, level_acc=0.9) -> dict:
    depths = sorted(ood)
    levels = {r: {lvl: (level_acc if r >= 10 else 0.2) for lvl in range(7, 13)} for r in depths}
    return {
        "depths": depths, "exit_cap": 12,
        "recurrent": {"depth": {"ood": _curve(ood, levels), "test": _curve({r: test_best for r in depths})},
                      "exit": [{"threshold": None, "accuracy": ood[10], "accuracy_drop": 0.0, "steps_saved": 0.0},
                               {"threshold": 1e-3, "accuracy": ood[10] - exit_drop, "accuracy_drop": exit_drop,
                                "steps_saved": saved}]},
        "fixed-depth": {"depth": {"ood": _curve({r: fixed for r in depths})}, "depth_trained": 6},
        "baselines": [{"multiplier": m, "ood": _summary(a), "test": _summary(0.9)} for m, a in baselines.items()],
        "flops": {"steps": 4000, "flops_ratio": 2.5, "ood": _summary(flops)},
        "cot": {"ood": {"accuracy": cot[0], "extra_context_tokens": cot[1]}},
        "text": {"perplexity": [{"num_steps": r, "perplexity": p} for r, p in (ppl or {1: 50, 2: 40, 6: 30,
                                                                                        12: 30, 24: 30.3}).items()]},
    }


GOOD = {1: 0.1, 5: 0.5, 10: 0.9, 24: 0.9, 50: 0.9}


def test_judge_claims_holds_and_fails_on_constructed_numbers() -> None:
    scale = replace(reproduce.FULL, mean_recurrence=6, difficulty={"ops": (1, 6), "ood_ops": (7, 12)})
    good = reproduce.judge_claims(_results(GOOD, {1: 0.2, 8: 0.55}), scale)
    assert [c["held"] for c in good] == [True] * 9
    bad = reproduce.judge_claims(_results({1: 0.5, 5: 0.5, 10: 0.6, 24: 0.3, 50: 0.3}, {1: 0.7, 8: 0.9},
                                          test_best=0.9, flops=0.8, fixed=0.5, cot=(0.9, 6.0), exit_drop=0.05,
                                          ppl={1: 30, 2: 40, 6: 50, 12: 55, 24: 60}, level_acc=0.5), scale)
    assert [c["held"] for c in bad] == [False] * 9
    # one missed target at a time: the table (a fall from 10x to 50x), the levels (one level below 80%)
    fall = reproduce.judge_claims(_results({**GOOD, 50: 0.85}, {1: 0.2, 8: 0.55}), scale)
    assert [c["held"] for c in fall][1] is False and all(c["held"] for c in fall[2:])
    nothing = reproduce.judge_claims(_results({r: 0.0 for r in GOOD}, {1: 0.0, 8: 0.0}, test_best=0.0, flops=0.0,
                                              fixed=0.0, cot=(0.0, 6.0), level_acc=0.0), scale)
    assert not any(c["held"] for c in nothing[:8])  # comparisons between arms that learned nothing never hold


def _lookup(ood: dict[int, float], test_best: float = 1.0, levels: dict[int, dict[int, float]] | None = None,
            floor: float = 0.1) -> dict:
    depths = sorted(ood)
    levels = levels or {r: {lvl: (0.95 if r >= 5 else 0.1) for lvl in range(5, 9)} for r in depths}
    return {"depths": depths, "floor": {"test": 0.1, "ood": floor}, "trained_levels": [1, 2, 3, 4],
            "ood_levels": [5, 6, 7, 8],
            "depth": {"ood": _curve(ood, levels), "test": _curve({r: test_best for r in depths})}}


def test_lookup_claims_hold_and_fail_on_constructed_numbers() -> None:
    scale = replace(reproduce.FULL, mean_recurrence=6)
    saturated = {1: 0.1, 3: 0.6, 5: 1.0, 10: 1.0, 24: 1.0, 50: 0.995}  # saturates at 5x: no strict rise asked
    res = _results(GOOD, {1: 0.2, 8: 0.55})
    res["lookup"] = _lookup(saturated)
    claims = reproduce.judge_claims(res, scale)
    assert len(claims) == 12 and [c["held"] for c in claims[9:]] == [True] * 3
    assert reproduce.judge_claims(_results(GOOD, {1: 0.2, 8: 0.55}), scale)[9:] == []  # no lookup: no such claims
    # one missed target at a time: in-distribution 90%; a 2-point fall from 10x to 50x; a gain of 25 points; level 8
    # never above 70% within r <= 24 (it reaches 100% at r = 50 only)
    assert [c["held"] for c in reproduce.judge_lookup_claims(_lookup(saturated, test_best=0.9), scale)] == [
        False, True, True]
    fall = reproduce.judge_lookup_claims(_lookup({**saturated, 50: 0.98}), scale)
    assert [c["held"] for c in fall] == [True, False, True]
    small = reproduce.judge_lookup_claims(_lookup({1: 0.7, 3: 0.8, 5: 0.95, 10: 0.95, 24: 0.95, 50: 0.95}), scale)
    assert [c["held"] for c in small] == [True, False, True]
    late = {r: {lvl: (0.7 if lvl == 8 and r < 50 else 0.95 if r >= 5 else 0.1) for lvl in range(5, 9)}
            for r in saturated}
    late[50][8] = 1.0
    slow = reproduce.judge_lookup_claims(_lookup(saturated, levels=late), scale)
    assert [c["held"] for c in slow] == [True, True, False] and "level 8: 70%" in slow[2]["measured"]
    # at the answer floor nothing is claimed
    assert reproduce.judge_lookup_claims(_lookup(saturated, floor=0.97), scale)[1]["held"] is False


def test_arms_tied_at_the_answer_floor_hold_no_comparison() -> None:
    """Every arm at 31% where always answering the commonest answer scores 30%: the effective-parameter, FLOPs,
    chain-of-thought and exit claims are ties by the answer distribution and do not hold."""
    scale = replace(reproduce.FULL, mean_recurrence=6, difficulty={"ops": (1, 6), "ood_ops": (7, 12)})
    flat = {r: 0.31 for r in GOOD}
    res = _results(flat, {1: 0.25, 8: 0.31}, flops=0.27, fixed=0.30, cot=(0.18, 10.0))
    assert [c["held"] for c in reproduce.judge_claims(res, scale)][3:8] == [True] * 5  # no floor given: 0
    res["floor"] = {"test": 0.2, "ood": 0.30}
    assert [c["held"] for c in reproduce.judge_claims(res, scale)][3:8] == [False] * 5
    assert reproduce.answer_floor([{"answer": "0"}, {"answer": "0"}, {"answer": "7"}, {"answer": "1"}]) == 0.5


def test_missing_bundle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import recurrent_depth.assets as assets

    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no bundled checkpoint .* pass --model PATH"):
        assets.resolve_model(None)
    assert assets.resolve_model("x") == Path("x")
    assert main(["demo"]) == 2
    assert "no bundled checkpoint" in capsys.readouterr().err


def test_reproduce_verb_needs_the_source_checkout(tmp_path: Path) -> None:
    from recurrent_depth.cli import reproduce as verb

    with pytest.raises(FileNotFoundError, match="experiments/reproduce.py"):
        verb.load_experiment(tmp_path / "missing.py")


def test_bundle_then_demo(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    tree = reproduce.train_tree(MICRO, reproduce.model_fields(MICRO), {"sampler": "poisson-lognormal-filling"},
                                reproduce.task_data(MICRO), 3, reproduce.task_seq_len(MICRO))
    reproduce.train_arm("recurrent", tree, run, lambda _: None)
    assert reproduce.main(["bundle", "--from", str(run / "recurrent"), "--out", str(tmp_path / "bundle")]) == 0
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert info["task"] == MICRO.task and info["mean_recurrence"] == MICRO.mean_recurrence
    assert (tmp_path / "bundle" / "tokenizer.json").is_file()
    from recurrent_depth.serving.model import load_served_model

    served = load_served_model(tmp_path / "bundle")  # a chat message reaches the task model as its bare prompt
    assert served.render([{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"},
                          {"role": "user", "content": "4*5="}]) == "<bos>4*5="
    capsys.readouterr()
    import recurrent_depth.inference.generate as engine
    from recurrent_depth.inference.defaults import INIT_SCALE, KV_SHARING_AUTO

    calls: list[dict] = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    assert main(["demo", "--model", str(tmp_path / "bundle"), "--n", "8", "--num-steps", "1,2",
                 "--out", str(tmp_path / "demo"), "--device", "cpu", "--threads", "1"]) == 0
    # the one generated answer runs on the shared inference defaults, not settings of its own
    assert [(c["kv_sharing"], c["init_scale"]) for c in calls] == [(KV_SHARING_AUTO, INIT_SCALE)]
    captured = capsys.readouterr()
    assert "num_steps" in captured.out and "token:steps" in captured.out
    assert "rdepth demo: r=2: 8/8 rows" in captured.err and "rdepth demo: r=1: accuracy" in captured.err
    assert (tmp_path / "demo" / "depth.png").is_file()
