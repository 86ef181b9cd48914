"""CIFAR-10 on disk and custom test pickles, as uint8 arrays (N, 32, 32, 3) plus int64 labels.

Every pickle is read with a restricted unpickler that builds numpy arrays and nothing else: a
course-provided file is still a file from the internet, and plain ``pickle.load`` runs any code in it.
"""
from __future__ import annotations

import io
import itertools
import math
import pickle
import reprlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the official CIFAR-10 training images, on the 0..1 scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


class DataError(ValueError):
    """Bad or missing data; the message names the file and what was expected."""


class Split(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    labels: np.ndarray  # int64 (N,)


# ------------------------------------------------------------------------------------------------
# Safe unpickling
# A pickle larger than this is refused before it is read: a CIFAR batch is ~31 MB and a course test
# pickle a few hundred MB, so 4 GiB only stops a wrong file (a disk image, a dataset archive).
MAX_PICKLE_BYTES = 4 * 2**30
# Pickle instructions allowed per file: a CIFAR batch needs ~40,000 (10,000 labels and file names),
# an array a handful, ids and labels given as lists about 2 per image. Each instruction can allocate a
# new object (~64 bytes for an empty list from one byte of file), so the count, not the file size,
# bounds memory (~320 MB) and time (~4 s at ~1.3M instructions/s).
MAX_PICKLE_OPS = 5_000_000
MAX_ID_CHARS = 256  # longest string id accepted in a custom pickle

try:  # numpy >= 2 moved these to numpy._core; older pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
    from numpy.core.numeric import _frombuffer as _np_frombuffer


class _Refused(pickle.UnpicklingError):
    """The pickle asks for something outside numpy arrays, dicts, lists, strings and numbers."""


class _NdarrayName:
    """Stands in for ``numpy.ndarray`` in a pickle: numpy names the class as an argument of
    ``_reconstruct`` but never calls it, and calling it would allocate any shape the file asks for."""

    __slots__ = ()

    def __call__(self, *args: Any) -> None:
        raise _Refused("refused to call numpy.ndarray(...): it allocates any shape asked for; "
                       "numpy pickles build arrays with _reconstruct")

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()
ALLOWED = "only numpy arrays, dicts, lists, tuples, strings and numbers are allowed"


def _simple_dtype(dtype: Any) -> bool:
    """Numbers or strings, without fields, subarrays or metadata: all these files need, and the dtypes
    whose pickled state numpy restores safely (a datetime dtype given a short state crashes numpy)."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "biufcSU" and dtype.fields is None
            and dtype.subdtype is None and dtype.metadata is None)


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype(spec)`` for a type string such as 'u1' or 'i8' (what numpy writes), always a new
    object: the pickle then sets its state, and without the copy that could be numpy's shared uint8."""
    if type(spec) is not str or len(spec) > 16:
        raise _Refused(f"refused dtype {reprlib.repr(spec)}: expected a type string such as 'u1'")
    dtype = np.dtype(spec, bool(align), True)
    if dtype.hasobject:  # object arrays hold arbitrary objects, and numpy allocates them before checking
        raise _Refused(f"refused an object array (dtype {dtype}): expected an array of numbers")
    if not _simple_dtype(dtype):
        raise _Refused(f"refused dtype {dtype}: expected numbers or strings")
    return dtype


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's array constructor as numpy calls it: ``_reconstruct(ndarray, (0,), 'b')``; the shape and
    dtype come afterwards from the array's state, which ``_check_array_state`` vets."""
    if subtype is not _NDARRAY:
        raise _Refused(f"refused to rebuild an array of class {type(subtype).__name__}: expected numpy.ndarray")
    if type(shape) is not tuple or shape != (0,) or dtype not in ("b", b"b"):
        raise _Refused(f"refused to allocate an array of shape {reprlib.repr(shape)} and dtype "
                       f"{reprlib.repr(dtype)} while unpickling: numpy pickles start every array at (0,), 'b'")
    return _np_reconstruct(np.ndarray, (0,), "b")


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """How protocol-5 pickles rebuild arrays: a view of bytes the file holds, for simple dtypes only."""
    if type(buffer) not in (bytes, bytearray) or not _simple_dtype(dtype) or order not in ("C", "F"):
        raise _Refused(f"refused _frombuffer with a {type(buffer).__name__} and dtype {reprlib.repr(dtype)}: "
                       "expected bytes and a numeric or string dtype")
    return _np_frombuffer(buffer, dtype, shape, order)


def _scalar(dtype: Any, *data: Any) -> Any:
    """A numpy scalar such as np.int64(3) in a list of labels, for simple dtypes only."""
    if not _simple_dtype(dtype):
        raise _Refused(f"refused a numpy scalar of dtype {reprlib.repr(dtype)}: expected numbers or strings")
    return _np_scalar(dtype, *data)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how Python 3 writes bytes in protocol-2 pickles. Other codecs
    are refused: 'hex' doubles its input, so nested calls would grow a tiny file into gigabytes."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"refused _codecs.encode with encoding {reprlib.repr(encoding)}: expected 'latin1' bytes")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how Python 3 writes b'' (e.g. an empty array's data) in protocol-2 pickles."""
    if args:
        raise _Refused("refused bytes(...) with arguments: expected only bytes() for b''")
    return b""


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


def _check_array_state(state: Any, max_bytes: int) -> int:
    """Vet ``ndarray.__setstate__((version, shape, dtype, fortran, data))`` before numpy allocates; its bytes."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise _Refused(f"refused array state {reprlib.repr(state)}: expected numpy's (shape, dtype, order, data)")
    shape, dtype = state[-4], state[-3]
    if not isinstance(dtype, np.dtype):
        raise _Refused(f"refused array state with dtype {type(dtype).__name__}: expected a numpy dtype")
    if dtype.hasobject:
        # numpy allocates the object array before it checks the item list, and its items may be anything.
        raise _Refused(f"refused an object array (dtype {dtype}): expected an array of numbers")
    if not _simple_dtype(dtype):
        raise _Refused(f"refused an array of dtype {dtype}: expected numbers or strings")
    # At most 64 sizes below 2**63 each (numpy's own limits), so the product below stays cheap.
    if not isinstance(shape, tuple) or len(shape) > 64 or not all(type(n) is int and 0 <= n < 2**63 for n in shape):
        raise _Refused(f"refused array shape {reprlib.repr(shape)}: expected a tuple of sizes")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise _Refused(f"refused an array of {nbytes:,} bytes (shape {reprlib.repr(shape)}, dtype {dtype}): "
                       f"expected at most the file's {max_bytes:,} bytes")
    return nbytes


class _ArrayUnpickler(pickle._Unpickler):
    """pickle's pure-Python unpickler, restricted to numpy arrays of numbers and plain containers.

    Pure Python so that every instruction can be vetted (the C unpickler only lets us vet imports):
    state only for arrays (numbers or strings, no larger than the file) and dtypes (exactly the state
    numpy writes), dict keys only strings (a tuple key nested 100,000 deep crashes CPython's hash; int
    keys can be chosen to collide), no sets, sizes and memo indices bounded, and at most MAX_PICKLE_OPS
    instructions, so memory stays a small multiple of the file size. Each of these was a crash, a hang
    or a multi-gigabyte allocation from a file of a few bytes (tests/test_data.py has them).
    """

    def __init__(self, raw: bytes, max_ops: int = MAX_PICKLE_OPS):
        super().__init__(io.BytesIO(raw), encoding="latin1")  # latin1: Python-2 str pickles, losslessly
        self.max_bytes = len(raw)
        # All arrays together, not each alone: one block of bytes, memoised, can be the data of any number
        # of arrays (each a copy), and a file's own arrays never hold more than the file.
        self.array_bytes_left = len(raw)
        self.ops_left = max_ops
        self.max_ops = max_ops

    def _spend(self, nbytes: int) -> None:
        self.array_bytes_left -= nbytes
        if self.array_bytes_left < 0:
            raise _Refused(f"refused: the arrays of this file would take more than its own {self.max_bytes:,} "
                           "bytes (the same data reused for many arrays?)")

    def _frombuffer(self, *args: Any) -> np.ndarray:
        array = _frombuffer(*args)
        self._spend(array.nbytes)  # a view of the file's bytes, but one a later conversion may copy
        return array

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            found = _ALLOWED[module, name]
            return self._frombuffer if found is _frombuffer else found
        what = f"{module}.{name}"
        what = what if what.isprintable() and len(what) <= 100 else reprlib.repr(what)
        raise _Refused(f"refused to load {what}: a name loaded from a pickle can run code; {ALLOWED}")

    def load_build(self) -> None:
        state, inst = self.stack[-1], self.stack[-2]
        if type(inst) is np.ndarray:
            self._spend(_check_array_state(state, self.max_bytes))
        elif isinstance(inst, np.dtype):
            # Only the state numpy itself writes for this dtype, up to byte order: numpy's dtype
            # __setstate__ trusts its input (a malformed one can crash the interpreter).
            own = inst.__reduce__()[2]
            if not (type(state) is tuple and len(state) == len(own) and state[0] == own[0]
                    and state[1] in ("<", ">", "|", "=") and state[2:] == own[2:]):
                raise _Refused(f"refused dtype state {reprlib.repr(state)} for {inst}: expected {own!r}")
        else:
            raise _Refused(f"refused to set the state of a {type(inst).__name__}: expected numpy arrays only")
        super().load_build()

    def _vet_items(self, target: Any, keys: Sequence) -> None:
        if type(target) is not dict:
            raise _Refused(f"refused to set items on a {type(target).__name__}: expected a dict")
        for key in keys:
            if type(key) not in (str, bytes):
                raise _Refused(f"refused a dict key of type {type(key).__name__}: expected string keys")

    def load_setitem(self) -> None:
        self._vet_items(self.stack[-3], [self.stack[-2]])
        super().load_setitem()

    def load_setitems(self) -> None:
        if self.metastack and self.metastack[-1]:  # else the base method reports the broken stack
            # Until pop_mark the items are the current stack; the dict is on top of the one below.
            self._vet_items(self.metastack[-1][-1], self.stack[0::2])
        super().load_setitems()

    def load_dict(self) -> None:
        self._vet_items({}, self.stack[0::2])
        super().load_dict()

    def load_set(self) -> None:
        raise _Refused(f"refused a set: {ALLOWED}")

    def load_bytearray8(self) -> None:
        # The base method allocates (and zeroes) the declared size before reading: bound it by the file.
        size = int.from_bytes(self.read(8), "little")
        if size > self.max_bytes:
            raise _Refused(f"refused a bytearray of {size:,} bytes: expected at most the file's {self.max_bytes:,} bytes")
        data = bytearray(size)
        self.readinto(data)
        self.append(data)

    def load_put(self) -> None:
        index = self.readline()[:-1]
        if not index.isdigit() or len(index) > 10:
            raise _Refused(f"refused memo index {reprlib.repr(index)}: expected a small non-negative integer")
        self.memo[int(index)] = self.stack[-1]


def _counted(op: Callable[[_ArrayUnpickler], None]) -> Callable[[_ArrayUnpickler], None]:
    def run(self: _ArrayUnpickler) -> None:
        self.ops_left -= 1
        if self.ops_left < 0:
            raise _Refused(f"refused: more than {self.max_ops:,} pickle instructions; expected numpy arrays "
                           "and short lists (a CIFAR batch needs ~40,000)")
        op(self)
    return run


_DISPATCH = dict(pickle._Unpickler.dispatch)
_DISPATCH.update({
    pickle.BUILD[0]: _ArrayUnpickler.load_build,
    pickle.SETITEM[0]: _ArrayUnpickler.load_setitem,
    pickle.SETITEMS[0]: _ArrayUnpickler.load_setitems,
    pickle.DICT[0]: _ArrayUnpickler.load_dict,
    pickle.EMPTY_SET[0]: _ArrayUnpickler.load_set,
    pickle.ADDITEMS[0]: _ArrayUnpickler.load_set,
    pickle.FROZENSET[0]: _ArrayUnpickler.load_set,
    pickle.PUT[0]: _ArrayUnpickler.load_put,
    pickle.BYTEARRAY8[0]: _ArrayUnpickler.load_bytearray8,
})
_ArrayUnpickler.dispatch = {code: _counted(op) for code, op in _DISPATCH.items()}

# What a non-pickle file starts with, to say what was passed instead.
_SIGNATURES = (
    (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive (extract it first, e.g. tar xzf cifar-10-python.tar.gz)"),
    (b"PK\x03\x04", "a zip archive (an .npz or a torch.save file?)"), (b"\x93NUMPY", "a .npy file (numpy.save)"),
    (b"BZh", "a bzip2 archive"), (b"\xfd7zXZ", "an xz archive"), (b"%PDF", "a PDF document"),
)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _what_file(raw: bytes) -> str:
    for magic, name in _SIGNATURES:
        if raw.startswith(magic):
            return f"{name} (starts with {raw[:8]!r})"
    head = raw[:60]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # a character cut at the end of the sample is still text
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"text ({_one_line(text, 60)!r})"
    return f"binary data starting with {raw[:8]!r}"


def safe_load_pickle(path: str | Path, max_bytes: int = MAX_PICKLE_BYTES, max_ops: int = MAX_PICKLE_OPS) -> Any:
    """Unpickle a file allowing only numpy arrays of numbers, dicts, lists, tuples, strings and numbers.

    Any bad file (missing, empty, too large, not a pickle, truncated, asking to run code or to
    allocate more than it holds) raises one ``DataError`` naming the file; nothing else escapes.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise DataError(f"{path}: file not found; expected a pickle file")
        if not path.is_file():
            raise DataError(f"{path}: not a regular file (a folder?); expected a pickle file")
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: file is {size:,} bytes; expected a pickle of at most {max_bytes:,} bytes "
                            "(a CIFAR batch is ~31 MB)")
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({type(e).__name__}: {_one_line(e.strerror or e)})") from None
    if not raw:
        raise DataError(f"{path}: empty file (0 bytes); expected a Python pickle")
    try:
        return _ArrayUnpickler(raw, max_ops).load()
    except _Refused as e:
        # A text file (a CSV, say) reads as old protocol-0 opcodes that "load a name": say what it is instead.
        if str(e).startswith("refused to load") and raw[0] != 0x80 and _what_file(raw).startswith("text"):
            raise DataError(f"{path}: not a pickle file: expected a Python pickle, found {_what_file(raw)}") from None
        raise DataError(f"{path}: {_one_line(e, 300)}") from None
    except Exception as e:  # corrupt, truncated, not a pickle; MemoryError/RecursionError/OverflowError too
        found = f"{type(e).__name__}: {_one_line(e)}" if str(e) else type(e).__name__
        # Every pickle of protocol 2 or later starts with the PROTO byte 0x80.
        if raw[0] != 0x80 or any(raw.startswith(m) for m, _ in _SIGNATURES):
            raise DataError(f"{path}: not a pickle file: expected a Python pickle, found {_what_file(raw)}") from None
        raise DataError(f"{path}: truncated or corrupt pickle: expected a complete Python pickle, "
                        f"found {found} in {len(raw):,} bytes (re-download or re-export the file)") from None


