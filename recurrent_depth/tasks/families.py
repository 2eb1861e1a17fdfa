"""Eight procedural reasoning families, each built so that an answer needs a number of sequential steps that grows with
its difficulty level (so more recurrence can help on harder instances):

- `addition`: "821+379=" -> "1200". Most significant digit first, so the first answer digit depends on the whole
  carry chain. Level: operand digits. CoT: the sum written least significant digit first, then the answer.
  `ood_digits=(3, 3), ood_min_carry=2` gives a carry-heavy hard split at trained lengths (more sequential carry
  steps without unseen prompt lengths, which small models fail at for reasons other than depth).
- `variable_binding`: "c=b,a=3,d=7,b=a;c?" -> "3". Assignments in shuffled order form a forest; the query sits k
  hops above its root, so resolving it takes k lookups. Level: k. CoT: the variables visited, then the value.
- `tree_path`: "ab,cb,bd,de;a>e?" -> "bde". A random tree as shuffled undirected edges; the answer is the unique path
  from the start (excluded) to the target. Level: path length. CoT: the breadth-first layers from the start.
- `pointer_chase`: "cbbcee;a?" -> "b". Slot i (the i-th letter) holds the slot it points to (a root, itself); the
  answer is the root reached from the query slot. Level: hops. Slots are fixed positions: a hop is a positional
  read, not a search. CoT: the slots visited.
- `modular_chain`: "3+4*2-7=" -> "8". Operations applied left to right, modulo 10. Level: number of operations.
  CoT: the running value after each operation.
- `binding_chain`: "3a,7b,ac,bd,ce,ef?" -> "3" (a = 3, b = 7, c = a, d = b, e = c, f = e). Variable binding in
  program order, each binding written value first: a digit or an earlier variable, then the new variable; the answer
  is the last variable's value, k hops from its digit. Each hop is a content-addressed lookup (the earlier
  occurrence of the same letter). Level: k. Dense labels (`trace`): each variable's value under both of its
  characters. CoT: the variables visited, then the value. `name_first=True` writes "a3,b7,ca,..." instead;
  `reach=r` keeps every lookup within the last r bindings (a local, translation-invariant lookup).
- `edge_chase`: pointer chasing over edges written one token each: "ĐŁđ...;c?" -> "b". Each node (a letter) has
  one outgoing edge, written as a single character that names both ends (`edge_char`: source s and target t are
  U+0100 + 16 s + t), roots point to themselves, the edges come in random order, and the answer is the root reached
  from the query node. A hop is one content-addressed lookup (the edge whose source is the current node) with no
  previous-token step in it (`binding_chain` and `variable_binding` write a binding over several characters). Level:
  hops. CoT: the nodes visited.
- `cups`: "1:acba?" -> "2". A ball under cup 1 of three; each letter swaps two cups (a: 0-1, b: 1-2, c: 0-2); the
  answer is the cup holding the ball at the end. A word problem in the symmetric group: each swap is one token, the
  step is a 3-state lookup, and no count or parity of the letters gives the answer. Level: number of swaps. CoT:
  the ball's cup after each swap.

All prompts stay under 64 characters at the default knobs (including the `ood` split). For `variable_binding` and
`tree_path` the in-distribution sizes span the `ood` sizes, so `ood` tests more sequential steps (hops, path length)
rather than unseen prompt lengths; for `addition` and `modular_chain` more steps mean longer prompts.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar

from recurrent_depth.tasks.base import Instance, Task

LETTERS = string.ascii_lowercase
DIGITS = string.digits


def _number(rng: random.Random, n_digits: int) -> int:
    """A uniformly drawn integer with exactly `n_digits` digits (0-9 for one digit)."""
    if n_digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (n_digits - 1), 10**n_digits - 1)


def longest_carry_run(a: int, b: int) -> int:
    """The longest run of consecutive digit positions that emit a carry when adding a and b."""
    run = best = carry = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) >= 10
        run = run + 1 if carry else 0
        best = max(best, run)
        a, b = a // 10, b // 10
    return best


@dataclass(frozen=True)
class Addition(Task):
    """Multi-digit addition; `digits` bounds each operand's digit count ((min, max), inclusive)."""

    name: ClassVar[str] = "addition"
    symbols: ClassVar[str] = DIGITS + "+="
    step_sep: ClassVar[str] = ""

    digits: tuple[int, int] = (1, 3)  # learnable by the `tiny` preset in ~800 steps of 32 on a CPU
    ood_digits: tuple[int, int] = (4, 5)
    ood_min_carry: int = 0  # ood problems hold a run of at least this many consecutive carries

    def _validate(self) -> None:
        self._set_range("digits", 1, 20)
        lo, hi = self._set_range("ood_digits", 1, 20)
        if not isinstance(self.ood_min_carry, int) or not 0 <= self.ood_min_carry <= hi:
            raise ValueError(f"difficulty knob `ood_min_carry` must be an integer in [0, ood_digits max = {hi}], "
                             f"got {self.ood_min_carry!r}")

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        lo, hi = self.ood_digits if ood else self.digits
        while True:
            na, nb = rng.randint(lo, hi), rng.randint(lo, hi)
            a, b = _number(rng, na), _number(rng, nb)
            if not ood or longest_carry_run(a, b) >= self.ood_min_carry:
                break
        total = str(a + b)
        return Instance(f"{a}+{b}=", total, tuple(reversed(total)), max(na, nb))


