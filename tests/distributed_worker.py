"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): every rank
does the distributed half of each check and saves what it saw to OUT/rank<r>.pt; the test computes
the single-process reference and compares. Not collected by pytest (no test_ prefix).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dkl_lib import distributed as D  # noqa: E402
from dkl_lib.prior import ClassPrior  # noqa: E402

# Shared with the test: problem sizes, seeds and the data every rank (and the reference) builds.
N, FEATURES, CLASSES = 15, 5, 3
GLOBAL_BATCH = 6            # 15 = 6 + 6 + 3: the last global batch splits 2 + 1
SHUFFLE_SEED, MODEL_SEED, DATA_SEED = 11, 0, 5
STEPS_BEFORE_SAVE = 2       # (e): train 2 steps, save, resume in a fresh model, train the last step


def make_data():
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(N, FEATURES, generator=g, dtype=torch.float64)
    y = torch.arange(N) % CLASSES
    logits_epochs = [torch.randn(N, CLASSES, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    return x, y, logits_epochs


def make_model():
    torch.manual_seed(MODEL_SEED)
    return torch.nn.Linear(FEATURES, CLASSES).double()


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)


def main(out: Path) -> None:
    info = D.init_from_env()
    assert D.is_distributed() and info.world_size == 2, info
    torch.set_num_threads(1)
    rank, world = info.rank, info.world_size
    x, y, logits_epochs = make_data()
    res = {"info": tuple(info), "backend": torch.distributed.get_backend()}

    # (a) this rank's share of every global batch of one shuffled epoch
    gen = torch.Generator().manual_seed(SHUFFLE_SEED)
    res["batches"] = [(idx.tolist(), size) for idx, size in
                      D.shard_batches(N, batch_size=GLOBAL_BATCH, rank=rank, world_size=world,
                                      shuffle=True, generator=gen)]

    # (b) DDP: 3 SGD steps of a float64 linear model, each rank on its half of the global batch
    model = D.wrap_model(make_model())
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(SHUFFLE_SEED)
    losses = []
    for step, (idx, size) in enumerate(D.shard_batches(N, batch_size=GLOBAL_BATCH, rank=rank, world_size=world,
                                                        shuffle=True, generator=gen)):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        scaled = loss * D.local_loss_scale(len(idx), size, world)
        opt.zero_grad()
        scaled.backward()
        opt.step()
        losses.append(D.all_reduce_sum({"loss_sum": loss.item() * len(idx)})["loss_sum"] / size)
        # (e) checkpoint after STEPS_BEFORE_SAVE steps: rank 0 writes, both ranks read it back
        if step + 1 == STEPS_BEFORE_SAVE:
            state = {"model": D.unwrap_model(model).state_dict(), "optimizer": opt.state_dict(),
                     "step": step + 1}
            res["saved"] = D.save_checkpoint(D.checkpoint_path(out / "ckpt", step + 1), state)
            D.barrier()
    res["params"] = {k: v.clone() for k, v in D.unwrap_model(model).state_dict().items()}
    res["losses"] = losses

    # (e) resume: a fresh model and optimizer from the newest checkpoint, then the remaining step(s)
    ckpt = D.load_latest_checkpoint(out / "ckpt")
    res["resumed_from"] = (ckpt.path.name, ckpt.state["step"])
    fresh = make_model()
    fresh.load_state_dict(ckpt.state["model"])
    fresh = D.wrap_model(fresh)
    opt2 = make_optimizer(fresh.parameters())
    opt2.load_state_dict(ckpt.state["optimizer"])
    # the epoch's batch order was drawn at its start: redraw it and skip the finished steps
    gen2 = torch.Generator().manual_seed(SHUFFLE_SEED)
    for step, (idx, size) in enumerate(D.shard_batches(N, batch_size=GLOBAL_BATCH, rank=rank, world_size=world,
                                                        shuffle=True, generator=gen2)):
        if step < ckpt.state["step"]:
            continue
        loss = F.cross_entropy(fresh(x[idx]), y[idx]) * D.local_loss_scale(len(idx), size, world)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
    res["resumed_params"] = {k: v.clone() for k, v in D.unwrap_model(fresh).state_dict().items()}

    # (c) class prior: each rank feeds its share; end_epoch all-reduces the sums
    prior = ClassPrior(CLASSES, dtype=torch.float64)
    for epoch_logits in logits_epochs:
        gen = torch.Generator().manual_seed(SHUFFLE_SEED)
        for idx, _ in D.shard_batches(N, batch_size=GLOBAL_BATCH, rank=rank, world_size=world,
                                      shuffle=True, generator=gen):
            prior.update(epoch_logits[idx], y[idx], weight_temperature=2.0)
        prior.end_epoch()
    res["prior"] = prior.history_tensor()

    # (d) epoch metrics: sums (numbers and a per-class tensor) and a sample-weighted mean
    mine = D.shard_indices(torch.arange(N), rank, world, pad=False)
    with torch.no_grad():
        logits = D.unwrap_model(model)(x[mine])
        per_sample = F.cross_entropy(logits, y[mine], reduction="none")
    local = {"loss_sum": per_sample.sum().item(), "correct": int((logits.argmax(1) == y[mine]).sum()),
             "seen": len(mine), "per_class": torch.bincount(y[mine], minlength=CLASSES).double()}
    res["sums"] = D.all_reduce_sum(local)
    res["mean"] = D.all_reduce_mean({"loss": per_sample.mean().item()}, weight=len(mine))
    res["plain_mean"] = D.all_reduce_mean({"rank": float(rank)})
    try:
        D.all_reduce_sum({"only_on_rank0": 1.0} if rank == 0 else {"other": 1.0})
        res["mismatch"] = "no error"
    except RuntimeError as err:
        res["mismatch"] = str(err)

    # (f) two forwards per backward (TRADES: natural and adversarial inputs) through a BatchNorm model:
    # no buffer copy inside DDP's forward; broadcast_buffers after each step gives every rank rank 0's
    torch.manual_seed(MODEL_SEED)
    bn_model = D.wrap_model(torch.nn.Sequential(torch.nn.BatchNorm1d(FEATURES), torch.nn.Linear(FEATURES, CLASSES))
                            .double(), forward_buffer_sync=False)
    res["forward_sync"] = bool(getattr(bn_model, "forward_sync_buffers", getattr(bn_model, "broadcast_buffers", None)))
    bn_opt = make_optimizer(bn_model.parameters())
    gen = torch.Generator().manual_seed(SHUFFLE_SEED)
    res["bn_before"], res["bn_after"] = [], []
    for idx, size in D.shard_batches(N, batch_size=GLOBAL_BATCH, rank=rank, world_size=world, shuffle=True,
                                     generator=gen):
        if size < 2 * world:  # decided on the global size: every rank skips the same batches
            continue
        nat, adv = bn_model(x[idx]), bn_model(x[idx] + 0.1)
        loss = (F.cross_entropy(nat, y[idx]) + F.cross_entropy(adv, y[idx])) * D.local_loss_scale(len(idx), size, world)
        bn_opt.zero_grad()
        loss.backward()
        bn_opt.step()
        res["bn_before"].append({k: v.clone() for k, v in D.unwrap_model(bn_model)[0].state_dict().items()})
        D.broadcast_buffers(bn_model)
        res["bn_after"].append({k: v.clone() for k, v in D.unwrap_model(bn_model)[0].state_dict().items()})

    # (g) a trainer (train_teacher; distill shares its loop) under DDP with a BatchNorm model: DDP copies
    # rank 0's buffers into every rank at the start of each forward only, so after the last one each
    # rank would keep its own statistics; after training every rank must hold rank 0's (the saved model)
    from dkl_lib import data as data_mod
    from dkl_lib import train as train_mod

    bn_data = data_mod.synthetic(n_train=40, n_test=20, num_classes=CLASSES, image_shape=(1, 4, 4), noise=0.5,
                                 seed=DATA_SEED, dtype=torch.float64)
    torch.manual_seed(MODEL_SEED)
    bn_net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                 torch.nn.Linear(8, CLASSES)).double()
    train_mod.train_teacher(bn_net, bn_data, epochs=2, lr=0.1, batch_size=10, seed=0, progress=False, device="cpu")
    res["trained_bn_net"] = {k: v.clone() for k, v in bn_net.state_dict().items()}

    # rank-0-only helpers
    @D.main_process_only
    def write_log(text):
        (out / "log.txt").write_text(text)
        return "written"

    res["log_return"] = write_log(f"rank {rank}")
    res["broadcast"] = D.broadcast_object(f"run-from-rank-{rank}")
    D.barrier()
    torch.save(res, out / f"rank{rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
