"""Procedural tasks: the interface the data loader relies on, correct answers, split separation, errors."""

from __future__ import annotations

import pytest

from recurrent_depth.tasks import SPLITS, TASKS, combined_alphabet, get_task

NAMES = sorted(TASKS)


def _resolve_binding(prompt: str) -> tuple[str, int]:
    body, query = prompt.split(";")
    table = dict(a.split("=") for a in body.split(","))
    node, hops = table[query.rstrip("?")], 0
    while not node.isdigit():  # var -> var links; the root's digit is read at the end
        node, hops = table[node], hops + 1
    return node, hops


def _check_tree_path(prompt: str, answer: str) -> int:
    body, query = prompt.split(";")
    edges = {frozenset(e) for e in body.split(",")}
    start, target = query.rstrip("?").split(">")
    nodes = {c for e in edges for c in e}
    assert len(edges) == len(nodes) - 1  # a tree: n - 1 edges over n nodes (connected is checked by the path)
    walk = start + answer
    assert walk[-1] == target and len(set(walk)) == len(walk)
    assert all(frozenset(walk[i:i + 2]) in edges for i in range(len(walk) - 1))
    return len(answer)


def _chase(prompt: str) -> tuple[str, int]:
    table, query = prompt.rstrip("?").split(";")
    node, hops = query, 0
    while table[ord(node) - ord("a")] != node:  # follow slot -> letter until a slot that holds its own name
        node, hops = table[ord(node) - ord("a")], hops + 1
    return node, hops


def _mod_chain(prompt: str) -> tuple[str, int]:
    expr = prompt.rstrip("=")
    value = int(expr[0])
    for i in range(1, len(expr), 2):
        op, x = expr[i], int(expr[i + 1])
        value = {"+": value + x, "-": value - x, "*": value * x}[op] % 10
    return str(value), (len(expr) - 1) // 2


def _cups(prompt: str) -> tuple[str, int, str]:
    """Replay the swaps (letter k names the k-th pair i < j): final cup, swaps, and the cup after each swap."""
    start, letters = prompt.rstrip("?").split(":")
    pairs = [(0, 1), (0, 2), (1, 2)]
    ball, trail = int(start), ""
    for ch in letters:
        i, j = pairs["abc".index(ch)]
        ball = {i: j, j: i}.get(ball, ball)
        trail += str(ball)
    return str(ball), len(letters), trail


def _bind_chain(prompt: str, name_first: bool = False) -> tuple[str, int, list[str]]:
    """Bind in order: the last variable's value, its hops from a digit, and every binding's value."""
    bound: dict[str, str] = {}
    values = []
    for binding in prompt.rstrip("?").split(","):
        name, target = binding if name_first else binding[::-1]
        assert name not in bound and (target.isdigit() or target in bound)  # program order, each bound once
        bound[name] = target
        node = target
        while not node.isdigit():
            node = bound[node]
        values.append(node)
    hops, node = 0, bound[name]
    while not node.isdigit():
        node, hops = bound[node], hops + 1
    return values[-1], hops, values


def _edge_chase(prompt: str) -> tuple[str, int, dict[str, str]]:
    """Decode the edge characters (U+0100 + 16 source + target, written here from the docstring, not the module's
    helper) and follow them from the query to the node pointing to itself: root, hops, and the parent map."""
    edges, query = prompt.rstrip("?").split(";")
    parent = {}
    for ch in edges:
        source, target = divmod(ord(ch) - 0x100, 16)
        assert 0 <= source < 16 and chr(97 + source) not in parent  # one edge out of each node
        parent[chr(97 + source)] = chr(97 + target)
    node, hops = query, 0
    while parent[node] != node:
        node, hops = parent[node], hops + 1
        assert hops <= len(parent)  # no cycle but the roots' self-edges
    return node, hops, parent


