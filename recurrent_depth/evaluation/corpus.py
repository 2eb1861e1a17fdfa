"""An offline text corpus for the language-modelling experiments: the running interpreter's own documentation and
standard library, found at run time (nothing is copied into this repository, nothing is downloaded).

Sources:
- `docs`: `pydoc_data.topics.topics`, the Python reference manual's topics as plain English text (~0.5 MB);
- `code`: the standard library's `.py` sources (~12 MB; `test`/`tests`, `site-packages`, `idlelib` left out).

Split: each document goes to validation when a hash of its name falls in the validation share, so the split is
deterministic across runs, machines and source subsets, and a document is never cut between the two splits.

    docs = load_corpus("train", sources=("docs",))           # list[Document(name, text)]
    texts = corpus_texts("validation", max_chars=100_000)     # list[str]
    export_corpus("data/stdlib", sources=("docs",))          # train/corpus.txt, validation/corpus.txt
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("docs", "code")
CORPUS_SPLITS = ("train", "validation")
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "__pycache__", "lib2to3"}


@dataclass(frozen=True)
class Document:
    """One corpus document: a stable name (source-qualified) and its text."""

    name: str
    text: str


def _doc_topics() -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some minimal Python builds strip pydoc_data
        raise FileNotFoundError("this Python has no pydoc_data.topics; use sources=('code',)") from err
    return [Document(f"docs/{key}", text) for key, text in sorted(topics.items()) if text.strip()]


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources() -> list[Document]:
    root = stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {str(root)!r} not found")
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(f"code/{rel.as_posix()}", text))
    if not docs:
        raise FileNotFoundError(f"no Python sources found under {str(root)!r}")
    return docs


def is_validation(name: str, valid_fraction: float) -> bool:
    """Whether document `name` belongs to the validation split (hash of the name, so stable everywhere)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < valid_fraction


def load_corpus(split: str = "train", sources: Sequence[str] = ("docs",), valid_fraction: float = 0.1,
                max_chars: int = 0) -> list[Document]:
    """The documents of `split` ("train" / "validation") from `sources`, in a fixed order.

    max_chars: stop once this many characters are collected (0: no limit); the last document is cut to fit.
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {list(CORPUS_SPLITS)}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"unknown corpus sources {unknown or list(sources)}; choose from {list(SOURCES)}")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must lie strictly between 0 and 1, got {valid_fraction!r}")
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars!r}")
    loaders = {"docs": _doc_topics, "code": _stdlib_sources}
    out, total = [], 0
    for source in dict.fromkeys(sources):
        for doc in loaders[source]():
            if is_validation(doc.name, valid_fraction) != (split == "validation"):
                continue
            if max_chars and total + len(doc.text) > max_chars:
                out.append(Document(doc.name, doc.text[: max_chars - total]))
                return out
            out.append(doc)
            total += len(doc.text)
    return out


def corpus_texts(split: str = "train", sources: Sequence[str] = ("docs",), valid_fraction: float = 0.1,
                 max_chars: int = 0) -> list[str]:
    """Just the texts of `load_corpus(...)`."""
    return [d.text for d in load_corpus(split, sources, valid_fraction, max_chars)]


def export_corpus(folder: str | Path, sources: Sequence[str] = ("docs",), valid_fraction: float = 0.1,
                  max_chars: int = 0) -> dict[str, Path]:
    """Write `<folder>/train/corpus.txt` and `<folder>/validation/corpus.txt` (documents separated by a blank
    line), one folder per split so a text loader pointed at one split's folder never reads the other."""
    paths = {}
    for split in CORPUS_SPLITS:
        path = Path(folder) / split / "corpus.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(corpus_texts(split, sources, valid_fraction, max_chars)), encoding="utf-8")
        paths[split] = path
    return paths