@dataclass(frozen=True)
class VariableBinding(Task):
    """Multi-hop variable binding (pointer chasing): `hops` is the query's distance from its root value (0: the query
    is a root, a direct lookup); `n_vars` the number of assignments; `roots` the number of distinct root values
    (distractor trees; chance accuracy is 1/roots)."""

    name: ClassVar[str] = "variable_binding"
    symbols: ClassVar[str] = LETTERS + DIGITS + "=,;?"

    hops: tuple[int, int] = (1, 4)
    ood_hops: tuple[int, int] = (5, 8)
    n_vars: tuple[int, int] = (8, 12)  # prompt lengths of train cover ood's: ood differs in hops, not length
    ood_n_vars: tuple[int, int] = (12, 12)
    roots: int = 4

    def _validate(self) -> None:
        if not isinstance(self.roots, int) or not 1 <= self.roots <= 10:
            raise ValueError(f"difficulty knob `roots` must be an integer in [1, 10], got {self.roots!r}")
        for hops, n_vars in (("hops", "n_vars"), ("ood_hops", "ood_n_vars")):
            h = self._set_range(hops, 0, 25)
            v = self._set_range(n_vars, 2, 26)
            if v[0] < h[1] + self.roots:
                raise ValueError(f"difficulty knob `{n_vars}` min ({v[0]}) must be at least `{hops}` max + `roots` "
                                 f"({h[1]} + {self.roots}) so the query chain and the distractor roots fit")

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        h_lo, h_hi = self.ood_hops if ood else self.hops
        hops = rng.randint(h_lo, h_hi)
        names = rng.sample(LETTERS, rng.randint(*(self.ood_n_vars if ood else self.n_vars)))
        values = rng.sample(DIGITS, self.roots)
        parent: dict[str, str] = {names[0]: values[0]}
        depth = {names[0]: 0}
        for i in range(1, hops + 1):  # the query chain
            parent[names[i]], depth[names[i]] = names[i - 1], i
        extra = names[hops + 1:]
        for name, value in zip(extra, values[1:]):  # distractor roots
            parent[name], depth[name] = value, 0
        for name in extra[self.roots - 1:]:  # the rest hang anywhere that keeps depth within the split's range
            if h_hi == 0:  # every variable is a root: the rest reuse the root values (a plain key-value lookup)
                parent[name], depth[name] = rng.choice(values), 0
                continue
            target = rng.choice([v for v in parent if depth[v] < h_hi])
            parent[name], depth[name] = target, depth[target] + 1
        query = names[hops]
        assignments = [f"{v}={p}" for v, p in parent.items()]
        rng.shuffle(assignments)
        steps, node = [], query
        while node in parent:
            node = parent[node]
            steps.append(node)
        return Instance(",".join(assignments) + f";{query}?", values[0], tuple(steps), hops)


