"""grain input pipelines: endless sharded training batches on the devices, and evaluation sequences.

Training (`create_train_iterator`), per JAX process:

  train records minus the validation slice -> this process's share (strided: sorted indices
  [process_index::process_count]) -> grain.MapDataset: seed(per-process seed) -> shuffle (a new order
  each epoch) -> repeat (endless) -> TrainTransform (crop / flip / resize / trimap, uint8) -> extra
  transforms -> to_iter_dataset -> drop bad-example markers (counted) -> batch (per-process batch,
  drop_remainder) -> mp_prefetch (`num_workers` processes; each builds whole batches from a strided
  slice of the stream) -> background thread: `jax.make_array_from_process_local_data` onto the
  `data`-sharded mesh, `prefetch_batches` ahead.

The same seed, process count and `num_workers` give the same batches. The iterator state (JSON bytes)
is that of the batches handed to the caller, not of those prefetched, and works as an orbax item:
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.

Evaluation data (the validation slice, the test splits) is opened by `p3m_jax.data.evaluation_data`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from typing import Any, Sequence

import grain
import numpy as np

from p3m_jax.common.errors import check
from p3m_jax.data import builds, holdout, raw_records
from p3m_jax.data import transforms as transforms_lib

_log = logging.getLogger(__name__)

_SKIPPED = "_skipped"  # per-element count of bad examples dropped just before it (popped from batches)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How the training batches are read, from the `config.data` fields of the same names."""

    num_workers: int  # grain worker processes per JAX process (0: in-process)
    read_threads: int  # read/transform threads per worker
    worker_buffer_size: int  # batches buffered per worker process
    prefetch_batches: int  # batches put on the devices ahead of the step

    def __post_init__(self):
        check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        for field in ("read_threads", "worker_buffer_size", "prefetch_batches"):
            value = getattr(self, field)
            check(value >= 1, f"data.{field}", f"must be >= 1, got {value}")

    @classmethod
    def from_config(cls, data_config) -> "PipelineOptions":
        return cls(
            num_workers=int(data_config.num_workers),
            read_threads=int(data_config.read_threads),
            worker_buffer_size=int(data_config.worker_buffer_size),
            prefetch_batches=int(data_config.prefetch_batches),
        )


# ------------------------------------------------------------------------------------------ indices
def train_indices(data_config) -> np.ndarray:
    """Record indices of the train split minus the validation slice, sorted (all processes together)."""
    names = holdout.split_names(data_config, raw_records.TRAIN_SPLIT)
    _, train = holdout.validation_split(names, holdout.validation_count(data_config, len(names)))
    return train


def process_train_indices(data_config, process_index: int, process_count: int) -> np.ndarray:
    """This process's disjoint share of `train_indices`: every `process_count`-th from `process_index`."""
    indices = train_indices(data_config)
    if len(indices) < process_count:
        raise ValueError(f"{len(indices)} training examples cannot be shared by {process_count} processes")
    return indices[process_index::process_count]


