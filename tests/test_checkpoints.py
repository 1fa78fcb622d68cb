"""Per-epoch checkpoints and resumption (one process): a run stopped after some epochs and resumed
from its checkpoint ends exactly where the uninterrupted run ends (model, history, class prior),
for distill, train_teacher and adversarial_train, and through run_grid / run_adv_grid / the CLI;
a checkpoint of other settings is refused; finished runs leave no checkpoint behind."""
import json

import pytest
import torch
import torch.backends.cpu as cpu_backend

from dkl_lib import attacks as A
from dkl_lib import data as D
from dkl_lib import distributed as dist
from dkl_lib import experiments as E
from dkl_lib import models as M
from dkl_lib import train as T

FAST = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=16, progress=False, device="cpu")


def tiny(dtype=torch.float64, **kw):
    args = dict(n_train=61, n_test=30, num_classes=3, image_shape=(1, 6, 6), noise=0.4, seed=2, dtype=dtype)
    args.update(kw)
    return D.synthetic(**args)


def mlp(seed):
    return M.build_model("mlp", 3, seed=seed, in_shape=(1, 6, 6), hidden=(8,)).double()


def stop_after(n):
    return lambda history: len(history) < n


def assert_same_model(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def assert_same_history(h1, h2):
    assert len(h1) == len(h2)
    for r1, r2 in zip(h1, h2):
        assert {k: v for k, v in r1.items() if k != "seconds"} == \
            pytest.approx({k: v for k, v in r2.items() if k != "seconds"}, nan_ok=True)


@pytest.fixture(scope="module")
def teacher():
    t = mlp(0)
    T.train_teacher(t, tiny(), epochs=2, seed=0, **FAST)
    return t


# ------------------------------------------------------------------------------------- trainers
@pytest.mark.parametrize("loss, gi", [("ikl", True), ("dkd", False)])
def test_distill_resumed_from_a_checkpoint_equals_the_uninterrupted_run(teacher, tmp_path, loss, gi):
    d = tiny(augment={"padding": 1, "flip": True})   # augmentation: its generator must resume too
    kw = dict(loss=loss, gi=gi, epochs=5, milestones=[2, 4], warmup_epochs=2, seed=3, **FAST)
    full = T.distill(mlp(1), teacher, d, **kw)
    first = T.distill(mlp(1), teacher, d, checkpoint_dir=tmp_path, callback=stop_after(3), **kw)
    assert first.stopped == "callback" and first.epochs_run == 3 and first.resumed_from is None
    assert [p.name for p in dist.list_checkpoints(tmp_path)] == ["checkpoint-000002.pt", "checkpoint-000003.pt"]
    second = T.distill(mlp(7), teacher, d, checkpoint_dir=tmp_path, **kw)   # other init: overwritten by resume
    assert second.resumed_from == 3 and second.stopped is None and second.epochs_run == 5
    assert_same_model(full.model, second.model)
    assert_same_history(full.history, second.history)
    assert [h["lr"] for h in second.history] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])  # schedule resumed
    if gi:
        assert torch.equal(torch.stack(full.priors), torch.stack(second.priors))
    # the last two checkpoints remain (keep_checkpoints=2)
    assert [p.name for p in dist.list_checkpoints(tmp_path)] == ["checkpoint-000004.pt", "checkpoint-000005.pt"]


def test_resuming_without_checkpoint_resume_state_would_differ(teacher, tmp_path):
    """The control: training the remaining epochs from the stopped model alone (fresh optimizer,
    schedule and generators) does NOT give the uninterrupted result, so the equality above is
    owed to the checkpoint."""
    d = tiny()
    kw = dict(loss="kl", epochs=4, milestones=[2], seed=3, **FAST)
    full = T.distill(mlp(1), teacher, d, **kw)
    part = T.distill(mlp(1), teacher, d, callback=stop_after(2), **kw)
    rest = T.distill(part.model, teacher, d, **{**kw, "epochs": 2, "milestones": []})
    diff = max((a - b).abs().max().item() for a, b in zip(full.model.parameters(), rest.model.parameters()))
    assert diff > 1e-6


def test_teacher_and_every_n_epochs(tmp_path):
    d = tiny()
    full = T.train_teacher(mlp(0), d, epochs=4, seed=1, **FAST)
    part = T.train_teacher(mlp(0), d, epochs=4, seed=1, checkpoint_dir=tmp_path, checkpoint_every=3,
                           keep_checkpoints=1, callback=stop_after(2), **FAST)
    # every 3 epochs, plus the epoch a callback stopped at; one kept
    assert part.epochs_run == 2 and [p.name for p in dist.list_checkpoints(tmp_path)] == ["checkpoint-000002.pt"]
    rest = T.train_teacher(mlp(0), d, epochs=4, seed=1, checkpoint_dir=tmp_path, checkpoint_every=3,
                           keep_checkpoints=1, **FAST)
    assert rest.resumed_from == 2
    assert_same_model(full.model, rest.model)
    assert [p.name for p in dist.list_checkpoints(tmp_path)] == ["checkpoint-000003.pt"]


