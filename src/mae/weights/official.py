"""The MAE team's release files: downloaded once per cache, checked, recorded, re-checked on demand.

A download holds a file lock (``<file>.lock``: the eight processes of one job download once, the others wait and
use the file), streams into a temporary file next to the target through the one atomic writer (`mae.files`), checks
the byte count against Content-Length and the md5 against the published prefix (md5, not sha256: torch.hub's
``check_hash`` cannot use these), then renames it into place and records its sha256, md5, size and URL in
``<file>.json``. Any failure (HTTP error, timeout, cut transfer, wrong bytes, full disk) is one `WeightsError` line
and leaves nothing half-written; the next try starts clean. File locks are no-ops on some network file systems
(NFS, Lustre): there, download once before launching many processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from mae.errors import OutputError, WeightsError, first_line
from mae.files import atomic_write_path, is_stale_temporary, reason_of, write_json
from mae.version import __version__
from mae.weights.catalogue import WeightsEntry
from mae.weights.settings import (
    cache_home,
    download_timeout,
    is_offline,
    mirror,
    official_path,
    official_url,
    offline_variable,
)

__all__ = ["Record", "cached_official", "fetch_official", "read_record", "record_path", "verify_official"]

_log = logging.getLogger(__name__)
CHUNK = 1 << 20
RECORD_SUFFIX = ".json"


@dataclass(frozen=True)
class Record:
    """What was recorded of a cached file when it entered the cache."""

    sha256: str
    md5: str
    size: int
    url: str  # "" for a file found in the cache (copied in by hand)
    downloaded: str = ""  # UTC time, ISO 8601


def record_path(path: Path) -> Path:
    """``mae_pretrain_vit_base.pth`` -> ``mae_pretrain_vit_base.pth.json``."""
    return path.with_name(path.name + RECORD_SUFFIX)


def read_record(path: Path) -> Record | None:
    """The record of a cached file; None when it is missing or unreadable."""
    try:
        values = json.loads(record_path(path).read_text(encoding="utf-8"))
        record = Record(**{k: values[k] for k in ("sha256", "md5", "size", "url")},
                        downloaded=str(values.get("downloaded", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record.size, int) and isinstance(record.sha256, str) else None


def cached_official(entry: WeightsEntry) -> tuple[Path, Record] | None:
    """The cached file and its record, when both are there and agree on the size (no hashing: fast)."""
    path = official_path(entry.location)
    try:
        size = path.stat().st_size if path.is_file() else -1
    except OSError:
        return None
    record = read_record(path) if size >= 0 else None
    return (path, record) if record is not None and record.size == size else None


def fetch_official(entry: WeightsEntry) -> tuple[Path, Record]:
    """The cached file of `entry` and its record: from the cache, else downloaded (see the module docstring)."""
    hit = cached_official(entry)
    if hit is not None:
        return hit
    path = official_path(entry.location)
    if is_offline() and not path.is_file():
        raise _offline_error(entry, path)
    # imported here, not at the top: `import mae` stays fast
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            _log.info("waiting: another process is downloading %s", path)
            lock.acquire()
    except OSError as e:
        raise _disk_error(entry, path, e) from None
    try:
        return _fill_cache(entry, path)
    finally:
        lock.release()


def _fill_cache(entry: WeightsEntry, path: Path) -> tuple[Path, Record]:
    """Under the lock: the file another process just finished, a file copied in by hand (checked, then recorded),
    or a fresh download."""
    hit = cached_official(entry)
    if hit is not None:
        return hit
    _remove_stale_temporaries(path)
    if path.is_file() and read_record(path) is None:  # copied in by hand: check it and record it
        return path, _adopt(entry, path)
    if path.is_file():
        if is_offline():
            raise WeightsError(f"the cached {entry.name} ('{path}') is not the size recorded when it was downloaded "
                               f"(a damaged copy); with network, run `mae weights download {entry.name}` again")
        _log.warning("the cached %s is not the size recorded at download: downloading it again", path)
    elif is_offline():
        raise _offline_error(entry, path)
    record_path(path).unlink(missing_ok=True)  # a record without its file
    return path, _download(entry, path)


def _download(entry: WeightsEntry, path: Path) -> Record:
    url = official_url(entry.location)
    timeout = download_timeout()
    failure: list[WeightsError] = []
    done: list[Record] = []

    def fill(tmp: Path) -> None:
        try:
            done.append(_stream(entry, url, tmp, timeout))
        except WeightsError as e:  # kept aside: the atomic writer turns what it does not know into a write error
            failure.append(e)
            raise _Abandoned from None

    _log.info("downloading %s from %s to %s", entry.name, url, path)
    try:
        atomic_write_path(path, fill)
    except _Abandoned:
        raise failure[0] from None
    except OutputError as e:  # a full disk, a read-only cache: the temporary file is already gone
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else OSError(str(e))
        raise _disk_error(entry, path, cause) from None
    _save_record(entry, path, done[0])
    return done[0]


class _Abandoned(Exception):
    """A download that failed for a reason already written as a `WeightsError` (no message: the atomic writer
    passes it on unchanged)."""


def _stream(entry: WeightsEntry, url: str, tmp: Path, timeout: float) -> Record:
    """Copy `url` into `tmp`, hashing as it goes; the checks that make a download complete and the right file."""
    # imported here, not at the top: `import mae` stays fast
    import http.client
    import urllib.error
    import urllib.request

    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": f"mae/{__version__}"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise _http_error(entry, url, e.code, str(e.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, refused, timeout, bad URL
        raise _network_error(entry, url, e, timeout) from None
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    received = 0
    with response, open(tmp, "wb") as f:
        length = _int(response.headers.get("Content-Length"))
        with tqdm(total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.name, file=sys.stderr,
                  disable=None, leave=False) as bar:  # disable=None: no bar when stderr is not a terminal
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, http.client.HTTPException) as e:  # a reset, a timeout, IncompleteRead
                    raise _network_error(entry, url, e, timeout, received, length) from None
                if not chunk:
                    break
                f.write(chunk)  # an OSError here (a full disk) reaches the atomic writer as one
                md5.update(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if length is not None and received != length:
        raise _cut(entry, url, received, length)
    expected = entry.size_bytes
    if expected is not None and received != expected:
        raise WeightsError(f"{entry.name} from {url} is {received} bytes, not the published {expected}: a "
                           f"truncated or different file; nothing was kept, run again (or check MAE_WEIGHTS_MIRROR)")
    got = md5.hexdigest()
    if entry.md5_prefix and not got.startswith(entry.md5_prefix):
        raise WeightsError(f"{entry.name} from {url} has md5 {got[:12]}..., not the published prefix "
                           f"{entry.md5_prefix}: a corrupt download or another file; nothing was kept, run again "
                           f"(or check MAE_WEIGHTS_MIRROR)")
    return Record(sha256.hexdigest(), got, received, url, _now())


def _save_record(entry: WeightsEntry, path: Path, record: Record) -> None:
    try:
        write_json(record_path(path), asdict(record))
    except OutputError as e:  # the file without its record would be taken for a copy: remove it, nothing half-done
        path.unlink(missing_ok=True)
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else OSError(str(e))
        raise _disk_error(entry, path, cause) from None


def _adopt(entry: WeightsEntry, path: Path) -> Record:
    """A file put in the cache by hand (a copy from a machine with network): checked against what was published,
    then recorded like a download."""
    sha256, md5, size = digests(path)
    problem = _published_mismatch(entry, md5, size)
    if problem:
        raise WeightsError(f"'{path}' in the cache {problem}; delete it and run `mae weights download "
                           f"{entry.name}` (or copy the right file)")
    return _write_found(path, Record(sha256, md5, size, "", _now()))


def _write_found(path: Path, record: Record) -> Record:
    try:
        write_json(record_path(path), asdict(record))
    except OutputError as e:  # a read-only copy of a cache: use the file, record nothing
        _log.warning("could not record the checksum of %s: %s", path, first_line(e))
    return record


def _published_mismatch(entry: WeightsEntry, md5: str, size: int) -> str:
    """What is wrong with a file against the published md5 prefix and size ("" when nothing is, or nothing was
    published)."""
    if entry.md5_prefix and not md5.startswith(entry.md5_prefix):
        return f"has md5 {md5[:12]}..., not the published prefix {entry.md5_prefix}"
    if entry.size_bytes is not None and size != entry.size_bytes:
        return f"is {size} bytes, not the published {entry.size_bytes}"
    return ""


def digests(path: Path) -> tuple[str, str, int]:
    """``(sha256, md5, size)`` of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return sha256.hexdigest(), md5.hexdigest(), size


