"""The training step as replayed CUDA graphs. With one micro-batch a step (no accumulation), one graph
per batch shape holds the whole step: forward, backward, gradient clipping and the optimizer update.
With accumulation, one graph per micro-batch shape holds forward + backward, and one more holds
clipping, the update and zeroing the gradients.

A training step of a 24-layer encoder launches a few thousand kernels; launched one by one from
Python they cost more host time than the GPU needs to run them. A replay launches a whole graph with
one call, so the step costs the GPU's time. Unlike torch.compile's per-graph CUDA graphs
(mode="reduce-overhead"), nothing is checked or copied per step beside the batch itself.

What capture needs, and how it is met:
- Fixed addresses: each shape has static input buffers that the batch is copied into. In the one-graph
  step the gradients live inside the graph: backward allocates them from the graph's memory as
  activations are freed, the update reads them, and they are freed before the graph ends, as eager
  training with ``zero_grad(set_to_none=True)`` does (no gradient memory between steps, no adds into
  old gradients, no zeroing). With accumulation the gradients must outlive a graph: they are allocated
  once and accumulated into in place (never set to None), and the update graph zeroes them.
- The optimizer runs on the device: fused AdamW/Adam with ``capturable=True`` and the learning rate as
  a device tensor, which the LR scheduler fills in place (build.py sets this up).
- Warm-up before capture (compilation, lazy kernel loading, optimizer state) must not change
  training: the update is warmed up at learning rate 0 on zero gradients and the optimizer state is
  put back; forward/backward warm-ups leave no gradients behind (or put back saved ones), and the RNG
  state is forked around warm-up and capture, so a replay draws the same dropout masks whenever the
  graph was captured (a resumed run captures at other steps than the original).
- Graphs of all shapes share one memory pool: their activations are never alive at the same time.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from seqcls.trainer import clip_and_update

log = logging.getLogger("seqcls")


def shape_key(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class StepGraphs:
    """Drop-in for the eager step: ``step(micro_batches)`` returns (summed loss, grad norm) as device tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, forward_loss: Callable[[dict], torch.Tensor],
                 denom: int, max_grad_norm: Optional[float], device: torch.device, one_graph: bool,
                 warmup_iters: int = 2):
        self.optimizer, self.forward_loss = optimizer, forward_loss
        self.denom, self.max_grad_norm, self.device = denom, max_grad_norm, device
        self.one_graph = one_graph  # one micro-batch a step: forward, backward and update in one graph
        self.warmup_iters = warmup_iters
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.grads: list[torch.Tensor] = []
        # shape -> (graph, static inputs, loss, grad norm or None)
        self.micro: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor,
                                      Optional[torch.Tensor]]] = {}
        self.update: Optional[tuple[torch.cuda.CUDAGraph, torch.Tensor]] = None
        self.pool = None
        self.side_stream: Optional[torch.cuda.Stream] = None  # warm-ups and captures run here
        self.ready = False
        self.grads_zero = True  # no micro-batch accumulated since the last update

    # ------------------------------------------------------------------ the step
    def step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ready:
            self._setup()
        if self.one_graph:
            if len(micro_batches) != 1:
                raise ValueError(f"the one-graph step takes one micro-batch a step, got {len(micro_batches)}")
            batch = micro_batches[0]
            graph, static, loss, norm = self.micro.get(shape_key(batch)) or self._capture_micro(batch)
            for k, v in batch.items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
            return loss.clone(), norm.clone()
        loss_total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            entry = self.micro.get(shape_key(batch))
            if entry is None:
                entry = self._capture_micro(batch)
            graph, static, loss, _ = entry
            for k, v in batch.items():
                static[k].copy_(v, non_blocking=True)
            graph.replay()
            self.grads_zero = False
            loss_total += loss
        graph, norm = self.update
        graph.replay()
        self.grads_zero = True
        return loss_total, norm.clone()

    # ------------------------------------------------------------------ capture
    def capture_ahead(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Capture the step of each batch's shape now rather than at its first use (the batches' values
        only warm up and fill the static inputs; they train nothing)."""
        if not self.ready:
            self._setup()
        for batch in batches:
            if shape_key(batch) not in self.micro:
                self._capture_micro(batch)

    def _setup(self) -> None:
        """Device learning rates, a warmed-up optimizer with its state as it was, and with accumulation
        the persistent gradients and the update graph (captured first, while the gradients are zero)."""
        for group in self.optimizer.param_groups:
            # A checkpoint load may hand back a float or a CPU tensor: the graph reads this device tensor.
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(self.device).reshape(())
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.pool = torch.cuda.graph_pool_handle()
        # One side stream for every warm-up and capture: cuBLAS and cuBLASLt keep a workspace (32 MiB
        # each on Hopper) for each stream they run on, for the life of the process, so a stream a shape
        # would hold ~64 MiB more GPU memory a captured shape.
        self.side_stream = torch.cuda.Stream(self.device)
        self.ready = True

        saved_lr = [g["lr"].clone() for g in self.optimizer.param_groups]
        # Kept in host memory: a copy on the GPU (moments, and seqcls.optim's fp32 masters) would raise
        # the run's peak memory by the optimizer state's size.
        saved_state = {p: {k: v.to("cpu", copy=True) for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                       for p in self.params if p in self.optimizer.state}
        with torch.random.fork_rng(devices=[self.device]):
            for g in self.optimizer.param_groups:
                g["lr"].zero_()  # lr 0 on zero gradients: the parameters do not move
            self._warm_up(self._update_body)
            for g, lr in zip(self.optimizer.param_groups, saved_lr):
                g["lr"].copy_(lr)
            for p in self.params:  # fresh state was zero (step, moments); loaded state goes back as it was
                for k, v in self.optimizer.state[p].items():
                    if torch.is_tensor(v):
                        v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
            if self.one_graph:  # the gradients are made and freed inside each step's graph
                self._drop_grads()
                self.grads = []
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.side_stream):
                norm = self._update_body()
        self.update = (graph, norm)

    def _update_body(self) -> torch.Tensor:
        norm = clip_and_update(self.optimizer, self.params, self.max_grad_norm)
        if self.one_graph:
            self._drop_grads()
        else:
            torch._foreach_zero_(self.grads)
        return norm

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _micro_body(self, static: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.forward_loss(static)
        (loss / self.denom).backward()
        return loss.detach()

    def _capture_micro(self, batch: dict[str, torch.Tensor]):
        static = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device) for k, v in batch.items()}
        for k, v in batch.items():
            static[k].copy_(v)
        norm = None
        with torch.random.fork_rng(devices=[self.device]):
            if self.one_graph:  # each warm-up pass starts without gradients, as a step of the graph does
                self._warm_up(lambda: (self._micro_body(static), self._drop_grads()))
            else:
                # Warm-up accumulates into the real gradients: zero them after, or put back a partial
                # accumulation.
                kept = None if self.grads_zero else [g.clone() for g in self.grads]
                self._warm_up(lambda: self._micro_body(static))
                if kept is None:
                    torch._foreach_zero_(self.grads)
                else:
                    torch._foreach_copy_(self.grads, kept)
                    del kept
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.side_stream):
                loss = self._micro_body(static)
                if self.one_graph:  # the update was warmed up in _setup (lr 0, state put back)
                    norm = self._update_body()
        self.micro[shape_key(batch)] = (graph, static, loss, norm)
        log.info("captured the training step for batch shape %s (%d shapes so far; %.2f GiB allocated, "
                 "%.2f GiB reserved)", "x".join(map(str, batch["input_ids"].shape)), len(self.micro),
                 torch.cuda.memory_allocated(self.device) / 2**30, torch.cuda.memory_reserved(self.device) / 2**30)
        return graph, static, loss, norm

    def _warm_up(self, fn: Callable[[], object]) -> None:
        stream = self.side_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_iters):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