def _short_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. ints over 4300 digits refuse str()
        return f"<{type(value).__name__}>"


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 40, 40, 2


def _describe(value: Any) -> str:
    """A short, one-line account of a found value for an error message."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, dict):
        return f"a dict with keys {_keys(value)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, np.generic):
        try:
            return f"numpy {value.dtype} {_short_repr(value.item())}"
        except Exception:
            return f"numpy {value.dtype}"
    return f"{type(value).__name__} {_short_repr(value)}"


def _keys(d: dict) -> str:
    keys = [k.decode("latin1") if isinstance(k, bytes) else k for k in itertools.islice(d, 8)]
    return f"[{', '.join(_short_repr(k) for k in keys)}{', ...' if len(d) > 8 else ''}]"


def _get(d: dict, key: str, path: Path, required: bool = True, expected: str = "") -> Any:
    """Look a key up as str or bytes (Python-2 pickles read with encoding='bytes' have bytes keys)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    if required:
        raise DataError(f"{path}: missing key '{key}': expected {expected or f'a dict with {key!r}'}, "
                        f"found keys {_keys(d)}")
    return None


def to_nhwc(data: Any, path: Path, field: str = "data") -> np.ndarray:
    """Accept (N, 3072) channel-first rows or (N, 32, 32, 3) uint8 with N >= 1; return (N, 32, 32, 3) uint8."""
    where = f"{path}: field '{field}'"
    if not isinstance(data, np.ndarray):
        raise DataError(f"{where}: expected a uint8 numpy array of shape (N, 3072) or (N, 32, 32, 3), "
                        f"found {_describe(data)}")
    if data.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 pixels (0-255), found dtype {data.dtype}")
    if not (data.ndim == 2 and data.shape[1] == 3072 or data.ndim == 4 and data.shape[1:] == (32, 32, 3)):
        raise DataError(f"{where}: expected shape (N, 3072) or (N, 32, 32, 3), found shape {data.shape}")
    if len(data) == 0:
        raise DataError(f"{where}: expected at least one image, found zero images (shape {data.shape})")
    if data.ndim == 2:
        return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(data)


