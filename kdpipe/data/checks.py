"""The files of each data format, checked without torch.

The command line runs these before Hydra starts a job (`kdpipe.preflight`), and the data modules
run the same functions when they load, so a missing, truncated or inconsistent file fails in one
line naming the file and the fix, whether the pipeline was started from the command line or from
Python. Each check is cheap: IDX headers, sizes and label files (a few hundred KB at most), the
presence and size of CIFAR batch files (nothing is unpickled), and one image per class of an
image folder. Imports neither torch nor numpy.
"""

from __future__ import annotations

import array
import gzip
import os
import shlex
import struct
import sys
import zlib
from pathlib import Path

from kdpipe.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

# IDX type code -> (array typecode, bytes per value); the values are big-endian.
IDX_TYPES = {0x08: ("B", 1), 0x09: ("b", 1), 0x0B: ("h", 2), 0x0C: ("i", 4), 0x0D: ("f", 4), 0x0E: ("d", 8)}

SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# What a truncated or corrupt file raises while it is read (gzip.BadGzipFile is an OSError).
READ_ERRORS = (OSError, EOFError, zlib.error)


def find_idx(root: Path, stem: str) -> Path | None:
    """The file of `stem` under `root`: raw or `.gz`, `-idx` or `.idx` in the name."""
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def idx_files(root: str | Path, install_hint: str = "") -> dict[str, tuple[Path, Path]]:
    """The (images, labels) files of each split, or a ConfigError with the command that gets them."""
    root = Path(os.path.expanduser(str(root)))
    found, missing = {}, []
    for split, (img, lab) in SPLIT_FILES.items():
        paths = (find_idx(root, img), find_idx(root, lab))
        missing += [n for n, p in zip((img, lab), paths, strict=True) if p is None]
        found[split] = paths
    if missing:
        hint = f" Get them with: {install_hint}" if install_hint else ""
        raise ConfigError(f"data.root={root} lacks {', '.join(missing)} (.gz or raw).{hint} "
                          f"Or point data.root at a folder that has them.")
    return found


def _fix(install_hint: str) -> str:
    return f"reinstall with: {install_hint}" if install_hint else "replace the file"


def idx_corrupt(path: Path, install_hint: str, expected: int | None = None, found: int | None = None,
                why: str = "") -> ConfigError:
    """The one error for a truncated or corrupt IDX file."""
    what = f"expected {expected} bytes, found {found}" if expected is not None else why
    return ConfigError(f"{path} is truncated or corrupt ({what}); {_fix(install_hint)}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _length(path: Path, expected: int, install_hint: str) -> None:
    """Raise unless `path` holds `expected` bytes (decompressed). A gzip file's trailer records its
    length (mod 2**32): when it agrees, the file is not read through; else it is, to tell a
    truncated file (EOFError) from a multi-member one."""
    size = path.stat().st_size
    if path.suffix != ".gz":
        if size != expected:
            raise idx_corrupt(path, install_hint, expected, size)
        return
    with open(path, "rb") as fh:
        fh.seek(max(size - 4, 0))
        trailer = fh.read(4)
    if len(trailer) == 4 and struct.unpack("<I", trailer)[0] == expected % 2**32:
        return
    n = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                n += len(chunk)
    except READ_ERRORS:
        raise idx_corrupt(path, install_hint, expected, n) from None
    if n != expected:
        raise idx_corrupt(path, install_hint, expected, n)


def idx_header(path: Path, install_hint: str = "") -> tuple[int, tuple[int, ...], int]:
    """(type code, shape, header bytes) of an IDX file, read from its first bytes."""
    try:
        with _open(path) as fh:
            head = fh.read(4)
            ndim = head[3] if len(head) == 4 else 0
            dims = fh.read(4 * ndim)
    except READ_ERRORS as exc:
        raise idx_corrupt(path, install_hint, why=str(exc) or type(exc).__name__) from None
    if len(head) < 4 or len(dims) < 4 * ndim:
        raise idx_corrupt(path, install_hint, 4 + 4 * ndim, len(head) + len(dims))
    if head[0] != 0 or head[1] != 0 or head[2] not in IDX_TYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number {head.hex()}); {_fix(install_hint)}")
    return head[2], struct.unpack(f">{ndim}I", dims), 4 + 4 * ndim