def _check_row(name: str, row: dict) -> None:
    prompt, answer, level = row["prompt"], row["answer"], row["level"]
    if name == "addition":
        a, b = prompt.rstrip("=").split("+")
        assert answer == str(int(a) + int(b)) and level == max(len(a), len(b))
    elif name == "variable_binding":
        assert _resolve_binding(prompt) == (answer, level)
    elif name == "tree_path":
        assert _check_tree_path(prompt, answer) == level
    elif name == "modular_chain":
        assert _mod_chain(prompt) == (answer, level)
    elif name == "pointer_chase":
        assert _chase(prompt) == (answer, level)
    elif name == "cups":
        assert _cups(prompt)[:2] == (answer, level)
    elif name == "binding_chain":
        assert _bind_chain(prompt)[:2] == (answer, level)
    elif name == "edge_chase":
        assert _edge_chase(prompt)[:2] == (answer, level)
    else:  # a new family must add its independent checker here
        raise AssertionError(f"no answer checker for task {name}")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_answers_are_correct_and_prompts_short(name: str, split: str) -> None:
    task = get_task(name)
    rows = task.generate(300, split=split, seed=3)
    assert len(rows) == 300
    for row in rows:
        assert isinstance(row["prompt"], str) and isinstance(row["answer"], str) and row["answer"]
        _check_row(name, row)
        assert len(row["prompt"]) < 64
        assert set(row["prompt"] + row["answer"]) <= set(task.alphabet)


@pytest.mark.parametrize("name", NAMES)
def test_cot_answers_hold_steps_then_the_same_final_answer(name: str) -> None:
    task = get_task(name)
    plain = task.generate(100, split="test", seed=5)
    cot = task.generate(100, split="test", seed=5, cot=True)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in cot]
    for p, c in zip(plain, cot):
        assert "#" in c["answer"] and len(c["answer"]) > len(p["answer"])
        assert task.extract_answer(c["answer"]) == p["answer"]
        assert task.score(c["answer"], p["answer"]) and task.score(p["answer"], c["answer"])
        assert set(c["answer"]) <= set(task.alphabet)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_and_deterministic(name: str) -> None:
    task = get_task(name)
    assert task.generate(50, "train", seed=1) == task.generate(50, "train", seed=1)
    assert task.generate(50, "train", seed=1) != task.generate(50, "train", seed=2)
    assert task.generate(10, "train", seed=1) == task.generate(50, "train", seed=1)[:10]


@pytest.mark.parametrize("name", NAMES)
def test_test_and_ood_never_share_a_prompt_with_train(name: str) -> None:
    task = get_task(name)
    train = {r["prompt"] for seed in range(3) for r in task.generate(2000, "train", seed=seed)}
    for split in ("test", "ood"):
        held = {r["prompt"] for r in task.generate(1000, split, seed=0)}
        assert not train & held


@pytest.mark.parametrize("name", NAMES)
def test_ood_is_harder(name: str) -> None:
    task = get_task(name)
    test_levels = [r["level"] for r in task.generate(500, "test", seed=0)]
    ood_levels = [r["level"] for r in task.generate(500, "ood", seed=0)]
    assert min(ood_levels) > max(test_levels)
    assert sum(len(r["answer"]) + len(r["prompt"]) for r in task.generate(200, "ood")) >= \
        sum(len(r["answer"]) + len(r["prompt"]) for r in task.generate(200, "test"))


def test_difficulty_knobs_change_levels() -> None:
    rows = get_task("variable_binding", hops=6, n_vars=10, roots=2).generate(50, "test")
    assert {r["level"] for r in rows} == {6}
    rows = get_task("variable_binding", hops=(0, 1)).generate(100, "train")
    assert {r["level"] for r in rows} == {0, 1}  # hops 0: the query is a root (a direct lookup)
    rows = get_task("addition", digits=[3, 3]).generate(50, "train")
    assert all(len(r["prompt"]) == 8 for r in rows)
    assert get_task("addition", digits=[3, 3]).difficulty["digits"] == (3, 3)
    rows = get_task("tree_path", path=(3, 3), nodes=(6, 6)).generate(50, "test")
    assert {r["level"] for r in rows} == {3} and all(r["prompt"].count(",") == 4 for r in rows)


