"""Training data: packing, prompt/answer encoding with answer-only labels, the batch schedule, data bundles."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from recurrent_depth.data.build import build_data
from recurrent_depth.data.loader import TokenDataset, batch_indices, eval_batches
from recurrent_depth.data.prompts import IGNORE, encode_examples, read_jsonl
from recurrent_depth.data.text import list_files, pack, read_texts, tokenize_stream
from recurrent_depth.data.tokenizer import char_tokenizer
from recurrent_depth.training.config import DataSection, TaskSection


def test_pack_gives_shifted_labels_without_padding() -> None:
    stream = torch.arange(23)
    ds = pack(stream, seq_len=5)
    assert ds.inputs.shape == (4, 5)
    assert torch.equal(ds.inputs[1], torch.arange(5, 10))
    assert torch.equal(ds.labels[1], torch.arange(6, 11))
    with pytest.raises(ValueError, match="seq_len"):
        pack(torch.arange(4), seq_len=5)


def test_read_and_tokenize_text(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "sub" / "b.txt").write_text("de")
    (tmp_path / "skip.md").write_text("zzz")
    files = list_files([tmp_path], "**/*.txt")
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    assert read_texts(files, max_bytes=4) == ["abc", "d"]
    tok = char_tokenizer("abcde")
    stream = tokenize_stream(["ab", "c"], tok, tok.eos_token_id)
    assert stream.tolist() == [*tok.encode("ab", add_special_tokens=False), 2, *tok.encode("c",
                                                                                         add_special_tokens=False), 2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_files([tmp_path / "missing"])


def test_answer_only_labels_cover_answer_and_eos() -> None:
    tok = char_tokenizer("0123456789+=")
    ds = encode_examples([{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+10=", "answer": "20"}], tok,
                         seq_len=32, answer_only=True)
    assert ds.inputs.shape == (2, 9)  # <bos> 10+10= 20 (the last token, <eos>, is only a target)
    row = ds.labels[1]
    kept = row[row != IGNORE].tolist()
    assert kept == [*tok.encode("20", add_special_tokens=False), tok.eos_token_id]
    assert torch.equal(ds.labels, ds.answer_labels)
    # position j predicts token j+1: the first answer target sits on the prompt's last character
    assert int(ds.inputs[1, 6]) == tok.convert_tokens_to_ids("=")
    assert int(ds.labels[1, 6]) == tok.convert_tokens_to_ids("2")
    full = encode_examples([{"prompt": "1+2=", "answer": "3"}], tok, seq_len=32, answer_only=False)
    assert int((full.labels != IGNORE).sum()) == 6 and int((full.answer_labels != IGNORE).sum()) == 2
    with pytest.raises(ValueError, match="seq_len"):
        encode_examples([{"prompt": "1+2=", "answer": "3"}], tok, seq_len=3, answer_only=True)


def test_read_jsonl_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "p", "answer": "a"}\n\n')
    assert read_jsonl([good]) == [{"prompt": "p", "answer": "a"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1"):
        read_jsonl([bad])
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl([bad])


def test_batch_schedule_is_a_function_of_position() -> None:
    n, b = 10, 4
    first_epoch = torch.cat([batch_indices(p, b, n, seed=0) for p in range(3)])[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))  # every row once per epoch
    assert torch.equal(batch_indices(7, b, n, 0), batch_indices(7, b, n, 0))
    assert not torch.equal(batch_indices(0, b, n, 0), batch_indices(0, b, n, 1))
    ds = TokenDataset(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3, dtype=torch.long))
    assert [len(x) for x in eval_batches(ds, 2, 10)] == [2, 2, 1]
    with pytest.raises(ValueError, match="empty"):
        TokenDataset(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long))


def test_build_text_bundle_trains_a_bpe(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world, hello recurrent depth. " * 200)
    bundle = build_data(DataSection(kind="text", paths=[str(tmp_path)], tokenizer="bpe", bpe_vocab_size=300,
                                    seq_len=16, val_fraction=0.1))
    assert 260 < len(bundle.tokenizer) <= 300 and bundle.train.seq_len == 16
    assert bundle.val is not None and len(bundle.val) >= 1
    assert int(bundle.train.inputs.max()) < len(bundle.tokenizer)


def test_dense_targets_label_prompt_positions_and_keep_the_answer_labels() -> None:
    tok = char_tokenizer("0123456789:abc?")
    rows = [{"prompt": "0:ab?", "answer": "2", "targets": " 012 "}, {"prompt": "1:c?", "answer": "1"}]
    ds = encode_examples(rows, tok, seq_len=16, answer_only=True)
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    # inputs: <bos> 0 : a b ? 2; the position of prompt character i (input i + 1) gets targets[i]
    assert ds.labels[0].tolist() == [IGNORE, IGNORE, *ids("012"), *ids("2"), tok.eos_token_id]
    assert ds.answer_labels[0].tolist() == [IGNORE] * 5 + [*ids("2"), tok.eos_token_id]  # validation: answer only
    assert torch.equal(ds.labels[1], ds.answer_labels[1])  # a row without targets is unchanged
    with pytest.raises(ValueError, match="as long as the prompt"):
        encode_examples([{"prompt": "0:a?", "answer": "1", "targets": "01"}], tok, seq_len=16, answer_only=True)
    with pytest.raises(ValueError, match="not one token"):
        encode_examples([{"prompt": "0:a?", "answer": "1", "targets": " 0x "}], tok, seq_len=16, answer_only=True)


def test_dense_targets_survive_dropped_examples() -> None:
    """Examples too long for seq_len are left out; the targets of those kept stay with their own rows."""
    tok = char_tokenizer("0123456789:abc?")
    rows = [{"prompt": "0:abcabcabc?", "answer": "1", "targets": " 0120120120 "},
            {"prompt": "1:a?", "answer": "0", "targets": " 10 "}]
    ds = encode_examples(rows, tok, seq_len=8, answer_only=True)
    assert len(ds) == 1 and ds.labels[0, 2:4].tolist() == tok.encode("10", add_special_tokens=False)


def test_task_bundle_uses_the_tasks_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    """A local stand-in with the tasks interface (get_task, TASKS, generate, alphabet) is all the loader needs."""

    class Copy:
        alphabet = "abc:"

        def __init__(self, length: int = 2) -> None:
            self.length = length

        def generate(self, n: int, split: str = "train", seed: int = 0) -> list[dict]:
            g = torch.Generator().manual_seed(seed + (split == "test"))
            words = ["".join("abc"[int(i)] for i in torch.randint(0, 3, (self.length,), generator=g))
                     for _ in range(n)]
            return [{"prompt": w + ":", "answer": w} for w in words]

    fake = types.ModuleType("recurrent_depth.tasks")
    fake.TASKS = {"copy": Copy}
    fake.get_task = lambda name, **kw: fake.TASKS[name](**kw)
    monkeypatch.setitem(sys.modules, "recurrent_depth.tasks", fake)
    section = DataSection(kind="task", task=TaskSection(name="copy", difficulty={"length": 3}, num_train=20,
                                                        num_eval=5), seq_len=16)
    bundle = build_data(section, seed=1)
    assert len(bundle.train) == 20 and len(bundle.val) == 5
    assert bundle.train.seq_len == 1 + 4 + 3  # <bos> + "xyz:" + "xyz" (inputs drop the final <eos>)
    with pytest.raises(ValueError, match="unknown task"):
        build_data(DataSection(kind="task", task=TaskSection(name="nope")))


def test_jsonl_bundle_char_tokenizer_and_split(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}?", "answer": f"a{i}"}) for i in range(20)))
    bundle = build_data(DataSection(kind="jsonl", paths=[str(path)], val_fraction=0.25, seq_len=16))
    assert len(bundle.train) == 15 and len(bundle.val) == 5
    assert set("qa?0123456789") <= set(bundle.tokenizer.get_vocab())


def test_jsonl_rows_may_carry_dense_targets(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "0:ab?", "answer": "2", "targets": " 012 "}] * 4 + [{"prompt": "1:a?", "answer": "0"}] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bundle = build_data(DataSection(kind="jsonl", paths=[str(path)], val_fraction=0.0, seq_len=16,
                                    tokenizer="char"))
    tok = bundle.tokenizer
    assert bundle.train.labels[0, 2:5].tolist() == tok.encode("012", add_special_tokens=False)
    assert bool((bundle.train.labels[4] == bundle.train.answer_labels[4]).all())


def test_examples_longer_than_seq_len_are_counted_not_silently_dropped(tmp_path: Path) -> None:
    tok = char_tokenizer("0123456789+=")
    examples = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "1234+5678=", "answer": "6912"},
                {"prompt": "2+2=", "answer": "4"}]
    notes: list[str] = []
    ds = encode_examples(examples, tok, seq_len=8, answer_only=True, notes=notes)
    assert len(ds) == 2
    assert notes == ["data: 1 of 3 train examples are longer than data.seq_len=8 tokens (the longest needs 15) "
                     "and were left out; raise data.seq_len to keep them"]
    with pytest.raises(ValueError, match=r"all 3 train examples are longer than data.seq_len=4 .*needs 6"):
        encode_examples(examples, tok, seq_len=4, answer_only=True)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in examples * 4))
    bundle = build_data(DataSection(kind="jsonl", paths=[str(path)], val_fraction=0.25, seq_len=8))
    assert [n.split(" examples")[0] for n in bundle.notes] == ["data: 3 of 9 train", "data: 1 of 3 validation"]


def test_curriculum_admits_levels_in_order_then_everything() -> None:
    from recurrent_depth.data.loader import curriculum_indices, curriculum_level

    levels = torch.tensor([1, 2, 3, 1, 2, 3, 3, 1])
    caps = [curriculum_level(s, levels, 0.3, 100) for s in range(100)]
    assert caps[:10] == [1] * 10 and caps[10:20] == [2] * 10 and caps[20:30] == [3] * 10
    assert caps[30:] == [None] * 70  # after the ramp: every row, the plain epoch schedule
    assert curriculum_level(0, levels, 0.0, 100) is None
    for step, cap in enumerate(caps[:30]):
        rows = curriculum_indices(step, 4, levels, cap, seed=0)
        assert len(rows) == 4 and bool((levels[rows] <= cap).all())
        assert torch.equal(rows, curriculum_indices(step, 4, levels, cap, seed=0))  # a function of the position
    assert len(set(curriculum_indices(0, 3, levels, 1, seed=0).tolist())) == 3  # no repeats within a batch
    assert len(curriculum_indices(0, 5, levels, 1, seed=0)) == 5  # fewer admitted rows than the batch: repeats


def test_training_indices_follow_the_curriculum_then_the_epoch_schedule() -> None:
    from recurrent_depth.data.loader import curriculum_indices, training_indices

    x = torch.zeros(8, 3, dtype=torch.long)
    data = TokenDataset(x, x, levels=torch.tensor([1, 2, 3, 1, 2, 3, 3, 1]))
    assert torch.equal(training_indices(0, 4, data, 0, 0.3, 100), curriculum_indices(0, 4, data.levels, 1, 0))
    assert torch.equal(training_indices(30, 4, data, 0, 0.3, 100), batch_indices(30, 4, 8, 0))
    assert torch.equal(training_indices(0, 4, data, 0), batch_indices(0, 4, 8, 0))  # no curriculum
    with pytest.raises(ValueError, match="a curriculum needs the dataset's row levels"):
        training_indices(0, 4, TokenDataset(x, x), 0, 0.3, 100)


def test_encoded_rows_carry_their_levels_only_when_every_row_has_one() -> None:
    tok = char_tokenizer("0123456789+=")
    rows = [{"prompt": "1+1=", "answer": "2", "level": 1}, {"prompt": "12+1=", "answer": "13", "level": 2}]
    data = encode_examples(rows, tok, 16, answer_only=True)
    assert data.levels.tolist() == [1, 2] and data.rows(torch.tensor([1])).levels.tolist() == [2]
    assert encode_examples([rows[0], {"prompt": "2+2=", "answer": "4"}], tok, 16, True).levels is None


def test_curriculum_needs_levels(tmp_path: Path) -> None:
    from recurrent_depth.training.config import ConfigError, config_from_dict

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2", "level": 1}\n{"prompt": "2+2=", "answer": "4"}\n' * 4)
    assert read_jsonl([path])[0]["level"] == 1
    with pytest.raises(ValueError, match=r"data.curriculum needs an integer `level` on every training row; 3 of 7"):
        build_data(DataSection(kind="jsonl", paths=[str(path)], tokenizer="char", curriculum=0.5), seed=0)
    base = {"model": {"preset": "debug"}, "data": {"kind": "text", "paths": [str(path)], "curriculum": 0.5}}
    with pytest.raises(ConfigError, match="plain text has none"):
        config_from_dict(base)
    with pytest.raises(ConfigError, match=r"`data.curriculum` must be a fraction of the steps in \[0, 1\), got 1.5"):
        config_from_dict({**base, "data": {"kind": "task", "task": {"name": "addition"}, "curriculum": 1.5}})
