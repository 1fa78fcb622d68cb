"""dkl_lib.data: digits, CIFAR (offline only), synthetic tensors, batching and augmentation."""
import pickle
from urllib.error import URLError

import numpy as np
import pytest
import torch

from dkl_lib import data as D



# ------------------------------------------------------------------------------------------ digits
def test_digits_shapes_range_and_split():
    d = D.digits(seed=0, n_train=300)
    assert d.x_train.shape == (300, 1, 8, 8) and d.x_test.shape == (1797 - 300, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    assert float(d.x_train.max()) == 1.0  # scaled by 16, not by the data maximum of a split
    assert d.num_classes == 10 and d.name == "digits" and d.augment is None
    assert set(d.y_train.tolist()) == set(range(10))  # stratified: every class in train
    counts = torch.bincount(d.y_train, minlength=10)
    assert int(counts.max() - counts.min()) <= 2
    # train and test are disjoint images of the 1797 (compare as rows of pixels)
    train_rows = {tuple(r) for r in d.x_train.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in d.x_test.flatten(1).tolist())
    assert overlap <= 5  # the raw data set itself holds a handful of duplicate images
    assert abs(d.mean[0] - float(d.x_train.mean())) < 1e-3


def test_digits_split_is_deterministic_per_seed():
    a, b, c = D.digits(seed=3, n_train=200), D.digits(seed=3, n_train=200), D.digits(seed=4, n_train=200)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_digits_bad_sizes():
    with pytest.raises(ValueError, match="n_train"):
        D.digits(n_train=5)
    with pytest.raises(ValueError, match="n_test"):
        D.digits(n_train=1000, n_test=900)


# ------------------------------------------------------------------------------------------- CIFAR
def test_cifar_offline_error_says_where_and_how(tmp_path, no_network):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.cifar("cifar100", root=tmp_path)
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert str(tmp_path / "cifar-100-python") in msg
    assert "download=True" in msg and "--download" in msg
    assert "train" in msg and "meta" in msg
    assert list(tmp_path.iterdir()) == []  # nothing was created or downloaded
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-batches-py"):
        D.cifar("cifar10", root=tmp_path)


@pytest.mark.parametrize("name, folder, other", [("cifar10", "cifar-10-batches-py", "cifar100"),
                                                  ("cifar100", "cifar-100-python", "cifar10'")])
def test_cifar_missing_message_is_about_that_data_set(tmp_path, no_network, name, folder, other):
    """The message names this data set's folder and download call, not another data set's command."""
    root = tmp_path / "data"
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.cifar(name, root=root)
    msg = str(info.value)
    assert str(root / folder) in msg and "add --download to your" in msg
    assert f"dkl.data.cifar('{name}', download=True)" in msg
    assert other not in msg and "--preset" not in msg


@pytest.mark.parametrize("failure", [URLError("[Errno -2] Name or service not known"), TimeoutError("timed out"),
                                     RuntimeError("File not found or corrupted.")])
def test_cifar_failed_download_says_where_to_put_the_archive(tmp_path, monkeypatch, no_network, failure):
    """download=True without network: a DatasetNotFoundError with the manual placement (URL, folder, files),
    chained from torchvision's error, not a raw urllib traceback."""
    import torchvision.datasets.cifar as tv_cifar

    def fail(url, download_root, **kw):
        assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        raise failure

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", fail)
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.cifar("cifar10", root=tmp_path / "data", download=True)
    msg = str(info.value)
    assert info.value.__cause__ is failure and msg.startswith("downloading CIFAR-10 failed")
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "data" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "DKL_DATA_DIR" in msg


def _fake_cifar10(folder, skip=()):
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name not in skip:
            with open(folder / name, "wb") as fh:
                pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)


def test_cifar_with_a_file_missing_or_damaged_says_which(tmp_path, monkeypatch, no_network):
    """An extraction that stopped half-way (data_batch_3 missing) is named as such, not as 'not found';
    files that fail torchvision's checksum are called damaged; and with download=True and no network,
    torchvision's attempt to fetch them again ends in the placement message, not a raw URLError."""
    import torchvision.datasets.utils as tv_utils

    _fake_cifar10(tmp_path / "a" / "cifar-10-batches-py", skip=("data_batch_3",))
    with pytest.raises(D.DatasetNotFoundError, match=r"cifar-10-batches-py lacks data_batch_3\)"):
        D.cifar("cifar10", root=tmp_path / "a")
    _fake_cifar10(tmp_path / "b" / "cifar-10-batches-py")  # every file there, none with the right checksum
    with pytest.raises(D.DatasetNotFoundError, match="failed torchvision's integrity check: a damaged or partial copy"):
        D.cifar("cifar10", root=tmp_path / "b")

    def offline(url, *a, **k):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tv_utils, "urlopen", offline, raising=False)
    monkeypatch.setattr(tv_utils, "_urlretrieve", offline, raising=False)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(D.DatasetNotFoundError, match="downloading CIFAR-10 failed .*URLError") as info:
        D.cifar("cifar10", root=tmp_path / "b", download=True)
    assert isinstance(info.value.__cause__, URLError)


