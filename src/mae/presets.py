"""The YAML presets shipped inside the package (``mae/configs/<recipe>/<name>.yaml``), found by name or by path.

    resolve_preset("vit_l_800ep")             # -> .../mae/configs/pretrain/vit_l_800ep.yaml
    resolve_preset("pretrain/vit_l_800ep")    # the same, with its folder
    resolve_preset("vit_b", kind="finetune")  # a name in several folders: the recipe's own folder decides
    resolve_preset("my_run.yaml")             # an existing file is used as it is

`mae.config.load_config` calls `resolve_preset` on its path argument, so every command's ``--config`` and every
recipe that loads a preset (the demo, the sweep) accept names as well as paths, from any working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from mae.errors import ConfigError

__all__ = ["PRESETS_DIR", "list_presets", "resolve_preset", "shipped_name"]

PRESETS_DIR = Path(__file__).resolve().parent / "configs"
"""Where the shipped presets live (package data, present in editable and regular installs alike)."""
_SUFFIXES = (".yaml", ".yml")


def list_presets(kind: str | None = None) -> list[str]:
    """Names of the shipped presets as ``<recipe>/<name>`` (e.g. 'pretrain/vit_l_800ep'), sorted; only one
    recipe's folder with `kind`."""
    if not PRESETS_DIR.is_dir():
        return []
    names = [p.relative_to(PRESETS_DIR).with_suffix("").as_posix()
             for p in PRESETS_DIR.rglob("*") if p.suffix in _SUFFIXES and p.is_file()]
    return sorted(n for n in names if kind is None or n.split("/", 1)[0] == kind)


def resolve_preset(name_or_path: str | Path, kind: str | None = None) -> Path:
    """The YAML file meant by `name_or_path`: an existing file as given, else a shipped preset by name.

    A name may carry its recipe folder ('pretrain/vit_l_800ep'), a '.yaml' suffix and the old 'configs/' prefix
    ('configs/pretrain/vit_l_800ep.yaml' keeps working outside the source tree). A bare name found in several
    folders is taken from `kind`'s folder (the recipe that reads it, e.g. 'finetune'). Anything else raises
    ConfigError with the closest names.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config '{name_or_path}' is a directory, not a file; pass a YAML file or a preset name "
                          f"(e.g. {_examples(kind)})")
    key = path.as_posix()
    key = key.removeprefix("./").removeprefix("configs/")
    for suffix in _SUFFIXES:
        key = key.removesuffix(suffix)
    names = list_presets()
    if key in names:
        return _file_of(key)
    matches = [n for n in names if n.rsplit("/", 1)[-1] == key]
    if len(matches) > 1 and kind is not None:
        matches = [n for n in matches if n.split("/", 1)[0] == kind] or matches
    if len(matches) == 1:
        return _file_of(matches[0])
    if len(matches) > 1:
        raise ConfigError(f"preset name '{name_or_path}' is in several folders ({', '.join(matches)}); pass one of "
                          f"them with its folder")
    by_base: dict[str, list[str]] = {}
    for n in names:
        by_base.setdefault(n.rsplit("/", 1)[-1], []).append(n)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    close += [n for base in difflib.get_close_matches(key.rsplit("/", 1)[-1], list(by_base), n=3, cutoff=0.6)
              for n in by_base[base]]
    hint = ", ".join(dict.fromkeys(close))
    hint = f"did you mean {hint}? " if hint else ""
    raise ConfigError(f"config '{name_or_path}' does not exist as a file and is not a shipped preset; {hint}"
                      f"pass a YAML file or a preset name (`mae presets` lists them, e.g. {_examples(kind)})")


def shipped_name(path: str | Path) -> str | None:
    """The name of a shipped preset ('finetune/vit_b') when `path` is one of the package's own YAML files, None for
    any other file (the user's own)."""
    try:
        rel = Path(path).resolve().relative_to(PRESETS_DIR)
    except (OSError, ValueError):
        return None
    return rel.with_suffix("").as_posix() if rel.suffix in _SUFFIXES else None


def _file_of(name: str) -> Path:
    for suffix in _SUFFIXES:
        candidate = PRESETS_DIR / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    raise ConfigError(f"preset '{name}' vanished from {PRESETS_DIR}; reinstall mae")  # listed a moment ago


def _examples(kind: str | None) -> str:
    names = list_presets(kind) or list_presets()
    return ", ".join(names[:3]) if names else "pretrain/vit_b_800ep"