def test_zero_hops_is_a_plain_lookup() -> None:
    # hops (0, 0) used to pass validation and then crash in _sample (no variable to hang the rest under)
    task = get_task("variable_binding", hops=(0, 0), ood_hops=(0, 0))
    for split in SPLITS:
        rows = task.generate(100, split)
        for row in rows:
            _check_row("variable_binding", row)
            assert all(a.split("=")[1].isdigit() for a in row["prompt"].split(";")[0].split(","))
        assert {r["level"] for r in rows} == {0}
        lo, hi = task.ood_n_vars if split == "ood" else task.n_vars  # every variable still appears
        assert {len(r["prompt"].split(",")) for r in rows} == set(range(lo, hi + 1))


def _tree_depths(table: str) -> dict[str, int]:
    """Root -> the depth of its deepest slot."""
    out: dict[str, int] = {}
    for i in range(len(table)):
        root, d = _chase(f"{table};{chr(ord('a') + i)}?")
        out[root] = max(out.get(root, 0), d)
    return out


def test_pointer_chase_levels_and_no_tree_shape_shortcut() -> None:
    task = get_task("pointer_chase", slots=12, hops=(0, 3), ood_hops=(5, 5), roots=2)
    rows = task.generate(200, "test")
    assert {r["level"] for r in rows} == {0, 1, 2, 3} and {len(r["prompt"]) for r in rows} == {15}
    for row in rows + task.generate(50, "ood"):  # two trees, each exactly as deep as the query
        depths = _tree_depths(row["prompt"][:12])
        assert len(depths) == 2 and set(depths.values()) == {max(row["level"], 1)}  # level 0: leaves hang under roots
    ood = get_task("pointer_chase", slots=8, roots=1, ood_hops=(7, 7)).generate(50, "ood")
    assert {r["level"] for r in ood} == {7}  # a chain through every slot
    assert _chase("cbbcee;a?") == ("b", 2)
    cot = task.generate(3, "test", cot=True)
    assert all(c["answer"].endswith("#" + r["answer"]) for c, r in zip(cot, task.generate(3, "test")))


def test_edge_chase_one_token_per_edge_and_no_tree_shape_shortcut() -> None:
    """Every node's edge is one character; `roots` trees each exactly as deep as the query (so no tree's size or depth
    names the answer); prompts of one length at every level; ood differs in hops only; CoT lists the nodes visited."""
    task = get_task("edge_chase", nodes=12, hops=(0, 3), ood_hops=(5, 5), roots=2)
    rows = task.generate(200, "test")
    assert {r["level"] for r in rows} == {0, 1, 2, 3} and {len(r["prompt"]) for r in rows} == {15}
    for row in rows + task.generate(50, "ood"):
        root, hops, parent = _edge_chase(row["prompt"])
        assert len(parent) == 12
        roots = {n for n, p in parent.items() if p == n}
        depth = {}
        for n in parent:
            m, d = n, 0
            while parent[m] != m:
                m, d = parent[m], d + 1
            depth[m] = max(depth.get(m, 0), d)
        assert len(roots) == 2 and set(depth.values()) == {max(row["level"], 1)} or row["level"] == 0
        assert root in roots and hops == row["level"]
    ood = get_task("edge_chase", nodes=8, roots=1, ood_hops=(7, 7)).generate(20, "ood")
    assert {r["level"] for r in ood} == {7}  # one chain through every node
    mixed = get_task("edge_chase", min_nodes=4, hops=(1, 3))  # graph sizes from the chains' 2 x (hops + 1) to 16
    sizes = {}
    for row in mixed.generate(400, "train"):
        assert _edge_chase(row["prompt"])[:2] == (row["answer"], row["level"])
        sizes.setdefault(row["level"], set()).add(len(row["prompt"]) - 3)
    assert all(min(n) == 2 * (level + 1) and max(n) == 16 for level, n in sizes.items() if level > 1)
    assert min(sizes[1]) == 4 and {len(r["prompt"]) for r in mixed.generate(50, "ood")} == {19}
    cot = task.generate(5, "test", cot=True)
    for c, r in zip(cot, task.generate(5, "test")):
        steps, final = c["answer"].split("#")
        walk, node = [], r["prompt"][-2]
        parent = _edge_chase(r["prompt"])[2]
        while parent[node] != node:
            node = parent[node]
            walk.append(node)
        assert final == r["answer"] and steps == ",".join(walk)


