"""A bucket's master-weight AdamW update as one Triton kernel that reads each gradient where autograd
left it, through a table of the gradients' addresses (``compile.update_kernel=triton``); and the word
embeddings' AdamW row by row, lazily (``compile.lazy_embedding_update``, LazyRows below).

seqcls.optim updates a bucket of bf16 weights (two transformer blocks: ~25M weights, 32 tensors) in one
kernel over flat fp32 masters and moments. Inductor's version reads the gradients either from a copy laid
end to end first (one more pass over them) or in place through its pointwise concatenation, where every
element issues a masked load for each of the bucket's tensors. On an H100 (roberta-large full fine-tuning,
b32) the in-place kernels ran at ~2.5 TB/s against ~2.95 TB/s for the kernel reading a flat copy
(docs/benchmarks.md). Here each program updates one block of one tensor, as torch's multi-tensor kernels
do: it looks up its tensor's address once and reads its gradients with plain contiguous loads.

The arithmetic is seqcls.optim._master_update's, in the same order, in fp32: AdamW (decoupled weight
decay) or Adam (L2), the gradient divided by ``grad_scale`` (the clipping factor), the master rounded to
the bf16 weight (round to nearest even, as torch rounds it).

The gradients' addresses go to the GPU as a small table copied in the same stream; under a CUDA-graph
capture from a row of pinned host memory set aside for that graph, which the graph's copy reads again at
every replay (the gradients a graph allocates lie at the same addresses at every replay).
"""

from __future__ import annotations

import torch

BLOCK = 2048  # elements a program updates: one block of one tensor
NUM_WARPS = 8
CAPTURES = 256  # the most CUDA graphs (batch shapes) a bucket's update may be captured in