@pytest.mark.parametrize("every", ["step", "epoch"])
def test_adversarial_train_resumes_exactly(tmp_path, every):
    d = tiny()
    # the paper recipe's moving parts: cosine lr, increasing eps, GI prior, AWP from epoch 2, weight average
    kw = dict(loss="ikl", epsilon=0.1, epochs=3, attack_steps=3, batch_size=16, lr=0.05, eval_samples=20,
              lr_schedule="cosine", epsilon_schedule="increasing", seed=4, progress=False, device="cpu",
              awp_gamma=0.01, awp_warmup=2, weight_average=0.9, weight_average_from=1, weight_average_every=every)
    full = T.adversarial_train(A.normalized(mlp(5), d), d, **kw)
    part = T.adversarial_train(A.normalized(mlp(5), d), d, checkpoint_dir=tmp_path, callback=stop_after(1), **kw)
    assert part.epochs_run == 1
    rest = T.adversarial_train(A.normalized(mlp(5), d), d, checkpoint_dir=tmp_path, **kw)
    assert rest.resumed_from == 1
    assert_same_model(full.model, rest.model)
    assert_same_history(full.history, rest.history)
    assert torch.equal(torch.stack(full.priors), torch.stack(rest.priors))


def test_a_checkpoint_of_other_settings_is_refused(teacher, tmp_path):
    d = tiny()
    T.distill(mlp(1), teacher, d, loss="kl", epochs=2, seed=0, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match=r"different run \(settings differ: \['temperature'\]\)"):
        T.distill(mlp(1), teacher, d, loss="kl", temperature=2.0, epochs=2, seed=0, checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        T.distill(mlp(1), teacher, d, loss="kl", epochs=1, checkpoint_dir=tmp_path / "x", checkpoint_every=0, **FAST)
    with pytest.raises(ValueError, match="keep_checkpoints"):
        T.distill(mlp(1), teacher, d, loss="kl", epochs=1, checkpoint_dir=tmp_path / "x", keep_checkpoints=-1, **FAST)


def test_a_checkpoint_of_other_data_or_another_teacher_is_refused(teacher, tmp_path):
    """The settings alone do not say what a run trains on: the same call on other images, or with a
    teacher of other weights, is refused (a checkpoint written before the data and the teacher were
    recorded still resumes)."""
    d = tiny()
    kw = dict(loss="kl", epochs=3, seed=0, checkpoint_dir=tmp_path, **FAST)
    full = T.distill(mlp(1), teacher, d, **{**kw, "checkpoint_dir": None})
    T.distill(mlp(1), teacher, d, callback=stop_after(1), **kw)
    with pytest.raises(ValueError, match=r"checkpoint of a run on other data \(the same settings"):
        T.distill(mlp(1), teacher, tiny(seed=5), **kw)
    other = mlp(0)
    other.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        next(other.parameters())[0, 0] += 1e-9
    with pytest.raises(ValueError, match="checkpoint of a run on other teacher"):
        T.distill(mlp(1), other, d, **kw)
    path = dist.checkpoint_path(tmp_path, 1)
    state = torch.load(path, weights_only=True)
    assert set(state["identity"]) == {"data", "teacher"}
    del state["identity"], state[dist.CHECKSUM_KEY]  # as written before the key existed
    dist.save_checkpoint(path, state)
    rest = T.distill(mlp(1), teacher, d, **kw)
    assert rest.resumed_from == 1
    assert_same_model(full.model, rest.model)
    assert_same_history(full.history, rest.history)


def test_the_identity_of_a_run_ignores_where_and_how_its_tensors_are_stored(teacher):
    """The data and the teacher are recorded by value: the same images in another memory layout
    (channels_last, a non-contiguous copy) and the same teacher copied give the same digests."""
    d = tiny()
    same = D.TensorData(d.x_train.contiguous(memory_format=torch.channels_last), d.y_train.clone(),
                        d.x_test.transpose(2, 3).contiguous().transpose(2, 3), d.y_test, d.num_classes, d.name,
                        d.mean, d.std, d.augment, dict(d.info))
    twin = mlp(0)
    twin.load_state_dict(teacher.state_dict())
    assert T._run_identity(d, teacher) == T._run_identity(same, twin)
    assert T._run_identity(d, None)["teacher"] is None
    assert T._run_identity(d, teacher)["data"] != T._run_identity(tiny(noise=0.41), teacher)["data"]
    flipped = D.TensorData(d.x_train, d.y_train.flip(0), d.x_test, d.y_test, d.num_classes, d.name, d.mean, d.std,
                           d.augment, dict(d.info))
    assert T._run_identity(flipped, teacher)["data"] != T._run_identity(d, teacher)["data"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(teacher, tmp_path):
    d = tiny()
    kw = dict(loss="kl", epochs=4, seed=0, **FAST)
    full = T.distill(mlp(1), teacher, d, **kw)
    T.distill(mlp(1), teacher, d, checkpoint_dir=tmp_path, callback=stop_after(3), **kw)
    dist.checkpoint_path(tmp_path, 3).write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        rest = T.distill(mlp(1), teacher, d, checkpoint_dir=tmp_path, **kw)
    assert rest.resumed_from == 2
    assert_same_model(full.model, rest.model)


def test_a_checkpoint_damaged_in_place_is_refused_not_resumed_from(teacher, tmp_path):
    """Bytes of the model's weights overwritten inside the newest checkpoint: torch.load reads such a
    file without an error (wrong numbers), so without the checksum the run would go on from them; it
    is refused with a warning and the run resumes from the previous checkpoint, ending exactly where
    the uninterrupted run ends."""
    d = tiny()
    kw = dict(loss="kl", epochs=4, seed=0, **FAST)
    full = T.distill(mlp(1), teacher, d, **kw)
    T.distill(mlp(1), teacher, d, checkpoint_dir=tmp_path, callback=stop_after(3), **kw)
    path = dist.checkpoint_path(tmp_path, 3)
    weight = next(iter(torch.load(path, weights_only=True)["model"].values()))
    blob = path.read_bytes()
    at = blob.find(weight.numpy().tobytes())
    assert at > 0
    damaged = (weight + 1.0).numpy().tobytes()
    path.write_bytes(blob[:at] + damaged + blob[at + len(damaged):])
    assert not torch.equal(next(iter(torch.load(path, weights_only=True)["model"].values())), weight)  # loads
    with pytest.warns(RuntimeWarning, match="checkpoint-000003.pt is corrupt"):
        rest = T.distill(mlp(1), teacher, d, checkpoint_dir=tmp_path, **kw)
    assert rest.resumed_from == 2
    assert_same_model(full.model, rest.model)
    assert_same_history(full.history, rest.history)


def test_trades_perturb_start_noise_is_the_generator_draw():
    d = tiny(torch.float32)
    model = A.normalized(M.build_model("mlp", 3, seed=0, in_shape=(1, 6, 6), hidden=(8,)), d)
    x = d.x_test[:7]
    a = A.trades_perturb(model, x, epsilon=0.1, steps=3, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    b = A.trades_perturb(model, x, epsilon=0.1, steps=3, start_noise=noise)
    assert torch.equal(a, b)
    c = A.trades_perturb(model, x, epsilon=0.1, steps=3, start_noise=noise.flip(0))
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="start_noise must be a tensor of x's shape"):
        A.trades_perturb(model, x, epsilon=0.1, steps=1, start_noise=noise[:3])


# ------------------------------------------------------------------------------ grid and command line
TINY = {"data.n_train": 100, "teacher.model_kw.width": 4, "teacher.train.epochs": 2, "distill.epochs": 3,
        "distill.batch_size": 50}


def test_run_grid_resumes_a_stopped_run_and_then_drops_its_checkpoints(tmp_path):
    overrides = {**TINY, "checkpoint_every": 1}
    ref = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=TINY, cache_dir=tmp_path / "ref", progress=False)
    stopped = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=overrides, cache_dir=tmp_path / "c",
                         progress=False, callback=lambda loss, seed, h: len(h) < 2)
    assert stopped.runs.iloc[0]["stopped"] == "callback"
    folder = next((tmp_path / "c").glob("student-*"))
    assert not (folder / "entry.json").exists() and (folder / "checkpoints").is_dir()
    resumed = E.run_grid(["ikl"], [0], preset="cpu-quick", overrides=overrides, cache_dir=tmp_path / "c",
                         progress=False)
    row, ref_row = resumed.runs.iloc[0], ref.runs.iloc[0]
    assert row["resumed_from"] == 2 and not row["cached"]
    assert row["config_hash"] == ref_row["config_hash"]     # checkpoint_every is not part of the run's hash
    assert (row["best_acc"], row["last_acc"]) == (ref_row["best_acc"], ref_row["last_acc"])
    assert torch.equal(resumed.priors[("ikl", 0)], ref.priors[("ikl", 0)])
    assert (folder / "entry.json").exists() and not (folder / "checkpoints").exists()
    # cpu-quick has no checkpoints by default; gpu-short and paper checkpoint every epoch
    assert E.preset("cpu-quick")["checkpoint_every"] == 0
    assert E.preset("gpu-short")["checkpoint_every"] == E.preset("paper")["checkpoint_every"] == 1
    assert not list((tmp_path / "ref").glob("*/checkpoints"))


