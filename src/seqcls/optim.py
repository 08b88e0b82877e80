"""AdamW over bf16 working weights with fp32 master copies (full fine-tuning under bf16 autocast).

Under autocast every bf16 matmul reads a bf16 copy of its fp32 weight: each step casts every Linear
weight fp32 -> bf16 in the forward and every weight gradient bf16 -> fp32 in the backward, and the
update then reads and writes fp32 weights and gradients. Keeping the Linear weights themselves in
bf16 removes both casts, and the update reads bf16 gradients. The fp32 masters live in the optimizer
state (``state[p]["master"]``), are updated as AdamW updates an fp32 weight, and are rounded into the
bf16 weight in the same kernel. The forward and backward see exactly what autocast gave them before
(the bf16 rounding of the fp32 weight), so training is the same up to the order of float operations.

Parameters that are not bf16 (embeddings, LayerNorms, biases) have no master and take the fused
AdamW update. ``grad_scale`` (set by ``seqcls.trainer.clip_and_update``) divides every gradient in
the update, as it does for torch's fused AdamW.
"""

from __future__ import annotations

from typing import Optional

import torch


def _master_update(param: torch.Tensor, master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, step: torch.Tensor, lr, grad_scale: torch.Tensor,
                   beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool) -> None:
    """One tensor's update, in torch.optim.AdamW's (decoupled) or Adam's (L2) form; ``step`` already
    counts this step. Compiled on CUDA into one kernel: reads grad, master, moments; writes master,
    moments and the bf16 weight."""
    g = grad.float() / grad_scale
    if weight_decay:
        if decoupled:
            master.mul_(1 - lr * weight_decay)
        else:
            g = g + weight_decay * master
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step = step.double()  # the bias corrections in double, as torch's fused kernels compute them
    bias_correction2_sqrt = (1 - beta2 ** step).sqrt().float()
    step_size = (lr / (1 - beta1 ** step)).float()
    master.sub_(exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps) * step_size)
    param.copy_(master)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (``decoupled_weight_decay=True``) or Adam with fp32 masters for its bf16 parameters."""

    accepts_grad_scale = True  # seqcls.trainer.clip_and_update hands the clipping factor to the update
    grad_scale: Optional[torch.Tensor] = None  # set (and deleted) around step() by clip_and_update

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 decoupled_weight_decay: bool = True, capturable: bool = False, compiled: bool = False,
                 masters: Optional[dict[torch.Tensor, torch.Tensor]] = None):
        """``masters``: bf16 parameter -> the fp32 weight it was rounded from (use_bf16_weights returns
        it); a bf16 parameter without one starts its master from its bf16 value. Only parameters that
        require a gradient should be passed, as for any torch optimizer. ``compiled``: one
        compiled kernel a tensor for the bf16 update (needs ``lr`` as a tensor, else every new learning
        rate would recompile)."""
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, capturable=capturable)
        super().__init__(params, defaults)
        # State from the start (not at the first step): the masters are taken from the fp32 weights now,
        # and a step graph's warm-up saves and puts back all of it (seqcls.step_graph).
        masters = dict(masters or {})
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, masters.get(p))
        self._update = (torch.compile(_master_update, dynamic=True, fullgraph=True) if compiled
                        else _master_update)

    def _init_state(self, p: torch.Tensor, master: Optional[torch.Tensor] = None) -> dict:
        state = self.state[p]
        if not state:
            if master is None and p.dtype == torch.bfloat16:
                master = p.detach().float()
            ref = master if master is not None else p
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(ref, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(ref, memory_format=torch.preserve_format)
            if master is not None:
                state["master"] = master
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps, decoupled = group["lr"], group["weight_decay"], group["eps"], group["decoupled_weight_decay"]
            if torch.is_tensor(lr) and group["params"] and lr.device != group["params"][0].device:
                lr = lr.to(group["params"][0].device)  # torch.distributed.checkpoint's state init sets a CPU 0.0
            fused = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [], "steps": []}
            masters = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                if "master" in state:
                    masters.append((p, state))
                    continue
                for key, value in zip(fused, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    fused[key].append(value)
            if masters:  # one launch counts every tensor's step, not one a tensor
                torch._foreach_add_([state["step"] for _, state in masters], 1)
                scale = self.grad_scale if self.grad_scale is not None else torch.ones((), device=masters[0][0].device)
            for p, state in masters:
                self._update(p.view(-1), state["master"].view(-1), p.grad.view(-1), state["exp_avg"].view(-1),
                             state["exp_avg_sq"].view(-1), state["step"], lr, scale,
                             beta1, beta2, eps, wd, decoupled)
            if fused["params"]:
                torch._foreach_add_(fused["steps"], 1)
                op = torch._fused_adamw_ if decoupled else torch._fused_adam_
                op(fused["params"], fused["grads"], fused["exp_avgs"], fused["exp_avg_sqs"], [], fused["steps"],
                   lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                   grad_scale=self.grad_scale, found_inf=None)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load casts every floating state tensor to its parameter's dtype, which would round
        the fp32 masters and moments of bf16 parameters to bf16: put the saved fp32 values back."""
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    def masters(self) -> dict[torch.Tensor, torch.Tensor]:
        """bf16 parameter -> its fp32 master, for saving the model at full precision."""
        return {p: s["master"] for p, s in self.state.items() if "master" in s}


def use_bf16_weights(model: torch.nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """Put the trainable fp32 weights of the model's Linear layers in bf16. Returns bf16 parameter ->
    the fp32 weight it was rounded from, the masters for MasterWeightAdamW."""
    masters = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad \
                and module.weight.dtype == torch.float32:
            masters[module.weight] = module.weight.detach().clone()
            module.weight.data = module.weight.data.to(torch.bfloat16)
    return masters
