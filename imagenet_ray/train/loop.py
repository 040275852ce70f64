"""The per-worker training loop: an epoch loop around a plain `train_step` function.

Data arrives as uint8 (N, H, W, 3) on the worker's device; `to_model_input` makes float NCHW with
channels_last strides and normalises there, so CPU workers never touch float images.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.train.metrics import EvalTotals, all_reduce_sum, topk_correct
from imagenet_ray.train.optim import lr_at, set_lr


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W) in channels_last memory format."""
    x = images.permute(0, 3, 1, 2).float()  # a view: NCHW shape, NHWC strides = channels_last
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    # Device-decoded batches arrive as NCHW memory; make every input channels_last (no-op if already).
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def train_batches(shard, cfg, device: torch.device, rng) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's training batches for one epoch: uint8 images + int64 labels on `device`."""
    common = dict(batch_size=cfg.data.batch_size, prefetch_batches=cfg.data.prefetch_batches,
                  local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None)
    if cfg.data.decode_on == "gpu":
        from imagenet_ray.data.device_decode import train_batch_on_device

        for b in shard.iter_batches(batch_format="numpy", **common):
            yield {"image": train_batch_on_device(list(b["image"]), cfg.data.train_crop, device, rng),
                   "label": torch.as_tensor(b["label"], dtype=torch.int64).to(device)}
    else:
        yield from shard.iter_torch_batches(dtypes={"image": torch.uint8, "label": torch.int64}, device=device,
                                            **common)


def val_batches(shard, cfg, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's share of the val set (every image once over all workers), on `device`."""
    common = dict(batch_size=cfg.data.val_batch_size, prefetch_batches=cfg.data.prefetch_batches)
    if cfg.data.decode_on == "gpu":
        from imagenet_ray.data.device_decode import eval_batch_on_device

        for b in shard.iter_batches(batch_format="numpy", **common):
            yield {"image": eval_batch_on_device(list(b["image"]), cfg.data.val_resize, cfg.data.val_crop, device),
                   "label": torch.as_tensor(b["label"], dtype=torch.int64).to(device)}
    else:
        yield from shard.iter_torch_batches(dtypes={"image": torch.uint8, "label": torch.int64}, device=device,
                                            **common)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               lr: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """One SGD step on a batch; returns the summed (not mean) loss, detached."""
    set_lr(optimizer, lr)
    x = to_model_input(images)
    with autocast_context(x.device):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * labels.shape[0]


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> EvalTotals:
    """Loss and top-1/top-5 counts over every batch this worker receives (no padding, no drop)."""
    model.eval()
    totals = EvalTotals()
    for batch in batches:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        x = to_model_input(images)
        with autocast_context(device):
            logits = model(x).float()
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        totals.add(loss_sum.item(), labels.shape[0], topk_correct(logits, labels))
    return totals


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entrypoint (runs on every worker)."""
    import ray.train
    import ray.train.torch

    from imagenet_ray.config import ExperimentConfig
    from imagenet_ray.tracking import RunTracker
    from imagenet_ray.train.checkpoint import load_checkpoint, write_checkpoint_dir
    from imagenet_ray.train.models import build_model
    from imagenet_ray.train.optim import build_sgd

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    aug_rng = np.random.default_rng()  # device-side augmentation (decode_on=gpu): fresh entropy

    model = build_model(cfg.model.name, plan["num_classes"]).to(memory_format=torch.channels_last)
    optimizer = build_sgd(model, plan["peak_lr"], cfg.optim.momentum, cfg.optim.weight_decay)
    start_epoch, step, run_id = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, run_id = state["epoch"], state["step"], state["mlflow_run_id"]
    ddp_model = ray.train.torch.prepare_model(model)
    # prepare_model moved the parameters: the optimizer state must follow them.
    for s in optimizer.state.values():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                s[k] = v.to(device)

    tracker = None
    if rank == 0:
        if run_id is None:
            tracker = RunTracker.start(plan["tracking_uri"], plan["experiment_id"], cfg.name, plan["params"],
                                       plan["config_yaml"])
        else:
            tracker = RunTracker(plan["tracking_uri"], run_id)
        run_id = tracker.run_id

    steps_per_epoch = plan["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, cfg.train.epochs):
        ddp_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        samples, wait_s = 0, 0.0
        epoch_start = time.perf_counter()
        iterator = iter(train_batches(train_shard, cfg, device, aug_rng))
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            wait_s += time.perf_counter() - t0
            if batch is None:
                break
            lr = lr_at(step, total_steps, warmup_steps, plan["peak_lr"], cfg.optim.schedule)
            loss_sum += train_step(ddp_model, optimizer, batch["image"], batch["label"], lr, cfg.optim.label_smoothing)
            samples += batch["label"].shape[0]
            step += 1
        train_s = time.perf_counter() - epoch_start
        local = torch.tensor([loss_sum.item(), samples, wait_s / max(train_s, 1e-9)], dtype=torch.float64,
                             device=device)
        g_loss, g_samples, g_wait = all_reduce_sum(local).tolist()

        val = evaluate(model, val_batches(val_shard, cfg, device), device).reduced(device)
        if val.samples != plan["num_val"]:
            raise RuntimeError(f"validation counted {val.samples} images but the manifest lists {plan['num_val']}: "
                               "refusing to report a wrong Top-1/Top-5")
        metrics = {
            "epoch": epoch + 1,
            "train/loss": g_loss / max(1, g_samples),
            "train/images": g_samples,
            "train/lr": lr_at(max(0, step - 1), total_steps, warmup_steps, plan["peak_lr"], cfg.optim.schedule),
            **val.as_metrics("val"),
            "perf/images_per_s": g_samples / train_s,
            "perf/images_per_s_per_worker": g_samples / train_s / world,
            "perf/data_wait_frac": g_wait / world,
            "perf/epoch_s": time.perf_counter() - epoch_start,
        }
        if rank == 0:
            tracker.log_metrics(metrics, step=epoch + 1)
            print(f"[epoch {epoch + 1}/{cfg.train.epochs}] train/loss={metrics['train/loss']:.4f} "
                  f"val/top1={metrics['val/top1']:.4f} val/top5={metrics['val/top5']:.4f} "
                  f"images/s={metrics['perf/images_per_s']:.1f}", flush=True)
            if epoch + 1 == cfg.train.epochs:
                tracker.finish("FINISHED")
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_dir(tmp, model=model, optimizer=optimizer, epoch=epoch + 1, step=step,
                                     mlflow_run_id=run_id, config_yaml=plan["config_yaml"])
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "mlflow_run_id": run_id or ""}, checkpoint=ckpt)