def idx_values(body: bytes, code: int) -> array.array:
    """The values of an IDX body as a flat array (host byte order)."""
    typecode, size = IDX_TYPES[code]
    values = array.array(typecode, body[: len(body) - len(body) % size])
    if size > 1 and sys.byteorder == "little":
        values.byteswap()
    return values


def check_idx_file(path: Path, ndim: int, install_hint: str = "") -> tuple[int, tuple[int, ...]]:
    """(type code, shape) of an IDX file whose header is valid, whose array has `ndim`
    dimensions and whose length matches its header; else a ConfigError naming the file."""
    code, shape, header = idx_header(path, install_hint)
    kind = "images (count, rows, columns)" if ndim == 3 else "labels (count,)"
    if len(shape) != ndim:
        raise ConfigError(f"{path} holds an array of shape {shape} where {kind} are expected; "
                          f"{_fix(install_hint)}")
    count = 1
    for d in shape:
        count *= d
    _length(path, header + count * IDX_TYPES[code][1], install_hint)
    return code, shape


def read_labels(path: Path, install_hint: str = "") -> array.array:
    """The labels of an IDX labels file, checked for truncation."""
    code, _ = check_idx_file(path, 1, install_hint)
    try:
        with _open(path) as fh:
            data = fh.read()
    except READ_ERRORS as exc:
        raise idx_corrupt(path, install_hint, why=str(exc) or type(exc).__name__) from None
    return idx_values(data[8:], code)


def check_idx(root: str | Path, install_hint: str = "", num_classes: int | None = None,
              in_shape: tuple[int, int, int] | None = None) -> dict[str, tuple[Path, Path]]:
    """The four IDX files under `root`, each present, with a valid header and the length it
    declares; as many labels as images in each split; every label in [0, num_classes); images of
    `in_shape` (channels, height, width). Returns the (images, labels) files of each split."""
    found = idx_files(root, install_hint)
    for split, (img, lab) in found.items():
        _, shape = check_idx_file(img, 3, install_hint)
        labels = read_labels(lab, install_hint)
        if shape[0] != len(labels):
            raise ConfigError(f"{img.name} holds {shape[0]} images but {lab.name} holds {len(labels)} labels "
                              f"(under {img.parent}); the {split} split needs one label per image; "
                              f"{_fix(install_hint)}")
        if in_shape is not None and (1, *shape[1:]) != tuple(in_shape):
            raise ConfigError(f"{img} holds {shape[1]}x{shape[2]} grey images but the config says "
                              f"channels/height/width = {tuple(in_shape)}; set data.channels=1 "
                              f"data.height={shape[1]} data.width={shape[2]}")
        if num_classes is not None and len(labels):
            low, high = min(labels), max(labels)
            bad = low if low < 0 else high if high >= num_classes else None
            if bad is not None:
                shown = int(bad) if float(bad).is_integer() else bad
                raise ConfigError(f"{lab} holds label {shown}, outside [0, data.num_classes={num_classes}); "
                                  f"labels are class indices 0..{num_classes - 1}: fix the file, or set "
                                  f"data.num_classes if the data has more classes")
    return found


