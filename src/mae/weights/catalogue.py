"""The released MAE weights this library fetches by name, and how a name is read.

Names: ``official:<file stem>`` (the MAE team's release on dl.fbaipublicfiles.com), ``hf:<org>/<repo>[@<revision>]``
(any Hugging Face Hub repository; the catalogue knows facebook/vit-mae-*), ``timm:<tag>`` (the Hub repository
``timm/<tag>``). Facts (files, md5 prefixes, what each holds, top-1) come from the upstream README, FINETUNE.md and
demo notebook; a size or md5 prefix that was not published is None.
"""

from __future__ import annotations

from dataclasses import dataclass

from mae.errors import WeightsError

__all__ = ["CATALOGUE", "SOURCES", "WeightsEntry", "is_weights_name", "parse_name"]

SOURCES = ("official", "hf", "timm")
"""The name prefixes (``official:``, ``hf:``, ``timm:``): a path never starts with one (a Windows drive is one
letter)."""
NON_COMMERCIAL = "CC-BY-NC-4.0"


@dataclass(frozen=True)
class WeightsEntry:
    """One released weights file or Hub repository: where it lives and what it holds."""

    name: str  # "official:mae_pretrain_vit_base", "hf:facebook/vit-mae-base", "timm:vit_base_patch16_224.mae"
    source: str  # "official" | "hf" | "timm"
    location: str  # official: the path under the release prefix ("pretrain/..."); hf / timm: the Hub repo id
    holds: str  # "encoder" | "encoder+decoder" | "classifier"
    target: str | None  # the decoder's target: "pixel" | "norm_pixel" | None (unknown, or a classifier)
    architecture: str  # this library's registry name (`mae models`)
    licence: str  # what the weights are released under ("CC-BY-NC-4.0" for the MAE team's)
    size_bytes: int | None = None  # the download's exact size, where published
    md5_prefix: str | None = None  # the published md5 prefix (md5, not sha256: torch.hub's check_hash cannot use it)
    num_classes: int = 0  # 1000 for the fine-tuned ImageNet-1k classifiers
    reported: str | None = None  # the published result, with its source
    notes: str = ""


_ARCH = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16", "huge": "mae_vit_huge_patch14"}
_PRETRAIN_MD5 = {"base": "8cad7c", "large": "b8b06e", "huge": "9bdbb0"}
_FINETUNE_MD5 = {"base": "1b25e9", "large": "51f550", "huge": "2541f2"}
_TOP1 = {"base": "83.664", "large": "85.952", "huge": "86.928"}
_HF_FILES = {"base": "model.safetensors (pytorch_model.bin: 448 MB)", "large": "pytorch_model.bin, 1.32 GB",
             "huge": "pytorch_model.bin, 2.63 GB"}
_TIMM_TAGS = {"base": "vit_base_patch16_224.mae", "large": "vit_large_patch16_224.mae",
              "huge": "vit_huge_patch14_224.mae"}


def _official(folder: str, stem: str, holds: str, target: str | None, architecture: str, notes: str,
              md5_prefix: str | None = None, num_classes: int = 0, reported: str | None = None) -> WeightsEntry:
    return WeightsEntry(name=f"official:{stem}", source="official", location=f"{folder}/{stem}.pth", holds=holds,
                        target=target, architecture=architecture, licence=NON_COMMERCIAL, md5_prefix=md5_prefix,
                        num_classes=num_classes, reported=reported, notes=notes)


