"""Image datasets read from folders: a class-folder tree (`root/<class>/**/<image>`) or any tree of images.

Every image comes out 8-bit in the requested mode ('RGB' or 'L'), whatever it was stored as: grey, palette,
with alpha (composited on white), or 16-bit (scaled 0..65535 -> 0..255). An unreadable file is skipped with a
warning and replaced by the next readable one (so the order stays deterministic), or raises at once with
`strict=True`; `verify=True` decodes every file up front so the bad ones are known before training starts.
Unreadable files are flagged in a shared-memory tensor, so `num_skipped` / `unreadable_files()` count what the
DataLoader worker processes met too. Entries the folder scan passes over (a dangling link, a link loop, a pipe named
like an image, a folder that cannot be listed) are named in one warning and kept in `passed_over`.

`decode='tensor'` reads JPEG files with `torchvision.io.decode_jpeg` into uint8 tensors (faster than PIL with the
same v2 transforms: docs/benchmarks.md, "The input pipeline alone"); other formats, and any JPEG that libjpeg-turbo
refuses, still go through PIL and the rules above. `decode='encoded'` (for decoding on the GPU, see
`mae.data.device_decode`) yields each JPEG's bytes and header size undecoded; it takes JPEG files only.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from mae.data.device_decode import EncodedJpeg
from mae.errors import DataError

IMAGE_MODES = ("RGB", "L")
"""The modes every image dataset gives its images in (built-in, folders, shards): 8-bit colour or grey."""
DECODE_MODES = ("pil", "tensor", "encoded")
"""What a folder or shard dataset's ``decode`` takes (see the module docstring; ``data.decode=nvjpeg`` is 'encoded')."""
JPEG_EXTENSIONS = (".jpg", ".jpeg")
# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec (not a dependency here); they work, and a
# warning per decoded image would bury the training log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What reading a damaged, truncated or crafted image file raises (Pillow, torchvision.io, `check_pixels`)."""
UNLABELED = -1
"""Label of every image of a plain (class-less) folder."""
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
"""PIL modes of images without colour (converting them to 'RGB' copies one channel into three)."""
_MODE_CHECKS_DECODED = 32
"""With decode='tensor', the first this-many JPEGs of each process also have their header read by PIL to notice a
colour / grey mismatch (PIL decoding notices it for free on every image)."""

_log = logging.getLogger(__name__)


def is_grey(image: Image.Image) -> bool:
    """True for an image without colour: a grey mode, or a palette whose entries are all grey."""
    if image.mode in GREY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = image.getpalette() or []
        return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
    return False


def channel_mismatch(image: Image.Image, mode: str | None, where: str) -> str | None:
    """The warning for an image whose colour does not fit the model's channels (None when it fits): colour read by
    a 1-channel model is turned grey, grey read by a 3-channel model is copied into three equal channels."""
    grey = is_grey(image)
    if mode == "L" and not grey:
        return (f"{where} holds colour images ({image.mode}) but the model reads 1 channel: they are converted to grey "
                f"(luma); a 3-channel model (model.in_chans=3 when pre-training) would use the colour (warned once)")
    if mode == "RGB" and grey:
        return (f"{where} holds grey images ({image.mode}) but the model reads 3 channels: each is copied into three "
                f"equal channels; a 1-channel model (model.in_chans=1 when pre-training) fits grey data (warned once)")
    return None


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a file with an image extension (case-insensitive) that is not hidden (e.g. macOS `._x.jpg`)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def walk_images(root: str | os.PathLike, passed_over: list[tuple[str, str]] | None = None
                ) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted image file names) for every folder under `root`, following links to folders but never into a
    folder twice (a link loop ends there), and keeping regular files only: a pipe, socket or device named like an
    image would block or misbehave when read. Hidden files and folders are left out.

    What the walk passes over that a user may have meant as data is appended to `passed_over` as (path, reason):
    dangling links, entries that cannot be read (a link loop, no permission), non-regular files named like images,
    and folders that cannot be listed."""
    seen: set[tuple[int, int]] = set()
    stack = [str(root)]
    skip = passed_over.append if passed_over is not None else lambda item: None
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skip((folder, f"a folder that cannot be listed: {e.strerror or e}"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        names, subfolders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            why = _passed_over(entry)
            if why is not None:
                skip((entry.path, why))
            elif entry.is_dir():
                subfolders.append(entry.path)
            elif entry.is_file() and is_image_file(entry.name):  # is_file: a regular file (or a link to one)
                names.append(entry.name)
        yield folder, sorted(names)
        stack.extend(sorted(subfolders, reverse=True))


def _passed_over(entry: os.DirEntry, images: bool = True) -> str | None:
    """Why a folder scan cannot use `entry` although a user may mean it as data (None when it is a folder, a regular
    file, or a file that is not named like an image; with `images=False` a non-regular file is not reported)."""
    try:
        if entry.is_dir() or entry.is_file():
            return None
        if entry.is_symlink():  # is_dir and is_file are False for a link to nothing
            return "a dangling link"
    except OSError as e:  # a link loop, no permission, a file that vanished
        return f"unreadable: {e.strerror or e}"
    return "not a regular file" if images and is_image_file(entry.name) else None


def _entry_key(path: str) -> str:
    """The directory entry `path` names, whatever links lead to its folder (the entry itself is not resolved)."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def is_dir_entry(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, but False for an entry that cannot be read (a link loop) instead of raising OSError."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def is_image_entry(entry: os.DirEntry) -> bool:
    """A regular (or linked) file named like an image; False for an entry that cannot be read."""
    try:
        return entry.is_file() and is_image_file(entry.name)
    except OSError:
        return False


