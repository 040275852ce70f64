"""BatchNorm statistics after DDP training: different on every rank, one set after averaging."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from imagenet_ray.train.norm_stats import average_batchnorm_stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_ddp_step(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same initial weights on both ranks
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
        model(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer before DDP
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        for _ in range(2):
            ddp(torch.randn(8, 3, 6, 6, generator=gen) * (rank + 1)).sum().backward()
            opt.step()
            opt.zero_grad()
        bn = model[1]
        before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        gathered = [torch.zeros(4) for _ in range(2)]
        dist.all_gather(gathered, bn.running_mean.clone())
        synced = average_batchnorm_stats(model)
        after = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
        # through the DDP wrapper (timm unwraps .module); equal values average to themselves
        synced_wrapped = average_batchnorm_stats(ddp)
        untracked = average_batchnorm_stats(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))
        out[rank] = {
            "before": before,
            "all_before": gathered,
            "synced": synced,
            "after": after,
            "synced_wrapped": synced_wrapped,
            "untracked": untracked,
            "after_wrapped": (bn.running_mean.clone(), bn.running_var.clone()),
            "weight": model[0].weight.detach().clone(),
        }
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_diverge_in_batchnorm_stats_and_averaging_makes_one_model():
    out = mp.Manager().dict()
    mp.spawn(_two_rank_ddp_step, args=(_free_port(), out), nprocs=2, join=True)
    r0, r1 = out[0], out[1]
    assert torch.equal(r0["weight"], r1["weight"])  # parameters: identical (DDP all-reduces gradients)
    assert not torch.allclose(r0["before"][0], r1["before"][0])  # running stats: each rank its own
    assert r0["synced"] == r1["synced"] == 2  # running_mean + running_var of the one BN layer
    for i in range(2):  # mean and var: the same on both ranks, equal to the mean of the ranks' values
        assert torch.equal(r0["after"][i], r1["after"][i])
        torch.testing.assert_close(r0["after"][i], (r0["before"][i] + r1["before"][i]) / 2)
    assert r0["after"][2] == r0["before"][2] == r1["after"][2] == 3  # untouched (1 lazy-init + 2 steps)
    assert r0["synced_wrapped"] == r1["synced_wrapped"] == 2
    assert all(torch.equal(a, b) for a, b in zip(r0["after_wrapped"], r0["after"][:2], strict=True))
    assert r0["untracked"] == r1["untracked"] == 0  # no running statistics to average


def test_averaging_is_a_no_op_without_a_process_group():
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(0.5)
    assert average_batchnorm_stats(nn.Sequential(bn)) == 0
    assert torch.equal(bn.running_mean, torch.full((3,), 0.5))
