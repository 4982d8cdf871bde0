"""Tar shards: ``mae prepare`` (folder -> shards + index.json) and the ``shards:`` loader (epoch plan, ranks and
workers, exact mid-epoch resume, corrupt members, specs)."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae import cli
from mae.data import (
    UNLABELED,
    build_loader,
    build_shard_dataset,
    build_shard_loader,
    build_transform,
    resolve_shards,
    set_epoch,
    shard_writer,
    skipped_files,
)
from mae.data.shard_writer import PROGRESS_NAME, write_shards
from mae.data.shards import expand_braces, plan_epoch
from mae.errors import ConfigError, DataError, MAEError

pytestmark = pytest.mark.filterwarnings("ignore:skipping corrupt:UserWarning")


# ---------------------------------------------------------------- helpers

def _jpeg(rng: np.random.Generator, h: int = 12, w: int = 10) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _class_tree(root: Path, counts: dict[str, dict[str, int]]) -> dict[str, set[bytes]]:
    """``root/<split>/<class>/<i>.jpg`` (every third a PNG, one large JPEG per class); the JPEG bytes per split."""
    rng = np.random.default_rng(0)
    written: dict[str, set[bytes]] = {}
    for split, classes in counts.items():
        written[split] = set()
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                if i % 3 == 2:
                    Image.fromarray(rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)).save(folder / f"{i}.png")
                else:
                    data = _jpeg(rng, 60, 80) if i == 0 else _jpeg(rng)
                    (folder / f"{i}.jpg").write_bytes(data)
                    written[split].add(data)
    return written


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _id_shards(root: Path, counts: list[int], corrupt: tuple[int, ...] = ()) -> Path:
    """Shards whose sample i carries label i (so batches say which samples they hold), with an index.json."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s, n in enumerate(counts):
        name = f"train-{s:06d}.tar"
        with tarfile.open(root / name, "w") as tar:
            for _ in range(n):
                for ext, data in (("jpg", b"not a jpeg" if i in corrupt else _jpeg(rng)), ("cls", str(i).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        shards.append({"name": name, "samples": n})
    index = {"splits": {"train": {"shards": shards, "samples": i, "classes": [str(k) for k in range(i)],
                                  "labelled": True}}}
    (root / "index.json").write_text(json.dumps(index))
    return root


def _no_pixels(image) -> torch.Tensor:
    """A transform for tests that only look at which samples a batch holds (their labels)."""
    return torch.zeros(1)


def _python_and_numpy_draws(image) -> torch.Tensor:
    """A transform that draws from python's and numpy's global RNGs (as some augmentation libraries do)."""
    return torch.tensor([random.random(), float(np.random.rand())], dtype=torch.float64)


def _labels(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


def _equal_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(p, q, strict=True))
                                    for p, q in zip(a, b, strict=True))


# ---------------------------------------------------------------- mae prepare

def test_prepare_a_class_tree_writes_class_mixed_shards_per_split_with_index_labels_and_skips(tmp_path):
    """train/ and val/ each become <split>-NNNNNN.tar shards of at most shard_size samples; index.json lists every
    shard with its count, the classes and the settings; .cls holds the class index; a corrupt source image is
    skipped and counted; small JPEGs are copied byte for byte and nothing is left longer than short_side."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    sources = _class_tree(src, {"train": {"cat": 7, "dog": 5}, "val": {"cat": 2, "dog": 3}})
    (src / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    index = write_shards(src, dst, shard_size=4, short_side=32, progress=False)

    assert sorted(p.name for p in dst.iterdir()) == ["index.json", "train-000000.tar", "train-000001.tar",
                                                      "train-000002.tar", "val-000000.tar", "val-000001.tar"]
    assert json.loads((dst / "index.json").read_text()) == json.loads(json.dumps(index))
    train, val = index["splits"]["train"], index["splits"]["val"]
    assert [s["samples"] for s in train["shards"]] == [4, 4, 4] and train["samples"] == 12
    assert [s["samples"] for s in val["shards"]] == [4, 1] and val["samples"] == 5
    assert train["classes"] == val["classes"] == ["cat", "dog"] and train["labelled"]
    assert (train["skipped"], train["skipped_files"]) == (1, [os.path.join("dog", "broken.jpg")])
    assert index["made_by"]["short_side"] == 32 and index["made_by"]["shard_size"] == 4
    labels, copied, first_shard_labels = [], 0, set()
    for shard in train["shards"]:
        members = _members(dst / shard["name"])
        assert [n.split(".")[1] for n, _ in members] == ["jpg", "cls"] * shard["samples"]
        for (jpg, data), (cls, label) in zip(members[::2], members[1::2], strict=True):
            assert jpg.split(".")[0] == cls.split(".")[0]
            labels.append(int(label.decode("ascii")))
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "JPEG" and min(image.size) <= 32
            copied += data in sources["train"]
            if shard["name"] == "train-000000.tar":
                first_shard_labels.add(labels[-1])
    assert sorted(labels) == [0] * 7 + [1] * 5
    assert copied == 7  # the small JPEGs; the two 60 x 80 ones and the three PNGs were re-encoded
    assert train["reencoded"] == 5
    assert first_shard_labels == {0, 1}  # shuffled before sharding: class-mixed


def test_prepare_a_flat_recursive_folder_gives_one_unlabelled_split(tmp_path):
    """A folder without class sub-folders (no first-level folder holds images itself) becomes one 'train' split
    without .cls members, read recursively;
    the loader reads its labels as -1."""
    rng = np.random.default_rng(2)
    for rel in ("a.jpg", "deep/er/b.jpg", "more/c.d/c.jpg", "d.jpg", "deep/er/e.jpg"):
        (tmp_path / "flat" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "flat" / rel).write_bytes(_jpeg(rng))
    index = write_shards(tmp_path / "flat", tmp_path / "out", shard_size=2, progress=False)
    assert list(index["splits"]) == ["train"]
    entry = index["splits"]["train"]
    assert entry["samples"] == 5 and len(entry["shards"]) == 3 and entry["classes"] == [] and not entry["labelled"]
    assert all(name.endswith(".jpg") for s in entry["shards"] for name, _ in _members(tmp_path / "out" / s["name"]))
    dataset = build_shard_dataset(f"shards:{tmp_path / 'out'}")
    assert {dataset[i][1] for i in range(len(dataset))} == {UNLABELED}


def test_webdataset_reads_the_shards_we_write(tmp_path):
    """The webdataset package (another reader) sees every sample with its key, JPEG and class."""
    wds = pytest.importorskip("webdataset")
    _class_tree(tmp_path / "src", {"train": {"a": 4, "b": 3}})
    index = write_shards(tmp_path / "src" / "train", tmp_path / "dst", shard_size=3, progress=False)
    urls = [str(tmp_path / "dst" / s["name"]) for s in index["splits"]["train"]["shards"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 7
    assert sorted(int(s["cls"]) for s in samples) == [0, 0, 0, 0, 1, 1, 1]
    assert all(isinstance(s["jpg"], Image.Image) and s["__key__"].isdigit() for s in samples)


def test_a_killed_prepare_leaves_no_index_and_a_rerun_continues_to_the_same_shards(tmp_path, monkeypatch):
    """Killed in the middle: finished shards are in place, no index.json, no half-written shard under its name;
    rerunning continues after the last finished shard (those are not rewritten) and gives the same bytes as an
    uninterrupted run; a rerun with other settings rewrites cleanly (stale shard names removed)."""
    src = tmp_path / "src"
    _class_tree(src, {"train": {"a": 6, "b": 5}})
    clean = write_shards(src, tmp_path / "clean", shard_size=3, progress=False)

    encode, calls = shard_writer._encode_task, []

    def dies_after_seven(task):
        calls.append(task)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return encode(task)

    monkeypatch.setattr(shard_writer, "_encode_task", dies_after_seven)
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, dst, shard_size=3, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == [PROGRESS_NAME, "train-000000.tar", "train-000001.tar"]
    finished = {name: (dst / name).stat().st_mtime_ns for name in ("train-000000.tar", "train-000001.tar")}

    monkeypatch.setattr(shard_writer, "_encode_task", encode)
    index = write_shards(src, dst, shard_size=3, progress=False)
    assert index["splits"] == clean["splits"]
    for shard in clean["splits"]["train"]["shards"]:
        assert (dst / shard["name"]).read_bytes() == (tmp_path / "clean" / shard["name"]).read_bytes()
    assert {name: (dst / name).stat().st_mtime_ns for name in finished} == finished  # continued, not redone
    assert not (dst / PROGRESS_NAME).exists()
    assert write_shards(src, dst, shard_size=3, progress=False)["up_to_date"]

    rewritten = write_shards(src, dst, shard_size=5, progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["index.json", "train-000000.tar", "train-000001.tar",
                                                      "train-000002.tar"]
    assert [s["samples"] for s in rewritten["splits"]["train"]["shards"]] == [5, 5, 1]


def test_prepare_by_size_caps_each_shard_near_shard_mb(tmp_path):
    """shard_mb closes a shard once its images reach the size (so a shard exceeds it by less than one image)."""
    _class_tree(tmp_path / "src", {"train": {"a": 9}})
    index = write_shards(tmp_path / "src", tmp_path / "dst", shard_size=1000, shard_mb=0.001, progress=False)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 9


# ---------------------------------------------------------------- the shards: loader

def test_two_ranks_of_two_workers_see_every_sample_at_most_once_with_equal_batch_counts(tmp_path):
    """2 ranks x 2 workers: no sample twice in an epoch, all but the remainder (< ranks x batch) seen, every rank
    the same number of batches (= len(loader)); the left-out samples are not the same every epoch."""
    root = _id_shards(tmp_path / "s", [7, 5, 9, 4])  # 25 samples; batch 3 x 2 ranks: 4 batches each, 1 left out
    loaders = [build_shard_loader(f"shards:{root}", transform=_no_pixels, batch_size=3, seed=5, rank=r,
                                  world_size=2, num_workers=2, decode="pil") for r in range(2)]
    left_out = set()
    for epoch in range(3):
        seen = []
        for loader in loaders:
            set_epoch(loader, epoch)
            batches = _labels(loader)
            assert len(batches) == len(loader) == 4 and all(len(b) == 3 for b in batches)
            seen += [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 24
        left_out |= set(range(25)) - set(seen)
    assert len(left_out) > 1
    plans = [plan_epoch([7, 5, 9, 4], seed=5, epoch=e, rank=0, world_size=1, batch_size=4) for e in range(6)]
    assert len({frozenset(range(25)) - frozenset(p.tolist()) for p in plans}) > 1


def test_order_is_a_pure_function_of_seed_and_epoch_and_a_samples_pixels_of_seed_epoch_index(tmp_path):
    """Two loaders with one seed give the same batches; another epoch or seed another order. A sample's augmented
    pixels depend on (seed, epoch, index) only: the same with 1 rank or 2, with or without workers."""
    root = _id_shards(tmp_path / "s", [6, 6, 6])
    tf = build_transform("rrc", 8, 3)

    def epoch_of(seed, epoch, **kw):
        loader = build_shard_loader(f"shards:{root}", transform=tf, batch_size=3, seed=seed, **kw)
        set_epoch(loader, epoch)
        return list(loader)

    a, b = epoch_of(0, 1), epoch_of(0, 1)
    assert _equal_batches(a, b)
    assert [x[1].tolist() for x in epoch_of(0, 2)] != [x[1].tolist() for x in a]
    assert [x[1].tolist() for x in epoch_of(1, 1)] != [x[1].tolist() for x in a]
    pixels = {int(i): img for images, labels in a for img, i in zip(images, labels, strict=True)}
    for rank in range(2):
        for images, labels in epoch_of(0, 1, rank=rank, world_size=2, num_workers=2):
            for img, i in zip(images, labels, strict=True):
                assert torch.equal(img, pixels[int(i)])


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_with_skip_resumes_bit_identically_without_reading_the_skipped_batches(tmp_path, workers):
    """After set_epoch(e, skip=k) the loader yields batches k, k+1, ... of the uninterrupted epoch, equal to the
    bit (images and masking noise), with 0 and 2 workers; len() stays the full epoch; the skipped samples are not
    decoded (counted in the main process with 0 workers); iterating again repeats the same selection."""
    root = _id_shards(tmp_path / "s", [10, 7, 11])
    calls = []
    rrc = build_transform("rrc", 8, 3)

    def counting(image):
        calls.append(1)
        return rrc(image)

    full_loader = build_shard_loader(f"shards:{root}", transform=rrc, batch_size=4, seed=3, num_patches=4)
    set_epoch(full_loader, 2)
    full = list(full_loader)
    assert len(full) == len(full_loader) == 7 and full[0][0].shape == (4, 3, 8, 8) and full[0][1].shape == (4, 4)
    transform = counting if workers == 0 else rrc
    loader = build_shard_loader(f"shards:{root}", transform=transform, batch_size=4, seed=3, num_patches=4,
                                num_workers=workers)
    set_epoch(loader, 2)
    assert _equal_batches(list(loader), full)  # the number of workers changes nothing
    for skip in (1, 5, 7):
        calls.clear()
        set_epoch(loader, 2, skip=skip)
        assert len(loader) == 7 and loader.remaining == 7 - skip
        resumed = list(loader)
        assert _equal_batches(resumed, full[skip:])
        if workers == 0:
            assert len(calls) == 4 * (7 - skip)
        assert _equal_batches(list(loader), resumed)
    with pytest.raises(ConfigError, match="skip=8"):
        set_epoch(loader, 2, skip=8)


def test_python_and_numpy_rngs_are_seeded_per_sample_and_the_callers_states_restored(tmp_path):
    """Draws from python's `random` and numpy's global RNG inside a transform are a function of the sample too
    (the same with 0 or 2 workers, different between samples); the main process's RNG states are left as they were."""
    root = _id_shards(tmp_path / "s", [5, 4])
    batches = {}
    for workers in (0, 2):
        loader = build_shard_loader(f"shards:{root}", transform=_python_and_numpy_draws, batch_size=3, seed=4,
                                    num_workers=workers, decode="pil")
        set_epoch(loader, 1)
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        batches[workers] = list(loader)
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == _after_seeding_11()
    assert _equal_batches(batches[0], batches[2])
    draws = torch.cat([b[0] for b in batches[0]])
    assert len(set(draws[:, 0].tolist())) == len(draws) and len(set(draws[:, 1].tolist())) == len(draws)


def _after_seeding_11() -> tuple[float, float, float]:
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_set_epoch_skip_resumes_folder_loaders_too_and_refuses_unseeded_ones():
    """mae.data.set_epoch(skip=k) on a `build_loader` DataLoader yields batches k, k+1, ... of the uninterrupted
    epoch; a DataLoader whose sampler cannot skip is refused in one line."""
    loader = build_loader(list(range(10)), batch_size=2, seed=3)
    set_epoch(loader, 1)
    whole = [b.tolist() for b in loader]
    set_epoch(loader, 1, skip=2)
    assert [b.tolist() for b in loader] == whole[2:]
    plain = torch.utils.data.DataLoader(list(range(10)), batch_size=2,
                                        sampler=torch.utils.data.distributed.DistributedSampler(
                                            list(range(10)), num_replicas=1, rank=0))
    with pytest.raises(ConfigError, match="cannot resume inside an epoch"):
        set_epoch(plain, 1, skip=2)


def test_corrupt_and_truncated_members_are_skipped_counted_and_replaced_keeping_batch_counts(tmp_path):
    """A member with bad JPEG bytes (and samples lost to a truncated shard) are replaced by the next readable
    sample, counted in the main process also when workers met them; batches per epoch do not change. strict=True
    raises one line naming the sample."""
    root = _id_shards(tmp_path / "s", [5, 5, 6], corrupt=(3,))
    loader = build_shard_loader(f"shards:{root}", transform=build_transform("none", 8, 3), batch_size=4,
                                num_workers=2, shuffle=False)
    set_epoch(loader, 0)
    labels = [i for b in _labels(loader) for i in b]
    assert len(labels) == 16 and labels[:5] == [0, 1, 2, 4, 4]  # sample 3 -> the next good one, sample 4
    assert loader.dataset.num_skipped == 1 and skipped_files(loader.dataset) == [f"{root / 'train-000000.tar'}[3]"]

    shard = root / "train-000002.tar"
    with tarfile.open(shard) as tar:
        second_image = tar.getmembers()[2].offset_data
    shard.write_bytes(shard.read_bytes()[:second_image + 100])  # cut inside its second image
    truncated = build_shard_loader(f"shards:{root}", transform=_no_pixels, batch_size=4, shuffle=False,
                                   decode="pil")
    set_epoch(truncated, 0)
    with pytest.warns(UserWarning, match="truncated"):
        labels = [i for b in _labels(truncated) for i in b]
    assert len(labels) == 16 and labels[10:] == [10, 0, 0, 0, 0, 0]  # 11..15 lost: replaced, wrapping to 0
    assert truncated.dataset.num_skipped == 1 + 5

    strict = build_shard_dataset(f"shards:{root}", strict=True)
    with pytest.raises(DataError, match=r"train-000000.tar\[3\] is corrupt") as e:
        strict[3]
    assert "\n" not in str(e.value)


def test_brace_patterns_with_and_without_an_index(tmp_path):
    """shards:<dir>/train-{000000..000002}.tar reads those shards (counts from the index beside them, or from
    their tar headers when there is none); brace expansion keeps zero padding and takes lists."""
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    root = _id_shards(tmp_path / "s", [4, 3, 5])
    pattern = f"shards:{root}/train-{{000000..000002}}.tar"
    with_index = resolve_shards(pattern)
    assert with_index.counts == (4, 3, 5) and with_index.total == 12
    (root / "index.json").unlink()
    counted = resolve_shards(pattern)
    assert counted.counts == (4, 3, 5) and counted.labelled and len(counted.classes) == 12
    part = build_shard_loader(f"shards:{root}/train-{{000001..000002}}.tar", transform=_no_pixels, batch_size=2,
                              decode="pil", shuffle=False, drop_last=False)
    set_epoch(part, 0)
    assert [i for b in _labels(part) for i in b] == list(range(4, 12))  # the samples of the named shards


def test_evaluation_plan_reads_every_sample_once_in_order_over_ranks(tmp_path):
    """shuffle=False, drop_last=False: ranks take consecutive near-equal parts; all samples, each once. The
    map-style dataset works under a plain DataLoader with workers (as evaluation loaders use it)."""
    root = _id_shards(tmp_path / "s", [4, 3])
    seen = []
    for rank in range(3):
        loader = build_shard_loader(f"shards:{root}", transform=_no_pixels, batch_size=2, rank=rank,
                                    world_size=3, decode="pil", shuffle=False, drop_last=False)
        set_epoch(loader, 0)
        seen += [i for b in _labels(loader) for i in b]
    assert seen == list(range(7))
    dataset = build_shard_dataset(f"shards:{root}", transform=_no_pixels, decode="pil")  # map-style: any sampler
    plain = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2)
    assert [i for _, labels in plain for i in labels.tolist()] == list(range(7))