_warned_scans: set[tuple[str, tuple[str, ...]]] = set()
"""(root, passed-over paths) already warned about in this process: a folder scanned again (the train and val split
of one tree, a k-NN monitor every few epochs) is not warned about twice."""


def _passed_over_text(root: str | os.PathLike, passed_over: list[tuple[str, str]], shown: int = 5) -> str:
    names = ", ".join(f"'{os.path.relpath(path, root)}' ({why})" for path, why in passed_over[:shown])
    more = f" and {len(passed_over) - shown} more" if len(passed_over) > shown else ""
    return names + more


def warn_passed_over(root: str | os.PathLike, passed_over: list[tuple[str, str]]) -> None:
    """One warning counting the entries a scan of `root` passed over and naming the first few of them (once per
    process for the same folder and entries)."""
    key = (str(root), tuple(path for path, _ in passed_over))
    if not passed_over or key in _warned_scans:
        return
    _warned_scans.add(key)
    what = "entry" if len(passed_over) == 1 else "entries"
    _log.warning("'%s': %d %s passed over while scanning for images (counted as skipped_files in the run's "
                 "summary): %s", root, len(passed_over), what, _passed_over_text(root, passed_over))


def check_pixels(width: int, height: int) -> None:
    """Refuse an image whose header claims more pixels than Pillow's decompression-bomb limit allows (twice
    ``Image.MAX_IMAGE_PIXELS``): decoding it would take gigabytes, e.g. a crafted 65535 x 65535 JPEG."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise ValueError(f"its header claims {width} x {height} pixels, more than the {2 * limit} an image may "
                         f"have (PIL.Image.MAX_IMAGE_PIXELS); a damaged or crafted file")


def to_mode(image: Image.Image, mode: str | None) -> Image.Image:
    """`image` as an 8-bit 'RGB' or 'L' image: alpha is composited on white, 16/32-bit values are scaled, not
    clipped."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greys (PNG, TIFF) map 0..65535 -> 0..255; 32-bit 'I' (how older Pillow opens 16-bit PNGs) is read
        # as the same 16-bit range.
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == mode else image.convert(mode)


def _check_folder(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data path '{root}' does not exist; check the path (a folder of images, or builtin:<name>)")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is a file, not a folder; give the folder that holds the images")


def _no_images(root: Path, passed_over: list[tuple[str, str]] | None = None) -> DataError:
    passed = f"; {len(passed_over)} passed over: {_passed_over_text(root, passed_over)}" if passed_over else ""
    return DataError(f"folder '{root}' holds no image files; accepted extensions: {' '.join(IMG_EXTENSIONS)}{passed}")


class ImageDataset(Dataset):
    """What every image dataset of this library tells the recipes: `classes` (names, in label order) and the image
    `mode` ('L' or 'RGB') give `num_classes` and `in_chans`."""

    classes: list[str] | tuple[str, ...]
    mode: str | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        """Channels of the images this dataset returns: 1 for mode 'L', 3 for 'RGB'."""
        return 1 if self.mode == "L" else 3


