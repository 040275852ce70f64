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
from imagenet_ray.train.optim import set_lr


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W) in channels_last memory format."""
    x = images.permute(0, 3, 1, 2).float()  # a view: NCHW shape, NHWC strides = channels_last
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    # Device-decoded batches arrive as NCHW memory; make every input channels_last (no-op if already).
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def train_batches(shard, cfg, device: torch.device, rng, shuffle_seed: int | None = None
                  ) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's training batches for one epoch: uint8 images + int64 labels on `device`."""
    common = dict(batch_size=cfg.data.batch_size, prefetch_batches=cfg.data.prefetch_batches,
                  local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None)
    if shuffle_seed is not None and common["local_shuffle_buffer_size"]:
        common["local_shuffle_seed"] = shuffle_seed
    if cfg.data.decode_on == "gpu":
        from imagenet_ray.data.device_decode import train_batch_on_device

        for b in shard.iter_batches(batch_format="numpy", **common):
            yield {"image": train_batch_on_device(list(b["image"]), cfg.data.train_crop, device, rng),
                   "label": torch.as_tensor(b["label"], dtype=torch.int64).to(device)}
    else:
        # dtypes are inferred (uint8 images, int64 labels); extra columns such as decode_errors pass through.
        yield from shard.iter_torch_batches(device=device, **common)


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


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs (auto/bf16); fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "fp32":
        return None
    if precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


_DEVICE_DEFAULT = object()


def autocast_context(device: torch.device, dtype: "torch.dtype | None | object" = _DEVICE_DEFAULT):
    """Autocast to `dtype`; None = off (fp32). Without `dtype`: bf16 on CUDA, off on CPU."""
    if dtype is _DEVICE_DEFAULT:
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def train_size_for_epoch(data_cfg, epoch: int) -> int:
    """Train crop for `epoch` (0-based): fixed, or FFCV's linear progressive resizing (nearest multiple)."""
    prog = data_cfg.progressive
    if prog is None:
        return data_cfg.train_crop
    if epoch <= prog.start_epoch:
        size = prog.start_size
    elif epoch >= prog.end_epoch:
        size = prog.end_size
    else:
        frac = (epoch - prog.start_epoch) / (prog.end_epoch - prog.start_epoch)
        size = prog.start_size + frac * (prog.end_size - prog.start_size)
    # FFCV rounds the interpolated size to the nearest multiple of 32 (np.round: half to even).
    return max(prog.step, int(np.round(size / prog.step)) * prog.step)