@pytest.mark.parametrize("spec, split, fragment", [
    ("shards:{tmp}/nowhere", "train", "do not exist"),
    ("shards:{tmp}/empty", "train", "has no index.json"),
    ("shards:{tmp}/s", "val", "has no 'val' split; it has: train"),
    ("shards:{tmp}/s/train-{{000000..000005}}.tar", "train", "4 of 6 shard file(s) do not exist"),
    ("shards:{tmp}/s/train-{{000000..000001}}.tar", "val", "names one set of shards"),
    ("shards:{tmp}/s/train-{{000000..000001.tar", "train", "without its '}'"),
    ("shards:{tmp}/junk.tar", "train", "is not a readable tar file"),
    ("shards:{tmp}/badindex", "train", "is unreadable or not JSON"),
    ("shards:https://host/train-{{0..3}}.tar", "train", "only files are read"),
    ("shards:", "train", "empty shard spec"),
])
def test_bad_specs_give_one_line_errors(tmp_path, spec, split, fragment):
    """Every bad spec is a one-line DataError naming the problem."""
    _id_shards(tmp_path / "s", [2, 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.tar").write_bytes(b"\x07" * 2000)
    (tmp_path / "badindex").mkdir()
    (tmp_path / "badindex" / "index.json").write_text("{not json")
    with pytest.raises(DataError) as e:
        build_shard_loader(spec.format(tmp=tmp_path), transform=None, batch_size=1, split=split)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_too_large_a_batch_and_bad_arguments_are_config_errors(tmp_path):
    root = _id_shards(tmp_path / "s", [3, 2])
    with pytest.raises(ConfigError, match=r"5 samples .* fewer than one batch of 3 for each of 2 rank"):
        build_shard_loader(f"shards:{root}", transform=None, batch_size=3, world_size=2)
    with pytest.raises(ConfigError, match="rank=2"):
        build_shard_loader(f"shards:{root}", transform=None, batch_size=1, rank=2, world_size=2)


def test_cli_prepare_runs_and_reports_errors_in_one_line(tmp_path, capsys):
    """`mae prepare --src SRC --dst DST key=value` prints the summary; a missing source is one line, exit 2."""
    _class_tree(tmp_path / "src", {"train": {"a": 3}})
    assert cli.main(["prepare", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "progress=false",
                     "shard_size=2"]) == 0
    out = capsys.readouterr().out
    assert "train_samples: 3" in out and "train_shards: 2" in out and "skipped_files: 0" in out
    assert cli.main(["prepare", "--src", str(tmp_path / "missing"), "--dst", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mae prepare: error: source folder") and "does not exist" in err and "\n" not in err
    with pytest.raises(MAEError):  # the library raises, the CLI prints
        write_shards(tmp_path / "missing", tmp_path / "d3")
    with pytest.raises(ConfigError, match="inside the source"):
        write_shards(tmp_path / "src", tmp_path / "src" / "shards")