def _vector(values: Any, n: int, path: Path, field: str, what: str, strings: bool) -> np.ndarray:
    """A 1-D array of ``n`` integers (or strings, where ``strings``) from a list, tuple or array."""
    where = f"{path}: field '{field}'"
    kinds = "integers or strings" if strings else "integers"
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise DataError(f"{where}: expected a 1-D list of {n} {what} (one per image), found shape {values.shape}")
        ok = values.dtype.kind in "iu" or strings and values.dtype.kind == "U"
        if not ok:
            raise DataError(f"{where}: expected {kinds}, found dtype {values.dtype}")
        arr = values
    elif isinstance(values, (list, tuple)):
        types = (int, np.integer, str) if strings else (int, np.integer)
        for i, v in enumerate(values):
            if not isinstance(v, types) or isinstance(v, (bool, np.bool_)):
                raise DataError(f"{where}: expected {kinds}, found {_describe(v)} at index {i}")
            if type(v) is str and len(v) > MAX_ID_CHARS:
                # numpy pads every string to the longest: one huge id would multiply the memory by N.
                raise DataError(f"{where}: expected ids of at most {MAX_ID_CHARS} characters, "
                                f"found one of {len(v):,} at index {i}")
        if strings and values and len({type(v) is str for v in values}) > 1:
            raise DataError(f"{where}: expected all integers or all strings, found both")
        try:
            arr = np.array(values) if values else np.zeros(0, np.int64)
        except (OverflowError, ValueError):
            raise DataError(f"{where}: expected integers that fit in 64 bits, found larger ones") from None
        if arr.dtype.kind not in "iuU":  # ints beyond int64 become an object array
            raise DataError(f"{where}: expected integers that fit in 64 bits, found larger ones")
    else:
        raise DataError(f"{where}: expected a list or 1-D array of {n} {what}, found {_describe(values)}")
    if len(arr) != n:
        raise DataError(f"{where}: expected one {what[:-1]} per image ({n}), found {len(arr)} {what}")
    return arr