def test_cifar_default_root_follows_env(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("DKL_DATA_DIR", str(tmp_path / "elsewhere"))
    assert D.default_data_root() == tmp_path / "elsewhere"
    with pytest.raises(D.DatasetNotFoundError, match="elsewhere"):
        D.cifar("cifar100")


def test_cifar_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cifar100"):
        D.cifar("cifar1000", root=tmp_path)
    with pytest.raises(TypeError, match="download"):
        D.cifar("cifar100", root=tmp_path, download="yes")


def test_cifar_reads_torchvision_files_into_tensors(tmp_path, monkeypatch, no_network):
    """Fake CIFAR-100 files in torchvision's layout (checksums bypassed): layout and scaling."""
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    for name, arr in (("train", train), ("test", test)):
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": arr, "fine_labels": list(range(arr.shape[0]))}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)
    monkeypatch.setattr(tv_cifar.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    d = D.cifar("cifar100", root=tmp_path)
    assert d.x_train.shape == (6, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    # CIFAR rows are channel-major: the first 1024 bytes are the red plane
    expected = torch.from_numpy(train[1].reshape(3, 32, 32).astype(np.float32) / 255.0)
    assert torch.equal(d.x_train[1], expected)
    assert d.y_test.tolist() == [0, 1, 2, 3] and d.num_classes == 100
    assert d.augment == {"padding": 4, "flip": True} and d.mean == D.CIFAR_STATS["cifar100"][0]


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_small_deterministic_and_valid():
    a = D.synthetic(n_train=10, n_test=6, num_classes=3, image_shape=(2, 4, 4), seed=1)
    b = D.synthetic(n_train=10, n_test=6, num_classes=3, image_shape=(2, 4, 4), seed=1)
    assert a.x_train.shape == (10, 2, 4, 4) and a.y_test.shape == (6,)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert set(a.y_train.tolist()) == {0, 1, 2}
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    assert a.describe()["n_train"] == 10 and a.describe()["image_shape"] == [2, 4, 4]


def test_tensordata_validation_and_helpers():
    good = D.synthetic(n_train=4, n_test=4)
    with pytest.raises(ValueError, match="y_train"):
        D.TensorData(good.x_train, good.y_train.int(), good.x_test, good.y_test, 4, "x", (0.5,), (0.2,))
    with pytest.raises(ValueError, match="mean and std"):
        D.TensorData(good.x_train, good.y_train, good.x_test, good.y_test, 4, "x", (0.5, 0.5), (0.2,))
    with pytest.raises(ValueError, match="std"):
        D.TensorData(good.x_train, good.y_train, good.x_test, good.y_test, 4, "x", (0.5,), (0.0,))
    x = torch.full((2, 1, 3, 3), 0.75)
    assert torch.allclose(good.normalize(x), torch.full_like(x, 1.0))  # (0.75 - 0.5) / 0.25
    d64 = good.to(dtype=torch.float64)
    assert d64.x_train.dtype == torch.float64 and d64.y_train.dtype == torch.int64
    assert good.to("cpu") is good


# ---------------------------------------------------------------------------------------- batching
def test_batch_indices_cover_everything_once_and_follow_the_generator():
    idx = list(D.batch_indices(10, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert [len(i) for i in idx] == [4, 4, 2]
    assert sorted(torch.cat(idx).tolist()) == list(range(10))
    again = list(D.batch_indices(10, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(idx, again))
    other = torch.cat(list(D.batch_indices(10, batch_size=4, shuffle=True,
                                           generator=torch.Generator().manual_seed(1))))
    assert not torch.equal(torch.cat(idx), other)
    dropped = list(D.batch_indices(10, batch_size=4, drop_last=True))
    assert [len(i) for i in dropped] == [4, 4] and torch.equal(dropped[0], torch.arange(4))
    with pytest.raises(ValueError, match="batch_size"):
        list(D.batch_indices(10, batch_size=0))


def test_batches_pairs_rows():
    x = torch.arange(7.0).view(7, 1, 1, 1)
    y = torch.arange(7)
    for xb, yb in D.batches(x, y, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(2)):
        assert torch.equal(xb.view(-1).long(), yb)
    with pytest.raises(ValueError, match="length"):
        list(D.batches(x, y[:3], batch_size=2))


# ------------------------------------------------------------------------------------ augmentation
def _all_crops(image, padding):
    """Every crop-after-padding of one (C, H, W) image, flipped and not."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            for flip in (False, True):
                window = padded[:, dy:dy + h, dx:dx + w]
                out.append(window.flip(-1) if flip else window)
    return out


def test_augment_keeps_shape_range_and_is_a_crop_or_flip():
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = D.augment_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(5))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    for i in range(x.shape[0]):
        assert any(torch.equal(out[i], c) for c in _all_crops(x[i], 2)), f"image {i} is no crop/flip"
    assert not torch.equal(out, x)  # something changed (12 images, 50 choices each)


def test_augment_is_deterministic_for_a_generator_and_varies_with_it():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = D.augment_crop_flip(x, generator=torch.Generator().manual_seed(7))
    b = D.augment_crop_flip(x, generator=torch.Generator().manual_seed(7))
    c = D.augment_crop_flip(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_flip_only_and_identity():
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = D.augment_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(1))
    same = [torch.equal(out[i], x[i]) for i in range(32)]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    assert D.augment_crop_flip(x, padding=0, flip=False) is x
    with pytest.raises(ValueError, match="padding"):
        D.augment_crop_flip(x, padding=-1)
    with pytest.raises(ValueError, match="B, C, H, W"):
        D.augment_crop_flip(x[0])


def test_augment_keeps_channels_last_layout():
    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = D.augment_crop_flip(x, generator=torch.Generator().manual_seed(0))
    assert out.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ found by mutation testing
def test_normalisation_statistics_are_the_published_ones_in_rgb_order():
    """The CIFAR teachers of RepDistiller/mdistiller were trained on inputs normalised with exactly these
    numbers (their dataset code), ImageNet models with torchvision's; a channel swap or a typo would
    silently feed a released teacher off-distribution inputs."""
    assert D.CIFAR_STATS["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert D.CIFAR_STATS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert D.IMAGENET_STATS == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_digits_std_is_that_of_the_training_images():
    for n_train in (200, 500):
        d = D.digits(seed=1, n_train=n_train)
        assert abs(d.std[0] - float(d.x_train.double().std())) <= 5e-5
        assert abs(d.mean[0] - float(d.x_train.double().mean())) <= 5e-5


def test_normalize_is_per_channel_and_per_dtype():
    """(x − mean_c) / std_c for each channel c, computed in x's dtype whatever dtype came first."""
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = D.TensorData(x, torch.zeros(2, dtype=torch.int64), x, torch.zeros(2, dtype=torch.int64), 2, "x",
                     (0.1, 0.5, 0.7), (0.2, 0.3, 0.9))
    mean = torch.tensor([0.1, 0.5, 0.7], dtype=torch.float64)
    std = torch.tensor([0.2, 0.3, 0.9], dtype=torch.float64)
    want = (x - mean[None, :, None, None]) / std[None, :, None, None]
    for first, second in ((torch.float32, torch.float64), (torch.float64, torch.float32)):
        d._stats.clear()
        d.normalize(x.to(first))
        out = d.normalize(x.to(second))
        assert out.dtype == second
        tol = 1e-15 if second == torch.float64 else 1e-6
        assert torch.allclose(out, want.to(second), rtol=tol, atol=tol)


def test_tensordata_refuses_train_and_test_images_of_different_sizes():
    x = torch.rand(2, 1, 8, 8)
    y = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="differ in shape"):
        D.TensorData(x, y, torch.rand(2, 1, 8, 6), y, 2, "x", (0.5,), (0.25,))


def test_augment_draws_every_offset_independently_and_flips_half():
    """Over many images: both offsets take every value in [0, 2p], independently of each other (all
    (dy, dx) pairs occur), and about half the images are mirrored."""
    padding, n = 1, 600
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5  # no pixel is 0
    out = D.augment_crop_flip(x, padding=padding, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    seen, flips = set(), 0
    for i in range(n):
        found = [(dy, dx, flip) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1) for flip in (0, 1)
                 if torch.equal(out[i], (lambda w: w.flip(-1) if flip else w)(padded[i, :, dy:dy + 4, dx:dx + 4]))]
        assert len(found) == 1, i
        seen.add(found[0][:2])
        flips += found[0][2]
    assert seen == {(dy, dx) for dy in range(3) for dx in range(3)}
    assert 0.42 < flips / n < 0.58


# ------------------------------------------------------------------ found by mutation testing (session 14)
def test_augment_crops_non_square_images_and_never_mirrors_without_flip():
    """Every augmentation test used square images (rows and columns swapped passed them) and flip=False
    only without padding (the early return): both cases now, each image one exact window of the padded
    image, unmirrored without flip."""
    x = torch.rand(24, 3, 6, 10, generator=torch.Generator().manual_seed(0))
    for flip in (True, False):
        out = D.augment_crop_flip(x, padding=2, flip=flip, generator=torch.Generator().manual_seed(4))
        assert out.shape == x.shape
        for i in range(x.shape[0]):
            windows = _all_crops(x[i], 2)
            if not flip:
                windows = windows[0::2]  # the unmirrored ones
            assert any(torch.equal(out[i], c) for c in windows), f"image {i} (flip={flip})"
        if not flip:
            assert not torch.equal(out, x)  # cropped all the same


def test_cifar10_gets_its_own_normalisation_and_ten_classes(tmp_path, monkeypatch, no_network):
    import importlib.util
    import pathlib

    import torchvision.datasets.cifar as tv_cifar

    spec = importlib.util.spec_from_file_location("presets", pathlib.Path(__file__).with_name("test_cifar_presets.py"))
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    presets.write_mini_cifar(tmp_path, "cifar10", n_train=10, n_test=5)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    d = D.cifar("cifar10", root=tmp_path)
    assert (d.mean, d.std) == D.CIFAR_STATS["cifar10"] and D.CIFAR_STATS["cifar10"] != D.CIFAR_STATS["cifar100"]
    assert d.num_classes == 10 and d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
