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

The overlapped update (``overlap=True``, one micro-batch a step, seqcls.optim.MasterWeightAdamW): the
update is memory-bound (~28 bytes a parameter) and the forward's matrix multiplies at batch 32 leave most of
the GPU's SMs idle, so a step's graph runs the *previous* step's update on a second stream while its own
forward runs, each block's forward waiting only for its own parameters' part of the update (an event per
bucket). Its backward copies each bucket's gradients, once all have arrived, into buffers that outlive the
graph (on the second stream, beside the rest of the backward), and the graph ends by keeping the clipping
factor and learning rate for the update the next step's graph applies. Training is the same: every step's
forward sees every earlier step's update. Whatever reads the parameters between steps (validation,
checkpoints, the end of the run) calls ``flush()`` first, which replays the update alone; a new shape's
capture flushes before its warm-up. An ``apply`` flag on the device makes the update of a step with
nothing pending leave every tensor as it was.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from seqcls.trainer import clip_and_update, total_grad_norm

log = logging.getLogger("seqcls")


def shape_key(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class StepGraphs:
    """Drop-in for the eager step: ``step(micro_batches)`` returns (summed loss, grad norm) as device tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, forward_loss: Callable[[dict], torch.Tensor],
                 denom: int, max_grad_norm: Optional[float], device: torch.device, one_graph: bool,
                 warmup_iters: int = 2, overlap_model: Optional[torch.nn.Module] = None):
        """``overlap_model``: the model whose forward waits for each part of the overlapped update (see the
        module's notes); None: the update ends each step's graph."""
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
        self.overlap = _Overlap(self, overlap_model) if overlap_model is not None else None

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
            if self.overlap is not None:
                self.overlap.pending = True
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

    def flush(self) -> None:
        """Apply an update the overlapped step left pending (see the module's notes): before anything reads
        the parameters or the optimizer state. A no-op otherwise."""
        if self.overlap is not None:
            self.overlap.flush()

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
        if self.overlap is not None:
            self.overlap.setup()
            return

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
            if self.overlap is not None:
                graph, loss, norm = self.overlap.capture(static)
            elif self.one_graph:  # each warm-up pass starts without gradients, as a step of the graph does
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
            if self.overlap is None:
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


class _WaitingBlocks(torch.nn.ModuleList):
    """The model's list of transformer blocks, calling ``_seqcls_before_block(i)`` as the encoder's loop
    reaches block ``i``: the compiled blocks run their hooks inside the compiled code, so the overlapped
    update's wait goes where the loop (eager) takes each block from the list."""

    def __iter__(self):
        before = self.__dict__.get("_seqcls_before_block")
        for i, block in enumerate(super().__iter__()):
            if before is not None:
                before(i)
            yield block


class _Overlap:
    """The overlapped update of StepGraphs (see the module's notes)."""

    def __init__(self, graphs: StepGraphs, model: torch.nn.Module):
        self.graphs, self.model = graphs, model
        self.pending = False  # a replayed step left its update for the next graph (or flush)
        self.active = False  # inside a step's forward and backward: the hooks act
        self.units: list[list[torch.Tensor]] = []  # the update's parts, in the order it launches them
        self.hooked: set[int] = set()  # the parts some forward hook waits for

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        g = self.graphs
        opt, device = g.optimizer, g.device
        g._drop_grads()
        self.kept = opt.keep_grads()
        self.stream = torch.cuda.Stream(device)
        self.apply = torch.zeros((), dtype=torch.float32, device=device)  # 0: nothing pending, nothing moves
        self.scale = torch.ones((), dtype=torch.float32, device=device)  # the pending step's clipping factor
        self.lrs = [group["lr"].clone() for group in opt.param_groups]  # ... and its learning rates
        self._update(record=self.units.append)  # apply 0: learns the parts' order, moves nothing
        unit_of = {p: i for i, unit in enumerate(self.units) for p in unit}
        if set(unit_of) != set(g.params):
            raise RuntimeError("the overlapped update found parameters its optimizer does not update in parts")
        self.unit_of = unit_of
        self.events = [torch.cuda.Event() for _ in self.units]
        self.norms = torch.zeros(len(self.units), dtype=torch.float32, device=device)
        self._install_hooks()
        g._warm_up(lambda: (self._update(), self.apply.zero_()))
        self.flush_graph, _ = self._capture(lambda: (self._update(), self.apply.zero_()))

    def _capture(self, fn: Callable[[], object]):
        """``fn`` captured as a graph of the step graphs' pool: (graph, what fn returned)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graphs.pool, stream=self.graphs.side_stream):
            out = fn()
        return graph, out

    def _install_hooks(self) -> None:
        from seqcls.distributed import find_transformer_blocks
        blocks = find_transformer_blocks(self.model)
        in_blocks = {id(b) for b in blocks}
        for p in self.graphs.params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

        def last_unit(params) -> Optional[int]:
            units = [self.unit_of[p] for p in params if p in self.unit_of]
            return max(units) if units else None

        def walk(module: torch.nn.Module) -> None:
            if id(module) in in_blocks:
                return
            unit = last_unit(module.parameters(recurse=False))
            if unit is not None:  # an eager module outside the compiled blocks
                module.register_forward_pre_hook(lambda m, args, unit=unit: self._wait(unit))
                self.hooked.add(unit)
            for child in module.children():
                walk(child)

        walk(self.model)
        if blocks:
            holder = next(m for m in self.model.modules()
                          if isinstance(m, torch.nn.ModuleList) and len(m) and m[0] is blocks[0])
            block_units = [last_unit(b.parameters()) for b in blocks]
            holder.__class__ = _WaitingBlocks
            holder.__dict__["_seqcls_before_block"] = lambda i: (self._wait(block_units[i])
                                                                  if block_units[i] is not None else None)
            self.hooked.update(u for u in block_units if u is not None)

    # ------------------------------------------------------------------ the parts of a step
    def _update(self, record=None) -> None:
        """The pending step's update, in parts (seqcls.optim.MasterWeightAdamW.step with ``kept`` gradients),
        each part's event recorded after it."""
        opt = self.graphs.optimizer
        saved = [group["lr"] for group in opt.param_groups]
        for group, lr in zip(opt.param_groups, self.lrs):
            group["lr"] = lr
        self.next_unit = 0
        opt.kept, opt.apply, opt.grad_scale, opt.unit_done = True, self.apply, self.scale, record or self._record
        try:
            opt.step()
        finally:
            for group, lr in zip(opt.param_groups, saved):
                group["lr"] = lr
            opt.kept, opt.apply, opt.unit_done = False, None, None
            del opt.grad_scale

    def _record(self, params) -> None:
        self.events[self.next_unit].record()
        self.next_unit += 1

    def _wait(self, unit: int) -> None:
        if self.active:
            torch.cuda.current_stream(self.graphs.device).wait_event(self.events[unit])
            self.waited.add(unit)

    def _grad_ready(self, p: torch.Tensor) -> None:
        """A gradient has arrived; once all of its part's have, copy them to the kept buffers (and take
        their norm) on the update's stream, beside the rest of the backward."""
        if not self.active:
            return
        i = self.unit_of[p]
        self.arrived[i] += 1
        if self.arrived[i] < len(self.units[i]):
            return
        ready = torch.cuda.Event()
        ready.record()
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            kept = [self.kept[q] for q in self.units[i]]
            torch._foreach_copy_(kept, [q.grad for q in self.units[i]])
            self.norms[i].copy_(total_grad_norm(kept))

    def body(self, static: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: the pending update beside the forward, the backward, and the next update's factors."""
        g = self.graphs
        main = torch.cuda.current_stream(g.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self._update()
        self.arrived, self.waited, self.active = [0] * len(self.units), set(), True
        try:
            loss = g.forward_loss(static)
            (loss / g.denom).backward()
        finally:
            self.active = False
        if self.waited != self.hooked:
            raise RuntimeError("the overlapped update: the forward did not wait for every part of the update "
                               "(the model's blocks are not called from their list in order); set "
                               "compile.overlap_update=false")
        if any(n < len(unit) for n, unit in zip(self.arrived, self.units)):
            raise RuntimeError("the overlapped update needs a gradient for every trainable parameter every step; "
                               "set compile.overlap_update=false")
        main.wait_stream(self.stream)
        norm = torch.linalg.vector_norm(self.norms)
        if g.max_grad_norm is None:
            self.scale.fill_(1.0)
            norm = torch.zeros((), device=g.device)
        else:
            self.scale.copy_(torch.clamp((norm + 1e-6) / g.max_grad_norm, min=1.0))
        for lr, group in zip(self.lrs, g.optimizer.param_groups):
            lr.copy_(group["lr"])
        self.apply.fill_(1.0)
        g._drop_grads()
        return loss.detach(), norm

    def capture(self, static: dict[str, torch.Tensor]):
        """A shape's graph: warmed up with nothing pending (so the warm-ups move nothing), then captured."""
        g = self.graphs
        self.flush()
        g._warm_up(lambda: (self.body(static), self.apply.zero_()))
        graph, (loss, norm) = self._capture(lambda: self.body(static))
        return graph, loss, norm

    def flush(self) -> None:
        if self.pending:
            self.flush_graph.replay()
            self.pending = False
