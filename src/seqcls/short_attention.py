"""Self-attention over packed short sequences, in Triton: one program per (sequence, head).

``compile.varlen_kernel=short``. FlashAttention's variable-length kernels tile queries and keys by 128
(the memory-efficient kernel's by 64) and, in the backward, add the query gradient across key tiles in
an fp32 buffer padded per sequence; on GLUE's lengths (MRPC: ~53 tokens) most of each tile is empty and
the backward's extra passes dominate. Here a program holds one sequence's keys and values for one head
(at most 256 rows) and walks its query rows in blocks, so every softmax row is whole: no running
maximum, and the backward writes the query gradient of each block directly, with no accumulation
buffer. Programs are launched once for each key-tile width (32, 64, 128, 256 rows), each taking the
sequences whose length falls in its range, so a 40-token sequence is not computed in a 128-wide tile.

Dropout: the mask comes from Philox (a seed drawn on the device at each call, so every CUDA-graph
replay draws a new one) at one call per 8 scores, 16 bits a score: an entry is dropped with probability
round(p * 65536) / 65536 (within 7.7e-6 of p) and the kept ones are scaled by 1 / (1 - p). The
backward regenerates the same mask from the saved seed.

short_attention takes query, key and value as three (tokens, heads, dim) tensors, with query rows of
their own (cu_q; the first-token last layer asks one query a sequence), and returns three gradients;
short_self_attention takes them as the thirds of one fused projection (tokens, 3 * heads * dim),
as training has them, and its backward writes that tensor's gradient whole.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; available() says no
    triton = None

TILES = (32, 64, 128, 256)
"""Key-tile widths: a sequence of n tokens runs in the smallest tile of at least n rows."""
_OFFSETS_PER_PROGRAM = max(TILES) * max(TILES) // 8  # Philox counters one (sequence, head) may use
_PHILOX_ROUNDS = 10  # Philox4x32-10, as cuRAND's and torch's CUDA generator
SEED_BOUND = 2**62  # the dropout seeds' range (Philox's key is 64 bits)
TAILS = False
"""Sequences of 65-96 tokens in a 64-row key tile and a tail of 16 or 32 rows (launches for 65-80 and
81-96) instead of the 128-row tile: on MRPC ~92% of the sequences past 64 tokens are at most 80 long,
so the 128-row tile computes ~44% of its scores on padding. Off (the 128-row tile): on an H100 one layer's
attention at b256 took 0.321 ms with the tails against 0.276 without (0.304 against 0.258 with the
one-block backward), the tails' settings not yet tuned (docs/benchmarks.md, twenty-seventh session)."""
_TAIL_LAUNCHES = ((64, 16), (64, 32))  # (key tile, tail rows)
# longest length a launch takes (its key tile plus tail) -> (query block, warps, pipeline stages) of the
# forward and of the backward kernel: the query rows a step of a program's loop takes, its warps, and
# Triton's software-pipelining depth of that loop. Tuned on an H200 on MRPC's random b256 batches
# (roberta-large's heads, dropout 0.1; docs/benchmarks.md); the tails' not yet tuned. The 128-row tile's
# backward in one block of 128 rows (8 warps): on an H100 one layer's attention at b32 13% faster, at
# b256 the same, full fine-tuning b32 +1.0% (docs/benchmarks.md, twenty-seventh and twenty-ninth sessions).
_FWD_CONFIG = {32: (32, 2, 3), 64: (64, 4, 3), 80: (32, 4, 2), 96: (32, 4, 2), 128: (32, 4, 2), 256: (32, 8, 3)}
_BWD_CONFIG = {32: (32, 2, 1), 64: (64, 4, 2), 80: (32, 8, 2), 96: (16, 8, 2), 128: (128, 8, 1), 256: (32, 8, 3)}
BWD_ONE_BLOCK = True
"""Self-attention backward in one query block where it covers the key tile, each gradient stored as
soon as it is computed (_bwd_one_block); off: the loop over query blocks with accumulators. The values
are the same either way (tested bit for bit); on an H100 one layer's attention at b256 took 0.258 ms
against the loop's 0.276, and LoRA b256 trained at 38.2-38.3% MFU against 38.0%."""


def available() -> bool:
    """Whether the kernels can run: Triton is installed (on CPU only under TRITON_INTERPRET=1, for tests)."""
    return triton is not None


