import os
import pickle
import re
import shutil
import tracemalloc
from pathlib import Path

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
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


GOOD = {"data": np.zeros((4, 3072), np.uint8), "ids": np.arange(4)}


@pytest.mark.parametrize("nest", [lambda e: e, lambda e: {"data": e, "ids": [1]},
                                  lambda e: {"data": np.zeros((1, 3072), np.uint8), "ids": [[e]]}],
                         ids=["top", "in-dict", "deep"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, monkeypatch, nest):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned_by_pickle"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(nest(_Evil(marker))))
    with pytest.raises(DataError, match=r"refused to load (posix|nt)\.system: a name loaded from a pickle can run code") as e:
        load_custom_pickle(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def _msg(path, **kw) -> str:
    """The DataError message for loading ``path`` as a custom pickle; fails on any other outcome."""
    with pytest.raises(DataError) as e:
        load_custom_pickle(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("obj, match", [
    ([1, 2, 3], "expected a dict with keys 'data' and 'ids', found a list of 3 items"),
    ("hello", "expected a dict .* found str 'hello'"),
    (None, "expected a dict .* found NoneType None"),
    ((GOOD,), "expected a dict .* found a tuple of 1 items"),
    ({"data": "pixels", "ids": 3}, "field 'data': expected a uint8 numpy array .* found str 'pixels'"),
    ({"data": {"x": [1, 2]}, "ids": [1]}, r"field 'data': expected a uint8 numpy array .* found a dict with keys \['x'\]"),
    ({"data": [[0] * 3072], "ids": [1]}, "field 'data': expected a uint8 numpy array .* found a list of 1 items"),
    ({**GOOD, "data": np.zeros((4, 3000), np.uint8)}, r"field 'data': expected shape \(N, 3072\) or \(N, 32, 32, 3\), found shape \(4, 3000\)"),
    ({**GOOD, "data": np.zeros((4, 32, 32), np.uint8)}, r"found shape \(4, 32, 32\)"),
    ({**GOOD, "data": np.zeros((4, 3072), np.float32)}, "field 'data': expected uint8 pixels .* found dtype float32"),
    ({**GOOD, "data": np.array([None] * 4, dtype=object)}, r"refused an object array \(dtype object\)"),
    ({**GOOD, "ids": np.array([1, "a", None, 2], dtype=object)}, r"refused an object array"),
    ({"data": np.zeros((0, 3072), np.uint8), "ids": np.arange(0)}, "field 'data': expected at least one image, found zero images"),
    ({**GOOD, "ids": np.arange(3)}, r"field 'ids': expected one id per image \(4\), found 3 ids"),
    ({**GOOD, "ids": np.arange(4).reshape(4, 1)}, r"field 'ids': expected a 1-D list of 4 ids .* found shape \(4, 1\)"),
    ({**GOOD, "ids": np.arange(4.0)}, "field 'ids': expected integers or strings, found dtype float64"),
    ({**GOOD, "ids": [1, 2, None, 4]}, "field 'ids': expected integers or strings, found NoneType None at index 2"),
    ({**GOOD, "ids": [1, 2, "3", 4]}, "field 'ids': expected all integers or all strings"),
    ({**GOOD, "ids": [1, 2, 2 ** 70, 4]}, "field 'ids': expected integers that fit in 64 bits"),
    ({**GOOD, "ids": "abcd"}, "field 'ids': expected a list or 1-D array of 4 ids, found str 'abcd'"),
    ({**GOOD, "ids": [7, 8, 9, 8]}, r"field 'ids': expected a unique id per image, found id 8 2 times \(first at index 1"),
    ({**GOOD, "ids": ["a", "b", "b", "a"]}, "found id 'a' 2 times .* a submission with duplicated IDs is invalid"),
    ({"data": np.zeros((4, 3072), np.uint8)}, "missing key 'ids': expected a dict with keys 'data' and 'ids', found keys \\['data'\\]"),
    ({"ids": np.arange(4)}, "missing key 'data'"),
    ({"data": {1, 2}, "ids": [1]}, r"refused (a set|to load __builtin__\.set)"),  # protocol 2 names set()
    ({("data",): 1}, "refused a dict key of type tuple: expected string keys"),
])
def test_bad_custom_pickles_fail_clearly(tmp_path, obj, match):
    path = tmp_path / "bad.pkl"
    for protocol in (2, 4, 5):
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        assert re.search(match, _msg(path)), (protocol, _msg(path))


@pytest.mark.parametrize("labels, match", [
    ([0, 1, 2], r"field 'labels': expected one label per image \(4\), found 3 labels"),
    ([0, 1, 12, 3], "field 'labels': expected integers 0-9 .* found 12 at index 2"),
    (np.array([0, -1, 2, 3]), "found -1 at index 1"),
    (np.array([0.0, 1, 2, 3]), "field 'labels': expected integers, found dtype float64"),
    (["cat", "dog", "cat", "dog"], "field 'labels': expected integers, found str 'cat' at index 0"),
    ([0, 1, True, 3], "found bool True at index 2"),
    (np.zeros((4, 10), np.int64), r"found shape \(4, 10\)"),
])
def test_bad_labels_fail_clearly(tmp_path, labels, match):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps({**GOOD, "labels": labels}))
    assert re.search(match, _msg(path, need_labels=True))


def test_missing_labels_when_needed(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(GOOD))
    assert "missing key 'labels': expected a dict with keys 'data' and 'ids' and 'labels'" in _msg(path, need_labels=True)


def test_good_variants_load(tmp_path):
    path = tmp_path / "ok.pkl"
    for protocol in (2, 4, 5):  # 2: bytes via _codecs.encode, 5: arrays via _frombuffer
        path.write_bytes(pickle.dumps({**GOOD, "ids": ["a", "b", "c", "d"], "labels": np.arange(4, dtype=np.uint8)},
                                      protocol=protocol))
        got = load_custom_pickle(path, need_labels=True)
        assert got.ids.tolist() == ["a", "b", "c", "d"] and got.labels.dtype == np.int64
    path.write_bytes(pickle.dumps({b"data": np.ones((2, 32, 32, 3), np.uint8), b"labels": [3, np.int64(4)]}))
    got = load_custom_pickle(path, need_ids=False, need_labels=True)
    assert got.ids.tolist() == [0, 1] and got.labels.tolist() == [3, 4]


_VALID = pickle.dumps(GOOD)


@pytest.mark.parametrize("raw, match", [
    (b"", r"empty file \(0 bytes\); expected a Python pickle"),
    (_VALID[: len(_VALID) // 2], "truncated or corrupt pickle: expected a complete Python pickle, found"),
    (_VALID[:-1], "truncated or corrupt pickle"),
    (_VALID[:30] + b"\xff" * 40 + _VALID[70:], "truncated or corrupt pickle"),
    (b"\x89PNG\r\n\x1a\n" + bytes(100), r"not a pickle file: expected a Python pickle, found a PNG image \(starts with"),
    (b"ID,Labels\n1,3\n", r"not a pickle file: expected a Python pickle, found text \('ID,Labels 1,3'\)"),
    (b"this is not a pickle", "not a pickle file: expected a Python pickle, found text"),
    (b"\x1f\x8b\x08\x00" + bytes(30), "not a pickle file: .* found a gzip archive"),
    (b"\x93NUMPY\x01\x00" + bytes(30), "not a pickle file: .* found a .npy file"),
    (bytes(range(1, 40)), "not a pickle file: .* found binary data starting with"),
])
def test_files_that_are_not_pickles(tmp_path, raw, match):
    path = tmp_path / "junk.pkl"
    path.write_bytes(raw)
    assert re.search(match, _msg(path))


def test_missing_file_and_folder(tmp_path):
    assert "file not found; expected a pickle file" in _msg(tmp_path / "missing.pkl")
    assert "not a regular file (a folder?)" in _msg(tmp_path)


@pytest.mark.parametrize("raw, match", [
    # An array whose state claims 10**9 bytes in a 200-byte file.
    (pickle.dumps(np.zeros(4, np.uint8), protocol=2).replace(b"K\x04\x85", b"J\x00\xca\x9a;\x85"),
     r"refused an array of 1,000,000,000 bytes .* expected at most the file's \d+ bytes"),
    # _reconstruct asked for a big shape directly instead of numpy's (0,).
    (pickle.dumps(np.zeros(4, np.uint8), protocol=2).replace(b"K\x00\x85", b"J\x00\xca\x9a;\x85"),
     r"refused to allocate an array of shape \(1000000000,\)"),
    # numpy.ndarray called directly with a shape.
    (b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x85R.", r"refused to call numpy\.ndarray\(\.\.\.\)"),
    # 'hex' doubles its input: nested 40 times, a tiny file would become a terabyte.
    (b"\x80\x02c_codecs\nencode\nq\x00h\x00X\x01\x00\x00\x00aX\x03\x00\x00\x00hex\x86RX\x03\x00\x00\x00hex\x86R.",
     "refused _codecs.encode with encoding 'hex'"),
    # A tuple key nested 100,000 deep: hashing it overflows CPython's C stack (a crash, not an exception).
    (b"\x80\x04}N" + b"\x85" * 100_000 + b"Ns.", "refused a dict key of type tuple"),
    # Ints that all hash alike make dict insertion quadratic: keys are strings only, memo indices small.
    (b"\x80\x02}(" + b"".join(b"L%dL\nN" % (k * (2**61 - 1)) for k in range(1, 5)) + b"u.", "refused a dict key of type int"),
    (b"(p99999999999999999999\n.", "refused memo index"),
    # A datetime dtype given an integer dtype's state: numpy's dtype __setstate__ segfaults on it.
    (pickle.dumps({"ids": np.arange(3)}, protocol=2).replace(b"i8", b"M8"), "refused dtype datetime64"),
    (pickle.dumps(np.zeros(2, np.uint8), protocol=2).replace(b"J\xff\xff\xff\xffJ", b"K\x05J"),
     "refused dtype state"),
    (pickle.dumps(np.zeros(2, np.uint8), protocol=2).replace(b"u1", b"V9"), "refused dtype |V9"),
    # BYTEARRAY8 declaring 6.8e18 bytes: pickle's own unpickler allocates that before reading.
    (b"\x80\x05\x96cnumpy._core", r"refused a bytearray of [\d,]+ bytes: expected at most the file's 15 bytes"),
])
def test_allocation_and_crash_attacks_are_refused(tmp_path, raw, match):
    path = tmp_path / "attack.pkl"
    path.write_bytes(raw)
    assert re.search(match, _msg(path))


def test_instruction_and_size_bounds(tmp_path):
    path = tmp_path / "many.pkl"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "ids": list(range(2000))}))
    with pytest.raises(DataError, match="refused: more than 1,000 pickle instructions"):
        data.safe_load_pickle(path, max_ops=1000)
    with pytest.raises(DataError, match=r"file is [\d,]+ bytes; expected a pickle of at most 100 bytes"):
        data.safe_load_pickle(path, max_bytes=100)
    assert data.MAX_PICKLE_BYTES >= 4 * 2**30  # a custom test pickle may be a few hundred MB


def test_errors_inside_unpickling_become_data_errors(tmp_path, monkeypatch):
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(GOOD))
    for exc in (MemoryError, RecursionError, OverflowError):
        def boom(self, exc=exc):
            raise exc("simulated")

        monkeypatch.setattr(data._ArrayUnpickler, "load", boom)
        with pytest.raises(DataError, match=f"{exc.__name__}: simulated"):
            data.safe_load_pickle(path)


def _cifar_copy(cifar_dir, tmp_path) -> Path:
    root = tmp_path / "cifar"
    shutil.copytree(cifar_dir, root)
    return root


@pytest.mark.parametrize("batch, match", [
    (b"", "empty file"),
    ([1, 2], "expected a CIFAR-10 batch: a dict with keys 'data' and 'labels', found a list of 2 items"),
    ({"data": np.zeros((3, 3072), np.uint8)}, "missing key 'labels': expected a CIFAR-10 batch"),
    ({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1, 10]}, "field 'labels': expected integers 0-9 .* found 10 at index 2"),
    ({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}, r"expected one label per image \(3\), found 2 labels"),
    ({"data": np.zeros((0, 3072), np.uint8), "labels": []}, "expected at least one image"),
])
def test_bad_cifar_batch_names_the_file(cifar_dir, tmp_path, batch, match):
    root = _cifar_copy(cifar_dir, tmp_path)
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(batch if isinstance(batch, bytes) else pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=match) as e:
        load_cifar10(root, train=True, download=False)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_python2_pickle_as_in_the_official_files(tmp_path):
    """The official batches were written by Python 2: str keys and pixel data as latin1 str opcodes."""
    pixels = bytes(range(256)) * 24  # 2 images x 3072

    def s(b: bytes) -> bytes:  # SHORT_BINSTRING, Python 2's str
        return b"U" + bytes([len(b)]) + b

    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
             + b"(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
             + b"\x89T" + len(pixels).to_bytes(4, "little") + pixels + b"tb")
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02}(" + s(b"data") + array + s(b"labels") + b"](K\x01K\x02eu.")
    batch = data.safe_load_pickle(path)
    assert batch["labels"] == [1, 2] and batch["data"].dtype == np.uint8
    assert batch["data"].tobytes() == pixels


class _Reused:
    """Pickles as one array of ``data``; many instances sharing one bytes object pickle it once (memoised)."""

    def __init__(self, data: bytes, protocol5: bool):
        self.data, self.protocol5 = data, protocol5

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer

        if self.protocol5:  # a view of the bytes, byte-swapped: converting it to native order copies it
            return _frombuffer, (self.data, np.dtype(">u8"), (len(self.data) // 8,), "C")
        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (len(self.data),), np.dtype("u1"), False, self.data)


@pytest.mark.parametrize("protocol", [2, 5])
def test_one_block_of_bytes_reused_by_many_arrays_is_refused(tmp_path, protocol):
    """Each array alone fits in the file; together 300 copies of its 100 kB would take 30 MB."""
    block = bytes(100_000)
    path = tmp_path / "reused.pkl"
    path.write_bytes(pickle.dumps({"data": [_Reused(block, protocol == 5) for _ in range(300)]}, protocol=protocol))
    assert path.stat().st_size < 120_000
    tracemalloc.start()
    try:
        message = _msg(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.search(r"refused: the arrays of this file would take more than its own [\d,]+ bytes", message)
    assert peak < 5 * path.stat().st_size  # refused before the copies were made


@pytest.mark.parametrize("download", [False, True])
def test_a_folder_missing_only_test_batch_names_it(cifar_dir, tmp_path, monkeypatch, download):
    """Issue 26: "CIFAR-10 not found" for a folder that lacks one file sent people looking for the folder."""
    import shutil

    import torchvision.datasets.utils as tv_utils

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    shutil.copytree(cifar_dir / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as e:
        load_cifar10(tmp_path, train=False, download=download)
    msg = str(e.value)
    assert "test file test_batch not found in" in msg and str(tmp_path / "cifar-10-batches-py") in msg, msg
    assert "data_batch" not in msg and "\n" not in msg
    assert len(load_cifar10(tmp_path, train=True, download=download).labels) == 400  # the train files are there


def test_root_pickles_and_report_csv_are_git_ignored_but_not_elsewhere():
    """The README's commands write custom_test.pkl-style inputs and report.csv at the root: never committed."""
    import shutil
    import subprocess

    from conftest import ROOT

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        proc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert proc.returncode in (0, 1), f"git check-ignore {path} failed"
        return proc.returncode == 0

    assert ignored("report.csv") and ignored("custom_test.pkl") and ignored("labeled.pkl")
    assert not ignored("tests/fixtures/custom_test.pkl") and not ignored("results/report.csv")
