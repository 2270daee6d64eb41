"""Datasets: tiny files written here in the publishers' real formats, read back pixel-exact."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hil.data.datasets import Dataset, carvana, cifar10, digits, load_dataset, mnist, shapes
from hil.data.formats import read_idx
from hil.data.safe_pickle import read_safe_pickle
from hil.errors import UserError

rng = np.random.default_rng(7)
TRAIN_X = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
TRAIN_Y = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.uint8)
TEST_X = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
TEST_Y = np.array([7, 8, 9], np.uint8)


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX as MNIST ships it: 0x0000, type 0x08 (ubyte), ndim, big-endian dims, the bytes."""
    return bytes([0, 0, 8, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_mnist(folder: Path, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": TRAIN_X,
        "train-labels-idx1-ubyte": TRAIN_Y,
        "t10k-images-idx3-ubyte": TEST_X,
        "t10k-labels-idx1-ubyte": TEST_Y,
    }
    for name, a in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (folder / name).write_bytes(idx_bytes(a))
    return folder


def test_digits_are_unchanged():
    data = digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.test_indices is None
    sizes = [len(data.split(s)) for s in ("train", "val", "test")]
    assert sizes == [1078, 359, 360]
    assert len(np.unique(np.concatenate([data.split(s) for s in ("train", "val", "test")]))) == 1797


@pytest.mark.parametrize("sub", ["", "mnist", "MNIST/raw"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_loads_pixel_exact_and_keeps_the_official_test_set(tmp_path, gz, sub):
    write_mnist(tmp_path / sub, gz)
    data = load_dataset("mnist", root=tmp_path)
    assert data.images.shape == (11, 1, 28, 28) and data.images.dtype == np.float32
    np.testing.assert_array_equal(data.images[:8, 0], TRAIN_X / np.float32(255))
    np.testing.assert_array_equal(data.images[8:, 0], TEST_X / np.float32(255))
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [*TRAIN_Y.tolist(), *TEST_Y.tolist()]
    assert data.split("test").tolist() == [8, 9, 10]
    train, val = data.split("train"), data.split("val")
    assert sorted([*train, *val]) == list(range(8)) and len(val) == 2  # 1 of each class's 4
    assert sorted(data.labels[val].tolist()) == [0, 1]
    assert np.array_equal(train, mnist(tmp_path).split("train"))  # the same on every load
    split = data.provenance()["split"]
    assert split["sizes"] == {"train": 6, "val": 2, "test": 3} and "test set" in split["method"]


def test_mnist_names_the_missing_file(tmp_path):
    write_mnist(tmp_path / "mnist", gz=True)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        UserError, match=r"mnist: missing train-labels-idx1-ubyte\(\.gz\); expected"
    ):
        mnist(tmp_path)
    with pytest.raises(UserError, match="data folder not found"):
        mnist(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:10], "truncated inside the header"),
        (lambda b: b + b"\0", "trailing bytes"),
        (lambda b: b"\x08\x03" + b[2:], "bad magic number"),
        (lambda b: gzip.compress(b)[:-20], "cannot read"),  # a cut-off .gz
    ],
)
def test_a_corrupt_idx_file_is_refused_with_its_name(tmp_path, corrupt, problem):
    write_mnist(tmp_path, gz=False)
    name = "train-images-idx3-ubyte"
    path = tmp_path / name
    data = corrupt(path.read_bytes())
    if problem == "cannot read":
        path.unlink()
        path = tmp_path / f"{name}.gz"
    path.write_bytes(data)
    with pytest.raises(UserError, match=problem) as err:
        mnist(tmp_path)
    assert str(path) in str(err.value)


def test_idx_reads_big_endian_wider_types(tmp_path):
    a = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3) + a.tobytes())
    got = read_idx(tmp_path / "x")
    assert got.dtype == np.int32 and got.tolist() == a.tolist()


# ---------------------------------------------------------------------------------------------
# CIFAR-10

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer"] + [b"x"] * 5


def cifar_batches() -> dict[str, dict]:
    r = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: {
            b"batch_label": name.encode(),
            b"labels": r.integers(0, 10, n).tolist(),
            b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{k}.png".encode() for k in range(n)],
        }
        for name, n in zip(names, [2, 2, 2, 2, 2, 3], strict=True)
    }


