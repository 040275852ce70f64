"""Training on each Ray Train worker: a `Runner` whose methods read like the recipe (set up or restore
the state, train one epoch, validate, save and report) and `train_loop_per_worker`, the entrypoint."""

from __future__ import annotations

import functools
import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imagenet_ray.config import DataSection
from imagenet_ray.dashboard import with_overview
from imagenet_ray.data.device_decode import train_batch_on_device
from imagenet_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imagenet_ray.runtime import configure_worker_logging
from imagenet_ray.tracking import RunSink
from imagenet_ray.train.batch_aug import mix_batch, random_erase, trivial_augment
from imagenet_ray.train.checkpoint import load_checkpoint, restore_rng, write_checkpoint_dir
from imagenet_ray.train.device import amp_dtype, resize_on_device, to_model_input, train_size_for_epoch
from imagenet_ray.train.evaluation import ConfusionPairs, PerClassCounts, evaluate, val_batches
from imagenet_ray.train.fatal import (
    PermanentError,
    checkpoint_storage_error,
    is_permanent_data_error,
    permanent_reason,
    read_fatal,
    record_fatal,
)
from imagenet_ray.train.metric_queue import MetricQueue, epochs_logged, last_logged_step
from imagenet_ray.train.metrics import all_reduce_sum
from imagenet_ray.train.mid_epoch import (
    CheckpointClock,
    EpochResume,
    MidEpochState,
    gather_to_all,
    plan_resume,
    rank_local_state,
    restore_rank_local_state,
)
from imagenet_ray.train.models import build_model
from imagenet_ray.train.norm_stats import average_batchnorm_stats
from imagenet_ray.train.optim import ResumedSchedule, build_optimizer, scale_for_world, schedule_from_config
from imagenet_ray.train.pictures import (
    augmented_grid_png,
    confused_pairs_dict,
    confused_pairs_png,
    per_class_top1_png,
    top_confused_pairs,
)
from imagenet_ray.train.plan import WorkerPlan
from imagenet_ray.train.progress import Interval, IntervalMeter, ProgressLine
from imagenet_ray.train.sample_audit import SampleAudit
from imagenet_ray.train.step import StepPacer, TrainStep
from imagenet_ray.train.system_metrics import start_worker_gpu_monitor

log = logging.getLogger(__name__)

FINAL_FLUSH_S = 180.0  # at the run's end, how long rank 0 waits for an unreachable MLflow to come back
# A mid-epoch checkpoint's val/top1 for Ray Train's scoring: below any real top-1, so it is kept only while
# it is the latest. Not -inf: Ray's checkpoint-manager snapshot stores that as JSON null, and a resubmitted
# job's controller then fails comparing scores (TypeError) at its first checkpoint.
MID_EPOCH_SCORE = -1.0


class DataWaitTimer:
    """Wall time blocked on the data iterator (the numerator of perf/data_wait_frac), and how much of it
    was the wait for the first batch (the pipeline's start-up)."""

    def __init__(self, iterable: Iterable[dict[str, torch.Tensor]]) -> None:
        self.iterator, self.wait_s, self.first_wait_s = iter(iterable), 0.0, 0.0
        self.last_wait_s = 0.0  # the wait for the batch just yielded

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        first = True
        while True:
            t0 = time.perf_counter()
            item = next(self.iterator, None)
            waited = time.perf_counter() - t0
            self.wait_s += waited
            self.last_wait_s = waited
            if first:
                self.first_wait_s, first = waited, False
            if item is None:
                return
            yield item