def supported(query: torch.Tensor, max_len: int, sequences: int = 1) -> bool:
    """Whether this kernel takes the packed query (tokens, heads, dim) of ``sequences`` sequences up to
    ``max_len`` tokens long."""
    return (available() and ((query.is_cuda and torch.version.hip is None)  # written and measured for NVIDIA
                             or os.environ.get("TRITON_INTERPRET") == "1")
            and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] in (16, 32, 64, 128)
            and 0 < max_len <= max(TILES) and _counters_fit(sequences, query.shape[1]))


def _counters_fit(sequences: int, heads: int) -> bool:
    """The dropout's Philox counters are 32-bit: each (sequence, head) takes a range of its own."""
    return sequences * heads * _OFFSETS_PER_PROGRAM < 2**31


if triton is not None:
    @triton.jit
    def _keep(seed, seq, h, H, m0, threshold, BM: tl.constexpr, BN: tl.constexpr, ROW: tl.constexpr,
              C0: tl.constexpr, OFFSETS: tl.constexpr, ROUNDS: tl.constexpr):
        """(BM, BN) dropout keep-mask of query rows m0.. and key columns C0.. of one (sequence, head) whose
        rows are ROW keys wide, the same in the forward and the backward: one Philox call gives 4 x 32
        random bits, 8 entries of 16 bits."""
        W: tl.constexpr = BN // 8
        WR: tl.constexpr = ROW // 8
        base = (seq * H + h) * OFFSETS + m0 * WR + C0 // 8  # each (sequence, head) has OFFSETS counters of its own
        offsets = base + tl.arange(0, BM)[:, None] * WR + tl.arange(0, W)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, offsets, ROUNDS)
        r = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        r = tl.join(r & 0xFFFF, (r >> 16) & 0xFFFF)
        return tl.reshape(r, (BM, BN)) >= threshold

    @triton.jit
    def _load_rows(ptr, rows, stride, h, D: tl.constexpr, inside):
        """Head h's (rows, D) block of a (tokens, heads * D) tensor whose rows lie ``stride`` apart; zeros outside."""
        return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + h * D + tl.arange(0, D)[None, :],
                       mask=inside[:, None], other=0.0)

    @triton.jit
    def _store_rows(ptr, rows, stride, h, D: tl.constexpr, inside, x):
        tl.store(ptr + rows.to(tl.int64)[:, None] * stride + h * D + tl.arange(0, D)[None, :],
                 x.to(ptr.dtype.element_ty), mask=inside[:, None])

    @triton.jit
    def _span(cu_ptr, seq):
        """(first row, rows) of sequence ``seq`` in a packed tensor whose boundaries are ``cu_ptr``."""
        start = tl.load(cu_ptr + seq)
        return start, tl.load(cu_ptr + seq + 1) - start

    @triton.jit
    def _scores(q, k, key_in, scale_log2):
        """Scaled scores in log2 units (for exp2), keys outside the sequence at -inf."""
        return tl.where(key_in[None, :], tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))

    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cuq_ptr, cuk_ptr, seed_ptr,
                    sq, sk, sv, so, H, scale_log2, threshold, inv_keep,
                    LO: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                    DROPOUT: tl.constexpr, OFFSETS: tl.constexpr, ROUNDS: tl.constexpr):
        """Sequences of LO < length <= BN + BT keys: a key tile of BN rows and, if BT, a tail of BT rows."""
        seq, h = tl.program_id(0), tl.program_id(1)
        kstart, length = _span(cuk_ptr, seq)
        if (length > LO) & (length <= BN + BT):
            qstart, queries = _span(cuq_ptr, seq)
            n = tl.arange(0, BN)
            key_in = n < length
            k = _load_rows(k_ptr, kstart + n, sk, h, D, key_in)
            v = _load_rows(v_ptr, kstart + n, sv, h, D, key_in)
            if BT > 0:
                t = BN + tl.arange(0, BT)
                tail_in = t < length
                kt = _load_rows(k_ptr, kstart + t, sk, h, D, tail_in)
                vt = _load_rows(v_ptr, kstart + t, sv, h, D, tail_in)
            seed = tl.load(seed_ptr) if DROPOUT else 0
            for m0 in range(0, queries, BM):
                m = m0 + tl.arange(0, BM)
                q_in = m < queries
                q = _load_rows(q_ptr, qstart + m, sq, h, D, q_in)
                s = _scores(q, k, key_in, scale_log2)
                top = tl.max(s, 1)
                if BT > 0:
                    st = _scores(q, kt, tail_in, scale_log2)
                    top = tl.maximum(top, tl.max(st, 1))
                e = tl.exp2(s - top[:, None])
                total = tl.sum(e, 1)
                if BT > 0:
                    et = tl.exp2(st - top[:, None])
                    total += tl.sum(et, 1)
                p = e / total[:, None]
                tl.store(lse_ptr + (qstart + m) * H + h, top + tl.log2(total), mask=q_in)
                if DROPOUT:
                    keep = _keep(seed, seq, h, H, m0, threshold, BM, BN, BN + BT, 0, OFFSETS, ROUNDS)
                    p = tl.where(keep, p * inv_keep, 0.0)
                o = tl.dot(p.to(v.dtype), v)
                if BT > 0:
                    pt = et / total[:, None]
                    if DROPOUT:
                        keep_t = _keep(seed, seq, h, H, m0, threshold, BM, BT, BN + BT, BN, OFFSETS, ROUNDS)
                        pt = tl.where(keep_t, pt * inv_keep, 0.0)
                    o += tl.dot(pt.to(v.dtype), vt)
                _store_rows(o_ptr, qstart + m, so, h, D, q_in, o)

    @triton.jit
    def _bwd_one_block(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, cuq_ptr, seed_ptr, dq_ptr, dk_ptr, dv_ptr,
                       sq, sk, sv, sg, sdq, sdk, sdv, H, scale, scale_log2, threshold, inv_keep, seq, h,
                       kstart, length, LO: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                       DROPOUT: tl.constexpr, OFFSETS: tl.constexpr, ROUNDS: tl.constexpr):
        """_bwd_kernel's work where one block of BM >= BN query rows holds all of a sequence's queries
        (self-attention): no loop and no key/value gradient accumulators; each gradient is stored as soon
        as it is computed, so fewer tiles are live at once. The same operations, so the same values."""
        if (length > LO) & (length <= BN):
            qstart, queries = _span(cuq_ptr, seq)
            n = tl.arange(0, BN)
            key_in = n < length
            m = tl.arange(0, BM)
            q_in = m < queries
            q = _load_rows(q_ptr, qstart + m, sq, h, D, q_in)
            k = _load_rows(k_ptr, kstart + n, sk, h, D, key_in)
            g = _load_rows(g_ptr, qstart + m, sg, h, D, q_in)
            lse = tl.load(lse_ptr + (qstart + m) * H + h, mask=q_in, other=float("inf"))
            p = tl.exp2(_scores(q, k, key_in, scale_log2) - lse[:, None])
            if DROPOUT:
                keep = _keep(tl.load(seed_ptr), seq, h, H, 0, threshold, BM, BN, BN, 0, OFFSETS, ROUNDS)
                pd = tl.where(keep, p * inv_keep, 0.0)
            else:
                pd = p
            _store_rows(dv_ptr, kstart + n, sdv, h, D, key_in, tl.dot(tl.trans(pd.to(g.dtype)), g))
            dp = tl.dot(g, tl.trans(_load_rows(v_ptr, kstart + n, sv, h, D, key_in)))
            if DROPOUT:
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = (p * (dp - tl.sum(p * dp, 1)[:, None])).to(q.dtype)
            _store_rows(dq_ptr, qstart + m, sdq, h, D, q_in, tl.dot(ds, k) * scale)
            _store_rows(dk_ptr, kstart + n, sdk, h, D, key_in, tl.dot(tl.trans(ds), q) * scale)

    @triton.jit
    def _bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, cuq_ptr, cuk_ptr, seed_ptr, dq_ptr, dk_ptr, dv_ptr,
                    sq, sk, sv, sg, sdq, sdk, sdv, H, scale, scale_log2, threshold, inv_keep,
                    LO: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                    DROPOUT: tl.constexpr, OFFSETS: tl.constexpr, ROUNDS: tl.constexpr, ONE_BLOCK: tl.constexpr):
        """Sequences of LO < length <= BN + BT keys: a key tile of BN rows and, if BT, a tail of BT rows
        (ONE_BLOCK only without a tail)."""
        seq, h = tl.program_id(0), tl.program_id(1)
        kstart, length = _span(cuk_ptr, seq)
        if ONE_BLOCK:
            _bwd_one_block(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, cuq_ptr, seed_ptr, dq_ptr, dk_ptr, dv_ptr,
                           sq, sk, sv, sg, sdq, sdk, sdv, H, scale, scale_log2, threshold, inv_keep, seq, h,
                           kstart, length, LO, BN, BM, D, DROPOUT, OFFSETS, ROUNDS)
        elif (length > LO) & (length <= BN + BT):
            qstart, queries = _span(cuq_ptr, seq)
            n = tl.arange(0, BN)
            key_in = n < length
            k = _load_rows(k_ptr, kstart + n, sk, h, D, key_in)
            v = _load_rows(v_ptr, kstart + n, sv, h, D, key_in)
            dk = tl.zeros((BN, D), dtype=tl.float32)
            dv = tl.zeros((BN, D), dtype=tl.float32)
            if BT > 0:
                t = BN + tl.arange(0, BT)
                tail_in = t < length
                kt = _load_rows(k_ptr, kstart + t, sk, h, D, tail_in)
                vt = _load_rows(v_ptr, kstart + t, sv, h, D, tail_in)
                dkt = tl.zeros((BT, D), dtype=tl.float32)
                dvt = tl.zeros((BT, D), dtype=tl.float32)
            seed = tl.load(seed_ptr) if DROPOUT else 0
            for m0 in range(0, queries, BM):
                m = m0 + tl.arange(0, BM)
                q_in = m < queries
                q = _load_rows(q_ptr, qstart + m, sq, h, D, q_in)
                g = _load_rows(g_ptr, qstart + m, sg, h, D, q_in)
                lse = tl.load(lse_ptr + (qstart + m) * H + h, mask=q_in, other=float("inf"))
                # the forward's probabilities; 0 outside the sequence
                p = tl.exp2(_scores(q, k, key_in, scale_log2) - lse[:, None])
                dp = tl.dot(g, tl.trans(v))  # gradient of the (dropped-out) probabilities
                if DROPOUT:
                    keep = _keep(seed, seq, h, H, m0, threshold, BM, BN, BN + BT, 0, OFFSETS, ROUNDS)
                    pd = tl.where(keep, p * inv_keep, 0.0)
                    dp = tl.where(keep, dp * inv_keep, 0.0)
                else:
                    pd = p
                dv += tl.dot(tl.trans(pd.to(g.dtype)), g)
                rowsum = tl.sum(p * dp, 1)
                if BT > 0:
                    pt = tl.exp2(_scores(q, kt, tail_in, scale_log2) - lse[:, None])
                    dpt = tl.dot(g, tl.trans(vt))
                    if DROPOUT:
                        keep_t = _keep(seed, seq, h, H, m0, threshold, BM, BT, BN + BT, BN, OFFSETS, ROUNDS)
                        pdt = tl.where(keep_t, pt * inv_keep, 0.0)
                        dpt = tl.where(keep_t, dpt * inv_keep, 0.0)
                    else:
                        pdt = pt
                    dvt += tl.dot(tl.trans(pdt.to(g.dtype)), g)
                    rowsum += tl.sum(pt * dpt, 1)
                ds = p * (dp - rowsum[:, None])  # softmax backward; the whole row is here
                ds = ds.to(q.dtype)
                dq = tl.dot(ds, k)
                dk += tl.dot(tl.trans(ds), q)
                if BT > 0:
                    dst = (pt * (dpt - rowsum[:, None])).to(q.dtype)
                    dq += tl.dot(dst, kt)
                    dkt += tl.dot(tl.trans(dst), q)
                _store_rows(dq_ptr, qstart + m, sdq, h, D, q_in, dq * scale)
            # every key row is written, zeros where the sequence asks no query
            _store_rows(dk_ptr, kstart + n, sdk, h, D, key_in, dk * scale)
            _store_rows(dv_ptr, kstart + n, sdv, h, D, key_in, dv)
            if BT > 0:
                _store_rows(dk_ptr, kstart + t, sdk, h, D, tail_in, dkt * scale)
                _store_rows(dv_ptr, kstart + t, sdv, h, D, tail_in, dvt)


