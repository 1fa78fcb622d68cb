"""dkl_lib.prior.ClassPrior: exactly the semantics of its module docstring, also under torch.distributed."""
import datetime
import os
import time

import pytest
import torch

import dkl_lib as dkl
from dkl_lib.prior import ClassPrior


def class_means(logits, targets, classes, temperature):
    """Row y = mean of softmax(logits / T) over the samples of class y (float64), NaN if none."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    out = torch.full((classes, classes), float("nan"), dtype=torch.float64)
    for y in range(classes):
        rows = probs[targets == y]
        if len(rows):
            out[y] = rows.mean(dim=0)
    return out


def test_starts_uniform_with_a_snapshot():
    gi = ClassPrior(4)
    assert gi.prior.shape == (4, 4) and gi.prior.dtype == torch.float32
    assert torch.equal(gi.prior, torch.full((4, 4), 0.25))
    assert len(gi.history) == 1 and torch.equal(gi.history[0], gi.prior)
    assert gi.epochs == 0


def test_update_accumulates_and_end_epoch_switches_to_the_class_means():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])  # class 3 never seen
    gi = ClassPrior(4, dtype=torch.float64)
    gi.update(logits[:5], targets[:5], weight_temperature=2.0)
    gi.update(logits[5:], targets[5:], weight_temperature=2.0)
    assert torch.equal(gi.prior, torch.full((4, 4), 0.25, dtype=torch.float64))  # not before end_epoch
    assert gi.counts.tolist() == [4.0, 4.0, 4.0, 0.0]
    new = gi.end_epoch()
    want = class_means(logits, targets, 4, 2.0)
    assert torch.allclose(new[:3], want[:3], atol=1e-15)
    assert torch.equal(new[3], torch.full((4,), 0.25, dtype=torch.float64))  # unseen: previous row
    assert torch.allclose(new.sum(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-15)
    assert gi.counts.sum() == 0 and gi.epochs == 1 and len(gi.history) == 2

    # epoch 2: only class 3 and class 0 seen; classes 1 and 2 keep their epoch-1 rows
    logits2 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    targets2 = torch.tensor([3, 3, 0])
    gi.update(logits2, targets2, weight_temperature=2.0)
    second = gi.end_epoch()
    want2 = class_means(logits2, targets2, 4, 2.0)
    assert torch.allclose(second[3], want2[3], atol=1e-15) and torch.allclose(second[0], want2[0], atol=1e-15)
    assert torch.equal(second[1:3], new[1:3])
    hist = gi.history_tensor()
    assert hist.shape == (3, 4, 4) and torch.equal(hist[1], new) and torch.equal(hist[2], second)


def test_weight_temperature_changes_the_rows():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    targets = torch.tensor([0, 1])
    sharp, soft = ClassPrior(3), ClassPrior(3)
    sharp.update(logits, targets, weight_temperature=1.0)
    soft.update(logits, targets, weight_temperature=8.0)
    assert sharp.end_epoch()[0, 0] > soft.end_epoch()[0, 0] > 1 / 3


def test_update_takes_no_gradient_and_feeds_ikl():
    logits = torch.randn(6, 5, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    gi = ClassPrior(5)
    gi.update(logits, targets, weight_temperature=4.0)
    prior = gi.end_epoch()
    assert prior.grad_fn is None and not prior.requires_grad and logits.grad is None
    student = torch.randn(6, 5, requires_grad=True)
    loss = dkl.ikl_loss(student, logits.detach(), temperature=4.0, targets=targets, class_prior=gi.prior)
    loss.backward()
    assert torch.isfinite(loss) and student.grad is not None
    # with GI the weights come from the prior, so they differ from the sample-wise ones
    sample_wise = dkl.ikl_terms(student, logits.detach(), temperature=4.0)["wmse"]
    with_gi = dkl.ikl_terms(student, logits.detach(), temperature=4.0, targets=targets,
                            class_prior=gi.prior)["wmse"]
    assert not torch.allclose(sample_wise, with_gi)


def test_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        ClassPrior(1)
    gi = ClassPrior(3)
    with pytest.raises(ValueError, match="3"):
        gi.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        gi.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="weight_temperature"):
        gi.update(torch.zeros(2, 3), torch.tensor([0, 1]), weight_temperature=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        gi.update(torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="keeps no history"):
        ClassPrior(3, keep_history=False).history_tensor()


def test_bad_input_is_named():
    for bad in (True, 3.0, "3", None):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
            ClassPrior(bad)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ClassPrior(3, dtype="float32")
    with pytest.raises(TypeError, match="floating-point"):
        ClassPrior(3, dtype=torch.int64)
    gi = ClassPrior(3)
    for bad in (float("-inf"), float("inf")):  # softmax would turn -inf into a finite 0
        with pytest.raises(ValueError, match="non-finite"):
            gi.update(torch.tensor([[0.0, bad, 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="weight_temperature overflows"):
        gi.update(torch.tensor([[0.0, 1e30, 1.0]]), torch.tensor([0]), weight_temperature=1e-300)
    assert int(gi.counts.sum()) == 0


def test_integer_likes_are_accepted_as_num_classes():
    np = pytest.importorskip("numpy")
    gi = ClassPrior(np.int64(3))
    assert gi.num_classes == 3 and type(gi.num_classes) is int and gi.prior.shape == (3, 3)


def test_an_empty_batch_adds_nothing():
    """A rank's empty share (B = 0) is a no-op, not an error; the shapes are still checked."""
    gi = ClassPrior(3)
    gi.update(torch.randn(2, 3), torch.tensor([0, 2]))
    before = gi.state_dict()
    gi.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    after = gi.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in ("prior", "sums", "counts"))
    with pytest.raises(ValueError, match="classes"):
        gi.update(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        gi.update(torch.zeros(0, 3), torch.zeros(0))


@pytest.mark.parametrize("key,value,fragment", [
    ("prior", torch.zeros(4, 4), r"state\['prior'\] has shape \(4, 4\), expected \(3, 3\)"),
    ("sums", torch.zeros(4, 4), r"state\['sums'\] has shape \(4, 4\), expected \(3, 3\)"),
    ("counts", torch.zeros(3, 1), r"state\['counts'\] has shape \(3, 1\), expected \(3,\)"),
    ("sums", None, r"lacks the key\(s\) \['sums'\]"),
    ("epochs", None, r"lacks the key\(s\) \['epochs'\]"),
])
def test_load_state_dict_names_a_missing_key_or_a_wrong_shape(key, value, fragment):
    gi = ClassPrior(3)
    gi.update(torch.randn(2, 3), torch.tensor([0, 1]))
    state = gi.state_dict()
    if value is None:
        del state[key]
    else:
        state[key] = value
    other = ClassPrior(3)
    with pytest.raises(ValueError, match=fragment):
        other.load_state_dict(state)
    assert other.epochs == 0 and int(other.counts.sum()) == 0  # nothing was loaded


def test_state_dict_round_trip():
    gi = ClassPrior(3)
    gi.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    gi.end_epoch()
    gi.update(torch.randn(2, 3), torch.tensor([1, 1]))
    other = ClassPrior(3)
    other.load_state_dict(gi.state_dict())
    assert torch.equal(other.prior, gi.prior) and torch.equal(other.counts, gi.counts)
    assert torch.equal(other.end_epoch(), gi.end_epoch())


def test_state_dict_round_trip_keeps_the_epoch_count_and_the_dtype():
    gi = ClassPrior(3, dtype=torch.float64)
    for _ in range(2):
        gi.update(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
        gi.end_epoch()
    other = ClassPrior(3)  # float32: the loaded prior is converted to its own dtype
    other.load_state_dict(gi.state_dict())
    assert other.epochs == gi.epochs == 2
    assert other.prior.dtype == torch.float32 and torch.equal(other.prior, gi.prior.float())
    other.end_epoch()
    assert other.prior.dtype == torch.float32 and other.epochs == 3


def test_state_dicts_are_snapshots_not_views():
    """A saved state does not change when training goes on, and loading it twice gives two
    independent priors (the checkpoint in memory is not updated in place either)."""
    gi = ClassPrior(3)
    gi.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    state = gi.state_dict()
    saved = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    gi.update(torch.randn(2, 3), torch.tensor([1, 1]))
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    first, second = ClassPrior(3), ClassPrior(3)
    first.load_state_dict(state)
    second.load_state_dict(state)
    first.update(torch.randn(3, 3), torch.tensor([2, 2, 0]))
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert torch.equal(second.state_dict()["sums"], saved["sums"])
    assert torch.equal(second.counts, saved["counts"])


# ------------------------------------------------------------------------------ torch.distributed
def _worker(rank, world, init_file, logits, targets, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        gi = ClassPrior(logits.shape[1], dtype=torch.float64)
        # interleaved shards of unequal size; class 4 lives on rank 1 only
        mine = torch.arange(rank, logits.shape[0], world)
        gi.update(logits[mine], targets[mine], weight_temperature=3.0)
        gi.end_epoch()
        part = os.path.join(out_dir, f"prior{rank}.part")
        torch.save(gi.prior, part)
        os.replace(part, os.path.join(out_dir, f"prior{rank}.pt"))  # whole or absent
    finally:
        torch.distributed.destroy_process_group()


def _spawn_and_collect(worker, args, paths, *, grace_s=30.0, deadline_s=180.0):
    """Run ``worker`` on 2 spawned ranks until both have written their file. A worker error fails at
    once (join raises). A rank still in gloo's teardown ``grace_s`` after both files exist is
    terminated: torch 2.4's destroy_process_group now and then hangs there under CPU load, after the
    result is saved (the teardown itself is tested under torchrun in test_distributed.py)."""
    ctx = torch.multiprocessing.spawn(worker, args=args, nprocs=2, join=False)
    start, saved = time.monotonic(), None
    try:
        while not ctx.join(timeout=1):
            now = time.monotonic()
            if saved is None and all(p.exists() for p in paths):
                saved = now
            if saved is not None and now - saved > grace_s:
                break
            if saved is None and now - start > deadline_s:
                pytest.fail(f"the ranks wrote no result in {deadline_s:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
            proc.join()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_all_reduced_prior_equals_the_single_process_prior(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([0, 4, 1, 0, 2, 4, 3, 1, 2])  # the 4s sit at odd positions: rank 1
    paths = [tmp_path / f"prior{r}.pt" for r in (0, 1)]
    _spawn_and_collect(_worker, (2, str(tmp_path / "init"), logits, targets, str(tmp_path)), paths)
    single = ClassPrior(6, dtype=torch.float64)
    single.update(logits, targets, weight_temperature=3.0)
    single.end_epoch()
    p0, p1 = (torch.load(path, weights_only=True) for path in paths)
    assert torch.equal(p0, p1)
    assert torch.allclose(p0, single.prior, atol=1e-15)
    assert torch.equal(p0[5], torch.full((6,), 1 / 6, dtype=torch.float64))  # class 5: nobody saw it


def test_a_prior_is_checked_once_until_it_changes_in_place():
    """ikl checks a class prior's values once per tensor (a training step reuses the epoch's prior
    without a device sync); an in-place change, of the tensor or through a view, is checked again."""
    from dkl_lib import _checks

    prior = torch.full((4, 4), 0.25)
    logits, target_logits, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 3])
    reads = []
    real = torch.Tensor.tolist

    def counting(t):
        reads.append(t.numel())
        return real(t)

    ikl = dict(temperature=2.0, targets=y, class_prior=prior)
    try:
        torch.Tensor.tolist = counting
        assert _checks.class_prior_bounds(prior, 4, prior.device)[0] == pytest.approx(1.0)
        first = len(reads)
        assert _checks.class_prior_bounds(prior, 4, prior.device)[0] == pytest.approx(1.0)
        assert len(reads) == first  # the second check read nothing back
    finally:
        torch.Tensor.tolist = real
    dkl.ikl_loss(logits, target_logits, **ikl)
    prior[2, 1] = float("nan")
    with pytest.raises(ValueError, match="class_prior contains non-finite"):
        dkl.ikl_loss(logits, target_logits, **ikl)
    prior[2, 1] = 0.25
    dkl.ikl_loss(logits, target_logits, **ikl)
    prior[3].fill_(0.0)  # through a view: the version counter is shared
    with pytest.raises(ValueError, match=r"rows \[3\] sum to zero"):
        dkl.ikl_loss(logits, target_logits, **ikl)
    # another tensor of the same values is checked on its own, and a wrong shape is always refused
    with pytest.raises(ValueError, match="shape"):
        dkl.ikl_loss(logits, target_logits, temperature=2.0, targets=y, class_prior=torch.full((4, 3), 0.25))


def test_update_reads_its_checks_in_one_device_sync_and_names_each_problem():
    p = ClassPrior(3)
    reads = []
    real = torch.Tensor.tolist

    def counting(t):
        reads.append(t.numel())
        return real(t)

    try:
        torch.Tensor.tolist = counting
        p.update(torch.randn(4, 3), torch.tensor([0, 2, 1, 2]), weight_temperature=2.0)
    finally:
        torch.Tensor.tolist = real
    assert reads == [5]  # targets min/max, logits min/max, the probabilities' sum: one read
    with pytest.raises(ValueError, match=r"targets out of range: the logits have 3 classes.*max 3"):
        p.update(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="min -1"):
        p.update(torch.randn(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="target_logits contain non-finite"):
        p.update(torch.tensor([[0.0, -float("inf"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="overflows"):
        p.update(torch.tensor([[0.0, 1e300, 1.0]], dtype=torch.float64), torch.tensor([0]), weight_temperature=1e-10)
    assert p.counts.sum() == 4  # the refused batches added nothing


def test_the_trainers_unchecked_update_equals_update_and_end_epoch_catches_an_overflow():
    """The trainers add each batch with ``_update_checked`` (their loss has just validated the same
    inputs, so no second device sync): the same prior as :meth:`update`; an overflow of
    logits / T_w, which update refuses per batch, surfaces at end_epoch instead of a nan prior."""
    g = torch.Generator().manual_seed(5)
    checked, trusted = ClassPrior(5, dtype=torch.float64), ClassPrior(5, dtype=torch.float64)
    for _ in range(2):
        for _ in range(3):
            logits, y = torch.randn(8, 5, generator=g) * 3, torch.randint(0, 5, (8,), generator=g)
            checked.update(logits, y, weight_temperature=2.5)
            trusted._update_checked(logits, y.int(), weight_temperature=2.5)
        torch.testing.assert_close(trusted.counts, checked.counts)
        torch.testing.assert_close(trusted.end_epoch(), checked.end_epoch(), rtol=0, atol=0)
    before = trusted.prior.clone()
    trusted._update_checked(torch.tensor([[0.0, 1e300, 1.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([1]),
                            weight_temperature=1e-10)
    with pytest.raises(ValueError, match=r"overflows torch.float64 \(weight_temperature = 1e-10\)"):
        trusted.end_epoch()
    assert torch.equal(trusted.prior, before)  # the nan sums did not become the prior


def test_a_copy_of_a_checked_prior_is_checked_again_and_freed_priors_are_forgotten():
    """The once-per-version check is kept for the tensor object itself: a deep copy or a pickled and
    loaded prior (which restart at version 0) is checked anew, and a freed prior leaves no entry."""
    import copy
    import gc
    import io

    from dkl_lib import _checks

    logits, target_logits, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 3])
    prior = torch.full((4, 4), 0.25)
    dkl.ikl_loss(logits, target_logits, temperature=2.0, targets=y, class_prior=prior)
    with torch.no_grad():
        prior.data[1, 1] = float("nan")  # .data: changed without bumping the version
    for other in (copy.deepcopy(prior), torch.load(io.BytesIO(_saved(prior)), weights_only=True)):
        with pytest.raises(ValueError, match="class_prior contains non-finite"):
            dkl.ikl_loss(logits, target_logits, temperature=2.0, targets=y, class_prior=other)
    before = len(_checks._CHECKED_PRIORS)
    fresh = torch.full((4, 4), 0.25)
    dkl.ikl_loss(logits, target_logits, temperature=2.0, targets=y, class_prior=fresh)
    assert len(_checks._CHECKED_PRIORS) == before + 1
    del fresh
    gc.collect()
    assert len(_checks._CHECKED_PRIORS) == before


def _saved(t):
    import io

    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def test_counts_stay_exact_over_batches_of_changing_size_with_the_kept_ones_vector():
    """The counts add a vector of ones kept from the last batch of the same size: over batches of
    4, 4, 3, 4, 1 samples (both update paths) every count is exact, the kept vector is still all
    ones, and the sums are those of a fresh prior fed the same batches one by one."""
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g))
               for n in (4, 4, 3, 4, 1)]
    gi = ClassPrior(5)
    for i, (logits, y) in enumerate(batches):
        if i % 2:
            gi.update(logits, y, weight_temperature=2.0)
        else:
            gi._update_checked(logits, y, weight_temperature=2.0)
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(gi.counts, torch.bincount(labels, minlength=5).to(gi.counts.dtype))
    assert torch.equal(gi._ones, torch.ones(1, dtype=gi.counts.dtype))
    ref = torch.zeros(5, 5, dtype=torch.float64)
    for logits, y in batches:
        for row, label in zip(torch.softmax(logits / 2.0, dim=1), y.tolist()):
            ref[label] += row
    torch.testing.assert_close(gi._sums, ref, rtol=1e-14, atol=0)


def test_class_prior_bounds_are_the_largest_row_sum_smallest_row_maximum_and_largest_entry():
    from dkl_lib import _checks

    g = torch.Generator().manual_seed(3)
    prior = torch.rand(5, 5, generator=g, dtype=torch.float64)
    prior[3] = torch.tensor([0.0, 1e-30, 0.0, 2e-30, 0.0], dtype=torch.float64)  # the row of the smallest maximum
    high_sum, low_row_max, high = _checks.class_prior_bounds(prior, 5, prior.device)
    assert high_sum == prior.sum(1).max().item() and high == prior.max().item()
    assert low_row_max == 2e-30 == prior.amax(1).min().item()
    assert _checks.class_prior_bounds(prior, 5, prior.device) == (high_sum, low_row_max, high)  # remembered
    prior[3, 0] = 0.5  # in place: checked anew, not the remembered bounds
    assert _checks.class_prior_bounds(prior, 5, prior.device)[1] == prior.amax(1).min().item() > 2e-30


# ------------------------------------------------------------------ found by mutation testing (session 14)
def test_to_moves_the_prior_and_both_accumulators():
    """to() that left the counts behind passed every test (the CUDA tests build the prior on the GPU);
    a CPU-built prior handed to a run on another device then failed in its first update."""
    gi = ClassPrior(3).to("meta")
    assert gi.prior.device.type == gi._sums.device.type == gi.counts.device.type == "meta"
    gi._update_checked(torch.randn(2, 3, device="meta"), torch.tensor([0, 1], device="meta"), weight_temperature=1.0)
    assert gi.counts.device.type == "meta"


def test_a_state_dict_round_trip_keeps_the_history_of_priors():
    """load_state_dict restored the epoch count but not the history, so history[e] (the prior used in
    epoch e) no longer matched: after two epochs, epochs = 2 beside a history of one uniform entry."""
    g = torch.Generator().manual_seed(0)
    gi = ClassPrior(4)
    for _ in range(2):
        gi.update(torch.randn(16, 4, generator=g), torch.arange(16) % 4, weight_temperature=2.0)
        gi.end_epoch()
    fresh = ClassPrior(4)
    fresh.load_state_dict(gi.state_dict())
    assert fresh.epochs == 2 and len(fresh.history) == 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.history, gi.history))
    assert torch.equal(fresh.history[-1], fresh.prior.cpu())
    state = gi.state_dict()
    del state["history"]  # a state from before the history was saved: the history is left alone
    older = ClassPrior(4)
    older.load_state_dict(state)
    assert older.epochs == 2 and len(older.history) == 1
    with pytest.raises(ValueError, match=r"state\['history'\] must be a list of epochs \+ 1 = 3"):
        ClassPrior(4).load_state_dict({**gi.state_dict(), "history": gi.history[:2]})
