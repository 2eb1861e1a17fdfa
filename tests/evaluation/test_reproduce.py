"""`rdepth reproduce` end to end at a micro scale, the claim judge on constructed results, the bundled-checkpoint
resolution, and `rdepth bundle` + `rdepth demo` on a freshly bundled model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from recurrent_depth.cli.main import main
from recurrent_depth.evaluation import reproduce

MICRO = replace(reproduce.QUICK, steps=4, n_train=200, n_eval=8, text_steps=3, text_max_chars=30_000,
                multipliers=(1, 2), jobs=1)


def test_micro_run_writes_results_with_one_claim_per_item(tmp_path: Path) -> None:
    res = reproduce.run(tmp_path, quick=True, scale=MICRO, log=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"] for c in saved["claims"]] == [c["claim"] for c in res["claims"]]
    assert len(saved["claims"]) == 6
    for claim in saved["claims"]:
        assert set(claim) == {"claim", "target", "measured", "held"} and isinstance(claim["held"], bool)
    assert [b["multiplier"] for b in saved["baselines"]] == [1, 2]
    assert saved["baselines"][1]["params"] > 1.5 * saved["baselines"][0]["params"]
    md = (tmp_path / "results.md").read_text()
    assert "QUICK smoke run" in md and "| r = 1 |" in md
    for plot in ("depth.png", "exit.png", "perplexity.png", "baselines.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def _records(accs: dict[int, float]) -> list[dict]:
    return [{"num_steps": r, "accuracy": a} for r, a in accs.items()]


def _results(ood: dict[int, float], baselines: dict[int, float], cot=(0.5, 6.0), exit_drop=0.0, saved=0.5,
             ppl=None) -> dict:
    return {
        "recurrent": {"depth": {"ood": _records(ood)},
                      "exit": [{"threshold": None, "accuracy": ood[4], "accuracy_drop": 0.0, "steps_saved": 0.0},
                               {"threshold": 1e-3, "accuracy": ood[4] - exit_drop, "accuracy_drop": exit_drop,
                                "steps_saved": saved}]},
        "baselines": [{"multiplier": m, "accuracy": {"ood": a}} for m, a in baselines.items()],
        "cot": {"ood": {"accuracy": cot[0], "extra_context_tokens": cot[1]}},
        "text": {"perplexity": [{"num_steps": r, "perplexity": p} for r, p in (ppl or {1: 50, 2: 40, 4: 30,
                                                                                        16: 30.3}).items()]},
    }


def test_judge_claims_holds_and_fails_on_constructed_numbers() -> None:
    scale = replace(reproduce.QUICK, mean_recurrence=4)
    good = reproduce.judge_claims(_results({1: 0.05, 2: 0.3, 4: 0.6, 16: 0.6}, {1: 0.2, 8: 0.55, 16: 0.7}), scale)
    assert [c["held"] for c in good] == [True, True, True, True, True, True]
    bad = reproduce.judge_claims(_results({1: 0.5, 2: 0.5, 4: 0.6, 16: 0.3}, {1: 0.7, 8: 0.9}, cot=(0.9, 6.0),
                                          exit_drop=0.05, ppl={1: 30, 2: 40, 4: 50, 16: 60}), scale)
    assert [c["held"] for c in bad] == [False, False, False, False, False, False]
    nothing = reproduce.judge_claims(_results({1: 0.0, 2: 0.0, 4: 0.0, 16: 0.0}, {1: 0.0, 8: 0.0}, cot=(0.0, 6.0)),
                                     scale)
    assert not any(c["held"] for c in nothing[:5])  # comparisons between arms that learned nothing never hold


def test_missing_bundle_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import recurrent_depth.assets as assets

    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no bundled checkpoint .* pass --model PATH"):
        assets.resolve_model(None)
    assert assets.resolve_model("x") == Path("x")
    assert main(["demo"]) == 2
    assert "no bundled checkpoint" in capsys.readouterr().err


def test_bundle_then_demo(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    reproduce.train_arm("recurrent", reproduce.train_tree(MICRO, reproduce.model_fields(MICRO),
                                                          {"sampler": "poisson-lognormal-filling"},
                                                          reproduce.task_data(MICRO), 3,
                                                          reproduce.task_seq_len(MICRO)), run, lambda _: None)
    assert main(["bundle", "--from", str(run / "recurrent"), "--out", str(tmp_path / "bundle")]) == 0
    info = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert info["task"] == "addition" and info["mean_recurrence"] == MICRO.mean_recurrence
    assert (tmp_path / "bundle" / "tokenizer.json").is_file()
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


def test_reproduce_evaluates_with_the_protocol_its_results_were_measured_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """`rdepth reproduce` draws s0 as in training (init_scale 1, seeded), the protocol the committed results/reproduce
    figures were measured with, not the library's zero-state default, so a re-run reproduces them."""
    import recurrent_depth.evaluation.sweeps as sweeps

    seen: list[tuple[str, float]] = []
    for name in ("depth_sweep", "exit_sweep", "perplexity_sweep"):
        monkeypatch.setattr(sweeps, name, lambda *a, _name=name, **kw: seen.append((_name, kw.get("init_scale"))))
    monkeypatch.setattr(reproduce, "_load", lambda rec: (None, None))
    reproduce.eval_depths({}, {"test": []}, [1])
    reproduce.eval_exit({}, [], reproduce.QUICK)
    reproduce.eval_text({}, [], [1])
    assert seen == [("depth_sweep", 1.0), ("exit_sweep", 1.0), ("perplexity_sweep", 1.0)]
