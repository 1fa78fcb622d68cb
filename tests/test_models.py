"""dkl_lib.models: the CIFAR ResNet/WRN naming of RepDistiller/mdistiller, checkpoints, small nets.

The expected key sets are derived here from the published architecture (a written-out recipe, not
the library's modules), so a renamed or reshaped layer fails these tests; the released CIFAR-100
teacher checkpoints (state_dict under "model") then load with strict=True.
"""
import pytest
import torch
import torch.nn.functional as F

from dkl_lib import models as M

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn_keys(prefix, width):
    shapes = {"weight": (width,), "bias": (width,), "running_mean": (width,), "running_var": (width,),
              "num_batches_tracked": ()}
    return {f"{prefix}.{k}": shapes[k] for k in BN}


def expected_resnet(depth, widths, classes):
    """{key: shape} of the CRD CIFAR ResNet (models/resnet.py of RepDistiller)."""
    n = (depth - 2) // 6
    keys = {"conv1.weight": (widths[0], 3, 3, 3), **bn_keys("bn1", widths[0])}
    cin = widths[0]
    for stage, cout in enumerate(widths[1:], start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            stride = 2 if (stage > 1 and i == 0) else 1
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys.update(bn_keys(f"{p}.bn1", cout))
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            keys.update(bn_keys(f"{p}.bn2", cout))
            if stride != 1 or cin != cout:
                keys[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
                keys.update(bn_keys(f"{p}.downsample.1", cout))
            cin = cout
    keys["fc.weight"] = (classes, cin)
    keys["fc.bias"] = (classes,)
    return keys


def expected_wrn(depth, k, classes):
    """{key: shape} of the CRD CIFAR Wide ResNet (models/wrn.py of RepDistiller)."""
    n = (depth - 4) // 6
    widths = (16, 16 * k, 32 * k, 64 * k)
    keys = {"conv1.weight": (16, 3, 3, 3)}
    cin = 16
    for stage, cout in enumerate(widths[1:], start=1):
        for i in range(n):
            p = f"block{stage}.layer.{i}"
            keys.update(bn_keys(f"{p}.bn1", cin))
            keys[f"{p}.conv1.weight"] = (cout, cin, 3, 3)
            keys.update(bn_keys(f"{p}.bn2", cout))
            keys[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                keys[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
            cin = cout
    keys.update(bn_keys("bn1", cin))
    keys["fc.weight"] = (classes, cin)
    keys["fc.bias"] = (classes,)
    return keys


ARCHS = {
    "resnet8x4": lambda c: expected_resnet(8, (32, 64, 128, 256), c),
    "resnet32x4": lambda c: expected_resnet(32, (32, 64, 128, 256), c),
    "resnet20": lambda c: expected_resnet(20, (16, 16, 32, 64), c),
    "resnet56": lambda c: expected_resnet(56, (16, 16, 32, 64), c),
    "resnet110": lambda c: expected_resnet(110, (16, 16, 32, 64), c),
    "wrn_16_2": lambda c: expected_wrn(16, 2, c),
    "wrn_40_2": lambda c: expected_wrn(40, 2, c),
}

# parameter counts at 100 classes (millions, 2 decimals) as quoted for the CRD benchmark models;
# resnet110's 1.74 (1,736,564) is the count of the reference code's architecture
PUBLISHED_M = {"resnet8x4": 1.23, "resnet32x4": 7.43, "resnet56": 0.86, "resnet20": 0.28,
               "resnet110": 1.74, "wrn_40_2": 2.26, "wrn_16_2": 0.70}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_state_dict_keys_and_shapes_match_the_reference_architecture(name):
    model = getattr(M, name)(num_classes=100)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = ARCHS[name](100)
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert got == want
    params = sum(v.numel() for k, v in model.named_parameters())
    bn_param = sum(s[0] for k, s in want.items() if k.endswith((".weight", ".bias")) and len(s) == 1
                   and not k.startswith("fc."))
    conv_fc = sum(torch.Size(s).numel() for k, s in want.items() if len(s) > 1) + want["fc.bias"][0]
    assert params == M.count_parameters(model) == conv_fc + bn_param
    assert round(params / 1e6, 2) == PUBLISHED_M[name]


@pytest.mark.parametrize("name,keys", [
    ("resnet8x4", {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                   "layer1.0.downsample.1.running_var": (64,), "layer3.0.conv2.weight": (256, 256, 3, 3),
                   "fc.weight": (100, 256)}),
    ("resnet32x4", {"layer1.4.conv2.weight": (64, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                    "layer3.4.bn2.running_mean": (256,)}),
    ("resnet56", {"layer1.8.conv1.weight": (16, 16, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
                  "fc.weight": (100, 64)}),
    ("wrn_40_2", {"block1.layer.0.bn1.weight": (16,), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
                  "block1.layer.5.conv2.weight": (32, 32, 3, 3),
                  "block3.layer.0.convShortcut.weight": (128, 64, 1, 1),
                  "bn1.running_var": (128,), "fc.weight": (100, 128)}),
    ("wrn_16_2", {"block2.layer.1.conv1.weight": (64, 64, 3, 3), "bn1.weight": (128,)}),
])
def test_hand_written_key_table(name, keys):
    state = getattr(M, name)(num_classes=100).state_dict()
    for key, shape in keys.items():
        assert tuple(state[key].shape) == shape, key
    absent = {"resnet56": "layer1.0.downsample.0.weight", "resnet32x4": "layer1.5.conv1.weight",
              "wrn_40_2": "block1.layer.1.convShortcut.weight", "wrn_16_2": "block1.layer.2.conv1.weight",
              "resnet8x4": "layer1.1.conv1.weight"}[name]
    assert absent not in state


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _bn(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                        training=False, eps=1e-5)


def reference_resnet_forward(s, x, n):
    """The CRD ResNet forward, written functionally from a state_dict (eval mode)."""
    out = F.relu(_bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"layer{stage}.{i}"
            stride = 2 if (stage > 1 and i == 0) else 1
            h = F.relu(_bn(F.conv2d(out, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn1"))
            h = _bn(F.conv2d(h, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in s:
                res = _bn(F.conv2d(out, s[f"{p}.downsample.0.weight"], stride=stride), s, f"{p}.downsample.1")
            else:
                res = out
            out = F.relu(h + res)
    return F.linear(F.avg_pool2d(out, out.shape[-1]).flatten(1), s["fc.weight"], s["fc.bias"])


def reference_wrn_forward(s, x, n):
    """The CRD WRN forward (pre-activation; the 1x1 shortcut sees the activated input)."""
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for i in range(n):
            p = f"block{stage}.layer.{i}"
            stride = 2 if (stage > 1 and i == 0) else 1
            o = F.relu(_bn(out, s, f"{p}.bn1"))
            h = F.relu(_bn(F.conv2d(o, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn2"))
            h = F.conv2d(h, s[f"{p}.conv2.weight"], padding=1)
            short = out
            if f"{p}.convShortcut.weight" in s:
                short = F.conv2d(o, s[f"{p}.convShortcut.weight"], stride=stride)
            out = h + short
    out = F.relu(_bn(out, s, "bn1"))
    return F.linear(F.avg_pool2d(out, out.shape[-1]).flatten(1), s["fc.weight"], s["fc.bias"])


def test_forward_matches_the_reference_wiring():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    res = _randomise_bn(M.build_model("resnet8", 10, seed=0))
    with torch.no_grad():
        assert torch.allclose(res(x), reference_resnet_forward(res.state_dict(), x, 1), atol=1e-4)
        assert res(x).shape == (2, 10)
    wrn = _randomise_bn(M.build_model("wrn_16_1", 10, seed=0))
    with torch.no_grad():
        assert torch.allclose(wrn(x), reference_wrn_forward(wrn.state_dict(), x, 2), atol=1e-4)


def test_checkpoint_round_trip_in_the_released_layout(tmp_path):
    src = _randomise_bn(M.build_model("resnet8x4", 100, seed=1))
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": src.state_dict(), "best_acc": torch.tensor(73.0)}, path)
    dst = M.build_model("resnet8x4", 100, seed=2)
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    assert M.load_teacher_checkpoint(path, dst) is dst
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    dst.eval()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # a strict load_state_dict of the "model" entry works too (what mdistiller does)
    fresh = M.resnet8x4(num_classes=100)
    fresh.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)


def test_checkpoint_bare_and_dataparallel_layouts():
    src = M.build_model("wrn_16_2", 100, seed=0)
    bare = src.state_dict()
    dp = {"module." + k: v for k, v in bare.items()}
    for layout in (bare, {"state_dict": bare}, {"model": dp}):
        dst = M.build_model("wrn_16_2", 100, seed=5)
        M.load_teacher_checkpoint(layout, dst)
        assert torch.equal(dst.fc.weight, src.fc.weight)
    old = {k: v for k, v in bare.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 BN
    M.load_teacher_checkpoint({"model": old}, M.wrn_16_2())


def test_checkpoint_mismatch_errors_name_the_keys(tmp_path):
    small = M.resnet8x4().state_dict()
    with pytest.raises(M.CheckpointMismatchError, match=r"missing in checkpoint.*layer1\.1\.conv1\.weight"):
        M.load_teacher_checkpoint({"model": small}, M.resnet32x4())
    shape_msg = r"fc\.weight: checkpoint \(10, 256\) vs model \(100, 256\)"
    with pytest.raises(M.CheckpointMismatchError, match=shape_msg):
        M.load_teacher_checkpoint({"model": M.resnet8x4(num_classes=10).state_dict()}, M.resnet8x4())
    extra = dict(small, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(M.CheckpointMismatchError, match="unexpected in checkpoint.*extra.weight"):
        M.load_teacher_checkpoint(extra, M.resnet8x4())
    with pytest.raises(M.CheckpointMismatchError, match="neither a state_dict"):
        M.load_teacher_checkpoint({"epoch": 3}, M.resnet8x4())
    with pytest.raises(FileNotFoundError):
        M.load_teacher_checkpoint(tmp_path / "missing.pth", M.resnet8x4())
    assert isinstance(M.CheckpointMismatchError("x"), ValueError)


def test_checkpoint_with_pickled_objects_needs_trust(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": M.resnet8x4().state_dict(), "opt": {"obj": object.__new__(_Opaque)}}, path)
    with pytest.raises(M.CheckpointMismatchError, match="trusted=True"):
        M.load_teacher_checkpoint(path, M.resnet8x4())
    M.load_teacher_checkpoint(path, M.resnet8x4(), trusted=True)


class _Opaque:
    pass


def test_build_model_registry_seed_and_errors():
    a = M.build_model("small_cnn", 10, seed=3, width=4)
    b = M.build_model("small_cnn", 10, seed=3, width=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    state = torch.random.get_rng_state()
    M.build_model("mlp", 10, seed=1, hidden=(8,))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    with pytest.raises(ValueError, match="unknown model"):
        M.build_model("resnet9", 10)
    with pytest.raises(TypeError, match=r"resnet20' takes no argument\(s\) \['width'\]; it takes none"):
        M.build_model("resnet20", 10, width=3)
    with pytest.raises(TypeError, match=r"no argument\(s\) \['widht'\]; its arguments: \['in_channels', 'width'\]"):
        M.build_model("small_cnn", 10, widht=3)
    assert M.model_arguments("mlp") == ["in_shape", "hidden"] and M.model_arguments("wrn_34_10") == []
    with pytest.raises(ValueError, match="num_classes"):
        M.build_model("resnet20", 1)
    with pytest.raises(ValueError, match="6n"):
        M.CifarResNet(depth=10)
    with pytest.raises(ValueError, match="6n"):
        M.WideResNet(depth=18)
    # the MLP's layer widths are integers as given: a string is not split into digits ("16" -> 1, 6)
    for hidden in ("16", 16, b"16"):
        with pytest.raises(TypeError, match="hidden must be a sequence of integers"):
            M.MLP(hidden=hidden)
    with pytest.raises(TypeError, match="hidden width must be an integer, got '16'"):
        M.MLP(hidden=["16"])
    with pytest.raises(TypeError, match="in_shape entries must be an integer, got 8.0"):
        M.MLP(in_shape=(1, 8.0, 8))
    assert [m.out_features for m in M.MLP(hidden=[16, 8]).modules() if isinstance(m, torch.nn.Linear)] == [16, 8, 10]


def test_small_models_shapes_and_sizes():
    x = torch.rand(5, 1, 8, 8)
    teacher, student = M.SmallCNN(width=32), M.MLP(hidden=(16,))
    assert teacher(x).shape == (5, 10) and student(x).shape == (5, 10)
    assert M.count_parameters(student) == 64 * 16 + 16 + 16 * 10 + 10
    assert M.count_parameters(teacher) > 20 * M.count_parameters(student)
    assert M.MLP(hidden=()).fc.in_features == 64


# ------------------------------------------------------------------ found by mutation testing
def reference_preact_forward(s, x, blocks):
    """PreActResNet (kuangliu / Rice et al.): the 1x1 shortcut sees relu(bn1(x)), strides 1, 2, 2, 2."""
    out = F.conv2d(x, s["conv1.weight"], padding=1)
    for stage, stride0 in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for i in range(blocks[stage - 1]):
            p = f"layer{stage}.{i}"
            stride = stride0 if i == 0 else 1
            o = F.relu(_bn(out, s, f"{p}.bn1"))
            short = F.conv2d(o, s[f"{p}.shortcut.0.weight"], stride=stride) if f"{p}.shortcut.0.weight" in s else out
            h = F.relu(_bn(F.conv2d(o, s[f"{p}.conv1.weight"], stride=stride, padding=1), s, f"{p}.bn2"))
            out = F.conv2d(h, s[f"{p}.conv2.weight"], padding=1) + short
    out = F.relu(_bn(out, s, "bn"))
    return F.linear(F.adaptive_avg_pool2d(out, 1).flatten(1), s["linear.weight"], s["linear.bias"])


def reference_small_cnn_forward(s, x):
    """conv(w)-BN-ReLU, conv(2w)-BN-ReLU, max-pool 2, conv(2w)-BN-ReLU, global average pool, Linear."""
    out = F.relu(_bn(F.conv2d(x, s["features.0.weight"], padding=1), s, "features.1"))
    out = F.max_pool2d(F.relu(_bn(F.conv2d(out, s["features.3.weight"], padding=1), s, "features.4")), 2)
    out = F.relu(_bn(F.conv2d(out, s["features.7.weight"], padding=1), s, "features.8"))
    return F.linear(out.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])


def test_preact_and_small_cnn_forward_match_the_reference_wiring():
    g = torch.Generator().manual_seed(0)
    blocks = (1, 2, 1, 1)
    pre = _randomise_bn(M.PreActResNet(blocks=blocks, num_classes=10))
    x = torch.randn(2, 3, 16, 16, generator=g)
    cnn = _randomise_bn(M.build_model("small_cnn", 10, seed=0, width=4))
    digits = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.allclose(pre(x), reference_preact_forward(pre.state_dict(), x, blocks), atol=1e-4)
        assert torch.allclose(cnn(digits), reference_small_cnn_forward(cnn.state_dict(), digits), atol=1e-5)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2"])
def test_cifar_models_use_the_reference_initialisation(name):
    """Convolutions: Kaiming normal with mode fan_out (std sqrt(2 / (out · k · k))), as in RepDistiller;
    WRN's classifier bias starts at 0. Checked on the convolutions whose fan-in differs from the fan-out."""
    model = M.build_model(name, 100, seed=0)
    checked = 0
    for key, w in model.state_dict().items():
        if w.dim() == 4 and w.shape[0] != w.shape[1]:
            fan_out = w.shape[0] * w.shape[2] * w.shape[3]
            assert float(w.std()) == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.15), key
            checked += 1
    assert checked >= 3
    if name.startswith("wrn"):
        assert torch.count_nonzero(model.fc.bias) == 0


def test_count_parameters_trainable_only_skips_frozen_parameters():
    model = M.MLP(hidden=(16,))
    total = M.count_parameters(model)
    for p in model.fc.parameters():
        p.requires_grad_(False)
    assert M.count_parameters(model) == total
    assert M.count_parameters(model, trainable_only=True) == total - (16 * 10 + 10)


def test_a_teacher_file_that_is_no_checkpoint_or_cut_short_is_named_with_what_to_do(tmp_path):
    """What a failed or interrupted download leaves: a web page saved as the .pth, or half an archive.
    Both are a CheckpointMismatchError (the command line's one `error:` line, not a traceback, nor
    advice to pass trusted=True) naming the file; a mismatching file is named too."""
    page = tmp_path / "page.pth"
    page.write_text("<html>404 Not Found</html>")
    with pytest.raises(M.CheckpointMismatchError, match=r"page\.pth is not a PyTorch checkpoint.*fetch the file again"):
        M.load_teacher_checkpoint(page, M.resnet8x4())
    full = tmp_path / "full.pth"
    torch.save({"model": M.resnet8x4().state_dict()}, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(M.CheckpointMismatchError, match=r"cut\.pth cannot be read.*truncated or damaged"):
        M.load_teacher_checkpoint(cut, M.resnet8x4())
    with pytest.raises(M.CheckpointMismatchError, match=r"full\.pth: checkpoint does not match CifarResNet"):
        M.load_teacher_checkpoint(full, M.resnet32x4())
    M.load_teacher_checkpoint(full, M.resnet8x4())  # the whole file still loads


def test_constructors_refuse_sizes_they_would_truncate_or_build_empty():
    """seed=1.9 built seed 1's weights, blocks=(2.7, ...) two blocks and blocks="3111" three; widths or
    in_channels of 0 built convolutions with no channels, num_classes=0 models with no logits; a negative
    width failed inside torch. All refused, naming the argument."""
    with pytest.raises(TypeError, match="seed must be an integer, got 1.9"):
        M.build_model("mlp", 10, seed=1.9)
    with pytest.raises(TypeError, match="seed must be an integer, got True"):
        M.build_model("mlp", 10, seed=True)
    with pytest.raises(TypeError, match="blocks entries must be an integer, got 2.7"):
        M.PreActResNet(blocks=(2.7, 1, 1, 1))
    with pytest.raises(TypeError, match="blocks entries must be an integer, got True"):
        M.PreActResNet(blocks=(True, 1, 1, 1))
    with pytest.raises(ValueError, match="blocks must hold 4 numbers"):
        M.PreActResNet(blocks="3111")
    for kw, needle in (({"widths": (16, 0, 32, 64)}, "widths entries must be >= 1, got 0"),
                       ({"widths": (16, -4, 32, 64)}, "widths entries must be >= 1, got -4"),
                       ({"in_channels": 0}, "in_channels must be >= 1, got 0")):
        with pytest.raises(ValueError, match=needle):
            M.CifarResNet(depth=8, **kw)
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        M.WideResNet(depth=16, in_channels=0)
    with pytest.raises(ValueError, match="in_channels must be >= 1"):
        M.PreActResNet(in_channels=0)
    for ctor in (M.mobilenet_v1, M.resnet18):
        with pytest.raises(ValueError, match="num_classes must be >= 2, got 0"):
            ctor(num_classes=0)
        with pytest.raises(TypeError, match="num_classes must be an integer, got True"):
            ctor(num_classes=True)
    for call in (lambda: M.count_parameters("resnet8"), lambda: M.load_teacher_checkpoint({}, "resnet8")):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            call()
    # the accepted spellings still build the same models
    assert M.count_parameters(M.PreActResNet(blocks=[1, 1, 1, 1])) == M.count_parameters(M.PreActResNet(blocks=(1, 1, 1, 1)))
    import numpy as np
    a, b = M.build_model("mlp", 10, seed=np.int64(4)), M.build_model("mlp", 10, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_build_model_with_a_seed_reseeds_no_gpu_generator(monkeypatch):
    """torch.manual_seed also reseeds every CUDA device's generator, which fork_rng(devices=[]) does not
    restore: build_model(seed=...) changed the GPU's random stream (dropout, augmentation on the GPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    a = M.build_model("small_cnn", 10, seed=123, width=4)
    assert calls == []
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(123)
        b = M.SmallCNN(num_classes=10, width=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_checkpoints_load_into_a_dataparallel_wrapped_model_and_find_the_state_dict_under_any_key():
    src = M.build_model("resnet8", 10, seed=0)
    bare = src.state_dict()
    prefixed = {"module." + k: v for k, v in bare.items()}
    for layout in (bare, {"model": prefixed}):  # a plain or a DataParallel checkpoint into a wrapped model
        dst = torch.nn.DataParallel(M.build_model("resnet8", 10, seed=5))
        M.load_teacher_checkpoint(layout, dst)
        assert torch.equal(dst.module.fc.weight, src.fc.weight)
    # "model" holding metadata, the weights under "state_dict": the next key is tried
    dst = M.build_model("resnet8", 10, seed=5)
    M.load_teacher_checkpoint({"model": {"arch": "resnet8"}, "state_dict": bare}, dst)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    with pytest.raises(M.CheckpointMismatchError, match=r"top-level keys: \['epoch', 'model'\]"):
        M.load_teacher_checkpoint({"model": {"arch": "resnet8"}, "epoch": 3}, dst)
