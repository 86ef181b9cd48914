import os
import pickle

import numpy as np
import pytest

from conftest import PER_BATCH, synthetic_images, write_custom_pickle
from resnet import data
from resnet.data import DataError, cifar10_splits, load_cifar10, load_custom_pickle, stratified_split


def test_official_layout_with_bytes_and_str_keys(cifar_dir):
    train = load_cifar10(cifar_dir, train=True, download=False)
    assert train.images.shape == (5 * PER_BATCH, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    rows, labels = synthetic_images(PER_BATCH, seed=1)
    # Rows are channel-first; the loader returns HWC with pixel (0,0) of channel c = rows[:, c*1024].
    np.testing.assert_array_equal(train.images[:PER_BATCH, 0, 0, :], rows[:, [0, 1024, 2048]])
    np.testing.assert_array_equal(train.labels[:PER_BATCH], labels)
    test = load_cifar10(cifar_dir, train=False, download=False)
    assert len(test.labels) == 100


def test_missing_data_offline_fails_with_one_clear_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path, train=True, download=False)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and str(tmp_path) in msg and "\n" not in msg


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="put the official cifar-10-batches-py folder in"):
        load_cifar10(tmp_path, train=True, download=True)


def test_stratified_split_is_balanced_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 50)
    train, val = stratified_split(labels, 100, seed=3)
    assert len(val) == 100 and len(train) == 400
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(500))
    assert np.bincount(labels[val]).tolist() == [10] * 10
    again, val2 = stratified_split(labels, 100, seed=3)
    np.testing.assert_array_equal(val, val2)
    _, other = stratified_split(labels, 100, seed=4)
    assert not np.array_equal(val, other)


def test_splits_and_train_subset(cifar_dir):
    train, val = cifar10_splits(cifar_dir, val_split=100, seed=0, download=False, train_subset=50)
    assert len(train.labels) == 50 and len(val.labels) == 100
    with pytest.raises(DataError, match="val-split"):
        cifar10_splits(cifar_dir, val_split=400, seed=0, download=False)


@pytest.mark.parametrize("str_keys", [False, True])
def test_custom_pickle_layouts_give_the_same_images(tmp_path, str_keys):
    a = write_custom_pickle(tmp_path / "rows.pkl", "rows", labels=True, str_keys=str_keys)
    write_custom_pickle(tmp_path / "nhwc.pkl", "nhwc", labels=True, str_keys=str_keys)
    rows = load_custom_pickle(tmp_path / "rows.pkl", need_labels=True)
    nhwc = load_custom_pickle(tmp_path / "nhwc.pkl", need_labels=True)
    assert rows.images.shape == (37, 32, 32, 3)
    np.testing.assert_array_equal(rows.images, nhwc.images)
    np.testing.assert_array_equal(rows.ids, a["ids"])
    np.testing.assert_array_equal(rows.labels, a["labels"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": _Evil(), "ids": [1]}))
    with pytest.raises(DataError, match="refused to load"):
        load_custom_pickle(path)
    assert not (tmp_path / "pwned_by_pickle").exists()


@pytest.mark.parametrize("obj, match", [
    ({"data": np.zeros((4, 3000), np.uint8), "ids": np.arange(4)}, "shape"),
    ({"data": np.zeros((4, 3072), np.float32), "ids": np.arange(4)}, "uint8"),
    ({"data": np.zeros((4, 3072), np.uint8), "ids": np.arange(3)}, "one id per image"),
    ({"data": np.zeros((4, 3072), np.uint8)}, "missing key 'ids'"),
    ({"ids": np.arange(4)}, "missing key 'data'"),
    ([1, 2, 3], "expected a dict"),
])
def test_bad_custom_pickles_fail_clearly(tmp_path, obj, match):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataError, match=match) as e:
        load_custom_pickle(path)
    assert str(path) in str(e.value)


def test_labels_must_match_and_be_classes(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "ids": np.arange(4), "labels": [0, 1, 2]}))
    with pytest.raises(DataError, match="one per image"):
        load_custom_pickle(path, need_labels=True)
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "ids": np.arange(2), "labels": [0, 12]}))
    with pytest.raises(DataError, match="0-9"):
        load_custom_pickle(path, need_labels=True)


def test_not_a_pickle(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        data.safe_load_pickle(path)