def train_batches(
    shard: Any,
    data: DataSection,
    crop: int,
    device: torch.device,
    rng: np.random.Generator,
    shuffle_seed: int | None = None,
    skip_batches: int = 0,
    audit: Callable[[int, Sequence[bytes]], None] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's training batches for one epoch: uint8 images + int64 labels on `device`, after the
    first `skip_batches` (trained before a mid-epoch checkpoint).

    decode_on="gpu": JPEG bytes are decoded and cropped to `crop` here (skipped ones are never decoded);
    otherwise they arrive decoded. `audit(batch index, JPEG bytes)` sees each batch trained (gpu only)."""
    common: dict[str, Any] = dict(
        batch_size=data.batch_size,
        prefetch_batches=data.prefetch_batches,
        local_shuffle_buffer_size=data.local_shuffle_buffer or None,
    )
    if shuffle_seed is not None and common["local_shuffle_buffer_size"]:
        common["local_shuffle_seed"] = shuffle_seed
    if data.decode_on == "gpu":
        batches = shard.iter_batches(batch_format="numpy", **common)
        for index, b in enumerate(batches):
            if index < skip_batches:
                continue
            if audit is not None:
                audit(index, list(b["image"]))
            yield {
                "image": train_batch_on_device(list(b["image"]), crop, device, rng, data.rrc_scale, data.rrc_ratio),
                "label": torch.as_tensor(b["label"], dtype=torch.int64).to(device),
            }
    else:
        # dtypes are inferred (uint8 images, int64 labels); extra columns such as decode_errors pass through.
        yield from itertools.islice(shard.iter_torch_batches(device=device, **common), skip_batches, None)


def permanent_data_errors(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """`batches`, with a read error naming a corrupt or missing shard raised as a PermanentError."""
    try:
        yield from batches
    except Exception as exc:
        if is_permanent_data_error(exc):
            raise PermanentError(f"reading the training data: {permanent_reason(exc)}") from exc
        raise


class Runner:
    """One worker's training run; rank 0 alone writes the MLflow run and the checkpoints."""

    def __init__(self, plan: WorkerPlan) -> None:
        self.plan, self.cfg = plan, plan.config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # An earlier attempt met an error no retry heals: every rank ends here, before any collective.
        self.fatal_reason = read_fatal(plan.fatal_error_url) if plan.fatal_error_url else None
        if self.fatal_reason is not None:
            return
        self.device = ray.train.torch.get_device()
        self.amp = amp_dtype(self.cfg.train.precision, self.device)
        self.set_up_state()
        self.restore(ray.train.get_checkpoint())
        self.place_on_device()
        self.open_tracking()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")

    # -- state ------------------------------------------------------------------------------------
    def set_up_state(self) -> None:
        """Model, optimizer, EMA and LR schedule for the actual world size (elastic runs may resize)."""
        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        self.aug_rng = np.random.default_rng([cfg.seed, self.rank])
        model = build_model(cfg.model.name, plan.num_classes, cfg.model.zero_init_residual, cfg.model.blurpool)
        if cfg.model.sync_batchnorm and self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        o = cfg.optim
        scale = scale_for_world(plan.num_train, self.world, cfg.data.batch_size, o.grad_accum_steps, o.lr)
        self.optimizer = build_optimizer(model, o, scale.peak_lr)
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(o.ema_decay), use_buffers=True)
            if o.ema_decay > 0
            else None
        )
        self.schedule = schedule_from_config(o, scale.peak_lr, scale.steps_per_epoch, cfg.train.epochs)
        self.lr_at = ResumedSchedule(self.schedule)  # restore() places it by the epochs done
        self.progress = ProgressLine(cfg.train.epochs, scale.steps_per_epoch, cfg.mlflow.progress_every_s)
        self.start_epoch, self.start_step, self.run_id = 0, 0, plan.mlflow_run_id
        self.epochs_done = 0
        self.restored_metrics: dict[str, float] = {}  # the restored checkpoint's epoch metrics
        self.last_epoch_metrics: dict[str, float] = {}  # the last completed epoch's (mid-epoch checkpoints too)
        self.mid_epoch: MidEpochState | None = None  # set by restore() from a mid-epoch checkpoint
        minutes = cfg.train.checkpoint_every_minutes
        self.clock = CheckpointClock(None if minutes is None else minutes * 60.0, cfg.train.preemption_check_s)
        self.preemption_saved = False  # a checkpoint was taken for the preemption notice in force
        self.audit = SampleAudit(plan.audit_samples_dir, self.rank) if plan.audit_samples_dir else None

    def restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        """Continue from the latest checkpoint (after a worker failure or a resubmission)."""
        if checkpoint is None:
            return
        state = load_checkpoint(checkpoint)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.start_epoch, self.start_step = state["epoch"], state["step"]
        self.epochs_done, self.restored_metrics = self.start_epoch, dict(state.get("metrics") or {})
        self.last_epoch_metrics = dict(self.restored_metrics)
        mid = state.get("mid_epoch")
        self.mid_epoch = MidEpochState.from_dict(mid) if mid else None
        where = f"inside epoch {self.start_epoch + 1}, after {mid['batches']} batches per rank" if mid else ""
        log.info(
            "rank %d: restored from the checkpoint of epoch %d (step %d) %s",
            self.rank,
            self.start_epoch,
            self.start_step,
            where,
        )
        # A checkpoint written by this run names its MLflow run (the driver found the same one).
        self.run_id = state["mlflow_run_id"] or self.run_id
        # The checkpoint's step counts the old world's steps: the LR continues from the epochs done.
        self.lr_at = ResumedSchedule(self.schedule, self.start_step, self.start_epoch + self.epoch_fraction_done())
        restore_rng(state["rng"])
        self.aug_rng = np.random.default_rng([self.cfg.seed, self.rank, self.start_epoch])

    def epoch_fraction_done(self) -> float:
        """How much of the interrupted epoch a mid-epoch checkpoint had trained, in this world's steps per
        epoch: its own steps on the same world size, its share of the samples on another."""
        mid, spe = self.mid_epoch, self.schedule.steps_per_epoch
        if mid is None:
            return 0.0
        if mid.world == self.world:
            return (mid.batches // self.cfg.optim.grad_accum_steps) / spe
        return round(mid.samples / self.plan.num_train * spe) / spe

    def place_on_device(self) -> None:
        """DDP-wrap (and compile) the model; the EMA and the optimizer state follow it to the device."""
        self.ddp_model = ray.train.torch.prepare_model(self.model)
        if self.ema is not None:
            self.ema.to(self.device)
        for s in self.optimizer.state.values():
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    s[k] = v.to(self.device)
        train_model = cast(nn.Module, torch.compile(self.ddp_model)) if self.cfg.model.compile else self.ddp_model
        o = self.cfg.optim
        self.step = TrainStep(
            train_model,
            self.optimizer,
            self.lr_at,
            accum_steps=o.grad_accum_steps,
            amp=self.amp,
            label_smoothing=o.label_smoothing,
            after_step=self._update_ema,
            ddp=self.ddp_model,
            step=self.start_step,
            clip_grad_norm=o.clip_grad_norm,
        )

    def _update_ema(self, step: int) -> None:
        if self.ema is not None and step % self.cfg.optim.ema_every_steps == 0:
            self.ema.update_parameters(self.model)

    def open_tracking(self) -> None:
        """Rank 0 writes the driver's MLflow run through a queue (an MLflow outage costs no training);
        after a restart it never logs an epoch twice."""
        self.queue: MetricQueue | None = None
        self.logged_epochs: set[int] = set()
        self.last_logged_step = -1
        self.grid_logged = False
        if self.rank == 0:
            sink = RunSink.attach(self.plan.tracking_uri, self.run_id)
            self.queue = MetricQueue(sink)
            self.queue.call("reopen the run", RunSink.reopen)
            self.logged_epochs = epochs_logged(sink)
            # A restarted attempt does not log again the step points the lost one logged (they stay).
            self.last_logged_step = last_logged_step(sink)
            self.relog_restored_epoch()
        # Every worker's GPU memory (a num_cpus=0 node monitor cannot see the GPUs); None without CUDA.
        m = self.cfg.mlflow
        self.gpu_monitor = (
            start_worker_gpu_monitor(self.run_id, self.plan.tracking_uri, m.system_metrics_every_s, self.device)
            if m.system_metrics
            else None
        )

    def relog_restored_epoch(self) -> None:
        """A failure after the checkpoint was reported but before its epoch reached MLflow: log that epoch
        from the checkpoint, so the run's metrics describe the checkpoints that exist."""
        if self.queue is None or not self.restored_metrics or self.start_epoch in self.logged_epochs:
            return
        log.info("epoch %d: its metrics were not in MLflow; logged from the checkpoint", self.start_epoch)
        self.queue.log_metrics(with_overview(self.restored_metrics), step=self.start_step)
        self.logged_epochs.add(self.start_epoch)

    def close_tracking(self) -> None:
        """Send what is still queued (waiting a while for MLflow if it is away)."""
        if self.gpu_monitor is not None:
            self.gpu_monitor.stop(10)
        if self.queue is not None:
            self.queue.close(timeout_s=FINAL_FLUSH_S)

    # -- the recipe -------------------------------------------------------------------------------
    def run(self) -> None:
        if self.fatal_reason is not None:
            log.error("rank %d: not retrying: %s", self.rank, self.fatal_reason)
            return
        try:
            self.run_epochs()
        except PermanentError as exc:
            # Recorded for the driver and a restarted group; raised so that every rank stops.
            if self.plan.fatal_error_url:
                record_fatal(self.plan.fatal_error_url, str(exc))
            raise

    def run_epochs(self) -> None:
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            start = time.perf_counter()
            metrics = {"epoch": epoch + 1, **self.train_one_epoch(epoch, train_size_for_epoch(self.cfg.data, epoch))}
            val_metrics, artifacts = self.validate(last=epoch + 1 == self.cfg.train.epochs)
            metrics.update(val_metrics)
            metrics["perf/epoch_s"] = time.perf_counter() - start
            self.progress.epoch_s = metrics["perf/epoch_s"]
            self.save_and_report(epoch + 1, metrics, artifacts)
            self.epochs_done = epoch + 1
            if self.time_box_reached(epoch + 1):
                break
        self.finish_run()
        self.close_tracking()

    def finish_run(self) -> None:
        """Rank 0 ends the MLflow run: FINISHED after the last epoch (also when a restart found it already
        trained), KILLED when the time box stopped it (a resubmission reopens it)."""
        if self.queue is None:
            return
        if self.epochs_done >= self.cfg.train.epochs:
            self.queue.finish("FINISHED")
        elif self.time_box_reached(self.epochs_done):
            self.queue.finish("KILLED")

    def resume_epoch(self, epoch: int) -> tuple[EpochResume, MidEpochState | None]:
        """How to run `epoch` when it was interrupted after a mid-epoch checkpoint (else a full pass);
        call after seed_epoch: each rank's RNGs continue where they were."""
        mid, self.mid_epoch = self.mid_epoch, None
        if mid is None or mid.epoch != epoch:
            return EpochResume(), None
        resume = plan_resume(mid, self.world, self.cfg.data.deterministic, self.plan.num_train)
        if len(mid.rank_states) == self.world:
            restore_rank_local_state(mid.rank_states[self.rank], self.aug_rng, self.ema, self.device)
        log.info(
            "rank %d: epoch %d continues after %d samples: %s",
            self.rank,
            epoch + 1,
            mid.samples,
            f"skipping the {resume.skip_batches} batches trained (exact)"
            if resume.exact
            else f"training the {resume.stop_after_samples} samples left on this rank, in a new order (approximate)",
        )
        return resume, mid

    def train_one_epoch(self, epoch: int, crop: int) -> dict[str, float]:
        """One pass over this worker's shard at train crop `crop` (or what a mid-epoch checkpoint left of
        it); metrics summed over all workers."""
        self.step.model.train()
        shuffle_seed = self.seed_epoch(epoch) if self.cfg.data.deterministic else None
        resume, before = self.resume_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        samples, decode_errors, batches = 0, 0, resume.skip_batches
        start = time.perf_counter()
        audit = functools.partial(self.audit.record, epoch) if self.audit is not None else None
        timed = DataWaitTimer(
            train_batches(
                self.train_shard,
                self.cfg.data,
                crop,
                self.device,
                self.aug_rng,
                shuffle_seed,
                skip_batches=resume.skip_batches,
                audit=audit,
            )
        )
        pacer = StepPacer(self.cfg.train.throttle_images_per_s)  # sleeps inside the loop body: not data wait
        skip_step = self.cfg.train.skip_step
        meter, first_step = IntervalMeter(self.cfg.mlflow.log_every_steps, self.device), self.step.step
        for full_batch in permanent_data_errors(timed):
            batch = self.within_count(full_batch, samples, resume.stop_after_samples)
            if batch is None:
                break  # every rank stops at the same sample (equal split): the epoch's count is reached
            batches += 1
            images = int(batch["label"].shape[0])
            with pacer.pace(images):
                if "decode_errors" in batch:  # rows replaced by another image of the batch (transforms.py)
                    decode_errors += int(batch["decode_errors"].sum())
                samples += images
                if skip_step:
                    self.step.skip()
                    meter.add(images, timed.last_wait_s)
                else:
                    x, target = self.model_input(batch, crop)
                    if not self.grid_logged:
                        self.log_input_grid(x, batch["label"])
                    batch_loss = self.step(x, target)
                    loss_sum += batch_loss
                    meter.add(images, timed.last_wait_s, batch_loss, self.step.grad_norm)
            if meter.due(self.step.step):
                interval = meter.cut(self.step.step)
                self.log_interval(interval, epoch, first_step, start)
                if self.mid_epoch_checkpoint_due(interval):
                    partial = torch.tensor(
                        [loss_sum.item(), samples, decode_errors], dtype=torch.float64, device=self.device
                    )
                    self.save_mid_epoch(epoch, batches, partial, before)
        if not skip_step:
            self.step.flush()
        self.log_interval(meter.finish(), epoch, first_step, start)
        train_s = time.perf_counter() - start
        local = torch.tensor(
            [
                loss_sum.item(),
                samples,
                timed.wait_s / max(train_s, 1e-9),
                decode_errors,
                pacer.slept_s / max(train_s, 1e-9),
                timed.first_wait_s,
                (timed.wait_s - timed.first_wait_s) / max(train_s - timed.first_wait_s, 1e-9),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        g_loss, g_samples, g_wait, g_errors, g_slept, g_first, g_steady = all_reduce_sum(local).tolist()
        throttle = {} if pacer.images_per_s is None else {"perf/throttle_sleep_frac": g_slept / self.world}
        # Loss and counts cover the whole epoch (before a mid-epoch checkpoint too); speeds, this attempt.
        e_loss, e_samples = g_loss + (before.loss_sum if before else 0.0), g_samples + (before.samples if before else 0)
        g_errors += before.decode_errors if before else 0
        # Nothing was trained with skip_step: no loss to report. The step curves own train/loss,
        # perf/images_per_s and perf/data_wait_frac; the epoch's figures have names of their own.
        trained = {} if skip_step else {"train/epoch_loss": e_loss / max(1, e_samples)}
        return {
            **trained,
            "train/images": e_samples,
            "train/crop_size": crop,
            "perf/epoch_images_per_s": g_samples / train_s,
            "perf/images_per_s_per_worker": g_samples / train_s / self.world,
            "perf/epoch_data_wait_frac": g_wait / self.world,
            # The start-up (first batch) apart from the steady state, which is what `plan` predicts.
            "perf/first_batch_s": g_first / self.world,
            "perf/steady_data_wait_frac": g_steady / self.world,
            "data/decode_errors": g_errors,
            **throttle,
        }

    @staticmethod
    def within_count(
        batch: dict[str, torch.Tensor], samples: int, stop_after: int | None
    ) -> dict[str, torch.Tensor] | None:
        """`batch`, cut to the `stop_after` samples an approximate resume trains (None once reached)."""
        if stop_after is None:
            return batch
        left = stop_after - samples
        if left <= 0:
            return None
        return batch if int(batch["label"].shape[0]) <= left else {k: v[:left] for k, v in batch.items()}

    def log_input_grid(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Rank 0, once per run: a grid of the first batch's inputs as the model saw them (de-normalised)."""
        self.grid_logged = True
        if self.queue is None:
            return
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
        images = (x[:16].detach().float() * std + mean).clamp(0, 255).to(torch.uint8).cpu()
        png = augmented_grid_png(images, labels[:16].cpu(), self.plan.classes)
        self.queue.call("artifact augmented_inputs.png", lambda s: s.log_image(png, "augmented_inputs.png"))

    def log_interval(self, interval: Interval | None, epoch: int, first_step: int, epoch_start: float) -> None:
        """Rank 0: an interval's step-curve points (MLflow step = global optimizer step) and, when due, a
        progress line."""
        if interval is None or self.queue is None or interval.step <= self.last_logged_step:
            return
        lr = None if self.cfg.train.skip_step else self.lr_at(max(0, interval.step - 1))
        self.queue.log_step_metrics(with_overview(interval.metrics(lr)), interval.step)
        line = self.progress.line(epoch, interval.step - first_step, interval, time.perf_counter() - epoch_start)
        if line is not None:
            log.info(line)

    def seed_epoch(self, epoch: int) -> int:
        """Deterministic runs: everything random in this epoch is a function of (seed, rank, epoch)."""
        self.aug_rng = np.random.default_rng([self.cfg.seed, self.rank, epoch])
        shuffle_seed = (self.cfg.seed * 100_003 + epoch * 1_009 + self.rank) % 2**31
        torch.manual_seed(shuffle_seed)  # torch's RNG drives TrivialAugmentWide
        return int(shuffle_seed)

    def model_input(self, batch: dict[str, torch.Tensor], crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(model input, targets) of a uint8 batch: TrivialAugment, the epoch's crop, erasing, Mixup/CutMix."""
        data, labels, images = self.cfg.data, batch["label"].long(), batch["image"]
        if data.auto_augment == "trivialaugment":
            images = trivial_augment(images)
        x = resize_on_device(to_model_input(images), crop)
        if data.random_erasing > 0:
            x = random_erase(x, data.random_erasing, self.aug_rng)
        if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
            return mix_batch(
                x,
                labels,
                self.plan.num_classes,
                data.mixup_alpha,
                data.cutmix_alpha,
                self.aug_rng,
                self.cfg.optim.label_smoothing,
            )
        return x, labels

    def validate(self, last: bool) -> tuple[dict[str, float], dict[str, dict[str, Any] | bytes]]:
        """(val metrics over every val image, artifacts: after the last epoch, if asked for, per-class
        top-1 and the most-confused class pairs, as JSON and as pictures)."""
        e = self.cfg.eval
        per_class = PerClassCounts(self.plan.num_classes, self.device) if (last and e.per_class) else None
        confusion = ConfusionPairs(self.plan.num_classes, self.device) if per_class is not None else None
        # Every rank evaluates (and rank 0 checkpoints) one model: see norm_stats.py.
        average_batchnorm_stats(self.model)
        if self.ema is not None:
            average_batchnorm_stats(self.ema.module)
        val = evaluate(
            self.model,
            self.val_batches(),
            self.device,
            self.amp,
            e.hflip,
            hooks=[per_class, confusion] if per_class is not None and confusion is not None else (),
        ).reduced(self.device)
        if val.samples != self.plan.num_val:
            raise PermanentError(
                f"validation counted {val.samples} images but the manifest lists {self.plan.num_val}: "
                "refusing to report a wrong Top-1/Top-5"
            )
        metrics = val.as_metrics("val")
        if self.ema is not None:
            ema_val = evaluate(self.ema.module, self.val_batches(), self.device, self.amp, e.hflip)
            metrics.update(ema_val.reduced(self.device).as_metrics("val_ema"))
        if per_class is None or confusion is None:
            return metrics, {}
        per_class_artifact, counts = per_class.as_artifact(self.plan.classes), confusion.reduced()  # every rank
        if self.rank != 0:
            return metrics, {}
        pairs = top_confused_pairs(counts, 20)
        return metrics, {
            "per_class_top1.json": per_class_artifact,
            "per_class_top1.png": per_class_top1_png(per_class_artifact),
            "confused_pairs.json": confused_pairs_dict(pairs, self.plan.classes),
            "confused_pairs.png": confused_pairs_png(pairs, self.plan.classes),
        }

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        e, data = self.cfg.eval, self.cfg.data
        return val_batches(
            self.val_shard, e.batch_size, data.prefetch_batches, self.device, data.decode_on, e.resize, e.crop
        )

    def save_and_report(
        self, epochs_done: int, metrics: dict[str, float], artifacts: dict[str, dict[str, Any] | bytes]
    ) -> None:
        """Rank 0 writes the checkpoint (with the epoch's metrics), every rank reports it to Ray Train, then
        rank 0 logs the epoch to MLflow: a failure in between is healed on restore (relog_restored_epoch),
        so no logged epoch lacks its checkpoint and no checkpoint lacks its epoch."""
        self.write_and_report(epochs_done, metrics, metrics)
        self.last_epoch_metrics = metrics
        self.clock.checkpointed()
        if self.queue is None:
            return
        # Epoch metrics share the step curves' x-axis: the global optimizer step at the epoch's end
        # (the `epoch` metric, logged with them, gives the epoch axis).
        if epochs_done not in self.logged_epochs:
            self.queue.log_metrics(with_overview(metrics), step=self.step.step)
            self.logged_epochs.add(epochs_done)
        for artifact_file, content in artifacts.items():
            self.queue.log_artifact(content, artifact_file)
        log.info(
            f"[epoch {epochs_done}/{self.cfg.train.epochs}] "
            f"train/loss={metrics.get('train/epoch_loss', float('nan')):.4f} "
            f"val/top1={metrics['val/top1']:.4f} val/top5={metrics['val/top5']:.4f} "
            f"images/s={metrics['perf/epoch_images_per_s']:.1f} "
            f"data_wait={metrics['perf/epoch_data_wait_frac']:.2f} epoch_s={metrics['perf/epoch_s']:.0f}"
        )

    def write_and_report(
        self,
        epochs_done: int,
        metrics: dict[str, float],
        reported: dict[str, float],
        mid_epoch: MidEpochState | None = None,
    ) -> None:
        """Rank 0 writes the checkpoint; every rank reports it (a barrier) with `reported`."""
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if self.rank == 0:
                write_checkpoint_dir(
                    tmp,
                    model=self.model,
                    optimizer=self.optimizer,
                    epoch=epochs_done,
                    step=self.step.step,
                    mlflow_run_id=self.run_id,
                    config_yaml=self.plan.config_yaml,
                    ema=self.ema.state_dict() if self.ema is not None else None,
                    metrics=metrics,
                    mid_epoch=mid_epoch.to_dict() if mid_epoch is not None else None,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            try:
                ray.train.report({**reported, "mlflow_run_id": self.run_id or ""}, checkpoint=ckpt)
            except Exception as exc:  # rank 0's upload: a full disk fails the same way on every retry
                what = f"the checkpoint of epoch {epochs_done}"
                if mid_epoch is not None:
                    what = f"a checkpoint inside epoch {epochs_done + 1}"
                permanent = checkpoint_storage_error(exc, self.plan.fatal_error_url, what)
                if permanent is None:
                    raise
                raise permanent from exc

    def mid_epoch_checkpoint_due(self, interval: Interval | None) -> bool:
        """Agreed by every rank: the interval's wall time is all-reduced, and a preemption notice comes
        from a barrier (asked every train.preemption_check_s). Only between optimizer steps."""
        if interval is not None:
            self.clock.add(interval.wall_s / interval.world)
        if self.step.pending != 0:
            return False
        return self.clock.interval_passed() or self.preemption_notice()

    def preemption_notice(self) -> bool:
        """True once per preemption notice for this worker group (Ray Train drains the nodes first)."""
        if not self.cfg.train.checkpoint_on_preemption or not self.clock.preemption_check_due():
            return False
        info = ray.train.get_preemption_info()
        if info is None or self.preemption_saved:
            return False
        self.preemption_saved = True
        log.warning("rank %d: preemption notice for ranks %s: checkpointing now", self.rank, info.preempted_ranks)
        return True

    def save_mid_epoch(self, epoch: int, batches: int, partial: torch.Tensor, before: MidEpochState | None) -> None:
        """A checkpoint inside `epoch` after `batches` per rank: `partial` is this attempt's (loss sum,
        samples, decode errors) on this rank. Ray Train keeps it while it is the latest (MID_EPOCH_SCORE)."""
        t0 = time.perf_counter()
        loss, samples, errors = all_reduce_sum(partial).tolist()
        state = MidEpochState(
            epoch=epoch,
            batches=batches,
            samples=int(samples) + (before.samples if before else 0),
            loss_sum=loss + (before.loss_sum if before else 0.0),
            decode_errors=int(errors) + (before.decode_errors if before else 0),
            world=self.world,
            rank_states=gather_to_all(rank_local_state(self.aug_rng, self.ema, self.device)),
        )
        reported = {"epoch": float(epoch), "val/top1": MID_EPOCH_SCORE, "train/mid_epoch_images": float(state.samples)}
        self.write_and_report(epoch, self.last_epoch_metrics, reported, mid_epoch=state)
        self.clock.checkpointed()
        seconds = time.perf_counter() - t0
        log.info(f"[epoch {epoch + 1}] mid-epoch checkpoint after {state.samples} images ({seconds:.1f} s)")
        if self.queue is not None:
            self.queue.log_step_metrics({"perf/checkpoint_s": seconds}, self.step.step)

    def time_box_reached(self, epochs_done: int) -> bool:
        stop = self.cfg.train.stop_after_epochs
        return stop is not None and epochs_done >= stop


def train_loop_per_worker(loop_config: dict[str, WorkerPlan]) -> None:
    """Ray Train entrypoint (runs on every worker)."""
    configure_worker_logging()
    Runner(WorkerPlan.from_loop_config(loop_config)).run()
