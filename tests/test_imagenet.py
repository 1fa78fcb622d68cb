"""ImageNet from class folders (dkl_lib.data.imagenet, decoded per batch), the ImageNet models, and
the `imagenet` KD preset end to end, on a miniature folder of a few random JPEG/PNG images."""
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from dkl_lib import configs as C
from dkl_lib import data as D
from dkl_lib import experiments as E
from dkl_lib import models as M
from dkl_lib import train as T

CLASSES = ("n01440764", "n01443537", "n01484850")
SIZES = ((40, 30), (30, 44), (52, 52), (64, 36))


def write_images(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        w, h = SIZES[k % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        img.save(folder / (f"img{k}.png" if k == 1 else f"img{k}.JPEG"))
    (folder / "notes.txt").write_text("not an image")


@pytest.fixture
def mini_imagenet(tmp_path, monkeypatch, no_network):
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        write_images(root / "imagenet" / "train" / name, 6, seed=c)
        write_images(root / "imagenet" / "val" / name, 2, seed=100 + c)
    monkeypatch.setenv("DKL_DATA_DIR", str(root))
    return root / "imagenet"


def test_class_folders_labels_and_the_official_test_view(mini_imagenet):
    d = D.imagenet(size=32, workers=2)
    assert isinstance(d, D.FolderData) and d.lazy and d.num_classes == 3 and (d.n_train, d.n_test) == (18, 6)
    assert d.y_train.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and d.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert d.image_shape == (3, 32, 32) and d.augment is None and d.mean == D.IMAGENET_STATS[0]
    x = d.x_test[torch.arange(6)]
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    # the test view is torchvision's Resize(size / 0.875) + CenterCrop(size), pixel for pixel
    for k, path in enumerate(d.x_test.files):
        with Image.open(path) as img:
            want = TF.pil_to_tensor(TF.center_crop(TF.resize(img.convert("RGB"), 36), 32)).float() / 255.0
        assert torch.equal(x[k], want), path
    assert torch.equal(d.x_test[torch.tensor([3, 0])], x[[3, 0]])  # deterministic, any order
    sub = d.x_test[:2]
    assert isinstance(sub, D.LazyImages) and sub.shape == (2, 3, 32, 32) and torch.equal(sub[[0, 1]], x[:2])


def test_train_crops_are_torchvisions_random_resized_crop(mini_imagenet):
    path = D.imagenet(size=16).x_train.files[0]  # 40 x 30
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        u = torch.rand(23, generator=g, dtype=torch.float64).tolist()
        top, left, h, w = D._resized_crop_box(40, 30, u)
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w
        assert 0.08 * 1200 * 0.9 <= h * w <= 1200 and 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
        want = TF.resized_crop(rgb, top, left, h, w, [16, 16], interpolation=TF.InterpolationMode.BILINEAR)
        if u[-1] < 0.5:
            want = TF.hflip(want)
        assert torch.equal(D._load_image(path, 16, True, u), TF.pil_to_tensor(want))
    # no try fits (aspect draws far outside the image): the centre crop of the clamped aspect ratio
    assert D._resized_crop_box(100, 10, [1.0, 0.0] * 10 + [0.5, 0.5, 0.9]) == (0, 43, 10, 13)


def test_training_crops_follow_the_seed(mini_imagenet):
    a, b, c = (D.imagenet(size=16, seed=s).x_train for s in (0, 0, 1))
    idx = torch.arange(18)
    first = a[idx]
    assert torch.equal(first, b[idx]) and not torch.equal(first, c[idx])
    assert not torch.equal(first, a[idx])  # the next draw: new crops


def test_missing_or_incomplete_folders_say_what_to_put_where(tmp_path, mini_imagenet):
    with pytest.raises(D.DatasetNotFoundError, match=r"train/<class>/<image>\.JPEG.*never downloaded"):
        D.imagenet(tmp_path / "nowhere")
    (mini_imagenet / "train" / "n09999999").mkdir()
    with pytest.raises(D.DatasetNotFoundError, match="val/ lacks"):
        D.imagenet()
    with pytest.raises(ValueError, match="size"):
        D.imagenet(size=4)


def test_class_folders_that_would_be_dropped_or_never_taught_are_refused(mini_imagenet):
    """A val/ folder that train/ lacks (its images would leave the evaluation unnoticed) and a train/
    folder without images (a class no image teaches) are named; so is a thread count below 1."""
    assert D.imagenet(workers=1).num_classes == len(CLASSES)
    with pytest.raises(ValueError, match="workers must be >= 1, got -1"):
        D.imagenet(workers=-1)
    (mini_imagenet / "val" / "n09999999").mkdir()
    with pytest.raises(D.DatasetNotFoundError, match=r"val/ has class folders that train/ lacks \(1: \['n09999999'\]\)"):
        D.imagenet()
    (mini_imagenet / "train" / "n09999999").mkdir()
    (mini_imagenet / "val" / "n09999999" / "x.JPEG").write_bytes(b"")
    with pytest.raises(D.DatasetNotFoundError, match=r"train/ class folders without images \(1: \['n09999999'\]"):
        D.imagenet()


def test_imagenet_models():
    assert round(M.count_parameters(M.build_model("mobilenet_v1", 1000)) / 1e6, 2) == 4.23
    assert round(M.count_parameters(M.build_model("resnet18", 1000)) / 1e6, 2) == 11.69
    import torchvision

    # torchvision's own weight files load into ours as they are (same module names)
    M.load_teacher_checkpoint(torchvision.models.resnet34().state_dict(), M.build_model("resnet34", 1000))
    assert M.build_model("mobilenet_v1", 5, seed=0)(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_distill_decodes_each_training_image_once_per_epoch_and_only_its_share(mini_imagenet, monkeypatch):
    calls = []
    real = D._load_image
    monkeypatch.setattr(D, "_load_image", lambda p, s, train, u: calls.append(train) or real(p, s, train, u))
    d = D.imagenet(size=32, workers=2)
    teacher, student = M.build_model("resnet18", 3, seed=0), M.build_model("mobilenet_v1", 3, seed=1)
    r = T.distill(student, teacher, d, loss="ikl", gi=True, epochs=2, batch_size=8, seed=0, device="cpu",
                  progress=False)
    # 18 training crops per epoch (no teacher-logit cache over random crops), test views for the evaluations
    assert calls.count(True) == 2 * 18 and r.priors[-1].shape == (3, 3) and len(r.history) == 2
    with pytest.raises(ValueError, match="in-memory"):
        T.adversarial_train(student, d, epsilon=0.03, epochs=1, progress=False, device="cpu")

    class Rank1Of2:  # what a torchrun rank does with a global batch of lazy data
        def local(self, t):
            return t[1::2]

    calls.clear()
    idx, x, y, n = T._batch(d, torch.arange(7), Rank1Of2(), None, None)
    assert idx.tolist() == [1, 3, 5] and n == 7 and y.tolist() == [0, 0, 0] and calls == [True] * 3
    # its crops are the ones a one-process run gives those rows: drawn for the whole global batch
    one_process, d2 = D.imagenet(size=32, workers=2), D.imagenet(size=32, workers=2)  # same seed
    shared = d2.x_train.take(torch.arange(7), keep=lambda t: t[1::2])
    assert torch.equal(shared, one_process.x_train[torch.arange(7)][1::2])


def test_a_resumed_run_gets_the_same_crops_as_an_uninterrupted_one(mini_imagenet, tmp_path):
    def run(folder, stop_after_one=False):
        d = D.imagenet(size=32, workers=2, seed=7)  # the trainer reseeds the crops from its own seed
        student = M.build_model("mobilenet_v1", 3, seed=1)
        cb = (lambda history: False) if stop_after_one else None
        r = T.distill(student, None, d, loss="ce", epochs=2, batch_size=8, seed=3, device="cpu", progress=False,
                      checkpoint_dir=folder, callback=cb)
        return r, torch.cat([p.detach().flatten() for p in student.parameters()])

    full, full_params = run(tmp_path / "a")
    stopped, _ = run(tmp_path / "b", stop_after_one=True)
    resumed, resumed_params = run(tmp_path / "b")
    assert stopped.epochs_run == 1 and resumed.resumed_from == 1
    assert torch.equal(resumed_params, full_params)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_imagenet_preset_end_to_end_with_torchvisions_teacher_file(tmp_path, mini_imagenet):
    teacher = M.build_model("resnet34", 3, seed=4)
    target = mini_imagenet.parent / "teachers" / "resnet34-b627a593.pth"
    target.parent.mkdir()
    torch.save(teacher.state_dict(), target)  # torchvision's files are bare state_dicts
    out = tmp_path / "out"
    status = E.main(["kd", "--preset", "imagenet", "--losses", "kl,ikl", "--seeds", "0", "--epochs", "1",
                     "--override", "data.size=32", "--override", "distill.batch_size=6", "--device", "cpu",
                     "--quiet", "--cache-dir", str(tmp_path / "runs"), "--out", str(out)])
    assert status == 0
    res = json.loads((out / "results.json").read_text())
    assert res["teacher"]["source"] == "checkpoint"
    assert res["teacher"]["acc"] == pytest.approx(T.evaluate(teacher, D.imagenet(size=32)))
    assert [r["loss"] for r in res["runs"]] == ["kl", "ikl"] and res["config"]["student"]["model"] == "resnet18"
    paper = {row["loss"]: row.get("paper_top1") for row in res["summary"]}
    assert paper == {"kl": 71.03, "ikl": 71.91}  # the paper's ImageNet numbers, beside ours
    with pytest.raises(ValueError, match="cannot be downloaded"):
        E.load_data({"name": "imagenet"}, download=True)


@pytest.mark.parametrize("path", sorted(C.config_dir().glob("kd_imagenet_*.yaml")), ids=lambda p: p.stem)
def test_each_imagenet_config_runs_with_torchvisions_teacher_file(tmp_path, mini_imagenet, path):
    """configs/kd_imagenet_*.yaml cut to one epoch at 32 pixels: the teacher file the config names
    is loaded and every loss of the config trains."""
    cfg = C.load_config(path)
    tcfg = cfg["resolved"]["teacher"]
    teacher = M.build_model(tcfg["model"], 3, seed=2)
    target = mini_imagenet.parent / tcfg["checkpoint"]
    target.parent.mkdir(parents=True)
    torch.save(teacher.state_dict(), target)
    out = tmp_path / "out"
    assert E.main(["kd", "--config", str(path), "--epochs", "1", "--override", "data.size=32", "--override",
                   "distill.batch_size=6", "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "runs"),
                   "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["teacher"]["source"] == "checkpoint" and [r["loss"] for r in res["runs"]] == cfg["losses"]
    assert all(r["epochs"] == 1 for r in res["runs"])


def test_distributed_imagenet_preset_under_torchrun_equals_one_process(tmp_path, mini_imagenet):
    """The ImageNet path under `torchrun --nproc_per_node=2` (gloo): each rank decodes its rows of every
    global batch with the crops a one-process run draws, so float64 MLPs (no BatchNorm) end equal."""
    from test_distributed_entry_point import _assert_same_cache, _assert_same_results, _run

    overrides = {"data.size": 12, "teacher.model": "mlp", "teacher.model_kw": {"hidden": [16]},
                 "teacher.checkpoint": None, "teacher.dtype": "float64", "student.model": "mlp",
                 "student.model_kw": {"hidden": [8]}, "student.dtype": "float64", "teacher.train.batch_size": 7,
                 "distill.batch_size": 7, "teacher.train.epochs": 2, "distill.epochs": 2, "checkpoint_every": 1}
    for name, nproc in (("one", 1), ("two", 2)):
        args = ["kd", "--preset", "imagenet", "--losses", "kl,ikl", "--seeds", "0", "--quiet", "--device", "cpu",
                "--cache-dir", str(tmp_path / f"cache_{name}"), "--out", str(tmp_path / f"out_{name}")]
        for key, value in overrides.items():
            args += ["--override", f"{key}={json.dumps(value)}"]
        _run(args, nproc=nproc)  # 18 images in global batches of 7: 4 + 3, 4 + 3, then 2 + 2
    _assert_same_results(tmp_path, ("best_acc", "last_acc", "teacher_acc"))
    _assert_same_cache(tmp_path)


def test_distributed_evaluation_decodes_only_a_ranks_share_of_the_validation_set(mini_imagenet, monkeypatch):
    calls = []
    real = D._load_image
    monkeypatch.setattr(D, "_load_image", lambda p, s, train, u: calls.append(p) or real(p, s, train, u))
    d = D.imagenet(size=16, workers=2)
    model = M.build_model("mobilenet_v1", 3, seed=0)
    par = T._Parallel()
    par.rank, par.world, par.active = 1, 2, True  # rank 1 of 2, with the all-reduce replaced by the other rank's
    other = {"correct": 1.0, "seen": 3}
    monkeypatch.setattr(par, "epoch_totals", lambda sums, **c: {k: float(c[k]) + other[k] for k in c})
    acc = par.accuracy(model, d, amp=False, channels_last=False)
    assert calls == d.x_test.files[1::2]  # rows 1, 3, 5 only
    mine = (T.predict_logits(model, d.x_test[1::2], d).argmax(1) == d.y_test[1::2]).sum().item()
    assert acc == pytest.approx(100.0 * (mine + 1) / 6)


def test_prefetching_keeps_the_order_and_works_one_batch_ahead():
    import threading

    started, second_started = [], threading.Event()

    def fetch(k):
        started.append(k)
        if k == 1:
            second_started.set()
        return k * 10

    gen = T._prefetched(range(4), fetch)
    assert next(gen) == 0
    # while the caller holds item 0, item 1 is already being fetched in the background
    assert second_started.wait(5.0)
    assert [*gen] == [10, 20, 30] and started == [0, 1, 2, 3]
    assert list(T._prefetched([], fetch)) == []

    def boom(k):
        raise ValueError(f"bad item {k}")

    with pytest.raises(ValueError, match="bad item 0"):
        list(T._prefetched(range(3), boom))


def test_decoding_threads_default_to_the_cpus_shared_among_local_processes(monkeypatch):
    import os

    monkeypatch.delenv("DKL_DECODE_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert D.default_decode_workers() == 8
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert D.default_decode_workers() == 16  # capped
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert D.default_decode_workers() == 2
    monkeypatch.setenv("DKL_DECODE_WORKERS", "5")
    assert D.default_decode_workers() == 5 and D.LazyImages(["a"], size=8, train=False).workers == 5
    monkeypatch.setenv("DKL_DECODE_WORKERS", "zero")
    with pytest.raises(ValueError, match="DKL_DECODE_WORKERS"):
        D.default_decode_workers()


def test_train_crops_can_start_at_every_row_and_column_as_torchvision_draws_them():
    """torchvision draws top from randint(0, H - h + 1): the last row is a possible start too; a draw
    from (H - h) passed the other tests and never cropped the bottom- or right-most window."""
    size_draws = [0.3, 0.5] + [0.0] * 18  # the first try fits: a fixed crop size
    _, _, h, w = D._resized_crop_box(40, 30, size_draws + [0.0, 0.0, 0.0])
    grid = [(k + 0.5) / 1000 for k in range(1000)]
    tops = {D._resized_crop_box(40, 30, size_draws + [u, 0.0, 0.0])[0] for u in grid}
    lefts = {D._resized_crop_box(40, 30, size_draws + [0.0, u, 0.0])[1] for u in grid}
    assert tops == set(range(30 - h + 1)) and lefts == set(range(40 - w + 1))
    assert 30 - h >= 1 and 40 - w >= 1  # a crop smaller than the image, so there is more than one start