def _labels(values: Any, n: int, path: Path) -> np.ndarray:
    labels = _vector(values, n, path, "labels", "labels", strings=False)
    bad = np.flatnonzero((labels < 0) | (labels >= len(CLASSES)))
    if len(bad):
        raise DataError(f"{path}: field 'labels': expected integers 0-9 (one class per image), "
                        f"found {labels[bad[0]].item()} at index {bad[0]}")
    return labels.astype(np.int64)


def _ids(values: Any, n: int, path: Path) -> np.ndarray:
    ids = _vector(values, n, path, "ids", "ids", strings=True)
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    dup = counts > 1
    if dup.any():
        j = np.flatnonzero(dup)[np.argmin(first[dup])]  # the duplicate that comes first in the file
        raise DataError(f"{path}: field 'ids': expected a unique id per image, found id {uniq[j].item()!r} "
                        f"{counts[j]} times (first at index {first[j]}; {int(dup.sum())} duplicated ids in all); "
                        "a submission with duplicated IDs is invalid")
    return ids


# ------------------------------------------------------------------------------------------------
# CIFAR-10
def _not_found(folder: Path, missing: list[str], train: bool) -> str:
    """What is missing, by name: "CIFAR-10 test file test_batch not found in <folder>"."""
    split = "train" if train else "test"
    return f"CIFAR-10 {split} file{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found in {folder}"