def resize_on_device(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased downscale of a float NCHW batch (progressive resizing of CPU-decoded crops)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).contiguous(
        memory_format=torch.channels_last)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy; `target` is class indices or (already smoothed) soft targets."""
    if target.dtype.is_floating_point:
        return F.cross_entropy(logits.float(), target)
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               lr: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """One plain SGD step on a uint8 batch; returns the summed (not mean) loss, detached."""
    set_lr(optimizer, lr)
    x = to_model_input(images)
    with autocast_context(x.device):
        logits = model(x)
    loss = loss_fn(logits, labels, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * labels.shape[0]


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
             dtype: "torch.dtype | None | object" = _DEVICE_DEFAULT, hflip: bool = False,
             per_class: torch.Tensor | None = None) -> EvalTotals:
    """Loss and top-1/top-5 counts over every batch this worker receives (no padding, no drop).

    hflip: average the logits of each image and its mirror. per_class: a (2, num_classes) float64
    tensor that receives per-class [correct top-1, count] sums.
    """
    model.eval()
    totals = EvalTotals()
    for batch in batches:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        x = to_model_input(images)
        with autocast_context(device, dtype):
            logits = model(x).float()
            if hflip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        totals.add(loss_sum.item(), labels.shape[0], topk_correct(logits, labels))
        if per_class is not None:
            hit = (logits.argmax(1) == labels).to(per_class.dtype)
            per_class[0].index_add_(0, labels, hit)
            per_class[1].index_add_(0, labels, torch.ones_like(hit))
    return totals


class _Timer:
    """Wall time blocked on the data iterator (the numerator of perf/data_wait_frac)."""

    def __init__(self, iterable):
        self.iterator, self.wait_s = iter(iterable), 0.0

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            item = next(self.iterator, None)
            self.wait_s += time.perf_counter() - t0
            if item is None:
                return
            yield item


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entrypoint (runs on every worker)."""
    import contextlib

    import ray.train
    import ray.train.torch

    from imagenet_ray.config import ExperimentConfig
    from imagenet_ray.tracking import RunTracker
    from imagenet_ray.train.batch_aug import mix_batch, random_erase, trivial_augment
    from imagenet_ray.train.checkpoint import load_checkpoint, restore_rng, write_checkpoint_dir
    from imagenet_ray.train.models import build_model
    from imagenet_ray.train.norm_stats import average_batchnorm_stats
    from imagenet_ray.train.optim import build_sgd, scale_for_world, schedule_from_config

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    plan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dtype = amp_dtype(cfg.train.precision, device)
    num_classes = plan["num_classes"]
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    aug_rng = np.random.default_rng([cfg.seed, rank])

    model = build_model(cfg.model.name, num_classes, cfg.model.zero_init_residual, cfg.model.blurpool)
    if cfg.model.sync_batchnorm and world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Elastic runs can restart with another world size: batch, LR and steps follow the actual one.
    scale = scale_for_world(plan["num_train"], world, cfg.data.batch_size, cfg.optim.grad_accum_steps, cfg.optim.lr)
    optimizer = build_sgd(model, scale.peak_lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov,
                          cfg.optim.no_decay_norm_and_bias)
    ema = None
    if cfg.optim.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay), use_buffers=True)
    start_epoch, step, run_id = 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step, run_id = state["epoch"], state["step"], state["mlflow_run_id"]
        restore_rng(state["rng"])
        aug_rng = np.random.default_rng([cfg.seed, rank, start_epoch])
    ddp_model = ray.train.torch.prepare_model(model)
    if ema is not None:
        ema.to(device)
    # prepare_model moved the parameters: the optimizer state must follow them.
    for s in optimizer.state.values():
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                s[k] = v.to(device)
    train_model = torch.compile(ddp_model) if cfg.model.compile else ddp_model

    # The driver created (or found) the run; a checkpoint written by this run names the same one.
    run_id = run_id or plan["mlflow_run_id"]
    tracker, logged_epochs = None, set()
    if rank == 0:
        tracker = RunTracker(plan["tracking_uri"], run_id)
        tracker.reopen()
        # After a restart the last epoch may already be logged: never log an epoch twice.
        logged_epochs = tracker.logged_steps("val/top1")

    accum = cfg.optim.grad_accum_steps
    schedule = schedule_from_config(cfg.optim, scale.peak_lr, scale.steps_per_epoch, cfg.train.epochs)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    mixing = cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0

    for epoch in range(start_epoch, cfg.train.epochs):
        size = train_size_for_epoch(cfg.data, epoch)
        epoch_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_crop": size})}) \
            if cfg.data.decode_on == "gpu" else cfg
        train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        samples, micro, decode_errors = 0, 0, 0
        epoch_start = time.perf_counter()
        shuffle_seed = None
        if cfg.data.deterministic:  # everything random in this epoch is a function of (seed, rank, epoch)
            aug_rng = np.random.default_rng([cfg.seed, rank, epoch])
            shuffle_seed = (cfg.seed * 100_003 + epoch * 1_009 + rank) % 2**31
            torch.manual_seed(shuffle_seed)  # torch's RNG drives TrivialAugmentWide
        timed = _Timer(train_batches(train_shard, epoch_cfg, device, aug_rng, shuffle_seed))
        for batch in timed:
            labels = batch["label"].long()
            if "decode_errors" in batch:  # rows replaced by another image of the batch (transforms.py)
                decode_errors += int(batch["decode_errors"].sum())
            images = batch["image"]
            if cfg.data.auto_augment == "trivialaugment":
                images = trivial_augment(images)
            x = resize_on_device(to_model_input(images), size)
            if cfg.data.random_erasing > 0:
                x = random_erase(x, cfg.data.random_erasing, aug_rng)
            target = labels
            if mixing:
                x, target = mix_batch(x, labels, num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha, aug_rng,
                                      cfg.optim.label_smoothing)
            sync = (micro + 1) % accum == 0
            no_sync = getattr(ddp_model, "no_sync", None)
            with (no_sync() if (not sync and no_sync is not None) else contextlib.nullcontext()):
                with autocast_context(device, dtype):
                    logits = train_model(x)
                loss = loss_fn(logits, target, cfg.optim.label_smoothing)
                (loss / accum).backward()
            if sync:
                set_lr(optimizer, schedule(step))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if ema is not None and step % cfg.optim.ema_every_steps == 0:
                    ema.update_parameters(model)
            loss_sum += loss.detach().double() * labels.shape[0]
            samples += labels.shape[0]
            micro += 1
        if micro % accum:  # a last partial accumulation (same count on every rank)
            set_lr(optimizer, schedule(step))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        train_s = time.perf_counter() - epoch_start
        local = torch.tensor([loss_sum.item(), samples, timed.wait_s / max(train_s, 1e-9), decode_errors],
                             dtype=torch.float64, device=device)
        g_loss, g_samples, g_wait, g_errors = all_reduce_sum(local).tolist()

        last = epoch + 1 == cfg.train.epochs
        per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device) \
            if (last and cfg.eval.per_class) else None
        # Every rank evaluates (and rank 0 checkpoints) one model: see norm_stats.py.
        average_batchnorm_stats(model)
        if ema is not None:
            average_batchnorm_stats(ema.module)
        val = evaluate(model, val_batches(val_shard, cfg, device), device, dtype, cfg.data.eval_hflip,
                       per_class).reduced(device)
        if val.samples != plan["num_val"]:
            raise RuntimeError(f"validation counted {val.samples} images but the manifest lists {plan['num_val']}: "
                               "refusing to report a wrong Top-1/Top-5")
        metrics = {
            "epoch": epoch + 1,
            "train/loss": g_loss / max(1, g_samples),
            "train/images": g_samples,
            "train/lr": schedule(max(0, step - 1)),
            "train/crop_size": size,
            **val.as_metrics("val"),
            "perf/images_per_s": g_samples / train_s,
            "perf/images_per_s_per_worker": g_samples / train_s / world,
            "perf/data_wait_frac": g_wait / world,
            "data/decode_errors": g_errors,
            "perf/epoch_s": time.perf_counter() - epoch_start,
        }
        if ema is not None:
            ema_val = evaluate(ema.module, val_batches(val_shard, cfg, device), device, dtype,
                               cfg.data.eval_hflip).reduced(device)
            metrics.update(ema_val.as_metrics("val_ema"))
        if per_class is not None:
            per_class = all_reduce_sum(per_class).cpu()
        if rank == 0:
            if epoch + 1 not in logged_epochs:
                tracker.log_metrics(metrics, step=epoch + 1)
            if per_class is not None:
                tracker.log_dict({"classes": plan.get("classes", []),
                                  "top1": (per_class[0] / per_class[1].clamp(min=1)).tolist(),
                                  "count": per_class[1].tolist()}, "per_class_top1.json")
            print(f"[epoch {epoch + 1}/{cfg.train.epochs}] train/loss={metrics['train/loss']:.4f} "
                  f"val/top1={metrics['val/top1']:.4f} val/top5={metrics['val/top5']:.4f} "
                  f"images/s={metrics['perf/images_per_s']:.1f} data_wait={metrics['perf/data_wait_frac']:.2f}",
                  flush=True)
            if last:
                tracker.finish("FINISHED")
            elif cfg.train.stop_after_epochs is not None and epoch + 1 >= cfg.train.stop_after_epochs:
                tracker.finish("KILLED")  # time box reached; a resubmission reopens this run
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_checkpoint_dir(tmp, model=model, optimizer=optimizer, epoch=epoch + 1, step=step,
                                     mlflow_run_id=run_id, config_yaml=plan["config_yaml"],
                                     ema=ema.state_dict() if ema is not None else None)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "mlflow_run_id": run_id or ""}, checkpoint=ckpt)
        if cfg.train.stop_after_epochs is not None and epoch + 1 >= cfg.train.stop_after_epochs:
            break