def test_score_is_exact() -> None:
    task = get_task("addition")
    assert task.score("123", "123") and task.score(" 123\n", "123")
    assert not task.score("1234", "123") and not task.score("12", "123") and not task.score("", "123")
    assert task.score("321#123", "123") and not task.score("123#321", "123")


def test_alphabet_union() -> None:
    union = combined_alphabet()
    for name in NAMES:
        assert set(get_task(name).alphabet) <= set(union)
    assert len(union) == len(set(union))


@pytest.mark.parametrize(("name", "knobs", "match"), [
    ("addition", {"digits": (0, 3)}, "digits"),
    ("addition", {"digits": (4, 2)}, "digits"),
    ("addition", {"digits": "3"}, "digits"),
    ("variable_binding", {"hops": (1, 9)}, "n_vars"),
    ("variable_binding", {"roots": 0}, "roots"),
    ("tree_path", {"path": (1, 20)}, "nodes"),
    ("modular_chain", {"ops": (0, 2)}, "ops"),
    ("pointer_chase", {"slots": 27}, "slots"),
    ("pointer_chase", {"slots": 12, "hops": (1, 2), "ood_hops": (5, 6)}, "ood_hops"),
    ("pointer_chase", {"roots": 0}, "roots"),
    ("edge_chase", {"nodes": 17}, "nodes"),
    ("edge_chase", {"nodes": 12, "hops": (1, 2), "ood_hops": (5, 6)}, "ood_hops"),
    ("edge_chase", {"roots": 0}, "roots"),
    ("edge_chase", {"nodes": 16, "min_nodes": 17}, "min_nodes"),
    ("edge_chase", {"min_nodes": 0}, "min_nodes"),
    ("binding_chain", {"hops": (1, 10)}, "n_vars"),
    ("binding_chain", {"chains": 0}, "chains"),
    ("binding_chain", {"p_digit": 0}, "p_digit"),
    ("binding_chain", {"name_first": 1}, "name_first"),
    ("binding_chain", {"reach": 1}, "reach"),
    ("binding_chain", {"reach": -1}, "reach"),
    ("addition", {"hops": 3}, "knobs are \\[.digits.,"),
    ("nope", {}, "unknown task"),
])
def test_bad_knobs_raise_clear_errors(name: str, knobs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_task(name, **knobs)


def test_bad_generate_arguments() -> None:
    task = get_task("addition")
    with pytest.raises(ValueError, match="split"):
        task.generate(3, split="val")
    with pytest.raises(ValueError, match="n must"):
        task.generate(-1)


def test_write_jsonl_round_trip(tmp_path) -> None:
    import json

    from recurrent_depth.tasks import write_jsonl

    rows = get_task("tree_path").generate(5, "ood", seed=0)
    path = write_jsonl(rows, tmp_path / "sub" / "ood.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


def test_addition_carry_heavy_ood_split() -> None:
    from recurrent_depth.tasks.families import longest_carry_run

    assert longest_carry_run(999, 1) == 3 and longest_carry_run(123, 456) == 0 and longest_carry_run(15, 5) == 1
    assert longest_carry_run(191, 19) == 2  # 1+9 carries, 9+1+1 carries, 1+0+1 does not
    task = get_task("addition", ood_digits=(3, 3), ood_min_carry=2)
    rows = task.generate(200, "ood", seed=0)
    for r in rows:
        a, b = map(int, r["prompt"].rstrip("=").split("+"))
        assert longest_carry_run(a, b) >= 2 and len(str(a)) == len(str(b)) == 3 and r["answer"] == str(a + b)
    train = {r["prompt"] for r in task.generate(3000, "train", seed=0)}
    assert not train & {r["prompt"] for r in rows}
    with pytest.raises(ValueError, match="ood_min_carry"):
        get_task("addition", ood_digits=(2, 2), ood_min_carry=3)


@pytest.mark.parametrize("name_first", [False, True])
def test_binding_chain_docstring_example_and_no_digit_count_shortcut(name_first: bool) -> None:
    assert _bind_chain("3a,7b,ac,bd,ce,ef?")[:2] == ("3", 3) == _bind_chain("a3,b7,ca,db,ec,fe?", True)[:2]
    task = get_task("binding_chain", name_first=name_first)
    row = task.generate(1, "train", seed=0, targets=True)[0]
    assert _bind_chain(row["prompt"], name_first)[:2] == (row["answer"], row["level"])
    values = "".join(_bind_chain(row["prompt"], name_first)[2])
    assert row["targets"][1::3] == values and row["targets"][0::3] == (" " * len(values) if name_first else values)
    for split in ("train", "ood"):
        rows = task.generate(1000, split, seed=2)
        most_common = sum(max(set(d := [c for c in r["prompt"] if c.isdigit()]), key=d.count) == r["answer"]
                          for r in rows)
        first = sum(next(c for c in r["prompt"] if c.isdigit()) == r["answer"] for r in rows)
        assert most_common < 250 and first < 600  # guessing among the two chains' digits scores 1/2


@pytest.mark.parametrize("reach", [2, 3])
def test_binding_chain_reach_keeps_every_lookup_within_the_last_bindings(reach: int) -> None:
    task = get_task("binding_chain", reach=reach)
    for split, levels in (("train", range(1, 5)), ("ood", range(5, 9))):
        rows = task.generate(1000, split, seed=4, targets=True)
        assert {r["level"] for r in rows} == set(levels)
        for row in rows:
            answer, level, values = _bind_chain(row["prompt"])
            assert (answer, level) == (row["answer"], row["level"]) and row["targets"][1::3] == "".join(values)
            bindings = row["prompt"].rstrip("?").split(",")
            for k, (target, _) in enumerate(bindings):
                assert target.isdigit() or target in [b[1] for b in bindings[max(0, k - reach):k]], row["prompt"]
        # neither the first digit nor the most common one gives the answer (guessing between the chains: 1/2)
        first = sum(next(c for c in r["prompt"] if c.isdigit()) == r["answer"] for r in rows)
        most_common = sum(max(set(d := [c for c in r["prompt"] if c.isdigit()]), key=d.count) == r["answer"]
                          for r in rows)
        assert first < 500 and most_common < 500
    # reach 0 (the default) keeps the unconstrained generator: some lookup reaches further back than 3 bindings
    far = 0
    for row in get_task("binding_chain").generate(200, "train", seed=4):
        bindings = row["prompt"].rstrip("?").split(",")
        far += any(t.isalpha() and t not in [b[1] for b in bindings[max(0, k - 3):k]]
                   for k, (t, _) in enumerate(bindings))
    assert far > 50


@pytest.mark.parametrize("name", ["binding_chain", "cups", "modular_chain"])
def test_targets_label_the_running_state_under_each_prompt_character(name: str) -> None:
    rows = get_task(name).generate(200, split="train", seed=5, targets=True)
    for row in rows:
        prompt, targets = row["prompt"], row["targets"]
        assert len(targets) == len(prompt) and targets[-1] == " "
        if name == "cups":
            assert targets[:2] == " " + prompt[0] and targets[2:-1] == _cups(prompt)[2]
        elif name == "binding_chain":
            values = "".join(_bind_chain(prompt)[2])  # the value under both characters of each binding
            assert targets[1::3] == values == targets[0::3] and set(targets[2::3]) == {" "}
        else:
            values = [int(prompt[0])]
            for i in range(1, len(prompt) - 1, 2):
                assert targets[i] == " "
                values.append({"+": values[-1] + int(prompt[i + 1]), "-": values[-1] - int(prompt[i + 1]),
                               "*": values[-1] * int(prompt[i + 1])}[prompt[i]] % 10)
                assert targets[i + 1] == str(values[-1])
        assert targets[-2] == row["answer"]  # the state under the last step is the answer


def test_targets_need_a_trace_and_exclude_cot() -> None:
    with pytest.raises(ValueError, match="no running state"):
        get_task("addition").generate(2, targets=True)
    with pytest.raises(ValueError, match="exclusive"):
        get_task("cups").generate(2, targets=True, cot=True)
