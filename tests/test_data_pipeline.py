"""The grain training pipeline and the evaluation sequences on a tiny synthetic TFDS build."""

import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from p3m_jax import data
from p3m_jax.data import holdout
from tests import data_helpers


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    holdout.NAMES_CACHE_DIR = str(tmp_path_factory.mktemp("names_cache"))
    return data_helpers.build(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def identity_config(synthetic):
    # 64x64 images, one crop size of 64 at output 64, no flip: the output image IS the stored image,
    # which identifies the example behind every batch row.
    return data_helpers.data_config(synthetic.data_dir, image_size=64, crop_sizes=(64,), flip_prob=0.0)


@pytest.fixture(scope="session")
def image_index(synthetic):
    return data_helpers.decoded_train_images(synthetic)


def _indices(batch, image_index):
    return [image_index[np.ascontiguousarray(row).tobytes()] for row in batch["image"]]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_no_tensorflow_import(synthetic):
    it = data.create_host_iterator(synthetic, seed=0, batch_size=2, process_index=0, process_count=1)
    next(it)
    assert "tensorflow" not in sys.modules


def test_validation_slice_is_stable_and_excluded(synthetic, identity_config, image_index):
    names = holdout.split_names(synthetic, "train")
    val = data.validation_names(synthetic)
    assert len(val) == 8 and val == sorted(val) and set(val) <= set(names)
    # Independent of the record order (chosen by name hash), and of the process count.
    held, _ = holdout.validation_split(list(reversed(names)), 8)
    assert sorted(list(reversed(names))[i] for i in held) == val
    shares = [data.validation_dataset(synthetic, process_index=i, process_count=3) for i in range(3)]
    assert sorted(n for s in shares for n in s.names) == val
    assert data.validation_dataset(synthetic, process_index=0, process_count=1).names == val
    fraction = data_helpers.data_config(synthetic.data_dir, validation_count=0, validation_fraction=0.25)
    assert len(data.validation_names(fraction)) == 6
    # Never in a training batch: three epochs of the single-process stream.
    val_indices = {names.index(n) for n in val}
    it = data.create_host_iterator(identity_config, seed=1, batch_size=4, process_index=0, process_count=1)
    seen = [i for batch in _take(it, 12) for i in _indices(batch, image_index)]
    assert not val_indices & set(seen)
    assert set(seen) == set(range(24)) - val_indices


def test_process_shards_disjoint_and_cover_train(identity_config, image_index):
    names = holdout.split_names(identity_config, "train")
    val_indices = {names.index(n) for n in data.validation_names(identity_config)}
    per_process = []
    for process in range(2):
        it = data.create_host_iterator(identity_config, seed=3, batch_size=4, process_index=process, process_count=2)
        epoch = [i for batch in _take(it, 2) for i in _indices(batch, image_index)]  # 8 = one epoch
        assert len(set(epoch)) == 8
        per_process.append(set(epoch))
    assert not per_process[0] & per_process[1]
    assert per_process[0] | per_process[1] == set(range(24)) - val_indices


def test_shuffle_per_epoch_and_determinism(identity_config, image_index, synthetic):
    def order(seed):
        it = data.create_host_iterator(identity_config, seed=seed, batch_size=4, process_index=0, process_count=1)
        return [i for batch in _take(it, 8) for i in _indices(batch, image_index)]

    first = order(5)
    epochs = [first[:16], first[16:]]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert order(5) == first and order(6) != first
    # Full augmentation is deterministic too.
    a = data.create_host_iterator(synthetic, seed=7, batch_size=4, process_index=0, process_count=1)
    b = data.create_host_iterator(synthetic, seed=7, batch_size=4, process_index=0, process_count=1)
    assert all(_same(x, y) for x, y in zip(_take(a, 3), _take(b, 3)))


def test_orbax_checkpoint_restores_mid_epoch(synthetic, tmp_path):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    make = lambda: data.create_train_iterator(synthetic, seed=9, global_batch_size=4, sharding=sharding)  # noqa: E731
    it = make()
    _take(it, 3)  # mid-epoch (4 batches per epoch); the prefetch thread has produced more by now
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [jax.device_get(b) for b in _take(it, 5)]  # crosses into the next epoch
    it.close()

    restored = make()
    next(restored)  # advance it, so that the restore has to rewind
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert restored.batches == 3
    got = [jax.device_get(b) for b in _take(restored, 5)]
    assert all(_same(x, y) for x, y in zip(expected, got))
    restored.close()
    manager.close()


def test_worker_processes_deterministic_and_resumable(synthetic):
    def make():
        return data.create_host_iterator(
            synthetic, seed=4, batch_size=3, process_index=0, process_count=1, num_workers=2
        )

    it = make()
    head = _take(it, 3)
    state = it.get_state()
    tail = _take(it, 3)
    it.close()
    again = make()
    assert all(_same(x, y) for x, y in zip(head + tail, _take(again, 6)))
    again.set_state(state)  # rewind to after batch 3
    assert all(_same(x, y) for x, y in zip(tail, _take(again, 3)))
    again.close()


def test_corrupt_record_stops_or_is_skipped(synthetic, tmp_path):
    train = np.flatnonzero(
        np.isin(holdout.split_names(synthetic, "train"), data.validation_names(synthetic), invert=True)
    )
    bad_config, bad_name = data_helpers.corrupt_copy(synthetic, tmp_path, record_index=int(train[0]))
    it = data.create_host_iterator(bad_config, seed=0, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(data.BadExampleError, match=bad_name):
        _take(it, 4)  # one epoch (16 examples) meets the bad record
    bad_config.skip_bad_examples = True
    it = data.create_host_iterator(bad_config, seed=0, batch_size=4, process_index=0, process_count=1)
    batches = _take(it, 8)  # two epochs
    assert it.skipped_examples == 2
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    state = data.pipeline._state_dict(it.get_state())
    assert state["skipped_examples"] == 2
    # With worker processes the error still names the example.
    bad_config.skip_bad_examples = False
    it = data.create_host_iterator(bad_config, seed=0, batch_size=4, process_index=0, process_count=1, num_workers=1)
    with pytest.raises(Exception, match=bad_name):
        _take(it, 4)
    it.close()


def test_eval_sequences_feed_evaluate(synthetic):
    from p3m_jax.data.evaluation_data import plain_example as _plain

    for split in ("p3m_500_p", "p3m_500_np"):
        whole = data.test_dataset(synthetic, split, process_index=0, process_count=1)
        assert len(whole) == 4 and whole.names == sorted(whole.names)
        halves = [data.test_dataset(synthetic, split, process_index=i, process_count=2) for i in range(2)]
        assert sorted(halves[0].names + halves[1].names) == whole.names
        assert not set(halves[0].names) & set(halves[1].names)
        example = whole[1]
        assert example["name"] == whole.names[1]
        assert example["image"].shape == (64, 64, 3) and example["alpha"].shape == (64, 64, 1)
        assert example["has_facemask"] == (split == "p3m_500_p")
        plain = _plain(example)
        assert set(np.unique(plain["trimap"])) <= {0, 128, 255}
        assert ("facemask" in plain) == (split == "p3m_500_p")
    val = data.validation_dataset(synthetic, process_index=0, process_count=1)
    example = val[0]
    assert example["name"] == data.validation_names(synthetic)[0]
    assert _plain(example)["alpha"].shape == (64, 64)
    with pytest.raises(ValueError, match="unknown test split"):
        data.test_dataset(synthetic, "train", process_index=0, process_count=1)


def test_ensure_dataset_missing(tmp_path):
    config = data_helpers.data_config(tmp_path, build_synthetic=False)
    with pytest.raises(FileNotFoundError, match=r"config.data.tfds_name.*config.data.data_dir.*build"):
        data.ensure_dataset(config)
    config = data_helpers.data_config(tmp_path, tfds_name="p3m10k/default")
    with pytest.raises(FileNotFoundError, match="--release_dir"):
        data.ensure_dataset(config)