def _launches(max_len: int):
    """(lowest length exclusive, key tile, tail rows) for each launch that sequences up to ``max_len``
    need; with TAILS, lengths 65-96 in a 64-row tile and a tail instead of the 128-row tile."""
    shapes = [(tile, 0) for tile in TILES]
    if TAILS:
        shapes[2:2] = _TAIL_LAUNCHES
    out, low = [], 0
    for tile, tail in shapes:
        if low >= max_len:
            break
        out.append((low, tile, tail))
        low = tile + tail
    return out


def _dropout_args(dropout: float) -> tuple[int, float]:
    return round(dropout * 65536), (1.0 / (1.0 - dropout) if dropout < 1.0 else 0.0)


@torch.library.custom_op("seqcls::short_attention_fwd", mutates_args=())
def _attention_fwd(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                   cu_k: torch.Tensor, max_len: int, dropout: float,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, heads, dim = query.shape
    out = torch.empty(tokens, heads, dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(tokens, heads, dtype=torch.float32, device=query.device)
    # Drawn on the device: a CUDA-graph replay draws a new seed (a Python int would be baked into the graph).
    # 62 bits of Philox's 64-bit key: two of a long run's millions of calls sharing a mask stays unlikely.
    seed = (torch.randint(0, SEED_BOUND, (1,), dtype=torch.int64, device=query.device) if dropout > 0
            else torch.zeros(1, dtype=torch.int64, device=query.device))  # zeros: the op's outputs are deterministic
    threshold, inv_keep = _dropout_args(dropout)
    for low, tile, tail in _launches(max_len):
        block, warps, stages = _FWD_CONFIG[tile + tail]
        _fwd_kernel[(cu_k.numel() - 1, heads)](
            query, key, value, out, lse, cu_q, cu_k, seed,
            query.stride(0), key.stride(0), value.stride(0), out.stride(0), heads, scale * 1.4426950408889634,
            threshold, inv_keep, LO=low, BN=tile, BT=tail, BM=block, D=dim, DROPOUT=dropout > 0,
            OFFSETS=_OFFSETS_PER_PROGRAM, ROUNDS=_PHILOX_ROUNDS, num_warps=warps, num_stages=stages)
    return out, lse, seed


@_attention_fwd.register_fake
def _(query, key, value, cu_q, cu_k, max_len, dropout, scale):
    tokens, heads, dim = query.shape
    return (query.new_empty(tokens, heads, dim), query.new_empty(tokens, heads, dtype=torch.float32),
            query.new_empty(1, dtype=torch.int64))


def _grad_views(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, fused: bool):
    """dq, dk, dv as views of the backward's one output: with ``fused`` the thirds of the (tokens,
    3 * heads * dim) gradient of a fused projection, else the three gradients laid end to end."""
    if fused:
        return (t.view(query.shape) for t in out.chunk(3, dim=-1))
    nq, nk = query.numel(), key.numel()
    return out[:nq].view(query.shape), out[nq:nq + nk].view(key.shape), out[nq + nk:].view(key.shape)


@torch.library.custom_op("seqcls::short_attention_bwd", mutates_args=())
def _attention_bwd(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   lse: torch.Tensor, seed: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_len: int,
                   dropout: float, scale: float, fused: bool) -> torch.Tensor:
    """The gradients of query, key and value in one tensor (_grad_views): with ``fused`` the (tokens,
    3 * heads * dim) gradient of a fused projection whose thirds they are (self-attention), else flat."""
    tokens, heads, dim = query.shape
    if fused:
        out = torch.empty(tokens, 3 * heads * dim, dtype=query.dtype, device=query.device)
    else:
        out = torch.empty(query.numel() + 2 * key.numel(), dtype=query.dtype, device=query.device)
    dq, dk, dv = _grad_views(out, query, key, fused)
    threshold, inv_keep = _dropout_args(dropout)
    # self-attention (each sequence's queries are its keys) can take the one-block path where a query
    # block covers the key tile
    one_block = BWD_ONE_BLOCK and cu_q.data_ptr() == cu_k.data_ptr()
    for low, tile, tail in _launches(max_len):
        block, warps, stages = _BWD_CONFIG[tile + tail]
        _bwd_kernel[(cu_k.numel() - 1, heads)](
            query, key, value, grad, lse, cu_q, cu_k, seed, dq, dk, dv,
            query.stride(0), key.stride(0), value.stride(0), grad.stride(0), dq.stride(0), dk.stride(0), dv.stride(0),
            heads, scale, scale * 1.4426950408889634, threshold, inv_keep,
            LO=low, BN=tile, BT=tail, BM=block, D=dim, DROPOUT=dropout > 0, OFFSETS=_OFFSETS_PER_PROGRAM,
            ROUNDS=_PHILOX_ROUNDS, ONE_BLOCK=one_block and block >= tile and tail == 0, num_warps=warps,
            num_stages=stages)
    return out


@_attention_bwd.register_fake
def _(grad, query, key, value, lse, seed, cu_q, cu_k, max_len, dropout, scale, fused):
    tokens, heads, dim = query.shape
    return query.new_empty(tokens, 3 * heads * dim) if fused else query.new_empty(query.numel() + 2 * key.numel())


def _setup_context(ctx, inputs, output):
    query, key, value, cu_q, cu_k, max_len, dropout, scale = inputs
    _, lse, seed = output
    ctx.save_for_backward(query, key, value, lse, seed, cu_q, cu_k)
    ctx.max_len, ctx.dropout, ctx.scale = max_len, dropout, scale


def _backward(ctx, grad, _grad_lse, _grad_seed):
    """Three gradients (short_self_attention writes a fused projection's as one tensor)."""
    query, key, value, lse, seed, cu_q, cu_k = ctx.saved_tensors
    grad = grad if grad.stride(-1) == 1 and grad.stride(1) == grad.shape[2] else grad.contiguous()
    out = _attention_bwd(grad, query, key, value, lse, seed, cu_q, cu_k, ctx.max_len, ctx.dropout, ctx.scale, False)
    return *_grad_views(out, query, key, False), None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (tokens, heads, dim) with each token's heads and dims laid out contiguously (what the kernels read)."""
    heads, dim = x.shape[1:]
    return x if x.stride(2) == 1 and x.stride(1) == dim else x.contiguous()


def _check(max_len: int, sequences: int, heads: int) -> None:
    if max_len > max(TILES):
        raise ValueError(f"short_attention takes sequences of up to {max(TILES)} tokens, got max_len {max_len}")
    if not _counters_fit(sequences, heads):
        raise ValueError(f"short_attention takes fewer than {2**31 // _OFFSETS_PER_PROGRAM} (sequence, head) pairs "
                         f"a call, got {sequences} x {heads}")


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                    cu_k: torch.Tensor, max_len: int, *, dropout: float, scale: float) -> torch.Tensor:
    """Attention over packed sequences: query rows [cu_q[i], cu_q[i+1]) attend to key/value rows
    [cu_k[i], cu_k[i+1]) alone (self-attention: the same tensor twice). query (Tq, heads, dim), key and
    value (Tk, heads, dim); cu_* int32 (sequences + 1,), every row inside some sequence, none with more
    than ``max_len`` (at most 256) queries or keys; returns (Tq, heads, dim). Check supported() first."""
    _check(max_len, cu_k.numel() - 1, query.shape[1])
    return _attention_fwd(_rows(query), _rows(key), _rows(value), cu_q, cu_k, int(max_len), float(dropout),
                          float(scale))[0]


class _ShortSelfAttention(torch.autograd.Function):
    """short_attention on the thirds of one (tokens, 3 * heads * dim) tensor, whose gradient the backward
    writes whole: no concatenation of three gradients."""

    @staticmethod
    def forward(ctx, qkv, head_dim: int, cu, max_len: int, dropout: float, scale: float):
        query, key, value = (t.view(qkv.shape[0], -1, head_dim) for t in qkv.chunk(3, dim=-1))
        out, lse, seed = _attention_fwd(query, key, value, cu, cu, max_len, dropout, scale)
        ctx.save_for_backward(qkv, lse, seed, cu)
        ctx.args = head_dim, max_len, dropout, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        qkv, lse, seed, cu = ctx.saved_tensors
        head_dim, max_len, dropout, scale = ctx.args
        query, key, value = (t.view(qkv.shape[0], -1, head_dim) for t in qkv.chunk(3, dim=-1))
        grad = grad if grad.stride(-1) == 1 and grad.stride(1) == grad.shape[2] else grad.contiguous()
        return _attention_bwd(grad, query, key, value, lse, seed, cu, cu, max_len, dropout, scale, True), \
            None, None, None, None, None


def short_self_attention(qkv: torch.Tensor, head_dim: int, cu: torch.Tensor, max_len: int, *, dropout: float,
                         scale: float) -> torch.Tensor:
    """short_attention of query, key and value given as the thirds of ``qkv`` (tokens, 3 * heads * head_dim),
    with the gradient of ``qkv`` written as one tensor; returns (tokens, heads, head_dim)."""
    _check(max_len, cu.numel() - 1, qkv.shape[1] // (3 * head_dim))
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return _ShortSelfAttention.apply(qkv, int(head_dim), cu, int(max_len), float(dropout), float(scale))
