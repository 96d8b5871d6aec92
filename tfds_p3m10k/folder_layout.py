"""Folders of portraits and mattes in a named layout: pairing files by stem, splitting, checking every file.

The layouts (`LAYOUTS`; docs/data.md has the table):
  folder   the user's own: `images/` + `alphas/`, optional `trimaps/`, `facemasks/`, `fg/` + `bg/`; either
           inside `train/`, `test/` (and `validation/`) subfolders, or directly in the folder, which is then
           split by a stable hash of each name with the fractions given (`split_by_hash`).
  ppm100   PPM-100 (the MODNet authors' portrait benchmark): `image/*.jpg` and `matte/*.png`, split `test`.
  aim500   AIM-500 (the AIM authors' natural-image benchmark): `original/*.jpg`, `mask/*.png`,
           `trimap/*.png` (the `usr/` maps are not read), split `test`.
  p3m10k   the P3M-10k release: `train/blurred_image` + `mask`, `validation/P3M-500-P/blurred_image` and
           `validation/P3M-500-NP/original_image` with `mask`, `trimap` (and `facemask`).
Each may sit in its published top folder (`PPM-100/`, `AIM-500/`, `P3M-10k/`) or be the folder itself.

Values: images are 8-bit RGB (JPEG, PNG or WebP; grey is replicated); a matte is 8-bit single-channel
0..255 (an RGB matte whose three channels are equal is read as grey); a trimap holds only 0/128/255; a
facemask is 0 / >0. Where a split has no trimaps they are derived from the alpha (`derived_trimap`).

`scan` pairs the files and `read_example` fully decodes every one, so that unpaired files, duplicate stems,
unreadable files, size mismatches, mattes that are not grey and empty splits are all found, naming every
file, before anything is written. `load_example` reads one example as arrays: it serves the dataset
builder and `p3m_jax.data.evaluation_data`, which scores a layout folder without building it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from tfds_p3m10k import maps
from tfds_p3m10k.release_files import BadInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
KINDS = ("image", "alpha", "trimap", "facemask", "fg", "bg")
REQUIRED_KINDS = ("image", "alpha")
# Portraits can be large; allow up to ~400 megapixels before Pillow's decompression-bomb guard.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 400_000_000)


class LayoutNotFoundError(BadInputError):
    """The folder does not exist or holds none of the layout's folders."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a layout keeps each kind of file.

    `folders` maps a kind to the folder names that may hold it (the first present wins); `splits` maps a
    split to its subfolder ('' for the layout's folder itself). `hash_split`: with no split subfolder
    present, the folder itself is split by a hash of each name. `top_folders`: published names of the
    folder that may wrap the layout (e.g. `PPM-100`).
    """

    name: str
    description: str
    folders: Mapping[str, tuple[str, ...]]
    splits: Mapping[str, str]
    top_folders: tuple[str, ...] = ()
    hash_split: bool = False
    blurred_splits: tuple[str, ...] = ()  # splits whose faces the release already obfuscated


LAYOUTS = {
    "folder": Layout(
        "folder",
        "folder of your own portraits (images/ + alphas/)",
        {
            "image": ("images",),
            "alpha": ("alphas",),
            "trimap": ("trimaps",),
            "facemask": ("facemasks",),
            "fg": ("fg",),
            "bg": ("bg",),
        },
        {"train": "train", "validation": "validation", "test": "test"},
        hash_split=True,
    ),
    "ppm100": Layout(
        "ppm100", "PPM-100 layout", {"image": ("image",), "alpha": ("matte",)}, {"test": ""}, ("PPM-100",)
    ),
    "aim500": Layout(
        "aim500",
        "AIM-500 layout",
        {"image": ("original",), "alpha": ("mask",), "trimap": ("trimap",)},
        {"test": ""},
        ("AIM-500",),
    ),
    "p3m10k": Layout(
        "p3m10k",
        "P3M-10k release layout",
        {
            "image": ("blurred_image", "original_image"),
            "alpha": ("mask",),
            "trimap": ("trimap",),
            "facemask": ("facemask",),
            "fg": ("fg_blurred", "fg"),
            "bg": ("bg",),
        },
        {"train": "train", "p3m_500_p": "validation/P3M-500-P", "p3m_500_np": "validation/P3M-500-NP"},
        ("P3M-10k",),
        blurred_splits=("train", "p3m_500_p"),
    ),
}
DEFAULT_FRACTIONS = (("train", 0.9), ("test", 0.1))


@dataclasses.dataclass(frozen=True)
class Example:
    """The files of one example: `files` maps a kind to its path (kinds without a file are absent)."""

    split: str
    name: str
    files: Mapping[str, str]
    is_blurred: bool = False


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def parse_fractions(text: str) -> tuple[tuple[str, float], ...]:
    """'train=0.9,test=0.1' -> (('train', 0.9), ('test', 0.1)); the fractions must sum to 1."""
    pairs = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        split, _, value = part.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"split fractions: {part!r} is not SPLIT=FRACTION") from None
        if split not in LAYOUTS["folder"].splits or not 0 < fraction <= 1:
            raise ValueError(
                f"split fractions: {part!r} needs a split of train/validation/test and a fraction in (0, 1]"
            )
        pairs.append((split, fraction))
    if not pairs or abs(sum(f for _, f in pairs) - 1.0) > 1e-6 or len({s for s, _ in pairs}) != len(pairs):
        raise ValueError(f"split fractions {text!r}: each split once, fractions summing to 1")
    return tuple(pairs)


def _hash_position(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _ranges(fractions: Sequence[tuple[str, float]]) -> dict[str, tuple[float, float]]:
    ranges, total = {}, 0.0
    for split, fraction in fractions:
        ranges[split] = (total, total + fraction)
        total += fraction
    return ranges


def split_by_hash(name: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split of `name`: a SHA-256 of the name read as a number in [0, 1) against the cumulative
    fractions. The same name always lands in the same split, whatever else is in the folder."""
    position = _hash_position(name)
    for split, (_, end) in _ranges(fractions).items():
        if position < end:
            return split
    return fractions[-1][0]


def fill_empty_splits(assigned: dict[str, list[str]], fractions: Sequence[tuple[str, float]]) -> dict[str, list[str]]:
    """Gives each split the hash left empty one name: from the largest split, the name whose hash lies
    nearest to the empty split's range. Only small folders (a few dozen photos) meet this; a folder with
    fewer names than splits keeps its empty splits."""
    assigned = {split: list(assigned.get(split, ())) for split, _ in fractions}
    for split, (start, end) in _ranges(fractions).items():
        donor = max(assigned, key=lambda s: len(assigned[s]))
        if assigned[split] or len(assigned[donor]) < 2:
            continue
        name = min(assigned[donor], key=lambda n: min(abs(_hash_position(n) - start), abs(_hash_position(n) - end)))
        assigned[donor].remove(name)
        assigned[split].append(name)
    return assigned


# ------------------------------------------------------------------------------------------ pairing
def _layout_root(root: pathlib.Path, layout: Layout) -> pathlib.Path:
    for top in layout.top_folders:
        if (root / top).is_dir():
            return root / top
    return root


def _split_folders(root: pathlib.Path, layout: Layout) -> dict[str, pathlib.Path]:
    """split -> folder holding its kind folders, for the splits present under `root`."""
    found = {}
    for split, sub in layout.splits.items():
        candidates = [root / sub] if sub else [root]
        if sub:
            candidates.append(root / pathlib.PurePosixPath(sub).name)  # e.g. P3M-500-P/ given directly
        for folder in candidates:
            if any((folder / name).is_dir() for name in layout.folders["image"]):
                found[split] = folder
                break
    return found


def _kind_folder(folder: pathlib.Path, layout: Layout, kind: str) -> pathlib.Path | None:
    for name in layout.folders.get(kind, ()):
        if (folder / name).is_dir():
            return folder / name
    return None


def _files_by_stem(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    by_stem: dict[str, list[pathlib.Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(path.stem, []).append(path)
    return by_stem


def _locate(root, layout: Layout) -> tuple[pathlib.Path, dict[str, pathlib.Path]]:
    """(the layout's folder, split -> its folder); one folder to split by hash is keyed ''.
    LayoutNotFoundError when `root` is missing or holds none of the layout's folders."""
    given = pathlib.Path(os.path.expanduser(os.fspath(root)))
    if not given.is_dir():
        raise LayoutNotFoundError(f"{given}: no such folder (expected the {layout.description})")
    base = _layout_root(given, layout)
    folders = _split_folders(base, layout)
    if not folders and layout.hash_split and _kind_folder(base, layout, "image"):
        folders = {"": base}
    if not folders:
        expected = ", ".join(
            f"{sub + '/' if sub else ''}{layout.folders['image'][0]}/" for sub in layout.splits.values()
        )
        raise LayoutNotFoundError(f"{base}: not the {layout.description} (expected {expected})")
    return base, folders


def present_splits(root, layout_name: str, fractions: Sequence[tuple[str, float]] | None = None) -> list[str]:
    """The splits whose folders `root` has, in the layout's order, without reading any file; a folder
    to be split by hash has the splits of `fractions` (as `scan`). LayoutNotFoundError as `scan`."""
    layout = get_layout(layout_name)
    _, folders = _locate(root, layout)
    if "" in folders:
        return [split for split, _ in fractions or DEFAULT_FRACTIONS]
    return [split for split in layout.splits if split in folders]


def scan(
    root,
    layout_name: str,
    fractions: Sequence[tuple[str, float]] | None = None,
    splits: Sequence[str] | None = None,
) -> dict[str, list[Example]]:
    """The examples of every split of the folder `root` in `layout_name`, sorted by name.

    `fractions` split a `folder` layout that has no split subfolders (default 90 % train, 10 % test);
    `splits` keeps only those splits. Pairing problems (missing folders, unpaired files, several files of
    one kind for a name, empty splits) raise `BadInputError` naming every file. Files are not decoded
    here: `read_example` does that.
    """
    layout = get_layout(layout_name)
    base, folders = _locate(root, layout)
    by_hash = "" in folders
    problems: list[str] = []
    examples: dict[str, list[Example]] = {}
    for split, folder in folders.items():
        kind_folders = {kind: _kind_folder(folder, layout, kind) for kind in KINDS}
        if kind_folders["alpha"] is None:
            problems.append(f"{folder / layout.folders['alpha'][0]}: missing folder (the mattes)")
            continue
        files = {kind: _files_by_stem(path) for kind, path in kind_folders.items() if path is not None}
        for stem in sorted(set(files["image"]) | set(files["alpha"])):
            paths = {}
            for kind, by_stem in files.items():
                found = by_stem.get(stem, [])
                if len(found) > 1:
                    problems.append(f"{found[0]}: several {kind} files for {stem!r}: {', '.join(map(str, found))}")
                if found:
                    paths[kind] = os.fspath(found[0])
            for kind in REQUIRED_KINDS:
                if kind not in paths:
                    other = paths.get("image") or paths.get("alpha")
                    problems.append(f"{other}: has no {kind} (expected {kind_folders[kind] / stem}.*)")
            if ("fg" in paths) != ("bg" in paths):
                problems.append(f"{paths.get('fg') or paths.get('bg')}: has no {'bg' if 'fg' in paths else 'fg'} file")
            target = split_by_hash(stem, fractions or DEFAULT_FRACTIONS) if by_hash else split
            examples.setdefault(target, []).append(Example(target, stem, paths, is_blurred=False))
        for kind in ("trimap", "facemask", "fg", "bg"):  # maps whose image is missing
            for stem in sorted(set(files.get(kind, {})) - set(files["image"]) - set(files["alpha"])):
                problems.append(f"{files[kind][stem][0]}: a {kind} with no image or matte")
    if by_hash:
        examples = _fill_hash_splits(examples, fractions or DEFAULT_FRACTIONS)
    examples = {
        split: [dataclasses.replace(e, split=split, is_blurred=split in layout.blurred_splits) for e in found]
        for split, found in examples.items()
    }
    wanted = list(splits) if splits else ([s for s, _ in fractions or DEFAULT_FRACTIONS] if by_hash else folders)
    for split in wanted:
        if not examples.get(split):
            problems.append(_empty_split_problem(base, split, by_hash, fractions or DEFAULT_FRACTIONS, examples))
    if problems:
        raise BadInputError(_format(base, layout, problems))
    return {split: sorted(examples[split], key=lambda e: e.name) for split in wanted}


def _fill_hash_splits(examples: dict[str, list[Example]], fractions) -> dict[str, list[Example]]:
    by_name = {e.name: e for found in examples.values() for e in found}
    assigned = fill_empty_splits({split: [e.name for e in found] for split, found in examples.items()}, fractions)
    return {split: [by_name[name] for name in names] for split, names in assigned.items()}


def _empty_split_problem(base, split, by_hash, fractions, examples) -> str:
    if not by_hash:
        return f"{base}: split {split!r} has no examples"
    count = sum(len(found) for found in examples.values())
    text = ",".join(f"{s}={f:g}" for s, f in fractions)
    return (
        f"{base}: split {split!r} has no examples: {count} photo(s) cannot fill the {len(fractions)} splits of "
        f"--split_fractions {text} (add photos, or give fewer splits, e.g. --split_fractions train=1.0)"
    )


def describe(layout_name: str, path) -> str:
    """'folder PATH' for your own folder, 'ppm100 folder PATH' for a benchmark's."""
    return f"folder {path}" if layout_name == "folder" else f"{layout_name} folder {path}"


def _format(base, layout: Layout, problems: Sequence[str]) -> str:
    lines = [f"{describe(layout.name, base)} has {len(problems)} problem(s); nothing was written:"]
    return "\n".join(lines + [f"  - {p}" for p in problems])


# ------------------------------------------------------------------------------------------ reading
def _open(path: str) -> Image.Image:
    image = Image.open(path)
    image.load()  # truncation only shows while decoding
    return ImageOps.exif_transpose(image)


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright per EXIF; grey is replicated, an alpha channel dropped."""
    image = _open(path)
    if image.mode not in ("RGB", "L", "RGBA", "LA", "P"):
        raise ValueError(f"not an 8-bit image (mode {image.mode})")
    return np.asarray(image.convert("RGB"), np.uint8).copy()


def read_grey(path: str, kind: str) -> np.ndarray:
    """(H, W) uint8 of a single-channel 8-bit map; an RGB map whose channels are equal is read as grey.

    Raises ValueError for anything else (16-bit, float, palette, 1-bit or coloured files)."""
    image = _open(path)
    if image.mode == "L":
        return np.asarray(image, np.uint8).copy()
    if image.mode == "RGB":
        array = np.asarray(image, np.uint8)
        if np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
            return array[..., 0].copy()
        raise ValueError(f"{kind} is an RGB image whose channels differ (expected single-channel 8-bit grey)")
    raise ValueError(f"{kind} is not single-channel 8-bit (mode {image.mode}; expected 8-bit grey)")


def derived_trimap(alpha: np.ndarray) -> np.ndarray:
    """The trimap of an alpha that comes without one: `maps.derive_trimap` (0 outside the dilated
    `alpha > 0`, 255 inside the eroded `alpha == 255`, 128 between) with the elliptical kernel of
    `maps.trimap_kernel_size` (25 px at a 1080 px short side, scaled, at least 3 px)."""
    return maps.derive_trimap(alpha, maps.trimap_kernel_size(*alpha.shape[:2]))


def read_example(example: Example) -> tuple[dict, list[str]]:
    """(the example's maps as arrays, its problems as 'path: reason'), reading every file.

    Maps: image (H, W, 3), alpha and trimap (H, W) (the trimap derived when the folder has none:
    `trimap_derived` says so), facemask (H, W) when present, fg/bg (H, W, 3) when present.
    Problems: unreadable or wrong files, size mismatches, trimap values outside 0/128/255."""
    out: dict = {"name": example.name}
    problems = []
    for kind, path in example.files.items():
        try:
            out[kind] = read_rgb(path) if kind in ("image", "fg", "bg") else read_grey(path, kind)
        except ValueError as error:
            problems.append(f"{path}: {error}")
        except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
            problems.append(f"{path}: unreadable {kind} file ({type(error).__name__}: {error})")
    if "image" not in out:
        return out, problems
    height, width = out["image"].shape[:2]
    for kind in KINDS[1:]:
        if kind in out and out[kind].shape[:2] != (height, width):
            h, w = out[kind].shape[:2]
            problems.append(f"{example.files[kind]}: {kind} is {w}x{h} but its image is {width}x{height}")
    if "trimap" in out:
        bad = np.setdiff1d(np.unique(out["trimap"]), maps.TRIMAP_VALUES)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if bad.size > 8 else "")
            problems.append(f"{example.files['trimap']}: trimap has values outside {{0, 128, 255}}: {shown}")
    out["trimap_derived"] = "trimap" not in out
    if out["trimap_derived"] and "alpha" in out and not problems:
        out["trimap"] = derived_trimap(out["alpha"])
    return out, problems


def load_example(example: Example) -> dict:
    """The example's maps as arrays (see `read_example`); ValueError naming every bad file."""
    out, problems = read_example(example)
    if problems:
        raise ValueError("; ".join(problems))
    return out