class _ImageFiles(ImageDataset):
    """A list of (image path, label) pairs read as PIL images, with the skip / strict policy for unreadable files."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str], transform: Callable | None,
                 mode: str, strict: bool, verify: bool, decode: str = "pil",
                 passed_over: list[tuple[str, str]] | None = None):
        if mode not in IMAGE_MODES:
            raise DataError(f"image mode '{mode}' is not supported; use one of {', '.join(IMAGE_MODES)}")
        if decode not in DECODE_MODES:
            raise DataError(f"image decoder '{decode}' is not supported; use one of {', '.join(DECODE_MODES)}")
        self.decode = decode
        if decode == "encoded":
            other = next((path for path, _ in samples if not path.lower().endswith(JPEG_EXTENSIONS)), None)
            if other is not None:
                raise DataError(f"decoding on the GPU (data.decode=nvjpeg) reads JPEG files only, and '{other}' is "
                                "not one; convert the folder to JPEG or use data.decode=tensor")
        self.root = root
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.mode = mode
        self.strict = strict
        self.bad_files: list[str] = []
        """Unreadable files met so far by this process (all of them after `verify=True`)."""
        # one entry reached through two paths (a link to a folder already walked) is one entry
        passed_over = list({_entry_key(path): (path, why) for path, why in passed_over or []}.values())
        self.passed_over = [path for path, _ in passed_over]
        """Entries the folder scan passed over (dangling links, unreadable entries; see `walk_images`)."""
        warn_passed_over(root, passed_over)
        # set once a colour / grey mismatch has been reported, by whichever process saw it first
        self._mode_warned = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self._mode_checks = 0
        if verify:
            good = [(path, label) for path, label in self.samples if self._try_load(path) is not None]
            if not good:
                raise DataError(f"no image in '{root}' could be read ({len(self.bad_files)} corrupt files)")
            self.samples = good
        # one flag per sample, set by whichever process (main or DataLoader worker) fails to read the file
        self._unreadable = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._verified_bad = len(self.bad_files)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far by any process (dropped by `verify` or skipped while loading)."""
        return self._verified_bad + int(self._unreadable.sum())

    def unreadable_files(self) -> list[str]:
        """Paths of the files skipped while loading so far, in any process (worker processes included)."""
        return [self.samples[i][0] for i in self._unreadable.nonzero().flatten().tolist()]

    def __len__(self) -> int:
        return len(self.samples)

    def _try_load(self, path: str) -> Image.Image | tv_tensors.Image | EncodedJpeg | None:
        """The decoded image, or None (after a warning, once per file) if the file is unreadable and not strict."""
        if self.decode == "encoded":
            try:
                with Image.open(path) as f:  # reads the header only: the size, and whether it is a JPEG at all
                    if f.format != "JPEG":
                        raise ValueError(f"a {f.format} image named like a JPEG")
                    width, height = f.size
                check_pixels(width, height)
                return EncodedJpeg(read_file(path), height, width)
            except _BAD_IMAGE as e:
                self._unreadable_file(path, e)
                return None
        if self.decode == "tensor" and path.lower().endswith(JPEG_EXTENSIONS):
            try:
                read_mode = ImageReadMode.GRAY if self.mode == "L" else ImageReadMode.RGB
                data = read_file(path)
                with Image.open(io.BytesIO(data.numpy().tobytes())) as header:  # the header only, no decoding
                    check_pixels(*header.size)  # before libjpeg allocates what the header claims
                    if not self._mode_warned[0] and self._mode_checks < _MODE_CHECKS_DECODED:
                        self._mode_checks += 1
                        self._check_channels(header, path)
                return tv_tensors.Image(decode_jpeg(data, mode=read_mode))  # uint8 [C, H, W]
            except (RuntimeError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                pass  # not a JPEG libjpeg-turbo takes (or a damaged one): PIL decides, with the usual skip / strict
        try:
            with Image.open(path) as f:
                f.load()  # decode now: a truncated file fails here, not inside a transform
                self._check_channels(f, path)
                return to_mode(f, self.mode)
        except _BAD_IMAGE as e:  # what Pillow raises for bad data
            self._unreadable_file(path, e)
            return None

    def _check_channels(self, image: Image.Image, path: str) -> None:
        """Log, once per dataset over all processes, that images are converted between colour and grey."""
        if self._mode_warned[0]:
            return
        message = channel_mismatch(image, self.mode, f"'{self.root}' (e.g. '{path}')")
        if message is not None:
            self._mode_warned[0] = 1
            _log.warning(message)

    def _unreadable_file(self, path: str, e: Exception) -> None:
        """Raise (strict), or warn once per file and return None."""
        if self.strict:
            raise DataError(f"image file '{path}' is corrupt or unreadable ({e}); delete or replace it, "
                            "or pass strict=False to skip such files") from e
        if path not in self.bad_files:
            self.bad_files.append(path)
            warnings.warn(f"skipping corrupt or unreadable image file '{path}': {e}", stacklevel=4)

    def __getitem__(self, index: int) -> tuple[object, int]:
        # An unreadable file is replaced by the next readable one, so a given index always gives the same sample.
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            path, label = self.samples[i]
            image = self._try_load(path)
            if image is not None:
                return (self.transform(image) if self.transform is not None else image), label
            self._unreadable[i] = 1
        raise DataError(f"no image in '{self.root}' could be read ({len(self.bad_files)} corrupt files)")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root='{self.root}', n={len(self)}, classes={self.num_classes}, "
                f"mode={self.mode!r}, skipped={self.num_skipped})")


