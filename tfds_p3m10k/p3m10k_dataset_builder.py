"""TFDS builder `p3m10k`: P3M-10k portrait matting (manual download) and a synthetic stand-in.

Configs:
  * `default`: the real release from `manual_dir` (folder or zip, see release_layout.py);
    `fg`/`bg` only where `train/fg_blurred|fg/` and `train/bg/` exist on disk.
  * `estimate_fg_bg`: as `default`, with train `fg`/`bg` estimated at build time by
    pymatting's `estimate_foreground_ml` (in parallel worker processes; slow).
  * `synthetic`: no download; procedurally rendered portraits (synthetic.py), 48
    train and 8 + 8 test examples of 128x128 by default. Other sizes/counts:
    `P3m10k(config=synthetic_config(image_size=(256, 256), num_train=200, num_test=16))`,
    the builder kwargs `synthetic_image_size=`, `synthetic_num_train=`,
    `synthetic_num_test=`, or `python -m tfds_p3m10k.build --tfds_config=synthetic
    --synthetic_image_size=256 ...`; such a config is named e.g.
    `synthetic_256x256_200_16_16` and read back under that name.

Splits: `train` (9,421), `p3m_500_p` (500), `p3m_500_np` (500).

Features, as numpy from `tfds.data_source('p3m10k/<config>', split=..., data_dir=...)`:
  image         uint8 HxWx3   the release's JPEG bytes as stored (synthetic: PNG)
  alpha         uint8 HxWx1   0..255 (channel 0 of 3-channel masks)
  trimap        uint8 HxWx1   0/128/255; test splits: the released trimap; train (no
                              trimap released): derived from alpha, dilate(alpha>0) /
                              erode(alpha==255), elliptical kernel 25 px at a 1080 px
                              short side (maps.trimap_kernel_size)
  facemask      uint8 HxWx1   the released face mask when `has_facemask`, else 1x1x1 zeros
  has_facemask  bool
  fg, bg        uint8 HxWx3   foreground/background when `has_fg_bg`, else 1x1x3 zeros
  has_fg_bg     bool
  name          bytes         file stem, e.g. b'p_07141906' (Text feature)
  is_blurred    bool          faces obfuscated (train, p3m_500_p) or not (p3m_500_np)

Default file format: array_record. Neither building nor reading needs TensorFlow:
images are handed to TFDS as encoded bytes and decoded with OpenCV (or PIL).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from tfds_p3m10k import encode
from tfds_p3m10k import release_layout
from tfds_p3m10k import maps
from tfds_p3m10k import synthetic

_log = logging.getLogger(__name__)

SYNTHETIC_DEFAULT_SIZE = (128, 128)
SYNTHETIC_DEFAULT_NUM_TRAIN = 48
SYNTHETIC_DEFAULT_NUM_TEST = 8


@dataclasses.dataclass
class P3m10kConfig(tfds.core.BuilderConfig):
    """Builder config; see the module docstring for the three named configs."""

    source: str = "release"  # 'release' (manual_dir) or 'synthetic'
    estimate_fg_bg: bool = False
    synthetic_image_size: tuple[int, int] = SYNTHETIC_DEFAULT_SIZE  # (height, width)
    synthetic_num_train: int = SYNTHETIC_DEFAULT_NUM_TRAIN
    synthetic_num_test: int = SYNTHETIC_DEFAULT_NUM_TEST  # per test split
    synthetic_seed: int = 0


def synthetic_config(
    image_size: int | tuple[int, int] = SYNTHETIC_DEFAULT_SIZE,
    num_train: int = SYNTHETIC_DEFAULT_NUM_TRAIN,
    num_test: int = SYNTHETIC_DEFAULT_NUM_TEST,
    seed: int = 0,
    name: str | None = None,
) -> P3m10kConfig:
    """A synthetic config; its name encodes non-default sizes so builds never collide."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = (int(image_size[0]), int(image_size[1]))
    if min(image_size) < 16 or num_train < 1 or num_test < 1:
        raise ValueError(
            f"synthetic config needs images >= 16x16 and >= 1 example per split, got "
            f"image_size={image_size}, num_train={num_train}, num_test={num_test}"
        )
    is_default = (
        image_size == SYNTHETIC_DEFAULT_SIZE
        and num_train == SYNTHETIC_DEFAULT_NUM_TRAIN
        and num_test == SYNTHETIC_DEFAULT_NUM_TEST
        and seed == 0
    )
    if name is None:
        name = (
            "synthetic"
            if is_default
            else (
                f"synthetic_{image_size[0]}x{image_size[1]}_{num_train}_{num_test}_{num_test}"
                + (f"_seed{seed}" if seed else "")
            )
        )
    return P3m10kConfig(
        name=name,
        description=(
            f"Procedural portrait composites, {image_size[0]}x{image_size[1]}, "
            f"{num_train} train and {num_test} per test split; no download."
        ),
        source="synthetic",
        synthetic_image_size=image_size,
        synthetic_num_train=num_train,
        synthetic_num_test=num_test,
        synthetic_seed=seed,
    )