def test_run_adv_grid_resumes(tmp_path):
    overrides = {"data.n_train": 120, "model.model_kw.width": 4, "train.epochs": 2, "train.eval_samples": 20,
                 "eval.samples": 30, "eval.ensemble": False, "checkpoint_every": 1}
    ref = E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path / "ref", progress=False)
    E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path / "c", progress=False,
                   callback=lambda loss, seed, h: False)
    assert not list((tmp_path / "c").glob("adv*-*/entry.json"))  # neither the stopped run nor its evaluation cached
    resumed = E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path / "c", progress=False)
    row, ref_row = resumed.runs.iloc[0], ref.runs.iloc[0]
    assert row["epochs"] == 2 and (row["clean_acc"], row["robust_acc"]) == (ref_row["clean_acc"], ref_row["robust_acc"])
    entry = json.loads(next((tmp_path / "c").glob("adv-*/entry.json")).read_text())
    assert entry["result"]["resumed_from"] == 1
    with pytest.raises(ValueError, match="checkpoint_every must be a non-negative integer"):
        E.run_adv_grid(["trades"], [0], overrides={**overrides, "checkpoint_every": -1}, cache_dir=tmp_path / "c",
                       progress=False)


def test_model_dtype_override(tmp_path):
    cfg = E.resolve_config("cpu-quick", {"student.dtype": "float64"})
    assert E._run_config(cfg, "kl", 0, "t")["student"]["dtype"] == "float64"
    # without it, the run's hash is what it was before the option existed (old caches stay valid)
    plain = E._run_config(E.resolve_config("cpu-quick"), "kl", 0, "t")
    assert plain["student"] == {"model": "mlp", "model_kw": {"hidden": [16]}}
    grid = E.run_grid(["kl"], [0], overrides={**TINY, "teacher.dtype": "float64", "student.dtype": "float64",
                                               "teacher.model": "mlp", "teacher.model_kw": {"hidden": [8]}},
                      cache_dir=tmp_path, progress=False)
    assert grid.runs.iloc[0]["epochs"] == 3
    with pytest.raises(ValueError, match="model dtype must be one of"):
        E.run_grid(["kl"], [0], overrides={**TINY, "student.dtype": "float16"}, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="ART ensemble evaluates float32 models only"):
        E.run_adv_grid(["trades"], [0], overrides={"model.dtype": "float64"}, cache_dir=tmp_path, progress=False)