def _check_forest(task: PointerChase | EdgeChase, size: str, limit: int) -> None:
    """Validate the knobs of an `_even_forest` task: `size` (its node count knob) and `roots` integers in
    [2, limit] and [1, limit], `hops` / `ood_hops` ranges in [0, limit - 1] whose longest chains fit: roots x
    (hops max + 1) nodes."""
    for knob, low, high in ((size, 2, limit), ("roots", 1, limit)):
        value = getattr(task, knob)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"difficulty knob `{knob}` must be an integer in [{low}, {high}], got {value!r}")
    n, roots = getattr(task, size), task.roots
    for knob in ("hops", "ood_hops"):
        _, hi = task._set_range(knob, 0, limit - 1)
        if roots * (hi + 1) > n:
            raise ValueError(f"difficulty knob `{knob}` max ({hi}): `roots` ({roots}) chains of {hi + 1} "
                             f"{size} need `{size}` >= {roots * (hi + 1)}, got {n}")


def _even_forest(rng: random.Random, n: int, roots: int,
                 hops: int) -> tuple[list[int], dict[int, int], list[int]]:
    """`pointer_chase`'s and `edge_chase`'s forest over nodes 0 .. n-1: `roots` trees, each holding a chain of
    hops + 1 nodes (a root points to itself), the other nodes hung anywhere no deeper than the chains. Returns the
    random node order (order[0] is the answer's root, order[hops] the query at the end of its chain), each node's
    parent, and the nodes visited from the query to its root."""
    order = rng.sample(range(n), n)
    parent: dict[int, int] = {}
    depth: dict[int, int] = {}
    for t in range(roots):  # one chain of hops + 1 nodes per tree; tree 0 holds the query at its end
        chain = order[t * (hops + 1):(t + 1) * (hops + 1)]
        for i, node in enumerate(chain):
            parent[node], depth[node] = chain[max(i - 1, 0)], i
    for node in order[roots * (hops + 1):]:  # the rest hang anywhere, no deeper than the chains
        target = rng.choice([v for v in parent if depth[v] < max(hops, 1)])
        parent[node], depth[node] = target, depth[target] + 1
    path, node = [], order[hops]
    while parent[node] != node:
        node = parent[node]
        path.append(node)
    return order, parent, path


@dataclass(frozen=True)
class PointerChase(Task):
    """Pointer chasing by position: slot i of the prompt (named by the i-th letter) holds the name of the slot it
    points to, a root holds its own name, and the answer is the root reached from the query slot:
    "cbbcee;a?" -> "b" (a -> c -> b). `hops` is the query's distance from its root. Every one of the `roots` trees
    holds a chain as long as the query's, and the other slots hang no deeper, so neither a tree's size nor its depth
    tells which root is the answer (a first version with one tree, or with shallow distractors, was solved by such
    shortcuts). Slots sit at fixed positions (the prompt has `slots` + 3 characters at every level), so a hop is a
    positional read with no content search; `ood` differs in hops only. Following a pointer past the root changes
    nothing, so extra recurrence cannot overshoot."""

    name: ClassVar[str] = "pointer_chase"
    symbols: ClassVar[str] = LETTERS + ";?"

    slots: int = 16
    hops: tuple[int, int] = (1, 4)
    ood_hops: tuple[int, int] = (5, 7)
    roots: int = 2  # trees (chance is 1/roots)

    def _validate(self) -> None:
        _check_forest(self, "slots", 26)

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        hops = rng.randint(*(self.ood_hops if ood else self.hops))
        order, parent, path = _even_forest(rng, self.slots, self.roots, hops)
        prompt = "".join(LETTERS[parent[i]] for i in range(self.slots)) + f";{LETTERS[order[hops]]}?"
        return Instance(prompt, LETTERS[order[0]], tuple(LETTERS[v] for v in path), hops)