def write_cifar(folder: Path, dump=pickle.dump) -> dict[str, dict]:
    """The batches as CIFAR ships them: pickled dicts with bytes keys, protocol 2."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = cifar_batches()
    meta = {b"num_cases_per_batch": 2, b"label_names": LABEL_NAMES, b"num_vis": 3072}
    for name, obj in [*batches.items(), ("batches.meta", meta)]:
        with (folder / name).open("wb") as f:
            dump(obj, f, protocol=2)
    return batches


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 strings (BINSTRING), as CIFAR's cPickle files hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def python2_dump(obj, f, protocol):
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol).dump(obj)
    f.write(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


@pytest.mark.parametrize("dump", [pickle.dump, python2_dump], ids=["py3", "py2"])
@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar10_loads_pixel_exact_with_red_in_channel_0(tmp_path, sub, dump):
    batches = write_cifar(tmp_path / sub, dump)
    if dump is python2_dump:
        assert b"numpy.core.multiarray" in (tmp_path / sub / "test_batch").read_bytes()
    data = load_dataset("cifar10", root=tmp_path)
    raw = np.concatenate([b[b"data"] for b in batches.values()])
    assert data.images.shape == (13, 3, 32, 32) and data.images.dtype == np.float32
    assert data.classes == 10
    np.testing.assert_array_equal(data.images, raw.reshape(13, 3, 32, 32) / np.float32(255))
    # The first 1024 bytes of a row are the red plane, row-major: pixel (y=0, x=1) is byte 1.
    np.testing.assert_array_equal(data.images[:, 0, 0, 1], raw[:, 1] / np.float32(255))
    np.testing.assert_array_equal(data.images[:, 2, 1, 0], raw[:, 2048 + 32] / np.float32(255))
    assert data.labels.tolist() == sum((b[b"labels"] for b in batches.values()), [])
    assert data.labels.dtype == np.int64
    assert data.split("test").tolist() == [10, 11, 12]
    assert sorted([*data.split("train"), *data.split("val")]) == list(range(10))


def test_cifar10_names_the_missing_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="cifar-10-batches-py: missing test_batch; expected"):
        cifar10(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: missing data_batch_1; expected"):
        cifar10(tmp_path / "empty")


class _Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


@pytest.mark.parametrize("call", [os.system, eval, np.load], ids=["os.system", "eval", "np.load"])
def test_a_pickle_naming_a_forbidden_global_is_refused_and_nothing_runs(tmp_path, call):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    arg = {
        os.system: f"touch {marker}",
        eval: f"open({str(marker)!r}, 'w').close()",
        np.load: str(marker),
    }[call]
    batch = cifar_batches()["data_batch_3"] | {b"batch_label": _Exploit(call, arg)}
    with (tmp_path / "data_batch_3").open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(UserError, match="data_batch_3: refused: refuses to load global"):
        cifar10(tmp_path)
    assert not marker.exists()


def test_object_arrays_and_truncated_pickles_are_refused(tmp_path):
    (tmp_path / "obj").write_bytes(pickle.dumps({b"data": np.array([1, "a"], object)}, 2))
    with pytest.raises(UserError, match="obj: refused: refuses dtype"):
        read_safe_pickle(tmp_path / "obj")
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match="data_batch_1: "):
        cifar10(tmp_path)


def nested_shared(levels: int) -> bytes:
    """A pickle of `levels` lists, each holding the one below twice: a few hundred bytes."""
    inner = [np.arange(3, dtype=np.uint8)]
    for _ in range(levels):
        inner = [inner, inner]
    return pickle.dumps({b"data": inner}, 2)


def test_shared_references_are_resolved_once_and_deep_nesting_is_refused(tmp_path):
    (tmp_path / "shared").write_bytes(nested_shared(30))  # 2**30 paths to one array
    top = read_safe_pickle(tmp_path / "shared")[b"data"]
    for _ in range(30):
        assert top[0] is top[1]
        top = top[0]
    assert top[0].tolist() == [0, 1, 2]
    (tmp_path / "deep").write_bytes(nested_shared(40))
    assert len(nested_shared(40)) < 1000
    with pytest.raises(UserError, match="deep: refused: nested deeper than 32 levels"):
        read_safe_pickle(tmp_path / "deep")


def test_a_wrong_shaped_cifar_batch_is_refused(tmp_path):
    write_cifar(tmp_path)
    batch = cifar_batches()["test_batch"] | {b"data": np.zeros((3, 1024), np.uint8)}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, 2))
    with pytest.raises(UserError, match="test_batch: 'data' rows hold 1024 bytes"):
        cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------
# Carvana


def write_carvana(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two PNG cars and one JPEG, GIF masks (0/1 palette like Kaggle's, one 0/255)."""
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    r = np.random.default_rng(2)
    cars = {}
    for k, ext in enumerate([".png", ".png", ".jpg"]):
        rgb = r.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        mask = np.zeros((8, 8), np.uint8)
        mask[2 + k : 6, 1:7] = 1
        name = f"car{k}_{k + 1:02d}"
        cv2.imwrite(str(root / "train" / f"{name}{ext}"), rgb[..., ::-1])
        scale = 255 if k == 1 else 1
        Image.fromarray(mask * scale, mode="L").save(root / "train_masks" / f"{name}_mask.gif")
        cars[name] = (rgb, mask)
    return cars


