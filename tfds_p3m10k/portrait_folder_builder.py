"""TFDS builder `portrait_folder`: the user's own portraits, or a public benchmark, as ArrayRecord shards.

Built from a folder in one of the layouts of `folder_layout.py` (the user's `images/` + `alphas/`,
PPM-100, AIM-500, the P3M-10k release) with the feature spec of `p3m10k`, so that the grain pipeline,
the trainer, `evaluate` and P3M-CP read it unchanged. Each build is a config named by the user, read
back as `portrait_folder/<name>` (from its folder: no builder code is needed to read it):

    python -m tfds_p3m10k.build --folder ~/my_portraits --name mine --data_dir ~/tensorflow_datasets \\
        [--layout folder|ppm100|aim500|p3m10k] [--split_fractions train=0.9,test=0.1] \\
        [--anonymize blur|mosaic|zero|none] [--anonymize_test none] [--missing_face stop|drop|keep]

Splits: those of the folder (`train`, `validation`, `test`; the benchmarks: `test`). Trimaps missing from
the folder are derived from the alpha (`folder_layout.derived_trimap`) and the build report counts them.

With `use_beam` (`--beam_options`), the examples are encoded (and fg/bg estimated, the slow part) by an
Apache Beam pipeline, as TFDS builders run on Beam (`pip install "p3m-jax[beam]"`); the files are still
checked first in local processes, so that bad input is refused before the pipeline starts.

Anonymisation (`anonymize.py`) obfuscates the faces of the train/validation splits (`anonymize`) and of
the test split (`anonymize_test`, default none, like P3M-500-NP). Faces come from the folder's
`facemasks/`, else from the BlazeFace detector (`face_detector.py`). The facemask is stored with
`has_facemask`, and `is_blurred` says the faces were obfuscated, so P3M-CP works on the result. An image
in which no face is found stops the build (`missing_face=stop`, naming every such file), is left out
(`drop`) or is stored as it is with `is_blurred` false (`keep`); the report names them either way.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tfds_p3m10k import anonymize as anonymize_lib
from tfds_p3m10k import encode
from tfds_p3m10k import face_detector
from tfds_p3m10k import folder_layout
from tfds_p3m10k import release_layout
from tfds_p3m10k import maps
from tfds_p3m10k.p3m10k_dataset_builder import features
from tfds_p3m10k.release_files import BadInputError

_log = logging.getLogger(__name__)

DATASET_NAME = "portrait_folder"
MISSING_FACE = ("stop", "drop", "keep")
TEST_SPLITS = ("test", "p3m_500_p", "p3m_500_np")  # splits anonymised by `anonymize_test`
ANONYMIZED_JPEG_QUALITY = 95


@dataclasses.dataclass
class PortraitFolderConfig(tfds.core.BuilderConfig):
    """One build of a folder; `folder_config` makes and checks it."""

    folder: str = ""
    layout: str = "folder"
    split_fractions: tuple = folder_layout.DEFAULT_FRACTIONS
    anonymize: str = "none"  # train and validation splits
    anonymize_test: str = "none"  # test splits
    missing_face: str = "stop"
    estimate_fg_bg: bool = False


def folder_config(
    name: str,
    folder: str,
    layout: str = "folder",
    split_fractions=folder_layout.DEFAULT_FRACTIONS,
    anonymize: str = "none",
    anonymize_test: str = "none",
    missing_face: str = "stop",
    estimate_fg_bg: bool = False,
) -> PortraitFolderConfig:
    """A checked config (ValueError naming the bad argument)."""
    if not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '.'")
    folder_layout.get_layout(layout)
    for flag, value in (("--anonymize", anonymize), ("--anonymize_test", anonymize_test)):
        if value not in anonymize_lib.METHODS:
            raise ValueError(f"{flag} {value!r}: expected one of {', '.join(anonymize_lib.METHODS)}")
    if missing_face not in MISSING_FACE:
        raise ValueError(f"--missing_face {missing_face!r}: expected one of {', '.join(MISSING_FACE)}")
    if isinstance(split_fractions, str):
        split_fractions = folder_layout.parse_fractions(split_fractions)
    return PortraitFolderConfig(
        name=name,
        description=f"{layout} folder {folder}; anonymize train {anonymize}, test {anonymize_test}",
        folder=os.path.abspath(os.path.expanduser(folder)),
        layout=layout,
        split_fractions=tuple(tuple(p) for p in split_fractions),
        anonymize=anonymize,
        anonymize_test=anonymize_test,
        missing_face=missing_face,
        estimate_fg_bg=estimate_fg_bg,
    )


def method_for(config: PortraitFolderConfig, split: str) -> str:
    return config.anonymize_test if split in TEST_SPLITS else config.anonymize


# ------------------------------------------------------------------------- worker functions (picklable)
def check_job(job: tuple[folder_layout.Example, bool]) -> tuple[list[str], list, bool]:
    """(problems, face boxes or None, trimap derived) of one example; detects faces when asked."""
    example, detect = job
    arrays, problems = folder_layout.read_example(example)
    if problems:
        return problems, None, False
    boxes = None
    if detect:
        try:
            boxes = [face.box for face in face_detector.shared_detector()(arrays["image"])]
        except face_detector.DetectorUnavailableError as error:
            return [str(error)], None, False
    return [], boxes, arrays["trimap_derived"]


def _plain_bytes(path: str) -> bytes | None:
    """The file's bytes when readers decode them as they are (JPEG/PNG without an EXIF rotation)."""
    with Image.open(path) as image:
        if image.format not in ("JPEG", "PNG") or image.mode not in ("RGB", "L"):
            return None
        if image.getexif().get(0x0112, 1) != 1:
            return None
    with open(path, "rb") as f:
        return f.read()


