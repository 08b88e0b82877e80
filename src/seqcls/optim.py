"""AdamW over bf16 working weights with fp32 master copies (training under bf16 autocast).

Under autocast every bf16 matmul reads a bf16 copy of its fp32 weight and bias: each step casts them
fp32 -> bf16 in the forward and their gradients bf16 -> fp32 in the backward, and the update then
reads and writes fp32 weights and gradients. Keeping the parameters that autocast reads only as bf16
(Linear weights and biases, the LayerNorms of the bf16 residual stream: use_bf16_weights) in bf16
removes both casts, and the update reads bf16 gradients. The fp32 masters live in the optimizer state
(``state[p]["master"]``), are updated as AdamW updates an fp32 weight, and are rounded into the bf16
weight in the same kernel. The forward and backward see exactly what autocast gave them before (the
bf16 rounding of the fp32 weight), so training is the same up to the order of float operations.

The bf16 parameters are grouped into buckets (whole transformer blocks, weight_buckets) whose
weights, masters and moments lie in flat buffers, and one kernel updates the whole bucket, reading its
gradients where autograd left them (buckets of a few dozen tensors) or from a copy of them end to end.
Parameters that are not bf16 (embeddings, LayerNorms that autocast runs in fp32) have no master and take
the fused AdamW update. ``grad_scale`` (set by
``seqcls.trainer.clip_and_update``) divides every gradient in the update, as it does for torch's
fused AdamW.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _adam_scalars(step: torch.Tensor, lr, beta1: float, beta2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The step size and sqrt of the second bias correction, in double as torch's fused kernels compute
    them; ``step`` already counts this step. Kept out of the update kernel: compiled together, the
    double-precision powers would be evaluated once per element, not once per step."""
    step = step.double()
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt().float()
    step_size = (lr / (1 - beta1 ** step)).float()
    return step_size, bias_correction2_sqrt


def _master_update(param: torch.Tensor, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, step_size: torch.Tensor, bias_correction2_sqrt: torch.Tensor, lr,
                   grad_scale: torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool) -> None:
    """One flat tensor's update, in torch.optim.AdamW's (decoupled) or Adam's (L2) form. Compiled on
    CUDA into one kernel: reads grad, master, moments; writes master, moments and the bf16 weight."""
    g = grad.float() / grad_scale
    if weight_decay:
        if decoupled:
            master.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * master
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    master.sub_(exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps) * step_size)
    param.copy_(master)


IN_PLACE_MAX_TENSORS = 32
"""MasterWeightAdamW(grads_in_place=None) reads the gradients of buckets of at most this many tensors in
place. Each tensor adds a masked load to every element of the update kernel: on an H100 roberta-large's
full fine-tuning buckets (two blocks, 32 tensors) ran +1.3% a step that way, LoRA's one bucket of ~100
small adapter tensors -0.25% (docs/benchmarks.md)."""


def _master_update_in_place(param: torch.Tensor, master: torch.Tensor, grads: list[torch.Tensor], *args) -> None:
    """_master_update of a bucket whose gradients are read where autograd left them. Compiled with
    inductor's pointwise concatenation, the ``torch.cat`` becomes masked loads inside the update kernel
    (one kernel reading each gradient once) rather than a copy of the gradients end to end first."""
    _master_update(param, master, torch.cat([g.reshape(-1) for g in grads]), *args)


def _end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values laid end to end in one flat tensor. One multi-tensor copy rather than
    ``torch.cat``, whose kernel took 124 µs for LoRA's ~100 small gradients on an H200 (docs/benchmarks.md)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    torch._foreach_copy_(list(flat.split([t.numel() for t in tensors])), [t.reshape(-1) for t in tensors])
    return flat