def find_classes(root: str | os.PathLike[str], passed_over: list[tuple[str, str]] | None = None) -> list[str]:
    """Sorted names of the visible sub-folders of `root` (hidden ones like `.ipynb_checkpoints` are not classes);
    dangling links and unreadable entries there are appended to `passed_over` (see `walk_images`)."""
    with os.scandir(root) as it:
        entries = [e for e in it if not e.name.startswith(".")]
    if passed_over is not None:  # what may have been meant as a class folder; loose files here are not data
        passed_over.extend((e.path, why) for e in entries if (why := _passed_over(e, images=False)) is not None)
    return sorted(e.name for e in entries if is_dir_entry(e))


class ClassFolderDataset(_ImageFiles):
    """`root/<class>/**/<image>` (torchvision's ImageFolder layout); labels index the sorted class names.

    Args:
        root: the folder whose sub-folders are the classes.
        transform: applied to the PIL image (a uint8 `tv_tensors.Image` for JPEGs with decode='tensor').
        mode: 'RGB' or 'L'; every image is converted to it.
        strict: raise DataError at the first unreadable file instead of skipping it with a warning.
        verify: decode every file now, so `bad_files` is complete and the bad ones never reach a batch.
        decode: 'pil', or 'tensor' to decode JPEGs with torchvision.io (faster; other formats still use PIL).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 strict: bool = False, verify: bool = False, decode: str = "pil"):
        root = Path(root)
        _check_folder(root)
        passed_over: list[tuple[str, str]] = []
        classes = find_classes(root, passed_over)
        if not classes:
            if any(is_image_file(p) for p in root.iterdir()):
                raise DataError(f"folder '{root}' has images but no class sub-folders; labels need the layout "
                                f"'{root}/<class name>/<image>' (one sub-folder per class)")
            raise _no_images(root, passed_over)
        # Empty classes are kept so that label indices agree between a train and a val tree. The order is
        # torchvision's make_dataset's: classes sorted, then (folder, file name) sorted within each class.
        samples = [(os.path.join(folder, name), i) for i, c in enumerate(classes)
                   for folder, names in sorted(walk_images(root / c, passed_over)) for name in names]
        if not samples:
            raise _no_images(root, passed_over)
        super().__init__(root, samples, classes, transform, mode, strict, verify, decode, passed_over)


class PlainFolderDataset(_ImageFiles):
    """Every image under `root`, recursively, in sorted path order; all labels are `UNLABELED` (-1).

    For pre-training on images without labels. Arguments as for `ClassFolderDataset`.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, mode: str = "RGB",
                 strict: bool = False, verify: bool = False, decode: str = "pil"):
        root = Path(root)
        _check_folder(root)
        passed_over: list[tuple[str, str]] = []
        paths = [os.path.join(folder, name) for folder, names in walk_images(root, passed_over) for name in names]
        if not paths:
            raise _no_images(root, passed_over)
        super().__init__(root, [(p, UNLABELED) for p in sorted(paths)], [], transform, mode, strict, verify,
                         decode, passed_over)