# ---------------------------------------------------------------------------------------------
# Image folders

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def list_classes(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def list_images(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
    items = []
    for idx, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        items += [(p, idx) for p in sorted(sub.rglob("*"))
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return items


def image_folder_root(root: str | Path | None) -> Path:
    """`data.root` of an image folder, expanded, or a ConfigError saying what to give."""
    if not root:
        raise ConfigError("data=image_folder needs data.root=/path/to/images (one sub-folder per class)")
    path = Path(os.path.expanduser(str(root)))
    if not path.exists():
        raise ConfigError(f"data.root={path} does not exist; give a folder with one sub-folder per class")
    if not path.is_dir():
        raise ConfigError(f"data.root={path} is not a folder; give a folder with one sub-folder per class")
    return path


def image_folder_layout(root: str | Path | None, num_classes: int
                        ) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(class names, the image files of each split found on disk: `all` when there are no split
    folders), or a ConfigError: no folder, fewer than two classes, a class count other than
    `num_classes`, a split without images."""
    path = image_folder_root(root)
    train_dir = path / "train"
    base = train_dir if train_dir.is_dir() else path
    classes = list_classes(base)
    if not classes:
        raise ConfigError(f"no class folders under {base}; put the images in one sub-folder per class "
                          f"({base}/<class>/<image>)")
    if len(classes) == 1:
        raise ConfigError(f"one class found under {base} ({classes[0]}); classification needs at least "
                          f"two class folders")
    if len(classes) != num_classes:
        raise ConfigError(f"{base} has {len(classes)} class folders ({', '.join(classes[:10])}) but "
                          f"data.num_classes={num_classes}; set data.num_classes={len(classes)}")
    if not train_dir.is_dir():
        found = {"all": list_images(path, classes)}
    else:
        found = {"train": list_images(train_dir, classes)}
        for split in ("val", "test"):
            if (path / split).is_dir():
                found[split] = list_images(path / split, classes)
    for split, items in found.items():
        if not items:
            raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under the {split} "
                              f"folders of {path}")
    return classes, found


def unreadable_image(path: Path, exc: BaseException) -> ConfigError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return ConfigError(f"cannot read image {path}: {text}; remove or replace it")


def check_sample_images(found: dict[str, list[tuple[Path, int]]]) -> None:
    """Open and decode the first image of each class of each split with PIL."""
    from PIL import Image

    for items in found.values():
        seen = set()
        for path, label in items:
            if label in seen:
                continue
            seen.add(label)
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise unreadable_image(path, exc) from None


def check_image_folder(root: str | Path | None, num_classes: int
                       ) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """`image_folder_layout` plus one image per class of each split decoded."""
    classes, found = image_folder_layout(root, num_classes)
    check_sample_images(found)
    return classes, found


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100

CIFAR_LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "labels": "labels", "num_classes": 10,
                "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"],
                 "labels": "fine_labels", "num_classes": 100,
                 "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"},
}


def cifar_layout(variant: str) -> dict:
    if variant not in CIFAR_LAYOUTS:
        raise ConfigError(f"data.variant={variant} is not one of {', '.join(CIFAR_LAYOUTS)}")
    return CIFAR_LAYOUTS[variant]


def cifar_folder(root: str | Path, variant: str) -> Path:
    """The folder of the batch files: `root` or the archive's folder inside it."""
    root = Path(os.path.expanduser(str(root)))
    nested = root / cifar_layout(variant)["folder"]
    return nested if nested.is_dir() else root


def cifar_get_command(root: str | Path, variant: str) -> str:
    """The shell command that downloads and extracts the archive into `root`, every path quoted:
    a folder name holding a space, `;` or `$(...)` is pasted as a name, never run."""
    root = shlex.quote(str(Path(os.path.expanduser(str(root)))))
    return f"mkdir -p {root} && curl -L {cifar_layout(variant)['url']} | tar xz -C {root}"


def cifar_files(root: str | Path, variant: str = "cifar10") -> dict[str, list[Path]]:
    """The batch files of each split, each present and not empty, or a ConfigError with the
    command that gets them. Nothing is unpickled here."""
    layout = cifar_layout(variant)
    folder = cifar_folder(root, variant)
    shown = Path(os.path.expanduser(str(root)))
    files = {split: [folder / n for n in layout[split]] for split in ("train", "test")}
    missing = [p.name for ps in files.values() for p in ps if not p.is_file()]
    if missing:
        raise ConfigError(
            f"data.root={shown} lacks the {variant} batch files {', '.join(missing)}. "
            f"Get them with: {cifar_get_command(root, variant)}  "
            f"(or point data.root at the extracted {layout['folder']} folder)")
    for path in (p for ps in files.values() for p in ps):
        if path.stat().st_size == 0:
            raise ConfigError(f"{path} is empty (0 bytes); get the batch files again with: "
                              f"{cifar_get_command(root, variant)}")
    return files
