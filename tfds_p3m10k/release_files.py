"""The files of a P3M-10k download, whether extracted folders or zips, and where the release root is.

`locate_release(manual_dir)` finds the release (the extracted `P3M-10k/` folder, `manual_dir` itself,
or a `*.zip` holding the layout) and any separately released facemasks (a folder or zip whose paths
contain a `facemask` component). Nothing here imports TensorFlow Datasets.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import zipfile


class BadInputError(ValueError):
    """The manual_dir content cannot be built; the message names every offending path."""


# ---------------------------------------------------------------------------
# Files in folders or zips


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file on disk (`archive is None`) or a member of a zip archive."""

    path: str
    archive: str | None = None

    def read_bytes(self) -> bytes:
        if self.archive is None:
            with open(self.path, "rb") as f:
                return f.read()
        return _open_zip(self.archive).read(self.path)

    def __str__(self) -> str:
        return self.path if self.archive is None else f"{self.archive}!{self.path}"

    @property
    def stem(self) -> str:
        return os.path.splitext(posixpath.basename(self.path))[0]


_ZIP_CACHE: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    """One open ZipFile per archive and process.

    Keyed by process id: a forked worker must not reuse its parent's handle, whose
    file offset it would share (concurrent seeks would corrupt reads).
    """
    key = (os.getpid(), path)
    handle = _ZIP_CACHE.get(key)
    if handle is None:
        handle = _ZIP_CACHE[key] = zipfile.ZipFile(path)
    return handle


@dataclasses.dataclass
class FileTree:
    """The file list of a folder or zip, as '/'-separated paths relative to its top."""

    top: str
    is_zip: bool
    files: list[str]

    def ref(self, relative: str) -> FileRef:
        if self.is_zip:
            return FileRef(relative, self.top)
        return FileRef(os.path.join(self.top, *relative.split("/")))

    def describe(self, relative: str = "") -> str:
        if self.is_zip:
            return f"{self.top}!{relative}"
        return os.path.join(self.top, *relative.split("/")) if relative else self.top


def _ignored(relative: str) -> bool:
    parts = relative.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _list_folder(top: str) -> FileTree:
    files = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, top).replace(os.sep, "/")
        for filename in sorted(filenames):
            relative = filename if rel_dir == "." else f"{rel_dir}/{filename}"
            if not _ignored(relative):
                files.append(relative)
    return FileTree(top, False, files)


def _list_zip(path: str) -> FileTree:
    try:
        names = _open_zip(path).namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadInputError(f"{path}: not a readable zip archive ({e})") from e
    files = sorted(n for n in names if not n.endswith("/") and not _ignored(n))
    return FileTree(path, True, files)


# ---------------------------------------------------------------------------
# Locating the release

_ROOT_MARKERS = ("train/blurred_image/", "train/mask/", "validation/P3M-500-P/", "validation/P3M-500-NP/")


def _release_roots(tree: FileTree) -> set[str]:
    """Prefixes (ending in '/' or empty) under which the release layout starts."""
    roots = set()
    for relative in tree.files:
        for marker in _ROOT_MARKERS:
            index = relative.find(marker)
            while index >= 0:
                if index == 0 or relative[index - 1] == "/":
                    roots.add(relative[:index])
                index = relative.find(marker, index + 1)
    return roots


@dataclasses.dataclass
class Release:
    """The located release: its file tree, root prefix and the facemask trees."""

    tree: FileTree
    root: str  # prefix inside tree, '' or ending in '/'
    facemask_trees: list[FileTree]

    def describe(self, relative: str = "") -> str:
        return self.tree.describe(self.root + relative)


def locate_release(manual_dir: str) -> Release:
    """Finds the release (folder preferred over zip) and any facemask sources."""
    manual_dir = os.fspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise BadInputError(f"manual_dir does not exist or is not a folder: {manual_dir}")
    trees = [_list_folder(manual_dir)]
    # Zips directly in manual_dir (the folder tree above lists them as files).
    for relative in trees[0].files:
        if "/" not in relative and relative.lower().endswith(".zip"):
            trees.append(_list_zip(os.path.join(manual_dir, relative)))

    release = None
    for tree in trees:
        roots = _release_roots(tree)
        if len(roots) > 1:
            listing = "\n".join(f"  - {tree.describe(r)}" for r in sorted(roots))
            raise BadInputError(f"found more than one P3M-10k release in {tree.describe()}; keep one:\n{listing}")
        if roots:
            release = Release(tree, roots.pop(), [])
            break  # the folder tree comes first: an extracted copy wins over the zip
    if release is None:
        raise BadInputError(
            f"no P3M-10k release found in {manual_dir}: expected the extracted P3M-10k/ folder "
            "(with train/ and validation/) or the downloaded zip directly in manual_dir."
        )
    # Facemasks may sit in the release itself or in any other folder or zip.
    release.facemask_trees = [t for t in trees if any(is_facemask_path(f) for f in t.files)]
    return release


def is_facemask_path(relative: str) -> bool:
    return any("facemask" in part.lower() for part in relative.split("/")[:-1])


def facemask_split(relative: str) -> str:
    parts = relative.split("/")
    if "P3M-500-NP" in parts:
        return "p3m_500_np"
    if "P3M-500-P" in parts:
        return "p3m_500_p"
    return "train"
