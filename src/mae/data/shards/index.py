"""Which shards a ``shards:`` spec names: the ``index.json`` that ``mae prepare`` writes, or a brace pattern, with
the sample count and class names of each split."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mae.data.shards.members import LABEL_EXTENSION, read_label, read_member_table
from mae.errors import DataError

log = logging.getLogger("mae")

SHARDS_PREFIX = "shards:"
INDEX_NAME = "index.json"


def is_shard_spec(spec: str) -> bool:
    """True for ``shards:...`` data specs."""
    return isinstance(spec, str) and spec.startswith(SHARDS_PREFIX)



def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar; ``{x,y}``; several groups.

    Numeric ranges keep the zero padding of their first bound.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DataError(f"shard pattern '{pattern}' has a '}}' without '{{'")
        return [pattern]
    depth, end = 0, -1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise DataError(f"shard pattern '{pattern}' has a '{{' without its '}}'")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        a, b = numeric.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    elif "," in body:
        choices = _split_top_level(body)
    else:
        raise DataError(f"shard pattern '{pattern}': '{{{body}}}' is neither a range like {{000000..000099}} "
                        "nor a list like {a,b}")
    return [out for choice in choices for out in expand_braces(head + choice + tail)]


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split: paths, sample counts (from the index, or counted), class names."""

    spec: str
    split: str
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...] = ()
    labelled: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def starts(self) -> list[int]:
        """Global index of each shard's first sample (index order)."""
        return [0, *np.cumsum(self.counts)[:-1].tolist()]


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"shard index '{path}' is unreadable or not JSON ({e}); rerun mae prepare") from e
    if not isinstance(index, dict) or not isinstance(index.get("splits"), dict):
        raise DataError(f"shard index '{path}' has no 'splits' table; it was not written by mae prepare")
    return index


def _split_entry(index: dict, path: Path, split: str) -> dict:
    splits = index["splits"]
    if split not in splits:
        raise DataError(f"shard index '{path}' has no '{split}' split; it has: {', '.join(splits) or 'none'}")
    entry = splits[split]
    try:
        [(str(s["name"]), int(s["samples"])) for s in entry["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"shard index '{path}': split '{split}' has no valid shard list ({e}); rerun mae prepare"
                        ) from e
    return entry


def resolve_shards(spec: str, split: str = "train") -> ShardSet:
    """The shards that `spec` names for `split`, with their sample counts.

    `spec` is ``shards:DIR`` (a folder with ``index.json``, which may list several splits), ``shards:FILE.tar`` or a
    brace pattern ``shards:/data/train-{000000..000099}.tar``. A pattern (or a single file) is one set of shards,
    read as the train split; its counts come from an ``index.json`` beside the shards that lists them, or else
    from reading their tar headers once.
    """
    rest = spec[len(SHARDS_PREFIX):] if is_shard_spec(spec) else spec
    if not rest:
        raise DataError("empty shard spec 'shards:'; give shards:DIR (a folder with index.json) or a pattern like "
                        "shards:/data/train-{000000..000099}.tar")
    if "://" in rest or rest.startswith("pipe:"):
        raise DataError(f"shard spec '{spec}': only files are read (the reader seeks); copy or mount the shards "
                        "locally")
    if "{" not in rest and "}" not in rest and Path(rest).expanduser().is_dir():
        root = Path(rest).expanduser()
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise DataError(f"shard folder '{root}' has no {INDEX_NAME}; write one with 'mae prepare', or name the "
                            f"shards with a pattern like shards:{root}/train-{{000000..000009}}.tar")
        entry = _split_entry(_read_index(index_path), index_path, split)
        paths = tuple(str(root / s["name"]) for s in entry["shards"])
        counts = tuple(int(s["samples"]) for s in entry["shards"])
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"shard index '{index_path}' lists {len(missing)} missing shard(s), first "
                            f"'{missing[0]}'; rerun mae prepare")
        return _checked(ShardSet(spec, split, paths, counts, tuple(entry.get("classes") or ()),
                                 bool(entry.get("labelled", bool(entry.get("classes"))))))
    if split != "train":
        raise DataError(f"shard pattern '{spec}' names one set of shards (read as the train split); for the "
                        f"'{split}' split give the folder with {INDEX_NAME} (mae prepare writes one per split)")
    paths = tuple(str(Path(p).expanduser()) for p in expand_braces(rest))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"shard pattern '{spec}': {len(missing)} of {len(paths)} shard file(s) do not exist, first "
                        f"'{missing[0]}'")
    known = _counts_from_nearby_index(paths)
    if known is not None:
        counts, classes, labelled = known
    else:
        log.info("shards: no %s beside %s lists them; counting samples from their tar headers", INDEX_NAME, rest)
        tables = [read_member_table(p) for p in paths]
        counts = tuple(len(t) for t in tables)
        labels = [read_label(p, sample) for p, t in zip(paths, tables, strict=True) for sample in t
                  if LABEL_EXTENSION in sample]
        labelled = bool(labels) and all(label is not None for label in labels)
        classes = tuple(str(i) for i in range(max(labels) + 1)) if labelled else ()  # type: ignore[type-var, operator]  # labelled: no label is None
    return _checked(ShardSet(spec, split, paths, counts, classes, labelled))


def _counts_from_nearby_index(paths: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...], bool] | None:
    """Counts from an index.json in the shards' folder, when it lists every one of them (in one split)."""
    folder = Path(paths[0]).parent
    index_path = folder / INDEX_NAME
    if not index_path.is_file() or any(Path(p).parent != folder for p in paths):
        return None
    try:
        index = _read_index(index_path)
    except DataError:
        return None
    for entry in index["splits"].values():
        table = {s.get("name"): s.get("samples") for s in entry.get("shards", []) if isinstance(s, dict)}
        if all(Path(p).name in table for p in paths):
            classes = tuple(entry.get("classes") or ())
            return (tuple(int(table[Path(p).name]) for p in paths), classes,  # type: ignore[arg-type]  # every listed shard has its sample count
                    bool(entry.get("labelled", bool(classes))))
    return None


def _checked(shards: ShardSet) -> ShardSet:
    if not shards.paths:
        raise DataError(f"shard spec '{shards.spec}' names no shards")
    if shards.total == 0:
        raise DataError(f"shards of '{shards.spec}' ({shards.split}) hold no samples")
    return shards