def _encode_rgb(array: np.ndarray, like_path: str) -> bytes:
    if os.path.splitext(like_path)[1].lower() in (".jpg", ".jpeg"):
        return maps.encode_jpeg(array, ANONYMIZED_JPEG_QUALITY)
    return maps.encode_png(array)


def encode_job(job) -> tuple[str, dict]:
    """(example, anonymisation method, face boxes or None, estimate fg/bg) -> (key, p3m10k features)."""
    example, method, boxes, estimate = job
    arrays = folder_layout.load_example(example)
    image = arrays["image"]
    height, width = image.shape[:2]
    facemask = arrays.get("facemask")
    if facemask is None and boxes:
        facemask = anonymize_lib.facemask_from_faces(boxes, height, width)
    obfuscated = method != "none" and facemask is not None and bool((facemask > 0).any())
    if obfuscated:
        image = anonymize_lib.obfuscate(image, facemask, method)
        image_bytes = _encode_rgb(image, example.files["image"])
    else:
        image_bytes = _plain_bytes(example.files["image"]) or maps.encode_png(image)
    out = {
        "image": image_bytes,
        "alpha": maps.encode_png(arrays["alpha"]),
        "trimap": maps.encode_png(arrays["trimap"]),
        "facemask": encode.PLACEHOLDER_GREY if facemask is None else maps.encode_png(facemask),
        "has_facemask": facemask is not None,
        "fg": encode.PLACEHOLDER_RGB,
        "bg": encode.PLACEHOLDER_RGB,
        "has_fg_bg": False,
        "name": example.name,
        "is_blurred": obfuscated or example.is_blurred,
    }
    if "fg" in arrays:
        out["fg"], out["bg"], out["has_fg_bg"] = maps.encode_png(arrays["fg"]), maps.encode_png(arrays["bg"]), True
    elif estimate and example.split == "train":
        fg, bg = encode.estimate_fg_bg(image, arrays["alpha"])
        out["fg"] = maps.encode_jpeg(fg, encode.ESTIMATED_FG_BG_JPEG_QUALITY)
        out["bg"] = maps.encode_jpeg(bg, encode.ESTIMATED_FG_BG_JPEG_QUALITY)
        out["has_fg_bg"] = True
    return example.name, out


# ------------------------------------------------------------------------------------------ builder
@dataclasses.dataclass
class BuildReport:
    """What a build did, per split: examples, derived trimaps, faces found (0 / 1 / several),
    anonymised images, and the names without a face that were dropped or kept un-anonymised (all of
    them: a photo kept with its face visible must be findable from the report)."""

    examples: dict = dataclasses.field(default_factory=dict)
    derived_trimaps: dict = dataclasses.field(default_factory=dict)
    faces: dict = dataclasses.field(default_factory=dict)  # split -> {"0": n, "1": n, "several": n}
    anonymized: dict = dataclasses.field(default_factory=dict)
    dropped: dict = dataclasses.field(default_factory=dict)
    kept_visible: dict = dataclasses.field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for split, count in self.examples.items():
            parts = [f"{split}: {count} examples"]
            if self.derived_trimaps.get(split):
                parts.append(f"{self.derived_trimaps[split]} trimaps derived from the alpha")
            if split in self.faces:
                f = self.faces[split]
                parts.append(f"faces found: none in {f['0']}, one in {f['1']}, several in {f['several']}")
            if split in self.anonymized:
                parts.append(f"{self.anonymized[split]} anonymised")
            out.append(", ".join(parts))
            for label, names in (
                ("dropped (no face found)", self.dropped),
                ("kept with visible faces", self.kept_visible),
            ):
                if names.get(split):  # every name: each is a photo to look at (or to add a facemask for)
                    out.append(f"  {label}: {len(names[split])} ({', '.join(names[split])})")
        return out


