"""Checkpoints of sharded (FSDP) runs: `torch.distributed.checkpoint` (DCP) directories, written by every rank in
parallel, complete or absent, and loadable on any number of processes.

    runs/vit6b/
      checkpoint-0019/            the end of epoch 19 (numbered as the single-file checkpoint-0019.pth)
        .metadata                 DCP's index: every tensor's global shape, dtype and where its pieces are
        __0_0.distcp ...          one file per rank: that rank's shards of the weights and optimizer state
        meta.pt                   rank 0: the run layer's schema (format, version, kind, train_state, rng of every
                                  rank, config, data, versions, engine counters, recipe metadata), the file list
                                  with sizes, and a SHA-256 digest of all of it (``integrity``)
      checkpoint-step-00012345/   a checkpoint in the middle of an epoch (update 12345; replaced by the next save)
      checkpoint-last -> checkpoint-0019     symbolic links, moved atomically
      checkpoint-best -> checkpoint-0019

`DCPStore` is the `mae.train.checkpoint_store.CheckpointStore` of these directories.

**Atomic.** Every rank writes into ``.checkpoint-0019.tmp/``; when DCP's save returns (every rank's file written
and fsynced, ``.metadata`` written by the coordinator) rank 0 lists the files, writes ``meta.pt`` last, fsyncs and
renames the directory into place. A save killed at any point leaves only a ``.tmp`` directory, which is never read
and which the next save removes; the newest complete checkpoint stays the newest valid one.

**Finding the newest.** `DCPStore.load_latest` (called by `mae.train.checkpoint.load_latest` next to the other
stores) takes the complete directories, reads each one's ``meta.pt``, verifies its digest and that every listed file
is there with its size, and returns the one standing furthest in the run (epoch, batch).

**Resharding.** The tensors are stored as DCP shards with their global shapes; `DCPStore.restore` loads them into
the live model and optimizer whatever their sharding (2 processes -> 1, 8 -> 16, FSDP -> a plain module). The RNG
states are restored when the number of processes is the same (as for single-file checkpoints).

`read_state` gives a DCP checkpoint as a single-file state (the whole model on the CPU), so every reader of
checkpoints (``mae visualize``, ``finetune checkpoint=...``, ``mae convert``: `mae.train.checkpoint.safe_load`) takes
the directories too; `dcp_to_file` and `file_to_dcp` convert training checkpoints both ways (``mae convert --to
file|dcp``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from mae.errors import CheckpointError, OutputError
from mae.files import as_os_error, fix_for, fsync_dir
from mae.train.checkpoint_formats import kind_of_state
from mae.train.checkpoint_schema import atomic_save, first_nonfinite, safe_load_file, stamp, standing, verify_state
from mae.train.checkpoint_store import CheckpointStore, TrainingParts, nonfinite_save_error, single_file_state
from mae.train.distributed import DistInfo, all_gather_objects, on_main
from mae.train.file_store import FileStore

__all__ = ["META_NAME", "DCPStore", "dcp_to_file", "file_to_dcp", "is_dcp_checkpoint", "read_meta", "read_state"]

_log = logging.getLogger(__name__)

META_NAME = "meta.pt"
_DCP_INDEX = ".metadata"
_FINAL = re.compile(r"^checkpoint-(\d+|step-\d+)$")
_STATES = ("model", "optimizer")  # the tensor states every DCP checkpoint holds (plus the recipe's extra modules)


def is_dcp_checkpoint(path: str | Path) -> bool:
    """True for a DCP checkpoint directory written by this library (DCP's index and ``meta.pt`` present)."""
    path = Path(path)
    return path.is_dir() and (path / _DCP_INDEX).is_file() and (path / META_NAME).is_file()


# ---------------------------------------------------------------------------------------------------- reading
def read_meta(path: str | Path) -> dict[str, Any]:
    """The run-layer state of a DCP checkpoint (no tensors), verified: its digest, and every file it lists present
    with the size it had when written. CheckpointError names what is wrong."""
    path = Path(path)
    if not is_dcp_checkpoint(path):
        raise CheckpointError(f"'{path}' is not a complete DCP checkpoint (no {_DCP_INDEX} or {META_NAME}); use an "
                              f"earlier checkpoint")
    meta = safe_load_file(path / META_NAME)
    verify_state(meta, path)
    listed = (meta.get("dcp") or {}).get("files")
    if not isinstance(listed, dict):
        raise CheckpointError(f"'{path / META_NAME}' lists no files; it was not written by this library's DCP saver")
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint '{path}' is incomplete: '{name}' is missing; use an earlier checkpoint")
        if file.stat().st_size != size:
            raise CheckpointError(f"checkpoint '{path}' is damaged: '{name}' has {file.stat().st_size} bytes, "
                                  f"{size} were written; use an earlier checkpoint")
    return meta


def _tensor_template(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Empty CPU tensors of the global shapes and dtypes DCP's index records under `prefix` (e.g. 'model')."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = FileSystemReader(str(path)).read_metadata()
    out: dict[str, torch.Tensor] = {}
    for key, entry in index.state_dict_metadata.items():
        where = index.planner_data.get(key, ())
        if len(where) == 2 and where[0] == prefix and isinstance(entry, TensorStorageMetadata):
            out[where[1]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    return out


def read_state(path: str | Path) -> dict[str, Any]:
    """A DCP checkpoint as a single-file state on the CPU of one process: ``meta.pt``'s entries plus ``model`` (the
    whole model). Not the optimizer (`dcp_to_file` converts everything)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    meta = read_meta(path)
    model = _tensor_template(path, "model")
    try:
        with _one_process():
            dcp.load({"model": model}, checkpoint_id=str(path), no_dist=True)
    except _dcp_errors() as e:  # DCP wraps every failure of every rank in one CheckpointException
        raise CheckpointError(f"could not read the weights of '{path}': {_dcp_reason(e)}; use an earlier "
                              f"checkpoint") from None
    return {**{k: v for k, v in meta.items() if k not in ("dcp", "integrity")}, "model": model}


# ---------------------------------------------------------------------------------------------------- writing
class DCPStore(CheckpointStore):
    """The DCP checkpoints of a sharded run (see the module docstring): every rank writes its shards, rank 0 the
    run's record; any number of processes reads them back."""

    @property
    def last_path(self) -> Path:
        return self.output_dir / "checkpoint-last"

    @property
    def best_path(self) -> Path:
        return self.output_dir / "checkpoint-best"

    def path_for(self, epoch: int) -> Path:
        return self.output_dir / f"checkpoint-{epoch:04d}"

    # ------------------------------------------------------------------------------------------------ writing
    def save(self, state: dict[str, Any], epoch: int | None, is_best: bool = False,
             parts: TrainingParts | None = None) -> Path | None:
        """Write a checkpoint (a collective: every rank writes its shards); see `CheckpointStore.save`. `state` is
        the run's record (every schema key but ``model`` and ``engine``); `parts` are required, their tensors go
        into DCP's shards. A state with NaN or inf is refused on every rank and nothing is written."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if parts is None:
            raise TypeError("DCPStore.save writes the shards of live modules: pass parts=TrainingParts(...)")
        engine = parts.engine
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), is_main=rank == 0)
        model_state, optim_state = get_state_dict(parts.model, engine.optimizer)
        tensors = {"model": model_state, "optimizer": optim_state,
                   **{k: m.state_dict() for k, m in parts.extra.items()}}
        bad = first_nonfinite({k: _local(v) for k, v in tensors.items()})
        flags = [bad] if world == 1 else all_gather_objects(bad)
        bad = next((b for b in flags if b is not None), None)
        if bad is not None:
            raise nonfinite_save_error(bad, epoch, self.output_dir)
        step = int(engine.step)
        name = f"checkpoint-{epoch:04d}" if epoch is not None and self.keep_last != 0 else f"checkpoint-step-{step:08d}"
        final, tmp = self.output_dir / name, self.output_dir / f".{name}.tmp"

        def prepare() -> None:
            self._remove_temporaries()
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                raise OutputError(f"could not create '{tmp}': {e.strerror or e}; free space or change "
                                  f"--output-dir") from e

        on_main(prepare, info)
        try:
            dcp.save(tensors, storage_writer=FileSystemWriter(str(tmp), sync_files=True))
        except _dcp_errors() as e:  # a full disk on any rank fails the collective save on every rank
            raise OutputError(f"could not write checkpoint '{final}': {_dcp_reason(e)}; free space or change "
                              f"--output-dir (the previous checkpoint is kept)") from None

        def publish() -> Path:
            engine_meta = {k: v for k, v in engine.state_dict().items() if k != "optimizer"}
            _write_meta(tmp, state, engine_meta, world_size=world, states=sorted(tensors))
            self._replace(tmp, final)
            self._link(self.last_path, final)
            if is_best:
                self._link(self.best_path, final)
            self._prune()
            return final

        return on_main(publish, info)

    def _replace(self, tmp: Path, final: Path) -> None:
        """Rename the finished temporary directory to its name (a save at the same position replaces the old one)."""
        old = None
        try:
            if final.exists():
                old = final.with_name(f".{final.name}.old.tmp")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            raise OutputError(f"could not put checkpoint '{final}' in place: {e.strerror or e}; check "
                              f"'{final.parent}'") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _link(self, link: Path, target: Path) -> None:
        """Point `link` at `target` atomically (a relative symbolic link renamed over the old one)."""
        tmp = link.with_name(f".{link.name}.link.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(target.name, tmp)
            os.replace(tmp, link)
            fsync_dir(link.parent)
        except OSError as e:
            warnings.warn(f"could not point '{link.name}' at '{target.name}' ({e.strerror or e}); resume=auto still "
                          f"finds the newest checkpoint", stacklevel=3)

    def _targets(self) -> set[str]:
        out = set()
        for link in (self.last_path, self.best_path):
            if link.is_symlink():
                out.add(os.readlink(link))
        return out

    def _prune(self) -> None:
        """Drop mid-epoch directories that last and best no longer name, and numbered ones beyond `keep_last`."""
        keep = self._targets()
        numbered: list[Path] = []
        steps: list[Path] = []
        for path in self.output_dir.iterdir():
            match = _FINAL.match(path.name)
            if match and not path.is_symlink() and path.is_dir():
                (steps if match.group(1).startswith("step-") else numbered).append(path)
        doomed = [p for p in steps if p.name not in keep]
        if self.keep_last is not None:
            numbered.sort(key=lambda p: int(_FINAL.match(p.name).group(1)))  # type: ignore[union-attr]
            doomed += [p for p in numbered[: max(len(numbered) - self.keep_last, 0)] if p.name not in keep]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    def _remove_temporaries(self) -> None:
        """Directories of saves that were killed before their rename (never read; only this run writes here)."""
        if self.output_dir.is_dir():
            for path in self.output_dir.glob(".checkpoint-*.tmp"):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()

    # ------------------------------------------------------------------------------------------------ reading
    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
        """The complete DCP checkpoint of the directory standing furthest in the run, as (path, meta without
        tensors); damaged ones are skipped with a warning; None when there is none."""
        if not self.output_dir.is_dir():
            return None
        best: tuple[tuple[int, int, int], Path, dict[str, Any]] | None = None
        for path in self.output_dir.iterdir():
            if not _FINAL.match(path.name) or path.is_symlink() or not path.is_dir():
                continue
            try:
                meta = read_meta(path)
            except CheckpointError as e:
                warnings.warn(f"skipping damaged checkpoint '{path}': {e}", stacklevel=4)
                continue
            key = standing(meta)
            if best is None or key > best[0]:
                best = (key, path, meta)
        return None if best is None else (best[1], best[2])

    @classmethod
    def holds(cls, path: str | Path) -> bool:
        return is_dcp_checkpoint(path)

    @classmethod
    def read(cls, path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint's verified schema keys without tensors (`read_meta`): `restore` loads those in place."""
        return read_meta(path)

    @classmethod
    def restore(cls, path: str | Path, state: dict[str, Any], parts: TrainingParts) -> None:
        """Load the checkpoint into the live (sharded or plain) model, the engine's optimizer and counters, and the
        extra modules, resharding as needed; a collective under FSDP (every rank calls it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        meta = read_meta(path)
        model_state, optim_state = get_state_dict(parts.model, parts.engine.optimizer)
        extra = {k: m.state_dict() for k, m in parts.extra.items() if k in meta["dcp"]["states"]}
        tensors: dict[str, Any] = {"model": model_state, "optimizer": optim_state, **extra}
        try:
            with _one_process():  # a plain single-process run may resume a sharded run's checkpoint
                dcp.load(tensors, checkpoint_id=str(path))
        except _dcp_errors() as e:
            raise CheckpointError(f"'{path}' does not fit this run's model and optimizer ({_dcp_reason(e)}); resume "
                                  f"with the model settings and optimizer of the run that wrote it") from None
        set_state_dict(parts.model, parts.engine.optimizer, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optimizer"])
        for key in extra:
            parts.extra[key].load_state_dict(tensors[key])
        parts.engine.load_state_dict(meta["engine"])


def _write_meta(directory: Path, record: dict[str, Any], engine: dict[str, Any], *, world_size: int,
                states: list[str]) -> None:
    """Write ``meta.pt`` into a finished temporary checkpoint directory, last: the run's record, the engine's
    counters, the file list with sizes and the digest of it all (the one place a DCP checkpoint's meta is built)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != META_NAME}
    meta = {**record, "engine": engine, "dcp": {"files": files, "world_size": world_size, "states": states}}
    atomic_save(stamp(meta), directory / META_NAME)
    fsync_dir(directory)


def _local(obj: Any) -> Any:
    """`obj` with every DTensor replaced by this rank's shard (for the NaN check, which must not communicate)."""
    if hasattr(obj, "to_local") and isinstance(obj, torch.Tensor):
        return obj.to_local()  # type: ignore[attr-defined]  # a DTensor (hasattr above); torch types it as a Tensor
    if isinstance(obj, dict):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_local(v) for v in obj]
    return obj


@contextlib.contextmanager
def _one_process():
    """DCP in a single process (reading or converting outside a run): DCP says so in a warning, every time."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """What a DCP load or save raises: its CheckpointException (which gathers every rank's failure) and the errors
    of one process."""
    from torch.distributed.checkpoint import CheckpointException

    return (CheckpointException, OSError, RuntimeError, ValueError, KeyError)


def _failure(e: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (whose text is every rank's traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _dcp_reason(e: BaseException) -> str:
    """The reason a DCP operation failed, in one line: the first rank's own error, errno's words for an OSError."""
    e = _failure(e)
    if isinstance(e, OSError) and e.strerror:  # errno's own words: "No space left on device"
        return e.strerror
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- converting
def dcp_to_file(src: str | Path, dst: str | Path) -> Path:
    """A DCP training checkpoint as one ``.pth`` file in the single-file layout (`FileStore`'s, with its digest): the
    whole model, the optimizer state keyed by parameter index, every schema key. Runs in one process; needs the whole
    state in memory once."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src, dst = Path(src), Path(dst)
    meta = read_meta(src)
    with tempfile.TemporaryDirectory(prefix=".mae-convert-", dir=dst.parent if dst.parent.is_dir() else None) as tmp:
        plain = Path(tmp) / "state.pt"
        try:
            with _one_process():
                dcp_to_torch_save(str(src), str(plain))
        except _dcp_errors() as e:  # torch.save's zip writer on a full disk: RuntimeError "unexpected pos"
            cause = _failure(e)
            cause = as_os_error(cause, plain) if isinstance(cause, Exception) else cause
            if not isinstance(cause, OSError):
                raise
            raise OutputError(f"could not write '{dst}': {_dcp_reason(cause)}; {fix_for(cause)}") from None
        try:
            tensors = safe_load_file(plain)
        except CheckpointError as e:  # e.g. NaN weights: name the checkpoint, not the temporary file
            raise CheckpointError(str(e).replace(str(plain), str(src))) from None
    engine = {**meta["engine"], "optimizer": _optimizer_by_index(tensors["optimizer"], src)}
    record = {k: v for k, v in meta.items() if k not in ("dcp", "integrity")}
    state = single_file_state(record, model=tensors["model"], engine=engine,
                              extra={k: tensors[k] for k in meta["dcp"]["states"] if k not in _STATES})
    return atomic_save(stamp(state), dst)


def file_to_dcp(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """A single-file training checkpoint as a DCP directory that a sharded run resumes from (any number of
    processes); written into a temporary directory and renamed into place. With `overwrite`, an earlier DCP
    checkpoint (or an empty folder) at `dst` is replaced whole; nothing else is. Runs in one process."""
    import torch.distributed.checkpoint as dcp

    src, dst = Path(src), Path(dst)
    state = read_meta(src) if is_dcp_checkpoint(src) else FileStore.read(src)  # a DCP one is refused just below
    if "engine" not in state or "model" not in state or "train_state" not in state:
        kind = kind_of_state(state)
        what = kind.what(src) if kind is not None and kind.format is None else (
            f"'{src}' is not a training checkpoint (no model, engine or train_state)")
        raise CheckpointError(f"{what}; a DCP checkpoint resumes a run, so convert the run's checkpoint-last.pth")
    if dst.exists() and not (overwrite and (is_dcp_checkpoint(dst) or (dst.is_dir() and not any(dst.iterdir())))):
        raise CheckpointError(f"'{dst}' exists; choose a new directory for the DCP checkpoint (overwrite replaces "
                              f"only an earlier DCP checkpoint)")
    engine = dict(state["engine"])
    tensors = {"model": state["model"], "optimizer": _optimizer_by_name(engine.pop("optimizer"), src)}
    extra = {k: state[k] for k in ("model_ema",) if isinstance(state.get(k), dict)}
    tensors.update(extra)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            with _one_process():
                dcp.save(tensors, checkpoint_id=str(tmp), no_dist=True)
        except _dcp_errors() as e:
            cause = _failure(e)
            fix = fix_for(cause) if isinstance(cause, OSError) else "free space or choose another place"
            raise OutputError(f"could not write '{dst}': {_dcp_reason(e)}; {fix}") from None
        record = {k: v for k, v in state.items() if k not in ("model", "engine", "integrity", *extra)}
        _write_meta(tmp, record, engine, world_size=1, states=sorted(tensors))
    except BaseException:  # a full disk at meta.pt, a signal: no half-written checkpoint folder is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():  # overwrite: the earlier checkpoint moves aside, the new one takes its name, then the old goes
        old = dst.with_name(f".{dst.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def _optimizer_by_index(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """DCP's optimizer state (keyed by parameter name) in ``torch.optim.Optimizer.state_dict``'s layout (parameters
    numbered group by group, as the optimizer numbers them)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        names = list(group["params"])
        ids = [index.setdefault(name, len(index)) for name in names]
        groups.append({**group, "params": ids, "param_names": names})
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise CheckpointError(f"'{path}': optimizer state for parameters in no group ({unknown[:3]})")
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _optimizer_by_name(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """The inverse of `_optimizer_by_index`: a torch optimizer state dict keyed by the parameter names each group
    records (``param_names``, which `mae.train.optim.param_groups` sets)."""
    names: dict[int, str] = {}
    groups = []
    for group in state["param_groups"]:
        if len(group.get("param_names") or ()) != len(group["params"]):
            raise CheckpointError(f"'{path}': its optimizer groups do not name their parameters (param_names), so "
                                  f"its state cannot be matched to a sharded model; resume it with "
                                  f"distributed.strategy=ddp")
        names.update(zip(group["params"], group["param_names"], strict=True))
        groups.append({**group, "params": list(group["param_names"])})
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}