class _FlatBucket:
    """The bf16 parameters of one bucket, with their weights, masters and moments laid end to end in
    flat buffers: one update kernel for the bucket rather than one a tensor (on an H200, roberta-large's
    146 per-tensor kernels took 3.67 ms a step at 2.35 TB/s; buckets of two blocks take 2.06 ms at
    4.1 TB/s, plus 0.44 ms to copy the gradients end to end, docs/benchmarks.md). Each parameter's
    ``.data`` and each state entry are views of those buffers, so state dicts, checkpoints and the step
    graphs' snapshots see ordinary per-tensor state."""

    def __init__(self, params: list[torch.Tensor], masters: list[Optional[torch.Tensor]], state) -> None:
        self.params = params
        numel = sum(p.numel() for p in params)
        device = params[0].device
        self.weight = torch.empty(numel, dtype=torch.bfloat16, device=device)
        self.flat = {key: torch.zeros(numel, dtype=torch.float32, device=device)
                     for key in ("master", "exp_avg", "exp_avg_sq")}
        self.split = False  # set for good once a step leaves some of the bucket without a gradient
        self.table = None  # seqcls.update_kernel.BlockTable, for the Triton update
        offset = 0
        for p, master in zip(params, masters):
            n = p.numel()
            self.flat["master"][offset:offset + n].copy_((master if master is not None else p.detach()).reshape(-1))
            self.weight[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.weight[offset:offset + n].view_as(p)
            state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                        **{key: flat[offset:offset + n].view_as(p) for key, flat in self.flat.items()}}
            offset += n
        self.ptrs = [p.data_ptr() for p in params]

    def relink(self, state) -> None:
        """Put parameters whose tensors were replaced (``p.data = ...``), and any state entry replaced
        with them, back into the flat buffers, keeping their values. (load_state_dict copies into the
        views itself.)"""
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.data_ptr() != self.weight[offset:offset + n].data_ptr():
                self.weight[offset:offset + n].copy_(p.detach().reshape(-1))
                p.data = self.weight[offset:offset + n].view_as(p)
            for key, flat in self.flat.items():
                view = flat[offset:offset + n]
                if state[p][key].data_ptr() != view.data_ptr():
                    view.copy_(state[p][key].reshape(-1))
                    state[p][key] = view.view_as(p)
            offset += n
        self.ptrs = [p.data_ptr() for p in self.params]


