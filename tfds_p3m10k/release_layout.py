"""Finds the P3M-10k release in a manual_dir and validates every file up front.

Accepted in `manual_dir` (docs/design.md section 2 has the layout):
  * the extracted `P3M-10k/` folder (or `manual_dir` itself being that folder);
  * the downloaded zip (any `*.zip` directly in `manual_dir` holding the layout);
  * optionally the separately released facemasks, as a folder or zip whose paths
    contain a `facemask` component (e.g. `.../P3M-500-P/facemask/p_x.png`); the
    split is read from the path (`P3M-500-P`, `P3M-500-NP`, else `train`);
  * optionally `train/fg_blurred/` (or `train/fg/`) and `train/bg/` inside the release.

`scan_release` pairs files by stem and then fully decodes every file (in parallel)
so that missing folders, unpaired files, unreadable/truncated files, size mismatches
and bad trimap values are all found before anything is written. Nothing here
imports TensorFlow Datasets; worker processes stay light.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import multiprocessing
import os
import posixpath
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from p3m_jax.common import cli
from tfds_p3m10k import maps
from tfds_p3m10k.release_files import (  # noqa: F401  (part of this module's interface)
    FileRef,
    FileTree,
    facemask_split,
    is_facemask_path,
    Release,
    BadInputError,
    locate_release,
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAP_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class SplitLayout:
    """Where one split lives inside the release."""

    name: str
    folder: str  # relative to the release root
    image_folder: str
    has_trimap: bool
    is_blurred: bool


SPLIT_LAYOUTS = (
    SplitLayout("train", "train", "blurred_image", has_trimap=False, is_blurred=True),
    SplitLayout("p3m_500_p", "validation/P3M-500-P", "blurred_image", has_trimap=True, is_blurred=True),
    SplitLayout("p3m_500_np", "validation/P3M-500-NP", "original_image", has_trimap=True, is_blurred=False),
)
SPLIT_NAMES = tuple(spec.name for spec in SPLIT_LAYOUTS)
FG_FOLDERS = ("fg_blurred", "fg")
BG_FOLDERS = ("bg",)


# ---------------------------------------------------------------------------
# Pairing files into examples


@dataclasses.dataclass(frozen=True)
class Record:
    """The files of one example (None where the release has no such file)."""

    split: str
    name: str
    image: FileRef
    mask: FileRef
    trimap: FileRef | None = None
    facemask: FileRef | None = None
    fg: FileRef | None = None
    bg: FileRef | None = None
    is_blurred: bool = True

    def files(self) -> list[FileRef]:
        return [f for f in (self.image, self.mask, self.trimap, self.facemask, self.fg, self.bg) if f is not None]


@dataclasses.dataclass
class Problem:
    """One bad-input finding; `record` is None for problems no skipping can fix."""

    path: str
    reason: str
    record: Record | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _files_in(tree: FileTree, folder: str, extensions: Sequence[str]) -> dict[str, list[str]]:
    """stem -> relative paths of the files directly in `folder` with those extensions."""
    prefix = folder.rstrip("/") + "/"
    by_stem = collections.defaultdict(list)
    for relative in tree.files:
        if relative.startswith(prefix) and "/" not in relative[len(prefix) :]:
            stem, ext = os.path.splitext(relative[len(prefix) :])
            if ext.lower() in extensions:
                by_stem[stem].append(relative)
    return by_stem


def _folder_present(tree: FileTree, folder: str) -> bool:
    prefix = folder.rstrip("/") + "/"
    return any(f.startswith(prefix) for f in tree.files)


def pair_files(release: Release) -> tuple[dict[str, list[Record]], list[Problem], list[str]]:
    """Pairs the release's files by stem.

    Returns:
      (records per split sorted by name, problems, log notes). Problems of missing
      folders have no record (cannot be skipped); unpaired files are reported
      against the example they belong to.
    """
    tree, root = release.tree, release.root
    records: dict[str, list[Record]] = {}
    problems: list[Problem] = []
    notes: list[str] = []

    for spec in SPLIT_LAYOUTS:
        base = root + spec.folder
        required = [spec.image_folder, "mask"] + (["trimap"] if spec.has_trimap else [])
        missing = [f for f in required if not _folder_present(tree, f"{base}/{f}")]
        for folder in missing:
            problems.append(Problem(tree.describe(f"{base}/{folder}"), "missing (or empty) folder"))
        if missing:
            records[spec.name] = []
            continue

        images = _files_in(tree, f"{base}/{spec.image_folder}", IMAGE_EXTENSIONS)
        masks = _files_in(tree, f"{base}/mask", MAP_EXTENSIONS)
        trimaps = _files_in(tree, f"{base}/trimap", MAP_EXTENSIONS) if spec.has_trimap else {}
        fgs, bgs = {}, {}
        if spec.name == "train":
            for folder in FG_FOLDERS:
                if _folder_present(tree, f"{base}/{folder}"):
                    fgs = _files_in(tree, f"{base}/{folder}", IMAGE_EXTENSIONS)
                    break
            for folder in BG_FOLDERS:
                if _folder_present(tree, f"{base}/{folder}"):
                    bgs = _files_in(tree, f"{base}/{folder}", IMAGE_EXTENSIONS)
                    break
            if fgs or bgs:
                notes.append(f"train: foreground for {len(fgs)} and background for {len(bgs)} examples found on disk")

        split_records = []
        for stem in sorted(set(images) | set(masks) | set(trimaps)):
            found = {"image": images.get(stem, []), "mask": masks.get(stem, [])}
            if spec.has_trimap:
                found["trimap"] = trimaps.get(stem, [])
            any_path = next(p for paths in found.values() for p in paths)
            first = {kind: (paths[0] if paths else None) for kind, paths in found.items()}
            record = Record(
                split=spec.name,
                name=stem,
                image=tree.ref(first["image"] or any_path),
                mask=tree.ref(first["mask"] or any_path),
                trimap=tree.ref(first["trimap"]) if first.get("trimap") else None,
                fg=tree.ref(fgs[stem][0]) if stem in fgs and stem in bgs else None,
                bg=tree.ref(bgs[stem][0]) if stem in fgs and stem in bgs else None,
                is_blurred=spec.is_blurred,
            )
            for kind, paths in found.items():
                if len(paths) > 1:
                    problems.append(
                        Problem(
                            tree.describe(paths[0]),
                            f"several {kind} files for {stem!r}: " + ", ".join(tree.describe(p) for p in paths),
                            record,
                        )
                    )
                elif not paths:
                    folder = spec.image_folder if kind == "image" else kind
                    present = tree.describe(any_path)  # image, else mask, else trimap
                    problems.append(
                        Problem(
                            present, f"has no {kind} (expected {tree.describe(f'{base}/{folder}/{stem}')}.*)", record
                        )
                    )
            if (stem in fgs) != (stem in bgs):
                notes.append(f"train: {stem} has only one of fg/bg on disk; stored without fg/bg")
            split_records.append(record)
        records[spec.name] = split_records

    _attach_facemasks(release, records, notes)
    return records, problems, notes


def _attach_facemasks(release: Release, records: dict[str, list[Record]], notes: list[str]) -> None:
    """Fills `Record.facemask` from every facemask source (first found wins)."""
    found: dict[tuple[str, str], FileRef] = {}
    for tree in release.facemask_trees:
        for relative in tree.files:
            stem, ext = os.path.splitext(posixpath.basename(relative))
            if is_facemask_path(relative) and ext.lower() in MAP_EXTENSIONS:
                found.setdefault((facemask_split(relative), stem), tree.ref(relative))
    if not found:
        return
    used = 0
    for split, split_records in records.items():
        for i, record in enumerate(split_records):
            ref = found.get((split, record.name))
            if ref is not None:
                split_records[i] = dataclasses.replace(record, facemask=ref)
                used += 1
    notes.append(f"facemasks: {used} matched to examples, {len(found) - used} without an example (ignored)")


# ---------------------------------------------------------------------------
# Decoding every file


@dataclasses.dataclass(frozen=True)
class FileFacts:
    """What the scan learnt about the files of one record (used when encoding)."""

    height: int
    width: int
    image_as_is: bool  # the image bytes decode to HxWx3 uint8 as they are
    mask_as_is: bool
    trimap_as_is: bool
    facemask_as_is: bool
    fg_bg_as_is: bool


def _open_fully(ref: FileRef) -> Image.Image:
    """Opens and fully decodes a file (truncation only shows while decoding)."""
    image = Image.open(io.BytesIO(ref.read_bytes()))
    image.load()
    return image


def check_record(record: Record) -> tuple[FileFacts | None, list[str]]:
    """Fully decodes the files of a record; returns (facts, problems as 'path: reason')."""
    problems = []

    def load(ref):
        try:
            return _open_fully(ref)
        except Exception as e:  # pylint: disable=broad-except
            problems.append(f"{ref}: unreadable or truncated file ({type(e).__name__}: {e})")
            return None

    image = load(record.image)
    mask = load(record.mask)
    if image is None or mask is None:
        for ref in (record.trimap, record.facemask, record.fg, record.bg):
            if ref is not None:
                load(ref)
        return None, problems
    width, height = image.size
    image_as_is = image.format in ("JPEG", "PNG") and image.mode in ("RGB", "L")

    def check_size(ref, pil, kind):
        if pil.size != image.size:
            problems.append(
                f"{ref}: {kind} is {pil.size[0]}x{pil.size[1]} but its image {record.image} is {width}x{height}"
            )
            return False
        return True

    def grey(ref, pil, kind):
        try:
            return maps.first_channel(pil)
        except ValueError as e:
            problems.append(f"{ref}: {kind}: {e}")
            return None

    check_size(record.mask, mask, "mask")
    grey(record.mask, mask, "mask")
    trimap_as_is = facemask_as_is = fg_bg_as_is = True
    if record.trimap is not None:
        trimap = load(record.trimap)
        if trimap is not None and check_size(record.trimap, trimap, "trimap"):
            values = grey(record.trimap, trimap, "trimap")
            if values is not None:
                bad_values = np.setdiff1d(np.unique(values), maps.TRIMAP_VALUES)
                if bad_values.size:
                    shown = ", ".join(str(v) for v in bad_values[:8]) + (" ..." if bad_values.size > 8 else "")
                    problems.append(f"{record.trimap}: trimap has values outside {{0, 128, 255}}: {shown}")
            trimap_as_is = maps.is_plain_grey_png(trimap)
    if record.facemask is not None:
        facemask = load(record.facemask)
        if facemask is not None and check_size(record.facemask, facemask, "facemask"):
            grey(record.facemask, facemask, "facemask")
            facemask_as_is = maps.is_plain_grey_png(facemask)
    for ref, kind in ((record.fg, "foreground"), (record.bg, "background")):
        if ref is not None:
            pil = load(ref)
            if pil is not None and check_size(ref, pil, kind):
                fg_bg_as_is &= pil.format in ("JPEG", "PNG") and pil.mode == "RGB"
    if problems:
        return None, problems
    return FileFacts(
        height, width, image_as_is, maps.is_plain_grey_png(mask), trimap_as_is, facemask_as_is, fg_bg_as_is
    ), []


def parallel_map(
    function, items: Sequence, num_workers: int, desc: str | None, inline_below: int = 32, initializer=None
) -> Iterable:
    """Ordered map, in a process pool for larger inputs; a progress bar if `desc`."""
    progress = lambda results: cli.progress(results, total=len(items), desc=desc, unit="example") if desc else results
    if num_workers <= 1 or len(items) < inline_below:
        yield from progress(map(function, items))
        return
    # 'fork' where available: 'spawn'/'forkserver' re-run the caller's __main__ in
    # every worker, which breaks scripts and notebooks without a main guard. The
    # workers only run pure functions of this package (no locks shared with threads).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=initializer) as pool:
        yield from progress(pool.map(function, items, chunksize=4))


@dataclasses.dataclass
class ScanResult:
    """Validated records per split, with their facts, and what was skipped."""

    records: dict[str, list[tuple[Record, FileFacts]]]
    skipped: dict[str, list[str]]  # split -> names left out
    problems: list[Problem]
    notes: list[str]


def scan_release(manual_dir: str, skip_bad_examples: bool = False, num_workers: int = 1) -> ScanResult:
    """Locates, pairs and fully validates the release.

    Raises:
      BadInputError: naming every offending file, when anything is wrong and
        `skip_bad_examples` is False, or when a problem cannot be skipped
        (no release, missing folders).
    """
    release = locate_release(manual_dir)
    records, problems, notes = pair_files(release)
    fatal = [p for p in problems if p.record is None]
    if fatal:
        raise BadInputError(_format_problems(release, problems))

    bad_keys = {(p.record.split, p.record.name) for p in problems}
    to_check = [r for split in SPLIT_NAMES for r in records[split] if (r.split, r.name) not in bad_keys]
    checked = {}
    for record, (facts, found) in zip(
        to_check, parallel_map(check_record, to_check, num_workers, "Checking P3M-10k files")
    ):
        if found:
            problems.extend(Problem(text.split(": ", 1)[0], text.split(": ", 1)[1], record) for text in found)
        else:
            checked[(record.split, record.name)] = facts

    if problems and not skip_bad_examples:
        raise BadInputError(_format_problems(release, problems))
    result = ScanResult({}, {}, problems, notes)
    for split in SPLIT_NAMES:
        result.records[split] = [
            (r, checked[(r.split, r.name)]) for r in records[split] if (r.split, r.name) in checked
        ]
        result.skipped[split] = sorted({p.record.name for p in problems if p.record.split == split})
    empty = [split for split in SPLIT_NAMES if not result.records[split]]
    if empty:
        raise BadInputError(
            f"P3M-10k input in {release.describe()}: no example left in "
            + ", ".join(f"{split} after skipping {len(result.skipped[split])} bad one(s)" for split in empty)
            + "; nothing was written:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return result


def _format_problems(release: Release, problems: list[Problem]) -> str:
    lines = [f"P3M-10k input in {release.describe()} has {len(problems)} problem(s); nothing was written:"]
    lines += [f"  - {p}" for p in problems]
    if all(p.record is not None for p in problems):
        lines.append(
            "Fix or remove these files, or build with skip_bad_examples=True "
            "(--skip_bad_examples) to leave the affected examples out."
        )
    return "\n".join(lines)