def test_carvana_loads_images_and_masks(tmp_path):
    cars = write_carvana(tmp_path / "carvana")
    data = load_dataset("carvana", root=tmp_path)
    assert data.task == "segmentation" and data.classes == 2
    assert data.images.shape == (3, 3, 64, 64) and data.labels.shape == (3, 64, 64)
    data = carvana(tmp_path, size=8)
    assert data.images.dtype == np.float32 and data.labels.dtype == np.int64
    for i, (name, (rgb, mask)) in enumerate(sorted(cars.items())):
        if i == 2:  # JPEG is lossy: compare with what OpenCV decodes
            rgb = cv2.imread(str(tmp_path / "carvana" / "train" / f"{name}.jpg"))[..., ::-1]
        np.testing.assert_array_equal(data.images[i], rgb.transpose(2, 0, 1) / np.float32(255))
        np.testing.assert_array_equal(data.labels[i], mask)
    small = carvana(tmp_path, size=4)
    assert set(np.unique(small.labels)) == {0, 1}
    np.testing.assert_array_equal(small.labels[0], data.labels[0][::2, ::2])
    assert small.test_indices is None  # no official test set: drawn by FRACTIONS
    assert [len(small.split(s)) for s in ("train", "val", "test")] == [2, 1, 0]


def test_carvana_names_a_missing_mask(tmp_path):
    write_carvana(tmp_path)
    (tmp_path / "train_masks" / "car1_02_mask.gif").unlink()
    with pytest.raises(UserError, match=r"missing car1_02_mask\.gif .*train/car1_02\.png"):
        carvana(tmp_path)
    with pytest.raises(UserError, match="missing train/; expected"):
        carvana(tmp_path / "train_masks")


# ---------------------------------------------------------------------------------------------


def test_shapes_are_deterministic_and_masks_cover_the_bright_shapes():
    a, b, c = shapes(50, 16, seed=3), shapes(50, 16, seed=3), shapes(50, 16, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (50, 1, 16, 16) and a.labels.shape == (50, 16, 16)
    assert a.task == "segmentation" and a.labels.dtype == np.int64
    assert set(np.unique(a.labels)) == {0, 1} and a.images.min() >= 0 and a.images.max() <= 1
    for img, mask in zip(a.images[:, 0], a.labels.astype(bool), strict=True):
        assert mask.any() and img[mask].mean() > img[~mask].mean() + 0.2
    full = load_dataset("shapes")
    assert full.images.shape == (1000, 1, 32, 32)
    assert [len(full.split(s)) for s in ("train", "val", "test")] == [600, 200, 200]


def test_load_dataset_wants_a_root_for_file_datasets():
    with pytest.raises(UserError, match="--data-root"):
        load_dataset("mnist")
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


def test_predefined_test_indices_split_the_rest_stratified():
    labels = np.repeat(np.arange(2), 10)
    data = Dataset(
        "x", np.zeros((20, 1, 2, 2), np.float32), labels, 2, test_indices=np.arange(16, 20)
    )
    test, train, val = data.split("test"), data.split("train"), data.split("val")
    assert test.tolist() == [16, 17, 18, 19]
    assert sorted([*train, *val]) == list(range(16)) and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [2, 2]  # a quarter of each class's 10 and 6


@pytest.mark.parametrize("target", [b"numpy\ndtype", b"numpy\nndarray", b"_codecs\nencode"])
def test_a_pickle_cannot_set_attributes_on_the_allowed_globals(tmp_path, target):
    # GLOBAL target; BUILD with state ({}, {"x": 1}): would setattr(target, "x", 1) if allowed.
    evil = b"\x80\x02c" + target + b"\n}}X\x01\x00\x00\x00xK\x01s\x86b."
    (tmp_path / "evil").write_bytes(evil)
    with pytest.raises(UserError, match="evil: "):
        read_safe_pickle(tmp_path / "evil")
    from hil.data import safe_pickle

    assert not any(hasattr(v, "x") for v in safe_pickle.PICKLE_ALLOWED.values())