def _buckets_of(params: list[torch.Tensor], buckets: Optional[list[list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
    """``params`` cut along ``buckets`` (lists of parameters, in order); what no bucket names forms one more."""
    if buckets is None:
        return [params] if params else []
    wanted = set(params)
    out = [[p for p in b if p in wanted] for b in buckets]
    named = {p for b in out for p in b}
    out.append([p for p in params if p not in named])
    return [b for b in out if b]


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (``decoupled_weight_decay=True``) or Adam with fp32 masters for its bf16 parameters."""

    accepts_grad_scale = True  # seqcls.trainer.clip_and_update hands the clipping factor to the update
    grad_scale: Optional[torch.Tensor] = None  # set (and deleted) around step() by clip_and_update

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 decoupled_weight_decay: bool = True, capturable: bool = False, compiled: bool = False,
                 masters: Optional[dict[torch.Tensor, torch.Tensor]] = None,
                 buckets: Optional[list[list[torch.Tensor]]] = None, grads_in_place: Optional[bool] = False,
                 kernel: str = "inductor", lazy_rows: Optional[dict[torch.Tensor, int]] = None):
        """``masters``: bf16 parameter -> the fp32 weight it was rounded from (use_bf16_weights returns
        it); a bf16 parameter without one starts its master from its bf16 value. ``buckets``: how the
        bf16 parameters are grouped into flat buffers, one update kernel each (weight_buckets gives
        whole blocks); null: one bucket a parameter group. Only parameters that require a gradient
        should be passed, as for any torch optimizer. ``compiled``: the bucket update compiled into
        one kernel (needs ``lr`` as a tensor, else every new learning rate would recompile).
        ``grads_in_place`` (with ``compiled``): the kernel reads each gradient where it lies instead of a
        copy of the bucket's gradients end to end (seqcls's compile.update_reads_grads); None: in buckets
        of at most IN_PLACE_MAX_TENSORS tensors. ``kernel`` (with ``compiled``): "inductor", the compiled
        update above; "triton", seqcls.update_kernel's, which reads every bucket's gradients in place through
        a table of their addresses (``grads_in_place`` then does not apply). ``lazy_rows``: fp32 embedding
        matrix -> the most steps between flushes; each is updated row by row, lazily, by
        seqcls.update_kernel.LazyRows (a CUDA GPU with Triton), and ``flush()`` brings every row up to date
        (state_dict() flushes first)."""
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, capturable=capturable)
        self._buckets: list[list[_FlatBucket]] = []  # one list a parameter group (add_param_group)
        self._given = (dict(masters or {}), buckets)
        super().__init__(params, defaults)
        self._lazy: dict = {}  # fp32 embedding -> its LazyRows
        if lazy_rows:
            from seqcls.update_kernel import LazyRows
            for p, capacity in lazy_rows.items():
                if p.dtype != torch.float32 or p.dim() != 2:
                    raise ValueError("lazy_rows takes fp32 matrices (embeddings), one row a token")
                self._lazy[p] = LazyRows(p, capacity)
        self._lazy_group = {p: g for g in self.param_groups for p in g["params"] if p in self._lazy}
        del self._given  # the fp32 weights now live in the flat masters
        # Static shapes: a kernel per bucket size (whole blocks: a few sizes), not a size-generic one.
        self._update, self._scalars, self._update_in_place = _master_update, _adam_scalars, None
        # The most tensors a bucket may hold and still have its gradients read in place.
        self._in_place_max = {True: math.inf, None: IN_PLACE_MAX_TENSORS, False: 0}[grads_in_place] if compiled else 0
        if kernel not in ("inductor", "triton"):
            raise ValueError(f"kernel must be inductor or triton, got {kernel!r}")
        self._triton = compiled and kernel == "triton"
        if compiled:
            self._update = torch.compile(_master_update, dynamic=False, fullgraph=True)
            self._scalars = torch.compile(_adam_scalars, dynamic=False, fullgraph=True)
            if self._in_place_max:
                self._update_in_place = torch.compile(_master_update_in_place, dynamic=False, fullgraph=True,
                                                      options={"force_pointwise_cat": True})

    def add_param_group(self, param_group: dict) -> None:
        # State from the start (not at the first step): the masters are taken from the fp32 weights now,
        # and a step graph's warm-up saves and puts back all of it (seqcls.step_graph).
        super().add_param_group(param_group)
        masters, buckets = getattr(self, "_given", ({}, None))
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.dtype != torch.bfloat16:
                self._init_state(p)
        low = [p for p in group["params"] if p.dtype == torch.bfloat16]
        self._buckets.append([_FlatBucket(b, [masters.get(p) for p in b], self.state)
                              for b in _buckets_of(low, buckets)])

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buckets in zip(self.param_groups, self._buckets):
            beta1, beta2 = group["betas"]
            lr, wd, eps, decoupled = group["lr"], group["weight_decay"], group["eps"], group["decoupled_weight_decay"]
            if torch.is_tensor(lr) and group["params"] and lr.device != group["params"][0].device:
                lr = lr.to(group["params"][0].device)  # torch.distributed.checkpoint's state init sets a CPU 0.0
            fused = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "steps": []}
            for p in group["params"]:
                if p.grad is not None and p in self._lazy:
                    self._step_lazy(p, group, lr)
                elif p.grad is not None and p.dtype != torch.bfloat16:
                    state = self._init_state(p)
                    for key, value in zip(fused, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                        fused[key].append(value)
            self._step_buckets(buckets, lr, beta1, beta2, eps, wd, decoupled)
            if fused["params"]:
                torch._foreach_add_(fused["steps"], 1)
                op = torch._fused_adamw_ if decoupled else torch._fused_adam_
                op(fused["params"], fused["grads"], fused["exp_avgs"], fused["exp_avg_sqs"], [], fused["steps"],
                   lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                   grad_scale=self.grad_scale, found_inf=None)
        return loss

    def _step_buckets(self, buckets: list[_FlatBucket], lr, beta1, beta2, eps, wd, decoupled) -> None:
        whole, parts = [], []
        for b in buckets:
            if [p.data_ptr() for p in b.params] != b.ptrs:
                b.relink(self.state)
            with_grad = [p for p in b.params if p.grad is not None]
            if len(with_grad) == len(b.params) and not b.split:
                whole.append(b)
            elif with_grad:
                # A parameter without a gradient takes no step (torch's AdamW skips it), so the step
                # counts in the bucket part ways: from now on its tensors are updated one by one.
                b.split = True
                parts.extend(with_grad)
        steps = [self.state[p]["step"] for b in whole for p in b.params] + [self.state[p]["step"] for p in parts]
        if not steps:
            return
        torch._foreach_add_(steps, 1)  # one launch counts every tensor's step
        scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=steps[0].device)
        for b in whole:
            scalars = self._scalars(self.state[b.params[0]]["step"], lr, beta1, beta2)
            rest = (b.flat["exp_avg"], b.flat["exp_avg_sq"], *scalars, lr, scale, beta1, beta2, eps, wd, decoupled)
            grads = [p.grad for p in b.params]
            if self._triton:
                from seqcls.update_kernel import BlockTable, multi_tensor_update
                if b.table is None:  # made at the step graphs' warm-up of the update, before any capture
                    b.table = BlockTable([p.numel() for p in b.params], b.weight.device)
                multi_tensor_update(b.table, b.weight, b.flat["master"], [g.contiguous() for g in grads], *rest)
            elif self.reads_grads_in_place(b):
                self._update_in_place(b.weight, b.flat["master"], grads, *rest)
            else:
                self._update(b.weight, b.flat["master"], _end_to_end(grads), *rest)
        for p in parts:
            state = self.state[p]
            _master_update(p.view(-1), state["master"].view(-1), p.grad.view(-1), state["exp_avg"].view(-1),
                           state["exp_avg_sq"].view(-1), *_adam_scalars(state["step"], lr, beta1, beta2),
                           lr, scale, beta1, beta2, eps, wd, decoupled)

    def _step_lazy(self, p: torch.Tensor, group: dict, lr) -> None:
        state = self._init_state(p)
        state["step"] += 1
        scalars = self._scalars(state["step"], lr, *group["betas"])
        rows = self._lazy[p]
        rows.record(state["step"], *scalars, 1 - lr * group["weight_decay"])
        scale = self.grad_scale if self.grad_scale is not None else rows.one
        rows.step(p.detach(), p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], scale, self._hyper(group))

    @staticmethod
    def _hyper(group: dict) -> tuple:
        return (*group["betas"], group["eps"], group["weight_decay"], group["decoupled_weight_decay"])

    def _lazy_args(self, p: torch.Tensor) -> tuple:
        """What LazyRows' flush and catch_up take besides their own: the weight, its moments, step, hyperparameters."""
        state = self._init_state(p)
        return p.detach(), state["exp_avg"], state["exp_avg_sq"], state["step"], self._hyper(self._lazy_group[p])

    @torch.no_grad()
    def flush(self) -> None:
        """Bring every row of the lazily updated embeddings up to date (before anything reads them or the
        optimizer state: validation, checkpoints, the end of training). A no-op without any."""
        for p, rows in self._lazy.items():
            rows.flush(*self._lazy_args(p))

    def catch_up_hook(self, weight: torch.Tensor):
        """A forward pre-hook for the embedding module of ``weight``: while gradients are on (training),
        the rows of the ids it is about to look up take the steps they owe first."""
        rows = self._lazy[weight]

        def hook(module, args):
            if torch.is_grad_enabled():
                with torch.no_grad():
                    rows.catch_up(args[0], *self._lazy_args(weight))
        return hook

    def state_dict(self) -> dict:
        self.flush()
        return super().state_dict()

    def reads_grads_in_place(self, bucket: _FlatBucket) -> bool:
        """Whether the bucket's update reads its gradients where they lie (else from a copy end to end)."""
        return self._triton or len(bucket.params) <= self._in_place_max

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating state tensor to its parameter's dtype, which would round
        the fp32 masters and moments of bf16 parameters to bf16, and it puts new tensors in place of
        the flat buffers' views: copy the saved values into the views, in fp32."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        views = {p: dict(self.state[p]) for p in params}
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if key == "step" or not torch.is_tensor(value) or not value.is_floating_point():
                    continue
                if key in views[p]:
                    views[p][key].copy_(value.to(views[p][key].device, torch.float32).view_as(views[p][key]))
                    self.state[p][key] = views[p][key]
                else:
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
        for p, rows in self._lazy.items():  # the saved state was flushed: every row is at the saved step
            rows.sync(self.state[p]["step"])

    def masters(self) -> dict[torch.Tensor, torch.Tensor]:
        """bf16 parameter -> its fp32 master, for saving the model at full precision."""
        return {p: s["master"] for p, s in self.state.items() if "master" in s}


def weight_buckets(model: torch.nn.Module, params, max_numel: int = 1 << 25) -> list[list[torch.Tensor]]:
    """``params`` in the model's order, cut into buckets of whole blocks (the parameters under one
    numbered module such as ``encoder.layer.3``; elsewhere under one top-level module), consecutive
    blocks joined while the bucket stays within ``max_numel`` elements. Equal blocks give equal buckets,
    so the compiled update has few sizes, and each bucket's gradients are copied into one flat buffer
    (``max_numel`` bounds that extra memory)."""
    wanted = set(params)
    blocks: list[tuple[str, list[torch.Tensor]]] = []
    for name, p in model.named_parameters():
        if p not in wanted:
            continue
        parts = name.split(".")
        cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)
        key = ".".join(parts[:cut])
        if blocks and blocks[-1][0] == key:
            blocks[-1][1].append(p)
        else:
            blocks.append((key, [p]))
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for _, block in blocks:
        n = sum(p.numel() for p in block)
        if buckets and size + n <= max_numel:
            buckets[-1].extend(block)
            size += n
        else:
            buckets.append(list(block))
            size = n
    return buckets


def use_bf16_weights(model: torch.nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """Put the trainable fp32 parameters that autocast reads only as bf16 (Linear weights and biases,
    AutocastLayerNorm's, seqcls.models.bf16_read_parameters) in bf16. Returns bf16 parameter -> the
    fp32 tensor it was rounded from, the masters for MasterWeightAdamW."""
    from seqcls.models import bf16_read_parameters
    masters = {}
    for p in bf16_read_parameters(model):
        if p.requires_grad and p.dtype == torch.float32:
            masters[p] = p.detach().clone()
            p.data = p.data.to(torch.bfloat16)
    return masters
