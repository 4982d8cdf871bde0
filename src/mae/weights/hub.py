"""Hugging Face Hub repositories (``hf:org/repo[@revision]``, ``timm:<tag>``) through huggingface_hub's own cache.

Only what `mae.interop.read_checkpoint` needs is fetched, one file at a time with ``hf_hub_download``: config.json,
then model.safetensors, else pytorch_model.bin (as timm does; the large and huge facebook/vit-mae repositories have
only the .bin on main). Downloading the whole repository would also fetch the TensorFlow file and both weight
formats. huggingface_hub brings the lock, the atomic move, the progress bar and the settings ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_OFFLINE`` and the proxies (``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when it is first
imported). It does not check what it downloaded; `verify_hub` does: a blob's name is its ETag, the sha256 of an LFS
file or the git blob sha1 of a small one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from mae.errors import WeightsError, first_line
from mae.files import reason_of
from mae.version import __version__
from mae.weights.settings import is_offline, offline_variable

__all__ = ["CONFIG_FILE", "WEIGHT_FILES", "cached_hub", "fetch_hub", "verify_hub"]

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


def fetch_hub(name: str, repo: str, revision: str | None) -> tuple[Path, str]:
    """``(snapshot folder, checksum)`` of a Hub repository's config.json and weights, from the cache or downloaded;
    offline (``MAE_OFFLINE`` / ``HF_HUB_OFFLINE``) only from the cache. Every failure is one `WeightsError`."""
    # imported here, not at the top: huggingface_hub (and its HTTP client) take a while to import
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    offline = is_offline()
    try:
        config = _download(repo, CONFIG_FILE, revision, offline)
        weights = _first_weights(repo, revision, offline)
        if weights is None:
            raise WeightsError(f"{name}: '{repo}' holds neither {' nor '.join(WEIGHT_FILES)}"
                               + (" in the cache" if offline else ""))
        if config.parent != weights.parent:  # the repository moved on between the two files: take its config too
            config = _download(repo, CONFIG_FILE, weights.parent.name, offline)
    except WeightsError:
        raise
    except hub.LocalEntryNotFoundError as e:
        if offline:
            raise _offline_error(name, constants.HF_HUB_CACHE) from None
        raise WeightsError(f"could not reach {constants.ENDPOINT} for {name}, and it is not cached "
                           f"({_reason(e)}); check the network, HF_ENDPOINT or the proxy (https_proxy), and run "
                           f"again") from None
    except hub.RevisionNotFoundError:
        raise WeightsError(f"{name}: '{repo}' has no revision '{revision}' on {constants.ENDPOINT}") from None
    except hub.RepositoryNotFoundError:  # also a gated or private repository
        raise WeightsError(f"{name}: no repository '{repo}' on {constants.ENDPOINT} (or it is private or gated: "
                           f"log in with `hf auth login`); check the name") from None
    except hub.EntryNotFoundError:  # on the Hub (the local kind is handled above)
        raise WeightsError(f"{name}: '{repo}' has no {CONFIG_FILE}, so it is not a transformers or timm model "
                           f"folder") from None
    except hub.HfHubHTTPError as e:
        raise WeightsError(f"{name}: {first_line(e)}; run again later") from None
    except (ValueError, hub.HFValidationError) as e:  # a malformed repo id or revision
        raise WeightsError(f"'{name}': {first_line(e)}") from None
    except OSError as e:  # a full disk or a read-only cache while huggingface_hub writes
        raise WeightsError(f"could not write {name} into '{constants.HF_HUB_CACHE}': {reason_of(e)}; free "
                           f"some space there, or set HF_HOME to a writable folder on a larger disk, and run "
                           f"again") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
            raise
        raise WeightsError(f"could not download {name} from {constants.ENDPOINT}: {type(e).__name__}: "
                           f"{first_line(e)}; check the network, HF_ENDPOINT or the proxy, and run again") from None
    return weights.parent, _checksum(weights)


def _download(repo: str, filename: str, revision: str | None, offline: bool) -> Path:
    # imported here, not at the top: huggingface_hub (and its HTTP client) take a while to import
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=offline, library_name="mae",
                                library_version=__version__))


def _first_weights(repo: str, revision: str | None, offline: bool) -> Path | None:
    """The first of `WEIGHT_FILES` the repository has (offline: that the cache has)."""
    # imported here, not at the top: huggingface_hub (and its HTTP client) take a while to import
    from huggingface_hub import errors as hub

    for filename in WEIGHT_FILES:
        try:
            return _download(repo, filename, revision, offline)
        except hub.LocalEntryNotFoundError:  # offline: not in the cache; online: the Hub cannot be reached
            if not offline:
                raise
        except hub.EntryNotFoundError:  # the repository has no such file
            continue
    return None


def cached_hub(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder holding the cached config.json and weights of `repo`, or None (never the network)."""
    # imported here, not at the top: huggingface_hub (and its HTTP client) take a while to import
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, CONFIG_FILE, revision=revision)
    if not isinstance(config, str):
        return None
    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(found, str) and Path(found).parent == Path(config).parent:
            return Path(found).parent
    return None


def verify_hub(name: str, repo: str, revision: str | None) -> tuple[bool, str]:
    """Re-read every file of a cached snapshot against its blob name (the ETag the Hub sent): the sha256 of an LFS
    file, the git blob sha1 of a small one. ``(ok, what was checked or what is wrong)``."""
    folder = cached_hub(repo, revision)
    if folder is None:
        return False, f"not cached; run `mae weights download {name}`"
    checked: list[str] = []
    bad: list[str] = []
    for file in sorted(folder.iterdir()):
        etag = file.resolve().name
        try:
            if _SHA256.fullmatch(etag):
                ok, kind = _hash_file(file, hashlib.sha256()) == etag, "sha256"
            elif _SHA1.fullmatch(etag):
                ok, kind = _git_blob_sha1(file) == etag, "git sha1"
            else:
                continue  # an ETag that is neither: nothing to compare with
        except OSError as e:
            bad.append(f"cannot read '{file}': {reason_of(e)}")
            continue
        (checked if ok else bad).append(f"{file.name} ({kind})" if ok else
                                        f"{file.name} does not match its {kind} {etag[:12]}...")
    if bad:
        return False, (f"{'; '.join(bad)}: delete '{folder}' (and its blobs: `hf cache delete`) and run "
                       f"`mae weights download {name}`")
    if not checked:
        return False, f"nothing to check in '{folder}' (no file has a sha256 or git sha1 ETag)"
    return True, f"{', '.join(checked)} as the Hub named them ('{folder}')"


def _hash_file(path: Path, digest: Any) -> str:  # digest: a hashlib object
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """The id git gives a file's content: sha1 of ``blob <size>\\0`` then the bytes (the Hub's ETag of a non-LFS
    file)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"blob {path.stat().st_size}\0".encode())
    return _hash_file(path, digest)


def _checksum(weights: Path) -> str:
    etag = weights.resolve().name
    return f"sha256:{etag}" if _SHA256.fullmatch(etag) else f"etag:{etag}"


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return first_line(cause) if cause is not None else first_line(e)


def _offline_error(name: str, cache: str) -> WeightsError:
    return WeightsError(f"{name} is not in the Hugging Face cache ('{cache}') and {offline_variable()}=1 forbids "
                        f"downloading; on a machine with network run `mae weights download {name}`, then copy its "
                        f"Hugging Face cache ($HF_HOME/hub) to this machine or set HF_HOME to the copy")
