"""dkl_lib.distributed: two CPU processes under torchrun (gloo) against the one-process reference,
and the single-process behaviour (no-ops, atomic checkpoints, resume). ``pytest -k distributed``
selects every test here.

The two-process half runs once per session (tests/distributed_worker.py, about 10 s) and saves what
each rank saw; each test compares one aspect with the same computation done here in one process:
(a) the global batches, (b) 3 DDP steps of a float64 linear model, (c) the class prior,
(d) all-reduced metrics, (e) checkpoint save on rank 0 and resume, (f) BatchNorm buffers with two
forwards per backward, (g) BatchNorm buffers after a trainer's epochs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distributed_worker as W
from dkl_lib import distributed as D
from dkl_lib.data import batch_indices
from dkl_lib.prior import ClassPrior

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker on 2 processes with torchrun; returns (out folder, [rank0 results, rank1 results])."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(WORKER), str(out)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in 180 s:\n{err.stdout}\n{err.stderr}")
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _reference_training(steps=None):
    """One process, full global batches: the parameters after `steps` steps (all by default)."""
    x, y, _ = W.make_data()
    model = W.make_model()
    opt = W.make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(W.SHUFFLE_SEED)
    losses = []
    for step, idx in enumerate(batch_indices(W.N, batch_size=W.GLOBAL_BATCH, shuffle=True, generator=gen)):
        if steps is not None and step == steps:
            break
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.state_dict(), losses


# ------------------------------------------------------------------------------- two processes
def test_distributed_torchrun_starts_two_gloo_ranks(ranks):
    _, res = ranks
    assert [r["info"] for r in res] == [(0, 2, 0, True), (1, 2, 1, False)]
    assert {r["backend"] for r in res} == {"gloo"}


def test_distributed_sharded_batches_are_the_single_process_global_batches(ranks):
    _, res = ranks
    gen = torch.Generator().manual_seed(W.SHUFFLE_SEED)
    reference = [b.tolist() for b in batch_indices(W.N, batch_size=W.GLOBAL_BATCH, shuffle=True, generator=gen)]
    assert len(res[0]["batches"]) == len(res[1]["batches"]) == len(reference) == 3
    for i, batch in enumerate(reference):
        share0, size0 = res[0]["batches"][i]
        share1, size1 = res[1]["batches"][i]
        assert size0 == size1 == len(batch)
        # strided split: rank r holds positions r, r + 2, ... of the global batch, in order
        assert share0 == batch[0::2] and share1 == batch[1::2]
    assert [len(s) for s, _ in res[0]["batches"]] == [3, 3, 2] and [len(s) for s, _ in res[1]["batches"]] == [3, 3, 1]


def test_distributed_ddp_three_steps_equal_one_process_on_the_full_batch(ranks):
    _, res = ranks
    reference, ref_losses = _reference_training()
    assert len(ref_losses) == 3
    for r in res:
        for name, value in reference.items():
            err = (r["params"][name] - value).abs().max().item()
            assert err < 1e-6, (name, err)   # measured: ~1e-16 (float64, gradient average + loss scale)
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    # both ranks hold the same parameters (DDP keeps them in sync)
    for name in reference:
        assert torch.equal(res[0]["params"][name], res[1]["params"][name])


def test_distributed_class_prior_equals_the_single_process_prior(ranks):
    _, res = ranks
    x, y, logits_epochs = W.make_data()
    prior = ClassPrior(W.CLASSES, dtype=torch.float64)
    for epoch_logits in logits_epochs:
        gen = torch.Generator().manual_seed(W.SHUFFLE_SEED)
        for idx in batch_indices(W.N, batch_size=W.GLOBAL_BATCH, shuffle=True, generator=gen):
            prior.update(epoch_logits[idx], y[idx], weight_temperature=2.0)
        prior.end_epoch()
    expected = prior.history_tensor()
    assert expected.shape == (3, W.CLASSES, W.CLASSES)
    for r in res:
        torch.testing.assert_close(r["prior"], expected, rtol=1e-12, atol=1e-14)


def test_distributed_metrics_reduce_to_the_single_process_metrics(ranks):
    _, res = ranks
    reference, _ = _reference_training()
    model = W.make_model()
    model.load_state_dict(reference)
    x, y, _ = W.make_data()
    with torch.no_grad():
        logits = model(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
    for r in res:
        sums = r["sums"]
        assert sums["loss_sum"] == pytest.approx(per_sample.sum().item(), rel=1e-12)
        assert sums["correct"] == float((logits.argmax(1) == y).sum()) and sums["seen"] == float(W.N)
        assert sums["per_class"].dtype == torch.float64
        assert torch.equal(sums["per_class"], torch.bincount(y, minlength=W.CLASSES).double())
        assert r["mean"]["loss"] == pytest.approx(per_sample.mean().item(), rel=1e-12)
        assert r["plain_mean"] == {"rank": 0.5}
        assert "different metric names" in r["mismatch"]


def test_distributed_checkpoint_is_written_by_rank0_only_and_resume_continues_exactly(ranks):
    out, res = ranks
    assert res[0]["saved"] == D.checkpoint_path(out / "ckpt", W.STEPS_BEFORE_SAVE) and res[1]["saved"] is None
    assert [p.name for p in (out / "ckpt").iterdir()] == ["checkpoint-000002.pt"]  # no temporary file left
    for r in res:
        assert r["resumed_from"] == ("checkpoint-000002.pt", W.STEPS_BEFORE_SAVE)
        for name, value in r["params"].items():
            assert torch.equal(r["resumed_params"][name], value), name
    # the checkpoint holds the one-process state after 2 steps
    state = torch.load(out / "ckpt" / "checkpoint-000002.pt", weights_only=True)
    after_two, _ = _reference_training(steps=W.STEPS_BEFORE_SAVE)
    for name, value in after_two.items():
        assert (state["model"][name] - value).abs().max().item() < 1e-6
    assert (out / "log.txt").read_text() == "rank 0"
    assert [r["log_return"] for r in res] == ["written", None]
    assert [r["broadcast"] for r in res] == ["run-from-rank-0"] * 2


# -------------------------------------------------------------------------------- one process
def test_distributed_helpers_are_no_ops_in_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not D.is_distributed()
    assert D.init_from_env() == D.dist_info() == D.DistInfo(0, 1, 0, True) and D.is_main()
    assert not D.is_distributed() and not D.launched_by_torchrun()
    out = D.all_reduce_sum({"a": 2, "b": torch.tensor([1.0, 2.0], dtype=torch.float32)})
    assert out["a"] == 2.0 and isinstance(out["a"], float)
    assert out["b"].dtype == torch.float64 and out["b"].tolist() == [1.0, 2.0]
    assert D.all_reduce_mean({"a": 3}) == {"a": 3.0} and D.all_reduce_mean({"a": 3}, weight=7) == {"a": 3.0}
    assert D.broadcast_object({"x": 1}) == {"x": 1}
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model) is model and D.unwrap_model(torch.nn.DataParallel(model)) is model
    D.barrier()
    D.cleanup()
    assert D.main_process_only(lambda: "ran")() == "ran"
    assert D.device_for_rank("cpu") == torch.device("cpu")
    with pytest.raises(TypeError, match="'bad'"):
        D.all_reduce_sum({"bad": "text"})


def test_distributed_main_process_only_skips_other_ranks(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "dist_info", lambda: D.DistInfo(1, 2, 1, False))
    assert D.main_process_only(lambda: "ran")() is None
    assert D.save_checkpoint(tmp_path / "c.pt", {"a": 1}) is None and not (tmp_path / "c.pt").exists()
    assert D.prune_checkpoints(tmp_path) == []


def test_distributed_init_from_env_needs_the_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT.*torchrun"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        D.init_from_env()
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(ValueError, match="RANK='zero'"):
        D.init_from_env()
    assert not D.is_distributed()


@pytest.mark.parametrize("n,world,drop_last", [(10, 2, False), (11, 2, False), (11, 2, True), (11, 4, False),
                                               (3, 4, False), (7, 3, True), (0, 2, False),
                                               (1, 4, False), (2, 7, False)])
def test_distributed_shard_indices_match_distributed_sampler(n, world, drop_last):
    from torch.utils.data import DistributedSampler

    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shares = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False, drop_last=drop_last)
        expected = [order[i].item() for i in sampler]
        got = D.shard_indices(order, rank, world, drop_last=drop_last)
        assert isinstance(got, torch.Tensor) and got.tolist() == expected
        assert D.shard_indices(order.tolist(), rank, world, drop_last=drop_last) == expected
        shares.append(D.shard_indices(order, rank, world, pad=False).tolist())
    # without padding: a partition of the order, sizes differing by at most one
    assert sorted(sum(shares, [])) == sorted(order.tolist())
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(order, world, world)


def test_distributed_shard_batches_on_one_rank_are_batch_indices_and_scale_is_exact():
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    one = [(idx.tolist(), size) for idx, size in
           D.shard_batches(10, batch_size=4, rank=0, world_size=1, shuffle=True, generator=gen_a)]
    assert one == [(b.tolist(), len(b)) for b in batch_indices(10, batch_size=4, shuffle=True, generator=gen_b)]
    # a last global batch smaller than the world is skipped on every rank
    for rank in range(4):
        sizes = [size for _, size in D.shard_batches(9, batch_size=4, rank=rank, world_size=4)]
        assert sizes == [4, 4]
    assert D.local_loss_scale(3, 6, 2) == 1.0 and D.local_loss_scale(1, 3, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        D.local_loss_scale(1, 0, 2)
    # a global batch smaller than the world: every batch would be skipped, no step at all
    with pytest.raises(ValueError, match="batch_size=3 is smaller than world_size=4"):
        next(D.shard_batches(9, batch_size=3, rank=0, world_size=4))


def test_distributed_weighted_mean_ignores_a_rank_without_samples(monkeypatch):
    """weight=0 (a rank that saw no sample, whose per-sample mean is nan) adds nothing, not nan."""
    other_rank = {"loss": torch.tensor(1.5 * 4), "acc": 2.0 * 4, "\0weight": 4.0}  # a second rank: 4 samples

    def two_ranks(metrics):
        return {k: v + other_rank[k] for k, v in metrics.items()}

    monkeypatch.setattr(D, "all_reduce_sum", two_ranks)
    out = D.all_reduce_mean({"loss": torch.tensor(float("nan")), "acc": float("nan")}, weight=0)
    assert out["loss"].item() == 1.5 and out["acc"] == 2.0
    out = D.all_reduce_mean({"loss": torch.tensor(3.5), "acc": 4.0}, weight=4)
    assert out["loss"].item() == 2.5 and out["acc"] == 3.0


def test_distributed_checkpoint_digest_of_a_set_is_the_same_in_every_process():
    """A set's iteration order follows the process's string hashing (PYTHONHASHSEED): the digest sorts
    it, so a checkpoint holding one is not taken for corrupt when another process reads it."""
    code = ("from dkl_lib.distributed import state_digest; "
            "print(state_digest({'losses': {'kl', 'dkl', 'ikl', 'gkl', 'dkd', 'ce'}, 'n': frozenset({'a', 'b'})}))")
    repo = str(Path(__file__).resolve().parent.parent)
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": repo}).stdout
               for seed in ("1", "2", "3", "4")}
    assert len(digests) == 1
    assert D.state_digest({"s": {"a", "b"}}) != D.state_digest({"s": {"a", "c"}})


def test_distributed_checkpoints_are_atomic_and_resume_skips_a_corrupt_latest(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    assert D.load_latest_checkpoint(folder) is None and D.list_checkpoints(folder) == []
    for epoch in (1, 2, 10):
        assert D.save_checkpoint(D.checkpoint_path(folder, epoch), {"epoch": epoch, "w": torch.ones(2) * epoch}) \
            == folder / f"checkpoint-{epoch:06d}.pt"
    assert [p.name for p in D.list_checkpoints(folder)] == \
        ["checkpoint-000001.pt", "checkpoint-000002.pt", "checkpoint-000010.pt"]
    latest = D.load_latest_checkpoint(folder)
    assert latest.path.name == "checkpoint-000010.pt" and latest.state["epoch"] == 10

    # a crash in the middle of writing leaves the previous file untouched and no temporary file
    real_save = torch.save

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        D.save_checkpoint(D.checkpoint_path(folder, 10), {"epoch": 99})
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in folder.iterdir()) == \
        ["checkpoint-000001.pt", "checkpoint-000002.pt", "checkpoint-000010.pt"]
    assert D.load_latest_checkpoint(folder).state["epoch"] == 10

    # a corrupt newest file (copied in by hand, truncated by a full disk, ...) falls back to the previous one
    (folder / "checkpoint-000011.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="checkpoint-000011.pt could not be loaded"):
        latest = D.load_latest_checkpoint(folder)
    assert latest.state["epoch"] == 10 and torch.equal(latest.state["w"], torch.full((2,), 10.0))

    assert [p.name for p in D.prune_checkpoints(folder, keep=2)] == ["checkpoint-000001.pt", "checkpoint-000002.pt"]
    assert [p.name for p in D.list_checkpoints(folder)] == ["checkpoint-000010.pt", "checkpoint-000011.pt"]
    with pytest.raises(TypeError):
        D.save_checkpoint(folder / "x.pt", ["not", "a", "dict"])
    with pytest.raises(ValueError):
        D.checkpoint_path(folder, -1)


def test_distributed_two_forwards_per_step_keep_rank0_batchnorm_buffers(ranks):
    """(f) The adversarial trainers' DDP wrap: no buffer copy inside forward (it broke the backward
    of two forwards under torch 2.11), then broadcast_buffers: after every step both ranks hold
    rank 0's BatchNorm statistics, which are those of a BatchNorm fed rank 0's shares alone."""
    _, (r0, r1) = ranks
    assert r0["forward_sync"] is False and r1["forward_sync"] is False
    assert len(r0["bn_after"]) == len(r1["bn_after"]) == 2  # the 2 + 1 split of the last batch is skipped
    x, _, _ = W.make_data()
    ref = torch.nn.BatchNorm1d(W.FEATURES).double().train()
    gen = torch.Generator().manual_seed(W.SHUFFLE_SEED)
    shards = [idx for idx, size in D.shard_batches(W.N, batch_size=W.GLOBAL_BATCH, rank=0, world_size=2, shuffle=True,
                                                   generator=gen) if size >= 4]  # the global batches of 6, not 3
    for step, idx in enumerate(shards):
        ref(x[idx])
        ref(x[idx] + 0.1)
        for key, want in ref.named_buffers():  # running_mean, running_var, num_batches_tracked
            assert torch.allclose(r0["bn_before"][step][key].to(want.dtype), want, rtol=1e-12, atol=1e-12), key
            assert torch.equal(r0["bn_after"][step][key], r0["bn_before"][step][key]), key
            assert torch.equal(r1["bn_after"][step][key], r0["bn_after"][step][key]), key
    # rank 1 had its own statistics before the broadcast: without it the ranks would drift apart
    assert not torch.equal(r1["bn_before"][0]["running_mean"], r0["bn_before"][0]["running_mean"])


def test_distributed_launched_by_torchrun_needs_both_rank_and_world_size():
    assert D.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2"})
    assert not D.launched_by_torchrun({"RANK": "0"}) and not D.launched_by_torchrun({"WORLD_SIZE": "2"})


def test_distributed_checkpoint_file_mode_follows_the_umask(tmp_path):
    """mkstemp creates 0600 files; a checkpoint gets the mode open() would give (0644 under umask 022)."""
    import stat

    old = os.umask(0o022)
    try:
        path = D.save_checkpoint(D.checkpoint_path(tmp_path, 1), {"epoch": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_distributed_a_checkpoint_that_is_no_dict_falls_back_to_the_previous_one(tmp_path):
    D.save_checkpoint(D.checkpoint_path(tmp_path, 1), {"epoch": 1})
    torch.save(["not", "a", "state"], D.checkpoint_path(tmp_path, 2))
    with pytest.warns(RuntimeWarning, match="does not hold a dict"):
        latest = D.load_latest_checkpoint(tmp_path)
    assert latest.state == {"epoch": 1}


def test_distributed_trainer_leaves_every_rank_with_rank0_batchnorm_buffers(ranks):
    """(g) After train_teacher / distill under DDP every rank holds rank 0's BatchNorm statistics (the
    model rank 0 saves). Without the per-epoch broadcast rank 1 kept those of its own last forward: its
    half of each epoch's test pass, and a teacher trained in the same command (which then distils on
    every rank), used another model than the cached one, so an uninterrupted torchrun grid differed
    from the same grid resumed from the cache or a checkpoint."""
    _, (r0, r1) = ranks
    assert r0["trained_bn_net"].keys() == r1["trained_bn_net"].keys()
    for key, value in r0["trained_bn_net"].items():
        assert torch.equal(value, r1["trained_bn_net"][key]), key
    assert r0["trained_bn_net"]["2.num_batches_tracked"].item() > 0