@dataclass(frozen=True)
class TreePath(Task):
    """Path finding in a random tree: `nodes` bounds the tree size, `path` the start-to-target distance (edges)."""

    name: ClassVar[str] = "tree_path"
    symbols: ClassVar[str] = LETTERS + ",;>?"

    nodes: tuple[int, int] = (5, 14)  # prompt lengths of train cover ood's: ood differs in path length
    path: tuple[int, int] = (1, 4)
    ood_nodes: tuple[int, int] = (10, 14)
    ood_path: tuple[int, int] = (5, 8)

    def _validate(self) -> None:
        for nodes, path in (("nodes", "path"), ("ood_nodes", "ood_path")):
            n = self._set_range(nodes, 2, 26)
            p = self._set_range(path, 1, 25)
            if n[1] < p[1] + 1:
                raise ValueError(f"difficulty knob `{nodes}` max ({n[1]}) must exceed `{path}` max ({p[1]}): a path "
                                 f"of {p[1]} edges needs {p[1] + 1} nodes")

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        n_lo, n_hi = self.ood_nodes if ood else self.nodes
        length = rng.randint(*(self.ood_path if ood else self.path))
        names = rng.sample(LETTERS, rng.randint(max(n_lo, length + 1), n_hi))
        edges = [(names[i], names[i + 1]) for i in range(length)]  # the start-to-target path first
        for i in range(length + 1, len(names)):  # then the rest of the tree, attached anywhere
            edges.append((rng.choice(names[:i]), names[i]))
        printed = [a + b if rng.random() < 0.5 else b + a for a, b in edges]
        rng.shuffle(printed)
        start, target = names[0], names[length]
        return Instance(",".join(printed) + f";{start}>{target}?", "".join(names[1:length + 1]),
                        tuple(_bfs_layers(edges, start, target)), length)