def process_seed(seed: int, process_index: int) -> int:
    """The grain seed of one process: shuffles and augmentations differ between processes."""
    return int(np.random.SeedSequence([int(seed), int(process_index)]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------- shuffling
class EpochShuffleDataset(grain.MapDataset):
    """Index i of epoch e = i // n reads element perm_e[i % n] (+ e n, for `repeat`), perm_e a seeded
    permutation of the parent's n elements, new each epoch.

    Replaces `grain.MapDataset.shuffle`, whose per-index Feistel shuffle walks cycles over a large fixed
    domain and costs more per element than the transform of a small synthetic example on small splits;
    here one `permutation` per epoch is cached, so an element costs an array lookup whatever the split's
    size.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "EpochShuffleDataset"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self._parent)
        epoch, position = divmod(int(index), length)
        cached = self._epoch_order  # one read: reader threads may replace it concurrently
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self._seed, epoch]).permutation(length))
            self._epoch_order = cached
        return self._parent[int(cached[1][position]) + epoch * length]


# ----------------------------------------------------------------------------- dropping bad examples
class _DropBadIterDataset(grain.IterDataset):
    """Drops bad-example markers; the next good element carries how many were dropped before it."""

    def __iter__(self):
        return _DropBadIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "DropBadExamples"


class _DropBadIterator(grain.DatasetIterator):
    def __next__(self):
        skipped = 0
        while True:
            element = next(self._parent)
            if transforms_lib.BAD in element:
                skipped += 1
                continue
            element[_SKIPPED] = np.int32(skipped)
            return element

    # Between two `next` calls nothing is pending, so the parent's state is the whole state.
    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def _worker_init(worker_index: int, worker_count: int) -> None:
    """grain worker start: one OpenCV thread per worker (the workers are the parallelism)."""
    del worker_index, worker_count
    import cv2

    cv2.setNumThreads(1)


def _ensure_absl_flags_parsed() -> None:
    # grain's spawned workers read absl flags; outside absl.app.run nothing has parsed them.
    try:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    except ImportError:
        pass


def build_train_dataset(
    data_config,
    *,
    seed: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    extra_transforms: Sequence[Any] = (),
    num_workers: int | None = None,
) -> grain.IterDataset:
    """The grain dataset of this process's host batches (numpy; plus a `_skipped` count per element).

    `batch_size` is the PER-PROCESS batch. `extra_transforms` are grain RandomMap objects
    (module-level classes with `random_map(element, rng)`) applied after the crop/resize transform,
    before batching. The element they get and must return is a dict of per-example numpy arrays at the
    training size S (`config.data.image_size`), the keys of a host batch without the batch axis:
      image (S, S, 3) uint8, alpha (S, S, 1) uint8, trimap (S, S, 1) uint8 in {0, 128, 255},
      fg, bg (S, S, 3) uint8 (zeros unless has_fg_bg), has_fg_bg np.bool_,
      facemask (S, S, 1) uint8 (zeros unless has_facemask), has_facemask np.bool_.
    They may add keys (every element must then have them, with fixed shapes and dtypes). Bad-example
    markers (skip_bad_examples) bypass them.
    """
    data_source = raw_records.open_split(data_config, raw_records.TRAIN_SPLIT)
    indices = process_train_indices(data_config, process_index, process_count)
    ds = grain.MapDataset.source(raw_records.RawSource(data_source, indices))
    seed = process_seed(seed, process_index)
    ds = EpochShuffleDataset(ds.seed(seed), seed).repeat()
    ds = ds.random_map(transforms_lib.TrainTransform.from_config(data_config))
    for transform in extra_transforms:
        ds = ds.random_map(transforms_lib.PassBadThrough(transform))
    options = PipelineOptions.from_config(data_config)
    read_options = grain.ReadOptions(num_threads=options.read_threads, prefetch_buffer_size=max(2, 2 * batch_size))
    ds = _DropBadIterDataset(ds.to_iter_dataset(read_options))
    ds = ds.batch(batch_size, drop_remainder=True)
    workers = options.num_workers if num_workers is None else int(num_workers)
    if workers > 0:
        _ensure_absl_flags_parsed()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=options.worker_buffer_size),
            worker_init_fn=_worker_init,
        )
    return ds


def _state_bytes(state: dict) -> bytes:
    return json.dumps(state, sort_keys=True).encode()


def _state_dict(state) -> dict:
    if isinstance(state, (bytes, bytearray)):
        state = state.decode()
    if isinstance(state, str):
        state = json.loads(state)
    return state


class HostBatchIterator:
    """Endless numpy host batches of one process (dicts with the keys of `transforms.ELEMENT_KEYS`).

    `get_state()` returns JSON bytes (grain's orbax `CheckpointHandler` stores the bytes of non-grain
    iterators); `set_state` accepts them (or the dict). `skipped_examples` counts bad examples skipped
    so far (`skip_bad_examples`); it is part of the state.
    """

    def __init__(self, dataset: grain.IterDataset, *, process_index: int, process_count: int, num_workers: int):
        self._iterator = iter(dataset)
        self.process_index, self.process_count, self.num_workers = process_index, process_count, num_workers
        self.batches = 0
        self.skipped_examples = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        skipped = int(np.sum(batch.pop(_SKIPPED)))
        if skipped:
            self.skipped_examples += skipped
            _log.warning(
                "skipped %d bad example(s) (%d so far in process %d)",
                skipped,
                self.skipped_examples,
                self.process_index,
            )
        self.batches += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "grain": self._iterator.get_state(),
            "batches": self.batches,
            "skipped_examples": self.skipped_examples,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("process_count", "num_workers"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(
                    f"iterator state saved with {key}={state[key]}, restoring into "
                    f"{key}={getattr(self, key)}: the batch order would differ"
                )
        self._iterator.set_state(state["grain"])
        self.batches = int(state["batches"])
        self.skipped_examples = int(state["skipped_examples"])

    def get_state(self) -> bytes:
        return _state_bytes(self.state_dict())

    def set_state(self, state) -> None:
        self.load_state_dict(_state_dict(state))

    def start_prefetch(self) -> None:
        """Called by grain's CheckpointHandler after a restore; grain prefetches lazily anyway."""

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class TrainIterator:
    """Global `jax.Array` batches sharded on the mesh's `data` axis, prefetched by a background thread.

    `next(it)` -> dict of global arrays with leading axis = global batch (keys `transforms.ELEMENT_KEYS`).
    `get_state()` / `set_state()` describe the batches consumed by the caller (a checkpoint after step k
    resumes with batch k + 1); orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
    `host` is the underlying `HostBatchIterator`; `skipped_examples` counts skipped bad examples.
    """

    def __init__(self, host: HostBatchIterator, sharding, prefetch_batches: int):
        self.host = host
        self.sharding = sharding
        self.prefetch_batches = max(1, int(prefetch_batches))
        self._state = host.state_dict()  # state after the last batch handed out
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def skipped_examples(self) -> int:
        return int(self._state["skipped_examples"])

    @property
    def batches(self) -> int:
        return int(self._state["batches"])

    def __iter__(self):
        return self

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict:
        import jax

        return {key: jax.make_array_from_process_local_data(self.sharding, value) for key, value in batch.items()}

    def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                batch = next(self.host)
                item = (self._to_device(batch), self.host.state_dict())
                if not put(item):
                    return
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer's thread)
            put(_Failure(e))

    def start_prefetch(self) -> None:
        """Starts the background thread (also done by the first `next`)."""
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.prefetch_batches)
            self._thread = threading.Thread(
                target=self._produce, args=(self._queue, self._stop), name="p3m-device-prefetch", daemon=True
            )
            self._thread.start()

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None

    def __next__(self) -> dict:
        self.start_prefetch()
        item = self._queue.get()
        if isinstance(item, _Failure):
            self._stop_prefetch()
            raise item.error
        batch, self._state = item
        return batch

    def get_state(self) -> bytes:
        return _state_bytes(self._state)

    def set_state(self, state) -> None:
        """Restores a `get_state()`; prefetched batches are dropped and produced again from there."""
        self._stop_prefetch()
        state = _state_dict(state)
        self.host.load_state_dict(state)
        self._state = self.host.state_dict()

    def close(self) -> None:
        self._stop_prefetch()
        self.host.close()


def create_host_iterator(
    data_config,
    *,
    seed: int,
    batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    extra_transforms: Sequence[Any] = (),
    num_workers: int | None = None,
) -> HostBatchIterator:
    """Numpy batches of `batch_size` (PER PROCESS) without devices (tests, benchmarks)."""
    process_index, process_count = builds.resolve_process(process_index, process_count)
    workers = int(data_config.num_workers if num_workers is None else num_workers)
    dataset = build_train_dataset(
        data_config,
        seed=seed,
        batch_size=batch_size,
        process_index=process_index,
        process_count=process_count,
        extra_transforms=extra_transforms,
        num_workers=workers,
    )
    return HostBatchIterator(dataset, process_index=process_index, process_count=process_count, num_workers=workers)


def create_train_iterator(
    data_config,
    *,
    seed: int,
    global_batch_size: int,
    sharding,
    process_index: int | None = None,
    process_count: int | None = None,
    extra_transforms: Sequence[Any] = (),
    num_workers: int | None = None,
) -> TrainIterator:
    """Endless training batches as global jax.Arrays on `sharding` (a `NamedSharding(mesh, P('data'))`).

    Each process reads its disjoint share of train (minus the validation slice) and builds
    `global_batch_size // process_count` examples per batch.
    """
    process_index, process_count = builds.resolve_process(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} not divisible by {process_count} processes")
    host = create_host_iterator(
        data_config,
        seed=seed,
        batch_size=global_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        extra_transforms=extra_transforms,
        num_workers=num_workers,
    )
    return TrainIterator(host, sharding, prefetch_batches=PipelineOptions.from_config(data_config).prefetch_batches)
