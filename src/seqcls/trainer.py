"""The training loop: read it top to bottom in ``Trainer.fit``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from seqcls.distributed import DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum
from seqcls.errors import ConfigError, NonFiniteLossError
from seqcls.metrics import compute_metrics, greater_is_better

log = logging.getLogger("seqcls")


def warmup_decay_lambda(total_steps: int, *, decay: str = "linear", warmup_ratio: float = 0.0,
                        min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: linear warm-up from 0, then linear/cosine decay to min_lr_ratio."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return factor


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a checkpoint; re-run to resume


class StopSignal:
    """SIGTERM/SIGUSR2 (what Slurm sends before preemption or time-out) ask for a checkpoint at the
    next step boundary instead of killing the run mid-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.requested, self.signum = False, None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested, self.signum = True, signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def forward_or_exit(self) -> None:
        """After the checkpoint: hand the signal to whoever handled it before (submitit requeues the
        job there), else exit with EXIT_PREEMPTED."""
        prev = self.previous.get(self.signum)
        if callable(prev):
            prev(self.signum, None)
        sys.exit(EXIT_PREEMPTED)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, num_labels: int, *, weight: Optional[torch.Tensor] = None,
             label_smoothing: float = 0.0, multi_label: bool = False) -> torch.Tensor:
    """Summed loss of a batch: cross-entropy (with class ``weight`` and ``label_smoothing``), for a regression
    (num_labels=1) squared error, for ``multi_label`` each example's binary cross-entropy averaged over its
    labels (``weight``: each label's positive-example weight). Validation reports it plain (no weights, no
    smoothing)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=weight,
                                                  reduction="none").mean(-1).sum()
    if num_labels == 1:
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, weight=weight, label_smoothing=label_smoothing, reduction="sum")


def class_weights(spec: Any, labels: Sequence[Any], num_labels: int, multi_label: bool = False) -> Optional[list[float]]:
    """loss.class_weights as a list of num_labels weights (None for null). ``balanced``: n / (num_labels x
    count) for each class over ``labels`` (the training split's), as scikit-learn's class_weight='balanced';
    ``multi_label`` (labels: 0/1 rows), negatives / positives of each label."""
    if spec is None:
        return None
    if spec != "balanced":
        return [float(w) for w in spec]
    if multi_label:
        positives = np.asarray(labels, dtype=np.float64).sum(0)
        if (positives == 0).any():
            raise ConfigError(f"loss.class_weights=balanced: label {int(np.argmin(positives))} has no positive "
                              f"training example; give the weights as a list")
        if (positives == len(labels)).any():  # its weight would be 0: the label would never train
            raise ConfigError(f"loss.class_weights=balanced: label {int(np.argmax(positives))} is positive in every "
                              f"training example; give the weights as a list")
        return ((len(labels) - positives) / positives).tolist()
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)
    if (counts == 0).any():
        raise ConfigError(f"loss.class_weights=balanced: class {int(np.argmin(counts))} has no training example; "
                          f"give the weights as a list")
    return (len(labels) / (num_labels * counts)).tolist()


def total_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as clip_grad_norm_ computes it, with the norms of bf16
    gradients (seqcls.optim's bf16 weights) taken in fp32 rather than rounded to bf16."""
    norms = []
    for dtype in sorted({g.dtype for g in grads}, key=str):
        norms.extend(torch._foreach_norm([g for g in grads if g.dtype == dtype], 2, dtype=torch.float32))
    return torch.linalg.vector_norm(torch.stack(norms), 2)


def clip_and_update(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                    max_grad_norm: Optional[float], scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
    """Clip the global gradient norm to ``max_grad_norm`` (None: no clipping), then step the optimizer.
    Returns the norm before clipping, as a device tensor.

    A fused Adam/AdamW divides each gradient by its ``grad_scale`` inside the update kernel (the hook
    GradScaler uses to unscale). Handing it the clipping factor there spares the separate pass that
    rescales every gradient (full fine-tune of roberta-large on an H200: 0.28 ms less of a 17.6 ms
    step, docs/benchmarks.md). seqcls.optim.MasterWeightAdamW takes the same hook. The update is that
    of ``clip_grad_norm_`` followed by ``step()``, and fused AdamW leaves the gradients clipped, as
    ``clip_grad_norm_`` leaves them (MasterWeightAdamW leaves its bf16 gradients as they were).
    """
    if scaler is not None:  # fp16: unscale, clip, then step unless a gradient overflowed (the scale then halves)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_grad_norm is None else max_grad_norm,
                                              foreach=True)
        scaler.step(optimizer)
        scaler.update()
        return norm
    grads = [p.grad for p in params if p.grad is not None]
    if max_grad_norm is None or not grads:  # no gradients (a step graph's warm-up): nothing moves
        optimizer.step()
        return torch.zeros((), device=params[0].device)
    fused_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
    if fused_adam or getattr(optimizer, "accepts_grad_scale", False):
        norm = total_grad_norm(grads)
        # clip_grad_norm_ multiplies by max_norm / (norm + 1e-6) where that is below 1: divide by its inverse
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_grad_norm, min=1.0)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return norm
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    optimizer.step()
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor


class MetricsLog:
    """metrics.jsonl (one JSON object a line), written by rank 0 only; every row also goes to the
    ``loggers`` (TensorBoard, and W&B or MLflow when chosen: seqcls.loggers), which rank 0 alone holds."""

    def __init__(self, path: Path, enabled: bool, loggers: Sequence[Any] = ()):
        self.path, self.enabled, self.loggers = path, enabled, list(loggers)

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for logger in self.loggers:
                logger.log(row)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class LogValues:
    """A log step's loss sum, grad norm, lr and earliest non-finite step, copied to the host without blocking
    and read after the next step is queued. On a GPU the copy goes to pinned memory behind an event, so the
    read waits for this step's work alone (a plain .item() would wait for the next step too, and the GPU
    would sit idle as long as before). Taken as the step's queued: the next step may overwrite its buffers."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float | torch.Tensor, bad_step: torch.Tensor):
        device = loss.device
        # A float lr (no step graphs) stays on the host: torch.tensor(lr, device=cuda) would be a blocking copy.
        self.lr = None if torch.is_tensor(lr) else float(lr)
        tensors = (loss, grad_norm, bad_step) + ((lr,) if self.lr is None else ())
        values = torch.stack([t.detach().to(device=device, dtype=torch.float64).reshape(()) for t in tensors])
        self.event = None
        if device.type == "cuda":
            self.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values

    def read(self) -> tuple[float, float, float, int]:
        if self.event is not None:
            self.event.synchronize()
        loss, grad_norm, bad_step, *lr = self.values.tolist()
        return loss, grad_norm, lr[0] if lr else self.lr, int(bad_step)


class Trainer:
    """Owns the loop; everything it trains with is built by seqcls.build and handed in."""

    def __init__(self, *, model: torch.nn.Module, train_loader, val_loaders: dict[str, Any], optimizer,
                 scheduler, device: torch.device, dist_info: DistInfo, run_dir: Path, task: str, num_labels: int,
                 grad_accum_steps: int, local_batch_size: int, steps_per_epoch: int, total_steps: int,
                 num_epochs: int, log_every_steps: int, val_every_steps: Optional[int],
                 ckpt_every_steps: Optional[int], max_grad_norm: Optional[float], autocast_dtype: Optional[torch.dtype],
                 best_metric: str, checkpointer=None, loggers: Sequence[Any] = (), cuda_graphs: bool = False,
                 capture_ahead: bool = False, early_stopping_patience: Optional[int] = None,
                 early_stopping_threshold: float = 0.0, class_weights: Optional[Sequence[float]] = None,
                 label_smoothing: float = 0.0, multi_label: bool = False):
        self.model, self.train_loader, self.val_loaders = model, train_loader, val_loaders
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device, self.dist = device, dist_info
        self.run_dir, self.task, self.num_labels = run_dir, task, num_labels
        self.grad_accum_steps, self.local_batch_size = grad_accum_steps, local_batch_size
        self.steps_per_epoch, self.total_steps, self.num_epochs = steps_per_epoch, total_steps, num_epochs
        self.log_every_steps, self.val_every_steps, self.ckpt_every_steps = log_every_steps, val_every_steps, ckpt_every_steps
        self.max_grad_norm, self.autocast_dtype = max_grad_norm, autocast_dtype
        # fp16: the loss is scaled before the backward so that small gradients do not flush to zero.
        self.scaler = torch.amp.GradScaler(device.type) if autocast_dtype == torch.float16 else None
        self.best_metric, self.checkpointer = best_metric, checkpointer
        self.early_stopping_patience, self.early_stopping_threshold = early_stopping_patience, early_stopping_threshold
        self.class_weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32,
                                                                              device=device)
        self.label_smoothing, self.multi_label = label_smoothing, multi_label
        if dist_info.is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_log = MetricsLog(run_dir / "metrics.jsonl", dist_info.is_writer, loggers)
        # Progress state, saved in checkpoints.
        self.step, self.epoch, self.batches_into_epoch = 0, 0, 0
        self.best: dict[str, Any] = {"metric": best_metric, "value": None, "step": None,
                                     "greater_is_better": greater_is_better(best_metric)}
        # Validations in a row that did not improve on the best by more than early_stopping_threshold.
        self.validations_without_improvement = 0
        # Train loss summed since the last train row of metrics.jsonl (kept so a resumed run logs the same rows).
        self.window_loss = torch.zeros((), device=device)
        self.window_examples = 0
        self.stop_requested = False
        self.stop_signal = None  # set by the caller: an object whose .requested turns True on SIGTERM/SIGUSR2
        self.step_graphs = None
        self.capture_ahead = capture_ahead  # with step graphs: every shape's graph before the first step
        if cuda_graphs:  # the whole step as replayed CUDA graphs (seqcls.step_graph), built at the first step
            from seqcls.step_graph import StepGraphs
            self.step_graphs = StepGraphs(optimizer, forward_loss=self._forward_loss,
                                          denom=local_batch_size * grad_accum_steps,
                                          max_grad_norm=max_grad_norm, device=device,
                                          one_graph=grad_accum_steps == 1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_into_epoch": self.batches_into_epoch,
                "best": dict(self.best), "window_loss": float(all_reduce_sum(self.window_loss, self.dist)),
                "window_examples": self.window_examples,
                "validations_without_improvement": self.validations_without_improvement,
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_into_epoch = int(state["batches_into_epoch"])
        if state["best"].get("metric") == self.best_metric:
            # A checkpoint from before the key: the metric's own direction
            self.best = {"greater_is_better": greater_is_better(self.best_metric), **state["best"]}
            self.validations_without_improvement = int(state.get("validations_without_improvement", 0))
        elif self.dist.is_writer:  # the value kept is another metric's: the next validation starts afresh
            log.warning("the checkpoint's best metric is %s, this run's %s: the best is tracked anew from the next "
                        "validation", state["best"].get("metric"), self.best_metric)
        # The summed loss of all ranks goes to rank 0; the train row sums it over ranks again.
        self.window_loss.fill_(state["window_loss"] if self.dist.is_writer else 0.0)
        self.window_examples = int(state["window_examples"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training objective: loss_sum with the run's class weights and label smoothing."""
        return loss_sum(logits, labels, self.num_labels, weight=self.class_weights,
                        label_smoothing=self.label_smoothing, multi_label=self.multi_label)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed loss of a micro-batch already on the device (labels included)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self._autocast():
            logits = self.model(**inputs).logits
        return self._loss_sum(logits, batch["labels"])

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``grad_accum_steps`` micro-batches.

        Each rank's loss is its summed example loss divided by the examples it sees in the step
        (local_batch_size x accumulation); FSDP averages gradients over the data-parallel ranks,
        so the gradient is that of the mean loss over the global batch.
        Returns (summed loss of this rank's examples, grad norm) as device tensors: no host sync.
        """
        if not self.model.training:  # Module.train() walks every submodule: only when it changes
            self.model.train()
        if self.step_graphs is not None:
            loss_total, grad_norm = self.step_graphs.step(micro_batches)
            self.scheduler.step()
            return loss_total, grad_norm
        denom = self.local_batch_size * self.grad_accum_steps
        loss_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last micro-batch
                self.model.set_requires_gradient_sync(sync)
            loss_sum = self._forward_loss(self._to_device(batch))
            loss = loss_sum / denom
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            loss_total += loss_sum.detach()
        if not hasattr(self, "_trainable"):
            self._trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_and_update(self.optimizer, self._trainable, self.max_grad_norm, self.scaler)
        self.scheduler.step()
        # Flush the gradients as soon as we can: frees memory before the next forward.
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, grad_norm

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """Metrics over every example of the split exactly once (each rank holds a disjoint shard)."""
        self.model.eval()
        logits_parts, label_parts = [], []
        loss_total = torch.zeros((), device=self.device)
        # Shards differ by one example when the split does not divide, but under FSDP every forward
        # all-gathers with every rank: a rank with fewer batches runs filler forwards (its last batch
        # again, a shape already seen, or one token; outputs dropped) to match the rank with the most.
        num_batches = len(loader)
        max_batches = int(all_reduce_max(torch.tensor(num_batches, device=self.device), self.dist))
        batches = iter(loader)
        batch = {"input_ids": torch.zeros((1, 1), dtype=torch.long),
                 "attention_mask": torch.ones((1, 1), dtype=torch.long)}
        for i in range(max_batches):
            if i >= num_batches:
                with self._autocast():
                    self.model(**self._to_device(batch))
                continue
            batch = self._to_device(next(batches))
            labels = batch.pop("labels")
            with self._autocast():
                logits = self.model(**batch).logits
            # plain (no class weights, no smoothing): comparable between runs with other loss settings
            loss_total += loss_sum(logits, labels, self.num_labels, multi_label=self.multi_label)
            logits_parts.append(logits.float())
            label_parts.append(labels)
        logits = torch.cat(logits_parts).cpu().numpy() if logits_parts else np.zeros((0, self.num_labels), np.float32)
        labels = torch.cat(label_parts).cpu().numpy() if label_parts else \
            np.zeros((0, self.num_labels) if self.multi_label else (0,))
        gathered = all_gather_objects((logits, labels, float(loss_total)), self.dist)
        logits = np.concatenate([g[0] for g in gathered])
        labels = np.concatenate([g[1] for g in gathered])
        metrics = compute_metrics(self.task, self.num_labels, logits, labels)
        metrics["loss"] = sum(g[2] for g in gathered) / max(1, len(labels))
        metrics["num_examples"] = int(len(labels))
        return metrics

    def validate(self) -> dict[str, float]:
        """Run every validation split, log it, and update the best-metric bookkeeping."""
        first = None
        for name, loader in self.val_loaders.items():
            m = self.evaluate(loader)
            self.metrics_log.write({"step": self.step, "epoch": self.epoch, "split": "validation", "name": name, **m})
            if self.dist.is_writer:
                log.info("step %d validation %s: %s", self.step, name,
                         " ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
            first = first or m
        value, best = first[self.best_metric], self.best["value"]
        sign = 1.0 if self.best["greater_is_better"] else -1.0
        improved = best is None or sign * (value - best) > self.early_stopping_threshold
        self.validations_without_improvement = 0 if improved else self.validations_without_improvement + 1
        if best is None or sign * (value - best) > 0:
            self.best = {**self.best, "value": value, "step": self.step, "metrics": first}
        self.last_validation = first
        return first

    @property
    def patience_exhausted(self) -> bool:
        """Whether the best metric went early_stopping_patience validations in a row without improving."""
        return self.early_stopping_patience is not None and \
            self.validations_without_improvement >= self.early_stopping_patience

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps or self.patience_exhausted

    def upcoming_shapes(self) -> list[dict[str, torch.Tensor]]:
        """One collated micro-batch of each batch shape that the rest of the run trains on, in the order
        the shapes first appear. The sampler's order is seeded and a batch's shape follows from its
        examples' lengths (the collator's ``padded_length``), so this collates one batch a shape. Empty
        for a collator that cannot tell (a collate_fn of the user's)."""
        loader = self.train_loader
        sampler, collate, rows = loader.batch_sampler, loader.collate_fn, loader.dataset
        if not hasattr(collate, "padded_length"):
            return []
        left = (self.total_steps - self.step) * self.grad_accum_steps
        epoch, skip = self.epoch, self.batches_into_epoch
        first: dict[int, list[int]] = {}
        while left > 0:
            micro = sampler.micro_batches(epoch)[skip:self.steps_per_epoch * self.grad_accum_steps][:left]
            if not micro:
                break
            for idx in micro:
                first.setdefault(collate.padded_length([len(rows[i]["input_ids"]) for i in idx]), idx)
            left -= len(micro)
            epoch, skip = epoch + 1, 0
        return [collate([rows[i] for i in idx]) for idx in first.values()]

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        start = time.time()
        if self.capture_ahead and self.step_graphs is not None and self.step < self.total_steps:
            self.model.train()
            batches = self.upcoming_shapes()
            self.step_graphs.capture_ahead(batches)
            log.info("captured the step graphs of %d batch shapes ahead in %.1f s", len(batches), time.time() - start)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.dist.is_writer and sys.stderr.isatty()))
        self.last_validation: Optional[dict[str, float]] = None
        self._window_start = time.time()
        # First step at which the loss was not finite; -1 while all is well. Kept on the device.
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        # A log step's values, read on the host only once the next step is queued (LogValues): reading them
        # at once would leave the GPU idle while the host writes the row and prepares the next batch.
        pending: Optional[dict[str, Any]] = None
        done = self.finished
        if done and self.step > 0:  # resumed from the final checkpoint: only the final metrics are missing
            self.validate()
        while not done:
            self.train_loader.batch_sampler.set_epoch(self.epoch)
            batches = iter(self.train_loader)
            while self.batches_into_epoch + self.grad_accum_steps <= self.steps_per_epoch * self.grad_accum_steps:
                micro = [next(batches) for _ in range(self.grad_accum_steps)]
                self.batches_into_epoch += self.grad_accum_steps
                loss_sum, grad_norm = self.train_step(micro)
                self.step += 1
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_sum),
                                       torch.full_like(bad_step, self.step), bad_step)
                self.window_loss += loss_sum
                self.window_examples += self.local_batch_size * self.grad_accum_steps * self.dist.world_size
                bar.update(1)
                if pending is not None:
                    self._write_train_row(pending, bar)
                    pending = None
                last = self.step >= self.total_steps
                if self.step % self.log_every_steps == 0 or last:
                    pending = {"step": self.step, "epoch": self.epoch, "examples": self.window_examples,
                               "values": LogValues(all_reduce_sum(self.window_loss, self.dist), grad_norm,
                                                   self.scheduler.get_last_lr()[0], self._earliest_bad_step(bad_step))}
                    self.window_loss.zero_()
                    self.window_examples = 0
                self._poll_stop(at_sync_point=self.step % self.log_every_steps == 0 or last)
                validate = last or bool(self.val_every_steps and self.step % self.val_every_steps == 0)
                save = self.checkpointer is not None and (
                    last or self.stop_requested or bool(self.ckpt_every_steps and self.step % self.ckpt_every_steps == 0))
                if pending is not None and (validate or save or self.stop_requested):
                    self._write_train_row(pending, bar)  # its row before the validation's
                    pending = None
                if (validate or save or self.stop_requested) and hasattr(self.optimizer, "flush"):
                    self.optimizer.flush()  # rows of a lazily updated embedding, before anything reads them
                if validate:
                    self.validate()
                    # With early stopping, each new best is saved: BEST then names the best model.
                    if self.early_stopping_patience is not None and self.best["step"] == self.step:
                        save = self.checkpointer is not None
                    if self.patience_exhausted and not last:
                        if self.dist.is_writer:
                            log.info("early stopping at step %d: %s has not improved for %d validations (best %.4f "
                                     "at step %s)", self.step, self.best_metric, self.validations_without_improvement,
                                     self.best["value"], self.best["step"])
                        save = self.checkpointer is not None
                if save:
                    self._check_finite(bad_step)
                    self.checkpointer.save(self)
                if last or self.stop_requested or self.patience_exhausted:
                    done = True
                    break
            else:
                for _ in batches:  # the tail that does not fill a step; drained so the next epoch starts clean
                    pass
                self.epoch += 1
                self.batches_into_epoch = 0
        bar.close()
        return {"steps": self.step, "epochs_completed": self.epoch, "wall_time_s": time.time() - start,
                "final": self.last_validation, "best": self.best, "early_stopped": self.patience_exhausted and self.step < self.total_steps,
                "preempted": self.stop_requested and not self.finished}

    def _write_train_row(self, pending: dict[str, Any], bar) -> None:
        """The train row of a log step from ``pending`` (no row for a window with a non-finite loss: the run
        stops). Reading its values waits for that step alone: the window's rate runs to then."""
        loss, grad_norm, lr, bad_step = pending["values"].read()
        self._raise_if_bad(bad_step)
        loss /= max(1, pending["examples"])
        now = time.time()
        row = {"step": pending["step"], "epoch": pending["epoch"], "split": "train", "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "samples_per_s": pending["examples"] / max(now - self._window_start, 1e-9)}
        self.metrics_log.write(row)
        bar.set_postfix(loss=f"{loss:.4f}")
        if self.dist.is_writer and bar.disable:  # plain log lines when no progress bar
            log.info("step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s", row["step"], self.total_steps,
                     row["epoch"], loss, row["lr"], row["samples_per_s"])
        self._window_start = now

    def _poll_stop(self, *, at_sync_point: bool) -> None:
        """Turn a pending SIGTERM/SIGUSR2 into stop_requested, on every rank at the same step.

        One process checks every step; several agree at the log steps, through an all-reduce the host waits
        for (with several processes, the one read at a log step that waits for the step's work).
        """
        if self.stop_signal is None:
            return
        if self.dist.world_size == 1:
            self.stop_requested = self.stop_requested or self.stop_signal.requested
        elif at_sync_point:
            flag = torch.tensor(int(self.stop_signal.requested), device=self.device)
            self.stop_requested = self.stop_requested or bool(all_reduce_max(flag, self.dist))

    def _earliest_bad_step(self, bad_step: torch.Tensor) -> torch.Tensor:
        """The earliest step of any rank whose loss was not finite, 2**62 for none (a min, written as a max of
        negatives), on the device: every rank must raise together, or the others wait in the next collective
        until the timeout."""
        never = torch.full_like(bad_step, 2**62)
        return -all_reduce_max(-torch.where(bad_step < 0, never, bad_step), self.dist)

    def _check_finite(self, bad_step: torch.Tensor) -> None:
        self._raise_if_bad(int(self._earliest_bad_step(bad_step)))

    @staticmethod
    def _raise_if_bad(s: int) -> None:
        if s < 2**62:
            raise NonFiniteLossError(f"the loss became NaN or inf at step {s}; lower optimizer.lr or check the "
                                     f"data (no checkpoint was written from that step on)")