def _download(root: Path, missing: list[str], train: bool) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    not_found = _not_found(root / FOLDER, missing, train)
    try:
        download_and_extract_archive(URL, download_root=str(root), md5=ARCHIVE_MD5)
    except Exception as e:
        raise DataError(
            f"{not_found}, and the download from {URL} failed ({type(e).__name__}: {e}); "
            f"put the official cifar-10-batches-py folder in {root}"
        ) from None


def load_cifar10(root: str | Path, train: bool, download: bool = True) -> Split:
    """Read the official python pickles from ``root/cifar-10-batches-py``, downloading if allowed."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    files = TRAIN_FILES if train else TEST_FILES
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(root, missing, train)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        hint = "" if download else " (or pass --download)"
        raise DataError(f"{_not_found(folder, missing, train)}: put the official cifar-10-batches-py folder in "
                        f"{root}{hint}")
    images, labels = [], []
    for name in files:
        path = folder / name
        batch = safe_load_pickle(path)
        expected = "a CIFAR-10 batch: a dict with keys 'data' and 'labels'"
        if not isinstance(batch, dict):
            raise DataError(f"{path}: expected {expected}, found {_describe(batch)}")
        x = to_nhwc(_get(batch, "data", path, expected=expected), path)
        images.append(x)
        labels.append(_labels(_get(batch, "labels", path, expected=expected), len(x), path))
    return Split(np.concatenate(images), np.concatenate(labels))


def stratified_split(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced train/val index split; val gets ``n_val`` images in total."""
    if n_val == 0:
        return np.arange(len(labels)), np.arange(0)
    if not 0 < n_val < len(labels):
        raise DataError(f"--val-split must be between 0 and {len(labels) - 1}, got {n_val}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    # Largest-remainder apportionment, so per-class shares sum exactly to n_val.
    share = counts * n_val / len(labels)
    per_class = np.floor(share).astype(int)
    per_class[np.argsort(share - per_class)[::-1][: n_val - per_class.sum()]] += 1
    val = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, per_class)
    ])
    val = np.sort(val)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def cifar10_splits(root: str | Path, val_split: int, seed: int, download: bool = True,
                   train_subset: int = 0) -> tuple[Split, Split]:
    """Train and validation sets carved from the CIFAR-10 training files."""
    full = load_cifar10(root, train=True, download=download)
    train_idx, val_idx = stratified_split(full.labels, val_split, seed)
    if train_subset:
        train_idx = train_idx[:train_subset]
    return (Split(full.images[train_idx], full.labels[train_idx]),
            Split(full.images[val_idx], full.labels[val_idx]))


