"""A weights name to a local path `mae.interop.read_checkpoint` reads: the cache, else a download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mae.weights.catalogue import WeightsEntry, parse_name
from mae.weights.hub import fetch_hub
from mae.weights.official import fetch_official

__all__ = ["UNKNOWN_LICENCE", "ResolvedWeights", "resolve_weights"]

UNKNOWN_LICENCE = "unknown (see the repository's model card)"


@dataclass(frozen=True)
class ResolvedWeights:
    """Weights found by name: where they are on this machine and what identifies them."""

    name: str  # as asked for ("official:mae_pretrain_vit_base", "hf:org/repo@rev")
    path: Path  # official: the .pth file; hf / timm: the Hub snapshot folder (config.json + weights)
    source: str  # "official" | "hf" | "timm"
    checksum: str  # "sha256:<hex>" (official: computed at download; Hub: the LFS ETag), else "etag:<etag>"
    entry: WeightsEntry | None  # None for a Hub repository the catalogue does not list

    def provenance(self) -> dict[str, str]:
        """What a run's config.yaml or a model card records of where its starting weights came from."""
        return {"name": self.name, "source": self.source, "checksum": self.checksum,
                "licence": self.entry.licence if self.entry is not None else UNKNOWN_LICENCE}


def resolve_weights(name: str) -> ResolvedWeights:
    """The local copy of released weights by name (``official:...``, ``hf:org/repo[@revision]``, ``timm:<tag>``):
    a cache hit, else a download (checked and recorded; never with ``MAE_OFFLINE=1``). Raises
    `mae.errors.WeightsError` with one line for an unknown name or a failed download."""
    name = name.strip()
    source, location, revision, entry = parse_name(name)
    if source == "official":
        assert entry is not None  # parse_name refuses an official name the catalogue does not list
        path, record = fetch_official(entry)
        return ResolvedWeights(name, path, source, f"sha256:{record.sha256}", entry)
    folder, checksum = fetch_hub(name, location, revision)
    return ResolvedWeights(name, folder, source, checksum, entry)