def verify_official(entry: WeightsEntry) -> tuple[bool, str]:
    """Re-read a cached file: its sha256 against the one recorded at download, its md5 against the published prefix.
    ``(ok, what was checked or what is wrong)``; a file with no record is checked and recorded now."""
    path = official_path(entry.location)
    if not path.is_file():
        return False, f"not cached; run `mae weights download {entry.name}`"
    try:
        sha256, md5, size = digests(path)
    except OSError as e:
        return False, f"cannot read '{path}': {reason_of(e)}"
    record = read_record(path)
    problems = []
    if record is not None and record.sha256 != sha256:
        problems.append(f"sha256 {sha256[:12]}... differs from the {record.sha256[:12]}... recorded at download")
    mismatch = _published_mismatch(entry, md5, size)
    if mismatch:
        problems.append(mismatch)
    if problems:
        return False, f"'{path}': {'; '.join(problems)}: delete it and run `mae weights download {entry.name}`"
    checked = [f"sha256 {sha256[:12]}... " + ("as recorded" if record is not None else "recorded now")]
    if record is None:
        _write_found(path, Record(sha256, md5, size, "", _now()))
    if entry.md5_prefix:
        checked.append(f"md5 prefix {entry.md5_prefix} as published")
    return True, f"{', '.join(checked)} ({size} bytes, '{path}')"


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of a download whose process is gone (killed mid-transfer): removed before a new one."""
    prefix = f".{path.name}."
    try:
        stale = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and is_stale_temporary(p)]
    except OSError:
        return
    for p in stale:
        p.unlink(missing_ok=True)


def _offline_error(entry: WeightsEntry, path: Path) -> WeightsError:
    return WeightsError(f"{entry.name} is not in the cache ('{path}') and {offline_variable()}=1 forbids downloading; "
                        f"on a machine with network run `mae weights download {entry.name}`, then copy its cache "
                        f"folder ($MAE_HOME, here '{cache_home()}') to this machine or set MAE_HOME to the copy")


def _http_error(entry: WeightsEntry, url: str, code: int, reason: str) -> WeightsError:
    if code == 404:
        where = "the release may have moved: set MAE_WEIGHTS_MIRROR to a copy that has it" \
            if "MAE_WEIGHTS_MIRROR" not in os.environ else f"check MAE_WEIGHTS_MIRROR (now '{mirror()}')"
        return WeightsError(f"{entry.name} was not found at {url} (HTTP 404); {where}")
    return WeightsError(f"downloading {entry.name} from {url} failed: HTTP {code} {reason}; run again later, or set "
                        f"MAE_WEIGHTS_MIRROR to a copy of the release")


def _network_error(entry: WeightsEntry, url: str, e: BaseException, timeout: float, received: int = 0,
                   length: int | None = None) -> WeightsError:
    reason = getattr(e, "reason", None)
    if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
        return WeightsError(f"downloading {entry.name} from {url} timed out: nothing received for {timeout:g} s "
                            f"(MAE_DOWNLOAD_TIMEOUT); nothing was kept: check the network or the proxy (https_proxy), "
                            f"or raise MAE_DOWNLOAD_TIMEOUT, and run again")
    if received or type(e).__name__ == "IncompleteRead":
        return _cut(entry, url, received, length)
    cause = reason if isinstance(reason, BaseException) else e
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause) or str(reason or "")
    text = text or type(e).__name__
    return WeightsError(f"could not download {entry.name} from {url}: {text}; check the network, the proxy "
                        f"(https_proxy) or MAE_WEIGHTS_MIRROR, and run again")


def _cut(entry: WeightsEntry, url: str, received: int, length: int | None) -> WeightsError:
    of = f" of {length}" if length is not None else ""
    return WeightsError(f"the download of {entry.name} from {url} was cut short ({received}{of} bytes); nothing was "
                        f"kept: run again")


def _disk_error(entry: WeightsEntry, path: Path, e: OSError) -> WeightsError:
    return WeightsError(f"could not write {entry.name} to '{path}': {reason_of(e)}; nothing was kept: free some space "
                        f"there, or set MAE_HOME to a writable folder on a larger disk, and run again")


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _now() -> str:
    # imported here, not at the top: `import mae` stays fast
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")