def _bfs_layers(edges: list[tuple[str, str]], start: str, target: str) -> list[str]:
    """Breadth-first layers from `start` (each a sorted string of nodes) up to the one holding `target`."""
    adj: dict[str, set[str]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
        adj.setdefault(b, set()).add(a)
    seen, frontier, layers = {start}, {start}, []
    while target not in frontier:
        frontier = {m for n in frontier for m in adj[n]} - seen
        seen |= frontier
        layers.append("".join(sorted(frontier)))
    return layers


_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@dataclass(frozen=True)
class ModularChain(Task):
    """Left-to-right arithmetic modulo 10 on one-digit operands; `ops` bounds the number of operations."""

    name: ClassVar[str] = "modular_chain"
    symbols: ClassVar[str] = DIGITS + "+-*="

    ops: tuple[int, int] = (2, 5)
    ood_ops: tuple[int, int] = (6, 10)

    def _validate(self) -> None:
        self._set_range("ops", 1, 30)
        self._set_range("ood_ops", 1, 30)

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        n_ops = rng.randint(*(self.ood_ops if ood else self.ops))
        value = rng.randint(0, 9)
        prompt, steps = [str(value)], []
        for _ in range(n_ops):
            op, operand = rng.choice("+-*"), rng.randint(0, 9)
            value = _OPS[op](value, operand) % 10
            prompt.append(f"{op}{operand}")
            steps.append(str(value))
        return Instance("".join(prompt) + "=", str(value), tuple(steps), n_ops)

    def trace(self, inst: Instance) -> str:
        """The start value under the first digit, the running value under each operand."""
        return inst.prompt[0] + "".join(" " + v for v in inst.steps) + " "


def _cup_swaps(cups: int) -> list[tuple[int, int]]:
    """Every pair of cups (i < j) in order; the k-th pair is named by the k-th letter."""
    return [(i, j) for i in range(cups) for j in range(i + 1, cups)]


@dataclass(frozen=True)
class Cups(Task):
    """The shell game: `cups` cups, the ball's start, then `swaps` swaps of two cups, each one letter."""

    name: ClassVar[str] = "cups"
    symbols: ClassVar[str] = DIGITS + LETTERS[:15] + ":?"

    swaps: tuple[int, int] = (1, 8)
    ood_swaps: tuple[int, int] = (9, 16)
    cups: int = 3  # 3 -> 3 swap letters (a-c), 4 -> 6, 5 -> 10, 6 -> 15; chance accuracy 1/cups

    def _validate(self) -> None:
        if not isinstance(self.cups, int) or isinstance(self.cups, bool) or not 2 <= self.cups <= 6:
            raise ValueError(f"difficulty knob `cups` must be an integer in [2, 6], got {self.cups!r}")
        self._set_range("swaps", 1, 60)
        self._set_range("ood_swaps", 1, 60)

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        n = rng.randint(*(self.ood_swaps if ood else self.swaps))
        pairs = _cup_swaps(self.cups)
        ball = start = rng.randrange(self.cups)
        letters, steps = [], []
        for _ in range(n):
            k = rng.randrange(len(pairs))
            i, j = pairs[k]
            ball = j if ball == i else i if ball == j else ball
            letters.append(LETTERS[k])
            steps.append(str(ball))
        return Instance(f"{start}:{''.join(letters)}?", str(ball), tuple(steps), n)

    def trace(self, inst: Instance) -> str:
        """The ball's cup under `:` (the start) and under each swap letter (after that swap)."""
        return " " + inst.prompt[0] + "".join(inst.steps) + " "


@dataclass(frozen=True)
class BindingChain(Task):
    """Variable binding in program order, `yx` = "x is bound to y" (y a digit or an earlier variable;
    `name_first`: written `xy`), the last binding queried. `chains` chains of `hops` + 1 variables each, every one
    rooted at its own digit and interleaved at random (each in its order), so the query's chain is `hops` lookups
    from its digit and guessing among the chains' digits scores 1 / chains; the other variables of `n_vars` are
    fillers bound to other digits or to earlier fillers (probability 1 - `p_digit`; at most `hops` from a digit, so
    no dense label needs more lookups than the answer, the row's level), adding lookups without hinting at it."""

    name: ClassVar[str] = "binding_chain"
    symbols: ClassVar[str] = LETTERS + DIGITS + ",?"

    hops: tuple[int, int] = (1, 4)
    ood_hops: tuple[int, int] = (5, 8)
    n_vars: tuple[int, int] = (10, 20)  # train's prompt lengths cover ood's: ood needs more hops, not longer prompts
    #                                     (a row has at least its chains' variables, whatever the minimum)
    ood_n_vars: tuple[int, int] = (18, 20)
    chains: int = 2
    p_digit: float = 0.5
    # the new variable before its value: its value is then unknown at its own character (a causal model sees the value
    # next), so each hop needs a lookup keyed on the previous character (an induction head), not on the same letter
    name_first: bool = False
    # 0: a chain's next binding (and a filler's earlier filler) may come anywhere later in the row; r > 0: within the
    # next r bindings, so every lookup searches the last r bindings only (a few candidate keys, found by a model
    # whose attention reaches 3r characters back, at any position of a longer row). The row then ends with the
    # query's chain: the other chains may stop short of `hops` + 1 variables, and fillers not placed are dropped.
    reach: int = 0

    def _validate(self) -> None:
        if not isinstance(self.reach, int) or isinstance(self.reach, bool) or not 0 <= self.reach <= 25 \
                or 0 < self.reach < self.chains:
            raise ValueError(f"difficulty knob `reach` must be 0 or an integer in [chains = {self.chains}, 25], got "
                             f"{self.reach!r}")
        if not isinstance(self.p_digit, int | float) or isinstance(self.p_digit, bool) or not 0 < self.p_digit <= 1:
            raise ValueError(f"difficulty knob `p_digit` must be a number in (0, 1], got {self.p_digit!r}")
        if not isinstance(self.name_first, bool):
            raise ValueError(f"difficulty knob `name_first` must be true or false, got {self.name_first!r}")
        if not isinstance(self.chains, int) or isinstance(self.chains, bool) or not 1 <= self.chains <= 5:
            raise ValueError(f"difficulty knob `chains` must be an integer in [1, 5], got {self.chains!r}")
        for hops, n_vars in (("hops", "n_vars"), ("ood_hops", "ood_n_vars")):
            h = self._set_range(hops, 0, 25)
            v = self._set_range(n_vars, 1, 26)
            if v[1] < self.chains * (h[1] + 1):
                raise ValueError(f"difficulty knob `{n_vars}` max ({v[1]}) must be at least `chains` x (`{hops}` max "
                                 f"+ 1) = {self.chains * (h[1] + 1)} so the chains fit")

    def _slots(self, rng: random.Random, size: int, n_fillers: int) -> tuple[list[int], int]:
        """The order of the bindings (a chain's index, -1 for a filler) and the queried chain, the last binding's."""
        query = rng.randrange(self.chains)
        if not self.reach:
            slots = [c for c in range(self.chains) for _ in range(size - (c == query))] + [-1] * n_fillers
            rng.shuffle(slots)
            return slots + [query], query
        left = [size] * self.chains + [n_fillers]  # bindings still to place per chain, then the fillers
        last = [-1] * self.chains  # each chain's latest binding (-1: not started)
        slots: list[int] = []
        while left[query]:
            i = len(slots)
            due = [c for c in range(self.chains) if left[c] and last[c] >= 0 and i - last[c] == self.reach]
            # at most one chain is due (their latest bindings sit at different positions); otherwise draw a
            # binding to place, chains and fillers in proportion to what is left of each
            c = due[0] if due else rng.choices(range(self.chains + 1), weights=left)[0]
            left[c] -= 1
            slots.append(-1 if c == self.chains else c)
            if c < self.chains:
                last[c] = i
        return slots, query

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        hops = rng.randint(*(self.ood_hops if ood else self.hops))
        lo, hi = self.ood_n_vars if ood else self.n_vars
        names = rng.sample(LETTERS, rng.randint(max(lo, self.chains * (hops + 1)), hi))  # at least the chains
        roots = rng.sample(DIGITS, self.chains)
        others = [d for d in DIGITS if d not in roots]
        size = hops + 1
        chains = [names[c * size:(c + 1) * size] for c in range(self.chains)]
        fillers = iter(names[self.chains * size:])
        slots, query = self._slots(rng, size, len(names) - self.chains * size)
        at = [0] * self.chains
        value: dict[str, str] = {}
        filler_depth: dict[str, int] = {}  # hops from a digit
        placed: list[str] = []  # the variables in binding order
        bindings = []
        for c in slots:
            if c >= 0:
                name = chains[c][at[c]]
                target = roots[c] if at[c] == 0 else chains[c][at[c] - 1]
                at[c] += 1
            else:
                name = next(fillers)
                earlier = [v for v, d in filler_depth.items() if d < hops and (not self.reach
                                                                                 or v in placed[-self.reach:])]
                target = rng.choice(others) if not earlier or rng.random() < self.p_digit else rng.choice(earlier)
                filler_depth[name] = 0 if target in DIGITS else filler_depth[target] + 1
            placed.append(name)
            value[name] = target if target in DIGITS else value[target]
            bindings.append(name + target if self.name_first else target + name)
        chain = chains[query]
        steps = tuple(reversed(chain[:-1])) + (value[chain[-1]],)
        return Instance(",".join(bindings) + "?", value[chain[-1]], steps, hops)

    def trace(self, inst: Instance) -> str:
        """Each variable's value under both characters of its binding (`name_first`: under its value's only, the
        first character being unknown yet); nothing under commas and `?`."""
        value: dict[str, str] = {}
        out = []
        for binding in inst.prompt[:-1].split(","):
            name, target = binding if self.name_first else binding[::-1]
            value[name] = target if target in DIGITS else value[target]
            out.append((" " if self.name_first else value[name]) + value[name])
        return " ".join(out) + " "


EDGE_BASE = 0x100  # edge_chase's edge characters: U+0100 .. U+01FF (Latin Extended-A and -B letters)
EDGE_NODES = 16  # nodes an edge character can name (a .. p)


def edge_char(source: int, target: int) -> str:
    """The one character `edge_chase` writes for the edge source -> target (node indices < EDGE_NODES)."""
    return chr(EDGE_BASE + EDGE_NODES * source + target)


@dataclass(frozen=True)
class EdgeChase(Task):
    """Pointer chasing over `nodes` letters whose edges are single tokens: every node has one edge to its parent
    (a root to itself), written as `edge_char(node, parent)`, all edges in random order, then `;`, the query node
    and `?`; the answer is the root reached from the query. `roots` trees each hold a chain as long as the query's
    (`hops` edges below its root) and the other nodes hang no deeper, so neither a tree's size nor its depth tells
    the answer (the shortcuts `pointer_chase` had to close); chance is 1 / roots. The nodes are a random subset of
    the 16 letters a .. p. A train or test row's graph has between `min_nodes` (or the chains' roots x (hops + 1), if
    more; None: `nodes`) and `nodes` nodes, an `ood` row always `nodes`: with `min_nodes` below `nodes` the easy
    rows include small graphs, where the lookup is learnt quickly (one hop among 8 nodes: 99% within 750 steps x 64,
    `tiny`; among 16: still at chance at 1000), and ood rows are as long as the longest training rows, so `ood`
    differs in hops only. Following an edge past the root changes nothing (a root's edge points to itself), so extra
    recurrence cannot overshoot."""

    name: ClassVar[str] = "edge_chase"
    symbols: ClassVar[str] = (LETTERS[:EDGE_NODES] + ";?"
                              + "".join(edge_char(s, t) for s in range(EDGE_NODES) for t in range(EDGE_NODES)))

    nodes: int = 16
    min_nodes: int | None = None  # None: every graph has `nodes` nodes
    hops: tuple[int, int] = (1, 4)
    ood_hops: tuple[int, int] = (5, 7)
    roots: int = 2

    def _validate(self) -> None:
        _check_forest(self, "nodes", EDGE_NODES)
        if self.min_nodes is not None and (not isinstance(self.min_nodes, int) or isinstance(self.min_nodes, bool)
                                           or not 1 <= self.min_nodes <= self.nodes):
            raise ValueError(f"difficulty knob `min_nodes` must be null or an integer in [1, nodes = {self.nodes}], "
                             f"got {self.min_nodes!r}")

    def _sample(self, rng: random.Random, ood: bool) -> Instance:
        hops = rng.randint(*(self.ood_hops if ood else self.hops))
        low = self.nodes if ood or self.min_nodes is None else max(self.min_nodes, self.roots * (hops + 1))
        n = rng.randint(low, self.nodes)
        order, parent, path = _even_forest(rng, n, self.roots, hops)
        names = rng.sample(range(EDGE_NODES), n)  # node i is letter names[i]
        edges = [edge_char(names[v], names[parent[v]]) for v in range(n)]
        rng.shuffle(edges)
        return Instance("".join(edges) + f";{LETTERS[names[order[hops]]]}?", LETTERS[names[order[0]]],
                        tuple(LETTERS[names[v]] for v in path), hops)