class PortraitFolder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for a folder of portraits (registered as `portrait_folder`); configs come from
    `folder_config`."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = []

    def __init__(self, *, num_workers: int | None = None, use_beam: bool = False, **kwargs):
        """`num_workers`: local processes for checking and encoding (default: the CPU count).
        `use_beam`: encode (and estimate fg/bg) in an Apache Beam pipeline, run by the runner of the
        `beam_options` given to `download_and_prepare` through its DownloadConfig."""
        kwargs.setdefault("file_format", "array_record")
        self._num_workers = num_workers or os.cpu_count() or 1
        self._use_beam = use_beam
        self.report = BuildReport()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=features("jpeg"), supervised_keys=("image", "alpha"))

    def _split_generators(self, dl_manager):
        config = self.builder_config
        start = time.time()
        examples = folder_layout.scan(config.folder, config.layout, config.split_fractions)
        jobs = []
        for split, split_examples in examples.items():
            detect = method_for(config, split) != "none"
            jobs += [(e, detect and "facemask" not in e.files) for e in split_examples]
        checked = list(
            release_layout.parallel_map(
                check_job, jobs, self._num_workers, f"Checking {config.folder}", initializer=None
            )
        )
        # Each problem once: a missing face detector fails every image with the same message.
        problems = list(dict.fromkeys(p for found, _, _ in checked for p in found))
        if problems:
            raise BadInputError(
                f"{folder_layout.describe(config.layout, config.folder)} has {len(problems)} problem(s); "
                "nothing was written:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        results = {(job[0].split, job[0].name): result for job, result in zip(jobs, checked)}
        report, kept, no_face = self.report, {}, []
        for split, split_examples in examples.items():
            method = method_for(config, split)
            counts = collections.Counter()
            report.derived_trimaps[split] = sum(results[(split, e.name)][2] for e in split_examples)
            kept[split] = []
            for example in split_examples:
                boxes = results[(split, example.name)][1]
                if method == "none":
                    kept[split].append((example, method, None))
                    continue
                faces = 1 if boxes is None else len(boxes)  # a given facemask counts as one face
                counts["0" if faces == 0 else "1" if faces == 1 else "several"] += 1
                if faces:
                    kept[split].append((example, method, boxes))
                elif config.missing_face == "stop":
                    no_face.append(example.files["image"])
                elif config.missing_face == "drop":
                    report.dropped.setdefault(split, []).append(example.name)
                else:
                    report.kept_visible.setdefault(split, []).append(example.name)
                    kept[split].append((example, "none", None))
            if method != "none":
                report.faces[split] = {key: counts[key] for key in ("0", "1", "several")}
                report.anonymized[split] = sum(1 for _, m, _ in kept[split] if m != "none")
            report.examples[split] = len(kept[split])
        if no_face:
            raise BadInputError(
                f"no face found in {len(no_face)} image(s) of a build that anonymises them; nothing was written "
                f"(add their facemasks/, or --missing_face drop to leave them out, or keep to store them as they "
                f"are):\n" + "\n".join(f"  - {p}" for p in no_face)
            )
        empty = [split for split, items in kept.items() if not items]
        if empty:
            raise BadInputError(f"{config.folder}: no example left in split(s) {', '.join(empty)}; nothing was written")
        _log.info("checked %d examples in %.1f s", len(jobs), time.time() - start)
        jobs = {
            split: [(example, method, boxes, config.estimate_fg_bg) for example, method, boxes in items]
            for split, items in kept.items()
        }
        if self._use_beam:
            return {split: self._beam_examples(split, split_jobs) for split, split_jobs in jobs.items()}
        return {split: self._generate_examples(split_jobs) for split, split_jobs in jobs.items()}

    def _generate_examples(self, jobs):
        initializer = encode.worker_init if self.builder_config.estimate_fg_bg else None
        yield from release_layout.parallel_map(
            encode_job, jobs, self._num_workers, None, inline_below=8, initializer=initializer
        )

    def _beam_examples(self, split: str, jobs):
        """The same examples as `_generate_examples`, encoded by the Beam workers."""
        beam = tfds.core.lazy_imports.apache_beam
        return f"Encode {split}" >> (beam.Create(jobs) | beam.Map(encode_job))