def test_cli_checkpoint_every_flag(tmp_path, capsys):
    args = ["kd", "--losses", "kl", "--seeds", "0", "--quiet", "--cache-dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "o")]
    for key, value in TINY.items():
        args += ["--override", f"{key}={json.dumps(value)}"]
    assert E.main(args + ["--checkpoint-every", "-2"]) == 2
    assert "checkpoint_every must be a non-negative integer" in capsys.readouterr().err
    assert E.main(args + ["--checkpoint-every", "1"]) == 0
    runs = json.loads((tmp_path / "o" / "results.json").read_text())
    assert runs["config"]["checkpoint_every"] == 1 and runs["runs"][0]["resumed_from"] is None


def test_run_adv_grid_reports_the_epoch_a_run_resumed_from(tmp_path):
    """As run_grid's table (and results.csv) do for KD: the resumed adversarial run says so in its row,
    since its `seconds` then count only the epochs after the checkpoint."""
    overrides = {"data.n_train": 120, "model.model_kw.width": 4, "train.epochs": 2, "train.eval_samples": 20,
                 "eval.samples": 30, "eval.ensemble": False, "checkpoint_every": 1}
    E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path, progress=False,
                   callback=lambda loss, seed, h: False)
    resumed = E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path, progress=False)
    assert resumed.runs.iloc[0]["resumed_from"] == 1 and not resumed.runs.iloc[0]["cached"]
    again = E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path, progress=False)
    assert again.runs.iloc[0]["cached"] and again.runs.iloc[0]["resumed_from"] == 1  # from the cache entry
    fresh = E.run_adv_grid(["trades"], [0], overrides=overrides, cache_dir=tmp_path / "fresh", progress=False)
    assert "resumed_from" in fresh.runs.columns and fresh.runs.iloc[0]["resumed_from"] is None


