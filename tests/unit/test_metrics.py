"""Exact top-k counts and their sums across workers."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imagenet_ray.train.metrics import EvalTotals, all_reduce_sum, topk_correct


def test_topk_correct_hand_computed():
    logits = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0],  # ranking 0,5,4,3,2,1,6
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # ranking 6,5,4,3,2,1,0
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # ranking 0..6
        ]
    )
    target = torch.tensor([0, 2, 1, 6])
    # row0: top1 hit. row1: 2 is rank 5 → top5 hit. row2: 1 is rank 6 → miss. row3: 6 is rank 7 → miss.
    out = topk_correct(logits, target)
    assert out.dtype == torch.int64
    assert out.tolist() == [1, 2]
    assert topk_correct(logits, target, ks=(1, 2, 3, 7)).tolist() == [1, 1, 1, 4]


def test_topk_correct_clamps_k_to_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target).tolist() == [1, 3]  # with 3 classes every target is in the "top 5"
    assert topk_correct(logits[:, :2], torch.tensor([1, 1, 0])).tolist() == [1, 3]


def test_topk_correct_empty_batch():
    assert topk_correct(torch.zeros(0, 10), torch.zeros(0, dtype=torch.int64)).tolist() == [0, 0]


def test_eval_totals_add_and_metrics():
    t = EvalTotals()
    t.add(3.0, 4, torch.tensor([1, 3]))
    t.add(torch.tensor(1.5), 2, torch.tensor([2, 2]))
    assert (t.loss_sum, t.samples, t.top1, t.top5) == (4.5, 6, 3, 5)
    m = t.as_metrics("val")
    assert m == {
        "val/loss": pytest.approx(0.75),
        "val/top1": pytest.approx(0.5),
        "val/top5": pytest.approx(5 / 6),
        "val/images": 6.0,
    }


def test_eval_totals_empty_does_not_divide_by_zero():
    assert EvalTotals().as_metrics("x") == {"x/loss": 0.0, "x/top1": 0.0, "x/top5": 0.0, "x/images": 0.0}


def test_all_reduce_sum_is_identity_without_distributed():
    assert not dist.is_initialized()
    v = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(all_reduce_sum(v), v)
    t = EvalTotals(2.5, 3, 2, 3)
    assert t.reduced(torch.device("cpu")) == t


def test_eval_totals_counts_exact_beyond_float32():
    # float64 reduction keeps integer counts exact well past float32's 2**24.
    big = 2**40 + 1
    t = EvalTotals(0.0, big, big - 2, big - 1)
    r = t.reduced(torch.device("cpu"))
    assert (r.samples, r.top1, r.top5) == (big, big - 2, big - 1)


# --- real 2-process gloo ---------------------------------------------------------------------------------------

PER_RANK = {0: 3, 1: 5}  # unequal shards, as the exact val split produces


def _rank_logits(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = PER_RANK[rank]
    return torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits, target = _rank_logits(rank)
        local = EvalTotals()
        local.add(
            float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")),
            len(target),
            topk_correct(logits, target),
        )
        total = local.reduced(torch.device("cpu"))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "local": [local.loss_sum, local.samples, local.top1, local.top5],
                    "total": [total.loss_sum, total.samples, total.top1, total.top5],
                },
                f,
            )
    finally:
        dist.destroy_process_group()


def test_reduced_sums_exactly_across_two_gloo_ranks(tmp_path):
    start = time.perf_counter()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    elapsed = time.perf_counter() - start

    # Expected totals computed here, from the same per-rank data.
    exp = EvalTotals()
    for rank in PER_RANK:
        logits, target = _rank_logits(rank)
        exp.add(
            float(torch.nn.functional.cross_entropy(logits, target, reduction="sum")),
            len(target),
            topk_correct(logits, target),
        )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["local"][1] for r in results] == [3, 5]
    for r in results:
        loss_sum, samples, top1, top5 = r["total"]
        assert samples == 8 == exp.samples
        assert (top1, top5) == (exp.top1, exp.top5)
        assert top1 == results[0]["local"][2] + results[1]["local"][2]
        assert loss_sum == pytest.approx(exp.loss_sum, rel=1e-12)
    assert elapsed < 30, f"2-process gloo test took {elapsed:.1f} s"