def _entries() -> list[WeightsEntry]:
    entries = []
    for size, arch in _ARCH.items():
        entries += [
            _official("pretrain", f"mae_pretrain_vit_{size}", holds="encoder", target="norm_pixel", architecture=arch,
                      md5_prefix=_PRETRAIN_MD5[size],
                      notes="encoder only; pre-trained 1600 epochs with norm_pix_loss (FINETUNE.md)"),
            _official("pretrain", f"mae_pretrain_vit_{size}_full", holds="encoder+decoder", target="norm_pixel",
                      architecture=arch, notes="encoder and decoder; the decoder reconstructs normalised pixels"),
            _official("finetune", f"mae_finetuned_vit_{size}", holds="classifier", target=None, architecture=arch,
                      md5_prefix=_FINETUNE_MD5[size], num_classes=1000,
                      reported=f"ImageNet-1k top-1 {_TOP1[size]} (FINETUNE.md)",
                      notes="fc_norm and a 1000-class head (global average pooling), no final norm"),
            _official("visualize", f"mae_visualize_vit_{size}", holds="encoder+decoder", target="pixel",
                      architecture=arch, notes="encoder and decoder with a pixel target: the demo notebook's"),
        ]
    entries.append(_official("visualize", "mae_visualize_vit_large_ganloss", holds="encoder+decoder", target="pixel",
                             architecture=_ARCH["large"],
                             notes="mae_visualize_vit_large trained with an extra GAN loss (demo notebook)"))
    for size, arch in _ARCH.items():
        repo = f"facebook/vit-mae-{size}"
        entries.append(WeightsEntry(
            name=f"hf:{repo}", source="hf", location=repo, holds="encoder+decoder", target="pixel", architecture=arch,
            licence=NON_COMMERCIAL,
            notes=f"transformers ViTMAEForPreTraining ({_HF_FILES[size]}), converted from mae_visualize_vit_{size}; "
                  f"licence conflict: the Hub card (written by Hugging Face, not the MAE team) says apache-2.0, "
                  f"the weights it converts are CC-BY-NC-4.0, which is recorded here"))
    for size, arch in _ARCH.items():
        tag = _TIMM_TAGS[size]
        entries.append(WeightsEntry(
            name=f"timm:{tag}", source="timm", location=f"timm/{tag}", holds="encoder", target="norm_pixel",
            architecture=arch, licence=NON_COMMERCIAL,
            notes=f"timm's copy of official:mae_pretrain_vit_{size} (encoder only, num_classes 0)"))
    return entries


CATALOGUE: dict[str, WeightsEntry] = {e.name: e for e in _entries()}
"""Every name `resolve_weights` knows, in the order `mae weights` lists them."""


def is_weights_name(text: str) -> bool:
    """Whether `text` names released weights (``official:``, ``hf:``, ``timm:``) rather than a path."""
    return isinstance(text, str) and text.split(":", 1)[0] in SOURCES and ":" in text


def parse_name(name: str) -> tuple[str, str, str | None, WeightsEntry | None]:
    """``(source, location, revision, entry)`` for a weights name: the official path or Hub repo id, the Hub
    revision (``hf:org/repo@rev``; None: the default branch) and the catalogue entry (None: an uncatalogued Hub
    repository). Raises `WeightsError` naming the closest valid names for an unknown official or timm name."""
    name = name.strip()
    source, _, rest = name.partition(":")
    if source not in SOURCES or not rest:
        raise WeightsError(f"'{name}' is not a weights name; names start with official:, hf: or timm: (e.g. "
                           f"official:mae_pretrain_vit_base; `mae weights` lists them)")
    if source == "hf":
        repo, _, revision = rest.partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")) or (revision == "" and "@" in rest):
            raise WeightsError(f"'{name}' is not a Hub name: expected hf:ORG/REPO or hf:ORG/REPO@REVISION (e.g. "
                               f"hf:facebook/vit-mae-base)")
        entry = CATALOGUE.get(f"hf:{repo}")
        return source, repo, revision or None, entry
    entry = CATALOGUE.get(name)
    if entry is None:
        raise _unknown(name, source)
    return source, entry.location, None, entry


def _unknown(name: str, source: str) -> WeightsError:
    # imported here, not at the top: `import mae` stays fast
    import difflib

    valid = [n for n, e in CATALOGUE.items() if e.source == source]
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5) or valid[:3]
    return WeightsError(f"unknown weights name '{name}'; closest: {', '.join(close)} (`mae weights` lists all "
                        f"{len(CATALOGUE)})")