_kernel = None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_blocks(grad_addrs, block_tensor, block_start, tensor_offset, tensor_numel, weight, master, exp_avg,
                     exp_avg_sq, step_size_ptr, bc2_ptr, lr_ptr, scale_ptr, one_minus_beta1, beta2, one_minus_beta2,
                     eps, wd, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        t = tl.load(block_tensor + b)
        idx = tl.load(block_start + b) + tl.arange(0, BLOCK)
        mask = idx < tl.load(tensor_numel + t)
        flat = tl.load(tensor_offset + t) + idx
        grad = tl.load(grad_addrs + t).to(tl.pointer_type(weight.dtype.element_ty), bitcast=True)
        g = tl.load(grad + idx, mask=mask).to(tl.float32) / tl.load(scale_ptr)
        p = tl.load(master + flat, mask=mask)
        if HAS_WD:
            if DECOUPLED:
                p = p * (1.0 - tl.load(lr_ptr) * wd)
            else:
                g = g + wd * p
        m = tl.load(exp_avg + flat, mask=mask)
        m = m + one_minus_beta1 * (g - m)  # torch's lerp for a weight below 0.5
        v = tl.load(exp_avg_sq + flat, mask=mask) * beta2 + one_minus_beta2 * g * g
        p = p - m / (tl.sqrt(v) / tl.load(bc2_ptr) + eps) * tl.load(step_size_ptr)
        tl.store(exp_avg + flat, m, mask=mask)
        tl.store(exp_avg_sq + flat, v, mask=mask)
        tl.store(master + flat, p, mask=mask)
        # bf16 rounded to nearest even from the bits (as torch's copy_ rounds; Triton's interpreter truncates)
        bits = p.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = tl.where(p != p, p.to(tl.bfloat16), bits.to(tl.uint16).to(tl.bfloat16, bitcast=True))
        tl.store(weight + flat, w, mask=mask)
    return adamw_blocks


class BlockTable:
    """A bucket's static layout for the kernel: which tensor and where in it each program starts, and each
    tensor's offset in the flat buffers and size (device tensors made once, outside any capture)."""

    def __init__(self, numels: list[int], device: torch.device, block: int = 0):
        block = block or BLOCK
        tensors, starts = [], []
        for t, n in enumerate(numels):
            for s in range(0, n, block):
                tensors.append(t)
                starts.append(s)
        offsets = [0]
        for n in numels[:-1]:
            offsets.append(offsets[-1] + n)
        self.block = block
        self.block_tensor = torch.tensor(tensors, dtype=torch.int32, device=device)
        self.block_start = torch.tensor(starts, dtype=torch.int64, device=device)
        self.tensor_offset = torch.tensor(offsets, dtype=torch.int64, device=device)
        self.tensor_numel = torch.tensor(numels, dtype=torch.int64, device=device)
        # One row of addresses a captured graph, pinned now: no host allocation may happen inside a capture,
        # and a graph's copy reads its row again at every replay.
        self.pinned = (torch.zeros((CAPTURES, len(numels)), dtype=torch.int64, pin_memory=True)
                       if device.type == "cuda" else None)
        self.captured = 0

    def grad_addresses(self, grads: list[torch.Tensor]) -> torch.Tensor:
        addrs = [g.data_ptr() for g in grads]
        device = grads[0].device
        if device.type != "cuda":
            return torch.tensor(addrs, dtype=torch.int64, device=device)
        if not torch.cuda.is_current_stream_capturing():
            return torch.tensor(addrs, dtype=torch.int64).to(device)  # pageable: the host waits for the copy
        if self.captured == CAPTURES:
            raise RuntimeError(f"compile.update_kernel=triton: more than {CAPTURES} step graphs captured; "
                               "use compile.update_kernel=inductor")
        row = self.pinned[self.captured]
        self.captured += 1
        row.copy_(torch.tensor(addrs, dtype=torch.int64))
        return row.to(device, non_blocking=True)


def multi_tensor_update(table: BlockTable, param: torch.Tensor, master: torch.Tensor, grads: list[torch.Tensor],
                        exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step_size: torch.Tensor,
                        bias_correction2_sqrt: torch.Tensor, lr: torch.Tensor, grad_scale: torch.Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool) -> None:
    """seqcls.optim._master_update of a bucket (flat ``param``, ``master``, moments) whose gradients
    ``grads`` (same dtype as ``param``, contiguous, in the bucket's order) are read where they lie. ``lr``
    is a device tensor, as MasterWeightAdamW(compiled=True) has it."""
    global _kernel
    if _kernel is None:
        _kernel = _build()
    if param.dtype != torch.bfloat16 or any(not g.is_contiguous() or g.dtype != param.dtype for g in grads):
        raise ValueError("the multi-tensor update takes bf16 weights and contiguous gradients of that dtype")
    blocks = table.block_tensor.numel()
    _kernel[(blocks,)](table.grad_addresses(grads), table.block_tensor, table.block_start, table.tensor_offset,
                       table.tensor_numel, param, master, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt,
                       lr, grad_scale, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, DECOUPLED=bool(decoupled),
                       HAS_WD=bool(weight_decay), BLOCK=table.block, num_warps=NUM_WARPS)


# ---------------------------------------------------------------------------------- the embeddings' rows
_rows_kernel = None


def _build_rows():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_rows(param, source, exp_avg, exp_avg_sq, last, wanted, step_size_hist, bc2_hist, decay_hist, step_ptr,
                   scale_ptr, n, width, capacity, one_minus_beta1, beta2, one_minus_beta2, eps, wd,
                   DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, MODE: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        t = tl.load(step_ptr).to(tl.int32)
        zero = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(ROWS):
            k = tl.program_id(0) * ROWS + j
            if k < n:
                if MODE == 2:  # catch-up: k-th of the batch's ids; the first program to claim its flag does it
                    r = tl.load(source + k).to(tl.int32)
                else:  # step, flush: k-th row
                    r = k
                offs = r.to(tl.int64) * width + cols
                since = tl.load(last + r)
                g = zero
                if MODE == 0:  # the step: the rows its gradient touched take the steps they skipped, then this one
                    g = tl.load(source + offs, mask=mask, other=0.0) / tl.load(scale_ptr)
                    go = tl.sum((g != 0).to(tl.int32), axis=0) > 0  # a NaN counts as touched
                elif MODE == 1:  # flush: every row that is behind takes its zero-gradient steps up to step t
                    go = t > since
                else:  # catch up the rows a forward is about to read to step t
                    go = (tl.atomic_xchg(wanted + r, 0) != 0) & (t > since)
                if go:
                    p = tl.load(param + offs, mask=mask)
                    m = tl.load(exp_avg + offs, mask=mask)
                    v = tl.load(exp_avg_sq + offs, mask=mask)
                    for s in range(since + 1, t + 1):
                        i = s % capacity
                        gs = tl.where(s == t, g, zero)
                        if HAS_WD:
                            if DECOUPLED:
                                p = p * tl.load(decay_hist + i)
                            else:
                                gs = gs + wd * p
                        m = m + one_minus_beta1 * (gs - m)
                        v = v * beta2 + one_minus_beta2 * gs * gs
                        p = p - m / (tl.sqrt(v) / tl.load(bc2_hist + i) + eps) * tl.load(step_size_hist + i)
                    tl.store(param + offs, p, mask=mask)
                    tl.store(exp_avg + offs, m, mask=mask)
                    tl.store(exp_avg_sq + offs, v, mask=mask)
                    tl.store(last + r, t)
    return adamw_rows


class LazyRows:
    """AdamW (or Adam) of one fp32 embedding matrix, row by row and lazily.

    A batch's gradient is zero in every row of a token the batch does not hold (a b32 MRPC batch of ~1,700
    tokens touches at most that many of roberta's 50,265 rows), yet AdamW moves each such row every step (its
    moments decay, weight decay and the momentum move the weight), so a dense update reads and writes all of the
    matrix's fp32 weights and moments each step (52M weights, 1.46 GB: 0.44 ms of full FT b32's step on an
    H100). Here a row takes those zero-gradient steps only when a forward is about to read it (catch_up, for the
    rows of the batch's token ids, so the forward sees what the dense update would have left), or at a flush
    (before anything else reads the weights or the state): then it replays them one by one, with each step's own
    step size and decay, which ``record`` keeps in a ring of ``capacity`` steps. The step kernel reads the
    gradient once, and only the touched rows' weights and moments. The arithmetic is
    seqcls.optim._master_update's in fp32 (with the gradient of a skipped step exactly zero), not torch's fused
    kernel's: the same up to float rounding order. ``capacity`` must exceed the steps between flushes (the run's
    steps, as build sets it).
    """

    def __init__(self, param: torch.Tensor, capacity: int):
        rows = param.shape[0]
        self.width = param.numel() // rows
        self.capacity = capacity
        self.last = torch.zeros(rows, dtype=torch.int32, device=param.device)  # the step each row has reached
        self.wanted = torch.zeros(rows, dtype=torch.int32, device=param.device)  # rows a forward is about to read
        self.hist = torch.zeros((3, capacity), dtype=torch.float32, device=param.device)  # step size, bc2, decay
        self.one = torch.ones((), dtype=torch.float32, device=param.device)  # the gradient scale without clipping

    def record(self, step: torch.Tensor, step_size: torch.Tensor, bc2: torch.Tensor, decay) -> None:
        """Keep this step's scalars (device tensors; ``step`` already counts it) at its place in the ring."""
        i = (step.to(torch.int64) % self.capacity).reshape(1)
        values = torch.stack([step_size.reshape(()).float(), bc2.reshape(()).float(),
                              torch.as_tensor(decay, dtype=torch.float32, device=self.hist.device).reshape(())])
        self.hist.index_copy_(1, i, values.reshape(3, 1))

    ROWS = 4  # rows a program of the step and the flush (50,265 rows: ~12.6k programs rather than 50k)

    def step(self, param, grad, exp_avg, exp_avg_sq, step, grad_scale, hyper) -> None:
        """This step (``step`` counts it) for the rows ``grad`` touches, after the steps they skipped.
        ``hyper``: (beta1, beta2, eps, weight_decay, decoupled)."""
        if grad.layout != torch.strided or not grad.is_contiguous():
            raise ValueError("the lazy embedding update takes a dense, contiguous gradient (nn.Embedding(sparse=False))")
        self._launch(0, param, grad, self.last.numel(), exp_avg, exp_avg_sq, step, grad_scale, hyper)

    def flush(self, param, exp_avg, exp_avg_sq, step, hyper) -> None:
        """Every row up to ``step``."""
        self._launch(1, param, param, self.last.numel(), exp_avg, exp_avg_sq, step, None, hyper)

    def catch_up(self, ids: torch.Tensor, param, exp_avg, exp_avg_sq, step, hyper) -> None:
        """The rows of ``ids`` (a batch's token ids, repeats and all) up to ``step``, before a forward reads them:
        one program an id; of an id's repeats, the first to clear the row's flag does it."""
        ids = ids.reshape(-1)
        self.wanted.index_fill_(0, ids.to(torch.int64), 1)
        self._launch(2, param, ids, ids.numel(), exp_avg, exp_avg_sq, step, None, hyper, rows=1)

    def _launch(self, mode, param, source, n, exp_avg, exp_avg_sq, step, grad_scale, hyper, rows=ROWS) -> None:
        global _rows_kernel
        if _rows_kernel is None:
            _rows_kernel = _build_rows()
        import triton
        beta1, beta2, eps, weight_decay, decoupled = hyper
        block = triton.next_power_of_2(self.width)
        _rows_kernel[(triton.cdiv(n, rows),)](
            param, source, exp_avg, exp_avg_sq, self.last, self.wanted, self.hist[0], self.hist[1], self.hist[2], step,
            grad_scale if grad_scale is not None else step, n, self.width, self.capacity, 1 - beta1, beta2, 1 - beta2,
            eps, weight_decay, DECOUPLED=bool(decoupled), HAS_WD=bool(weight_decay), MODE=mode, ROWS=rows,
            BLOCK=block, num_warps=4 if block <= 1024 else 8)

    def sync(self, step: torch.Tensor) -> None:
        """After a load: every row holds the state of ``step``."""
        self.last.fill_(int(step.item()))