def features(rgb_format: str) -> tfds.features.FeaturesDict:
    """The feature spec of p3m10k, also used by `portrait_folder` so that every reader takes both."""
    grey = lambda: tfds.features.Image(shape=(None, None, 1), encoding_format="png")  # noqa: E731
    rgb = lambda: tfds.features.Image(shape=(None, None, 3), encoding_format=rgb_format)  # noqa: E731
    return tfds.features.FeaturesDict(
        {
            "image": rgb(),
            "alpha": grey(),
            "trimap": grey(),
            "facemask": grey(),
            "has_facemask": tfds.features.Scalar(np.bool_),
            "fg": rgb(),
            "bg": rgb(),
            "has_fg_bg": tfds.features.Scalar(np.bool_),
            "name": tfds.features.Text(),
            "is_blurred": tfds.features.Scalar(np.bool_),
        }
    )


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for P3M-10k (registered as `p3m10k`)."""

    name = "p3m10k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        P3m10kConfig(
            name="default", description="The P3M-10k release from manual_dir; fg/bg only where present on disk."
        ),
        P3m10kConfig(
            name="estimate_fg_bg",
            estimate_fg_bg=True,
            description="The release, with train fg/bg estimated by pymatting estimate_foreground_ml at build time.",
        ),
        synthetic_config(),
    ]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
  P3M-10k needs a manual download after accepting its release agreement (MIT
  License): https://jizhizili.github.io/files/p3m_dataset_agreement/P3M-10k_Dataset_Release_Agreement.pdf
  Download links (Google Drive / Baidu) are in https://github.com/JizhiziLi/P3M (section "P3M-10k Dataset")
  Put into manual_dir either the extracted `P3M-10k/` folder (with train/ and
  validation/ inside) or the downloaded zip as it is. The optional facemask
  download may be added next to it, as a zip or a folder. Then:
    python -m tfds_p3m10k.build --release_dir=<manual_dir> --data_dir=<data_dir>
  The `synthetic` config needs no download.
  """

    def __init__(
        self,
        *,
        skip_bad_examples: bool = False,
        num_workers: int | None = None,
        synthetic_image_size: int | tuple[int, int] | None = None,
        synthetic_num_train: int | None = None,
        synthetic_num_test: int | None = None,
        **kwargs,
    ):
        """Extra kwargs on top of TFDS's.

        Args:
          skip_bad_examples: leave out examples with bad files (logged with their
            count) instead of stopping the build.
          num_workers: processes for checking files and estimating fg/bg (default:
            the CPU count).
          synthetic_image_size, synthetic_num_train, synthetic_num_test: override the
            synthetic config's size/counts (gives a config named after them).
          **kwargs: `data_dir`, `config`, `version`, `file_format` (default
            'array_record').
        """
        overrides = (synthetic_image_size, synthetic_num_train, synthetic_num_test)
        if any(value is not None for value in overrides):
            config = kwargs.get("config") or "synthetic"
            base = config if isinstance(config, P3m10kConfig) else self.builder_configs.get(str(config).split(":")[0])
            if base is None or base.source != "synthetic":
                raise ValueError(f"synthetic_* kwargs need a synthetic config, got config={config!r}")
            kwargs["config"] = synthetic_config(
                image_size=synthetic_image_size or base.synthetic_image_size,
                num_train=synthetic_num_train or base.synthetic_num_train,
                num_test=synthetic_num_test or base.synthetic_num_test,
                seed=base.synthetic_seed,
            )
        kwargs.setdefault("file_format", "array_record")
        self._skip_bad_examples = skip_bad_examples
        self._num_workers = num_workers or os.cpu_count() or 1
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Synthetic images are stored as PNG: lossless, so image == composite(fg, bg, alpha).
        rgb_format = "png" if self.builder_config.source == "synthetic" else "jpeg"
        return self.dataset_info_from_configs(
            features=features(rgb_format),
            supervised_keys=("image", "alpha"),
            homepage="https://github.com/JizhiziLi/P3M",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        if config.source == "synthetic":
            counts = {
                "train": config.synthetic_num_train,
                "p3m_500_p": config.synthetic_num_test,
                "p3m_500_np": config.synthetic_num_test,
            }
            return {split: self._generate_examples(split=split, count=count) for split, count in counts.items()}

        # Scan everything before returning any generator: bad input fails before a
        # single shard is written (and TFDS writes into an `incomplete.*` dir anyway).
        start = time.time()
        scan = release_layout.scan_release(
            os.fspath(dl_manager.manual_dir), skip_bad_examples=self._skip_bad_examples, num_workers=self._num_workers
        )
        for note in scan.notes:
            _log.info("%s", note)
        skipped = sum(len(names) for names in scan.skipped.values())
        if skipped:
            _log.warning(
                "skip_bad_examples: left out %d example(s) with bad files:\n%s",
                skipped,
                "\n".join(f"  - {p}" for p in scan.problems),
            )
        _log.info(
            "checked %d examples in %.1f s (%s)",
            sum(len(r) for r in scan.records.values()),
            time.time() - start,
            ", ".join(f"{s}: {len(r)}" for s, r in scan.records.items()),
        )
        self.skipped_examples = scan.skipped
        return {split: self._generate_examples(split=split, records=records) for split, records in scan.records.items()}

    def _generate_examples(self, split: str, records=None, count: int = 0):
        """Yields (key, example): from validated `records`, or `count` synthetic ones."""
        if self.builder_config.source == "synthetic":
            yield from self._generate_synthetic(split, count)
        else:
            yield from self._generate_release(records)

    def _generate_release(self, records):
        jobs = [(record, facts, self.builder_config.estimate_fg_bg) for record, facts in records]
        initializer = encode.worker_init if self.builder_config.estimate_fg_bg else None
        # Encoding the release is mostly file copying: workers only pay off for fg/bg estimation.
        workers = self._num_workers if self.builder_config.estimate_fg_bg else 1
        # No progress bar of our own: TFDS shows one per split.
        yield from release_layout.parallel_map(
            encode.encode_record, jobs, workers, None, inline_below=2, initializer=initializer
        )

    def _generate_synthetic(self, split: str, count: int):
        config = self.builder_config
        height, width = config.synthetic_image_size
        split_index = release_layout.SPLIT_NAMES.index(split)
        blurred = split != "p3m_500_np"
        for index in range(count):
            seed = synthetic.sample_seed(config.synthetic_seed, split_index, index)
            portrait = synthetic.render_portrait(seed, height, width, blur_face=blurred)
            name = f"synthetic_{split}_{index:05d}"
            png = lambda array: maps.encode_png(array, compress_level=1)  # fast; size hardly matters
            yield (
                name,
                {
                    "image": png(portrait.image),
                    "alpha": png(portrait.alpha),
                    "trimap": png(portrait.trimap),
                    # Like the release: facemasks exist for the blurred splits only.
                    "facemask": png(portrait.facemask) if blurred else encode.PLACEHOLDER_GREY,
                    "has_facemask": blurred,
                    "fg": png(portrait.fg),
                    "bg": png(portrait.bg),
                    "has_fg_bg": True,
                    "name": name,
                    "is_blurred": blurred,
                },
            )


# The `tfds new` layout names the class `Builder`; this alias reads better elsewhere.
P3m10k = Builder