# ------------------------------------------------------------------------------------------------
# Custom pickles (course/Kaggle test files)
class CustomSet(NamedTuple):
    images: np.ndarray  # uint8 (N, 32, 32, 3)
    ids: np.ndarray  # (N,) as given
    labels: np.ndarray | None  # int64 (N,) when the file has 'labels'


def load_custom_pickle(path: str | Path, need_ids: bool = True, need_labels: bool = False) -> CustomSet:
    """Read a dict with 'data' ((N,3072) channel-first or (N,32,32,3) uint8), 'ids' and 'labels'.

    Ids (integers or strings, unique) may be left out only where ``need_ids`` is False (then they
    are 0..N-1); ids and labels are checked whenever present. Any bad file raises one ``DataError``.
    """
    path = Path(path)
    obj = safe_load_pickle(path)
    expected = "a dict with keys 'data' and 'ids'" + (" and 'labels'" if need_labels else "")
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected {expected}, found {_describe(obj)}")
    images = to_nhwc(_get(obj, "data", path, expected=expected), path)
    ids = _get(obj, "ids", path, required=need_ids, expected=expected)
    ids = np.arange(len(images)) if ids is None else _ids(ids, len(images), path)
    raw_labels = _get(obj, "labels", path, required=need_labels, expected=expected)
    labels = None if raw_labels is None else _labels(raw_labels, len(images), path)
    return CustomSet(images, ids, labels)