def test_a_grid_says_when_a_run_resumes_from_a_checkpoint(tmp_path, capsys):
    """Rerunning an interrupted command resumes; the console says so (run, epoch, file) before the
    first resumed epoch ends, instead of only a `resumed_from` column in the results afterwards."""
    overrides = {**TINY, "checkpoint_every": 1}
    E.run_grid(["kl"], [0], preset="cpu-quick", overrides=overrides, cache_dir=tmp_path, progress=True,
               callback=lambda loss, seed, h: len(h) < 2)
    assert "resuming" not in capsys.readouterr().err
    said = []
    E.run_grid(["kl"], [0], preset="cpu-quick", overrides=overrides, cache_dir=tmp_path, progress=True,
               callback=lambda loss, seed, h: said.append(capsys.readouterr().err))
    assert "kl seed 0: resuming after epoch 2 from the checkpoint " in said[0]
    assert "checkpoint-000002.pt" in said[0]
    adv = {"data.n_train": 120, "model.model_kw.width": 4, "train.epochs": 2, "train.eval_samples": 20,
           "eval.samples": 30, "eval.ensemble": False, "checkpoint_every": 1}
    E.run_adv_grid(["trades"], [0], overrides=adv, cache_dir=tmp_path, progress=True,
                   callback=lambda loss, seed, h: False)
    capsys.readouterr()
    E.run_adv_grid(["trades"], [0], overrides=adv, cache_dir=tmp_path, progress=True)
    assert "trades seed 0: resuming after epoch 1 from the checkpoint " in capsys.readouterr().err
    E.run_adv_grid(["trades"], [0], overrides=adv, cache_dir=tmp_path, progress=True)  # from the cache: silent
    assert "resuming" not in capsys.readouterr().err


def test_a_checkpoint_resumes_on_a_cpu_with_other_vector_instructions(teacher, tmp_path, monkeypatch):
    """The CPU's vector instruction set is recorded where a run ran (ran_on), not as one of its settings:
    a run checkpointed on an AVX2 machine goes on from its checkpoint on an AVX512 one (or one from
    before the key existed)."""
    d = tiny()
    kw = dict(loss="kl", epochs=3, seed=0, checkpoint_dir=tmp_path, **FAST)
    monkeypatch.setattr(T, "_cpu_capability", lambda: "AVX2")
    part = T.distill(mlp(1), teacher, d, callback=stop_after(2), **kw)
    assert part.epochs_run == 2 and part.ran_on["cpu_capability"] == "AVX2"
    monkeypatch.setattr(T, "_cpu_capability", lambda: "AVX512")
    rest = T.distill(mlp(1), teacher, d, **kw)
    assert rest.resumed_from == 2 and rest.epochs_run == 3 and rest.ran_on["cpu_capability"] == "AVX512"
    monkeypatch.undo()
    assert T.distill(mlp(1), teacher, d, loss="kl", epochs=1, seed=0, **FAST).ran_on["cpu_capability"] \
        == cpu_backend.get_cpu_capability()


def test_the_class_prior_history_resumes_from_new_and_older_checkpoints(teacher, tmp_path):
    """The prior's state_dict now carries its history (it was lost by a round trip through it): a
    checkpoint holds it once, inside "prior", and one written before, with a separate "prior_history"
    and a prior state without one, still resumes to the same priors as the uninterrupted run."""
    d = tiny()
    kw = dict(loss="ikl", gi=True, epochs=4, seed=3, **FAST)
    full = T.distill(mlp(1), teacher, d, **kw)
    for older in (False, True):
        folder = tmp_path / ("older" if older else "now")
        T.distill(mlp(1), teacher, d, checkpoint_dir=folder, callback=stop_after(2), **kw)
        path = dist.checkpoint_path(folder, 2)
        state = torch.load(path, weights_only=True)
        assert len(state["prior"]["history"]) == 3 and "prior_history" not in state
        if older:  # as written before: the history beside the prior's state, not in it
            state["prior_history"] = state["prior"].pop("history")
            del state[dist.CHECKSUM_KEY]
            dist.save_checkpoint(path, state)
        rest = T.distill(mlp(1), teacher, d, checkpoint_dir=folder, **kw)
        assert rest.resumed_from == 2
        assert torch.equal(torch.stack(full.priors), torch.stack(rest.priors)), older
