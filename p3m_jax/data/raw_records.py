"""Raw access to a TFDS build's records: encoded bytes per feature, decoded on demand by `decoding`.

`tfds.data_source` decodes every image feature of an example, although training needs only the JPEG
and the alpha PNG. Here the ArrayRecord records are read with `tfds.decode.SkipDecoding` for every
image feature (no TensorFlow); `BadExampleError` names a record that cannot be used.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from p3m_jax.data.builds import get_builder

IMAGE_FEATURES = ("image", "alpha", "trimap", "facemask", "fg", "bg")
TRAIN_SPLIT = "train"
TEST_SPLITS = ("p3m_500_p", "p3m_500_np")


class BadExampleError(ValueError):
    """An example that cannot be decoded or whose maps disagree in size.

    Attributes: `name` (the example's name, '' if unreadable), `index` (its record index in the split),
    `reason`. Picklable, so it crosses grain's worker processes unchanged.
    """

    def __init__(self, name: str, index: int, reason: str):
        super().__init__(name, index, reason)
        self.name, self.index, self.reason = name, index, reason

    def __str__(self) -> str:
        return f"bad example {self.name or '<unnamed>'!r} (record {self.index}): {self.reason}"


def open_split(data_config, split: str):
    """Random-access source of `split` whose image features are the stored encoded bytes."""
    import tensorflow_datasets as tfds

    builder = get_builder(data_config)
    decoders = {key: tfds.decode.SkipDecoding() for key in IMAGE_FEATURES}
    return builder.as_data_source(split=split, decoders=decoders)


def train_stores_fg_bg(data_config, sample: int = 8) -> bool:
    """Whether the build stores foreground/background for train (the composition loss needs them),
    judged from the first `sample` records: builds store them for all of train or for none."""
    source = RawSource(open_split(data_config, TRAIN_SPLIT))
    return any(source[i].get("has_fg_bg", False) for i in range(min(sample, len(source))))


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RawSource:
    """`source[i]` = the raw record `indices[i]` of a split as a dict of encoded bytes.

    Keys: image, alpha, trimap, facemask, fg, bg (bytes), has_facemask, has_fg_bg (bool), name (str),
    index (the record index in the split). A record that cannot be parsed comes back as
    `{'index': i, 'name': '', 'error': message}` so that the transform can stop or skip it by name.
    Picklable (grain ships it to its worker processes).
    """

    def __init__(self, data_source, indices: Sequence[int] | None = None):
        self._source = data_source
        self._indices = np.arange(len(data_source)) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self._indices[i])
        try:
            record = self._source[index]
        except Exception as e:  # noqa: BLE001  (a corrupt record is reported by the transform, by index)
            return {"index": index, "name": "", "error": f"unreadable record: {type(e).__name__}: {e}"}
        out = {key: record[key] for key in IMAGE_FEATURES}
        out["has_facemask"] = bool(record["has_facemask"])
        out["has_fg_bg"] = bool(record["has_fg_bg"])
        out["name"] = text(record["name"])
        out["index"] = index
        return out

    def __repr__(self) -> str:
        return f"RawSource({self._source!r}, {len(self)} records)"
