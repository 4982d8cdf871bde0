"""``mae weights``: list the catalogue, download ahead, verify the cache. The CLI only declares and dispatches;
the lines come from here (through the `out` / `note` callables it passes, so the library never prints)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mae.errors import WeightsError
from mae.weights.catalogue import CATALOGUE, WeightsEntry, is_weights_name, parse_name
from mae.weights.hub import cached_hub, verify_hub
from mae.weights.official import cached_official, verify_official
from mae.weights.resolve import resolve_weights
from mae.weights.settings import cache_home, is_offline, official_url

__all__ = ["ACTIONS", "run_command"]

Echo = Callable[[str], object]
ACTIONS = ("list", "download", "verify")


def run_command(action: str, names: Sequence[str], out: Echo, note: Echo) -> int:
    """Run one action; `out` takes the result lines (stdout), `note` the remarks (stderr). A failure raises
    `WeightsError` (the CLI: one line, exit code 2)."""
    if action not in ACTIONS:
        raise _unknown_action(action, names)
    if action == "download":
        if not names:
            raise WeightsError("mae weights download needs at least one NAME, e.g. official:mae_pretrain_vit_base "
                               "(`mae weights` lists them)")
        return _download(names, out, note)
    if action == "verify":
        return _verify(names, out, note)
    if names:
        raise WeightsError(f"mae weights list takes no names (got {', '.join(names)}); to fetch them: mae weights "
                           f"download {' '.join(names)}")
    for line in catalogue_lines():
        out(line)
    offline = " (offline: MAE_OFFLINE / HF_HUB_OFFLINE set)" if is_offline() else ""
    note(f"({len(CATALOGUE)} names; official files cached in '{cache_home() / 'official'}', Hub repositories in "
         f"the Hugging Face cache{offline}; `mae weights download NAME` fetches one)")
    return 0


def _unknown_action(action: str, names: Sequence[str]) -> WeightsError:
    if is_weights_name(action):
        return WeightsError(f"'{action}' is a name, not an action; to fetch it: mae weights download "
                            f"{' '.join([action, *names])}")
    # imported here, not at the top: `mae --help` stays fast
    import difflib

    close = difflib.get_close_matches(action, ACTIONS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return WeightsError(f"unknown action '{action}' (valid: {', '.join(ACTIONS)}){hint}")


def catalogue_lines() -> list[str]:
    """One line per catalogue entry: name, holds, target, size, licence, cached or not, where."""
    rows = [("NAME", "HOLDS", "TARGET", "SIZE", "LICENCE", "CACHED", "WHERE")]
    for entry in CATALOGUE.values():
        where, size = _where(entry)
        rows.append((entry.name, entry.holds, entry.target or "-", _size(size), entry.licence,
                     "yes" if where is not None else "no", str(where) if where is not None else _origin(entry)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
            for row in rows]


def _where(entry: WeightsEntry) -> tuple[Path | None, int | None]:
    """The cached file or snapshot folder (None: not cached) and the size of its weights."""
    if entry.source == "official":
        hit = cached_official(entry)
        return (hit[0], hit[1].size) if hit is not None else (None, entry.size_bytes)
    folder = cached_hub(entry.location, None)
    if folder is None:
        return None, entry.size_bytes
    sizes = [p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
    return folder, max(sizes, default=None)


def _origin(entry: WeightsEntry) -> str:
    return official_url(entry.location) if entry.source == "official" else f"hub: {entry.location}"


def _size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def _download(names: Sequence[str], out: Echo, note: Echo) -> int:
    """Each name in turn (a failure does not stop the others); one error line naming the first failure."""
    for name in names:
        parse_name(name)  # an unknown name is refused before anything is fetched
    failed: list[tuple[str, WeightsError]] = []
    for name in names:
        try:
            resolved = resolve_weights(name)
        except WeightsError as e:
            failed.append((name, e))
            continue
        out(f"{resolved.name}  {resolved.path}  {resolved.checksum}")
    if failed:
        if len(failed) == 1:
            raise failed[0][1]
        raise WeightsError(f"{len(failed)} of {len(names)} downloads failed ({', '.join(n for n, _ in failed)}); the "
                           f"first: {failed[0][1]}")
    return 0


def _verify(names: Sequence[str], out: Echo, note: Echo) -> int:
    """Each named (default: each cached) entry re-read; one error line when any is bad."""
    targets = [(name.strip(), parse_name(name)) for name in names]
    if not targets:
        targets = [(e.name, parse_name(e.name)) for e in CATALOGUE.values() if _where(e)[0] is not None]
        if not targets:
            note(f"nothing is cached (official files: '{cache_home() / 'official'}', Hub repositories: the Hugging "
                 f"Face cache)")
            return 0
    bad = []
    for name, (source, location, revision, entry) in targets:
        if source == "official":
            assert entry is not None  # parse_name refuses an official name the catalogue does not list
            ok, detail = verify_official(entry)
        else:
            ok, detail = verify_hub(name, location, revision)
        out(f"{'ok ' if ok else 'BAD'}  {name}  {detail}")
        if not ok:
            bad.append(name)
    if bad:
        raise WeightsError(f"{len(bad)} of {len(targets)} failed verification: {', '.join(bad)} (the lines above say "
                           f"why and what to do)")
    return 0
