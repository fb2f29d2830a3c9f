"""Triton kernels of the fused forward noise (DESIGN.md sections 1, 2 and 4).

Two noise kernels, each one pass over memory (read x0 / the caller's eps, write the outputs):

* :func:`squeeze_mix_kernel` - specs WITHOUT a spatial part (white or squeeze-only noise: the
  bandwidth-bound case). Grid ``(pixel blocks, B)``; a program holds a ``[CP, BLOCK_PIX]`` tile, all
  channels of BLOCK_PIX pixels of one sample, because the squeeze mixes the channels of a pixel.
* :func:`spectral_kernel` - specs WITH spectral weights and/or per-sample normalisation. Grid
  ``(B,)``; a program keeps a whole ``[CP, HP, WP]`` sample in registers: for each input channel c'
  it draws the white plane, filters it with real DFTs (loops of rank-1 updates whose operands it
  reads back from a per-program ``[2, HP, WP]`` float32 scratch in L1/L2, :func:`_filter_plane`),
  normalises, mixes the draws, and accumulates column c' of S(t) times that plane; then it mixes
  with x0 and stores. DRAM traffic stays that of one pass (the scratch is written and read back by
  the same program at once); nothing spills on sm_90 up to 4 x 32 x 32 samples (anisodiff._autoselect).

Their DDPM-step counterparts, :func:`step_elementwise_kernel` and :func:`step_spectral_kernel`, draw
the same step noise with the same helpers but without the squeeze (the step's channel part is its
Sig matrix), read x_t and the model output, and write x_prev and x0_hat (:func:`_step_and_store`).

The white noise is the canonical stream: element ``i`` of the contiguous ``[B, C, H, W]`` tensor is
lane ``i & 3`` of ``randn4x(seed, offset + (i >> 2))``, with the draw index in Philox counter word 2
(the second draw of an independent two-band spec). It is built from triton.language.random's own
philox / uint_to_uniform_float / pair_uniform_to_normal, so draw 0 is tl.randn4x bit for bit.
Math is float32 throughout; inputs and outputs are float32, float16 or bfloat16 with any strides.
Memory offsets are int64: Triton passes a stride below 2**31 as an i32, so every channel / row /
column index is cast to tl.int64 BEFORE it is multiplied by a stride (an i32 product would wrap on
permuted views whose per-sample span exceeds 2**31 elements).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox, uint_to_uniform_float

# target codes, as in anisodiff.plan.TARGET_CODES
TARGET_V: tl.constexpr = tl.constexpr(1)
TARGET_X0: tl.constexpr = tl.constexpr(2)
TARGET_FLOW: tl.constexpr = tl.constexpr(3)


# ---------------------------------------------------------------------------------------------
# the noise stream
# ---------------------------------------------------------------------------------------------
@triton.jit
def _philox_words(seed, counter, DRAW: tl.constexpr):
    """Philox4x32-10 of int64 counters: word 0/1 = counter low/high, word 2 = draw, word 3 = 0."""
    low = counter.to(tl.uint32)  # truncation keeps the low word
    high = (counter >> 32).to(tl.uint32)
    zero = low * 0
    return philox(seed, low, high, zero + DRAW, zero)


@triton.jit
def normals_per_element(seed, offset, index, DRAW: tl.constexpr):
    """N(0, 1) of the stream elements ``index`` (int64, any shape): lane ``index & 3`` of
    randn4x(seed, offset + (index >> 2)). Any alignment; one Philox call per element."""
    w0, w1, w2, w3 = _philox_words(seed, offset + (index >> 2), DRAW)
    lane = (index & 3).to(tl.int32)
    first_pair = lane < 2  # lanes 0, 1 come from words (0, 1), lanes 2, 3 from words (2, 3)
    u1 = uint_to_uniform_float(tl.where(first_pair, w0, w2))
    u2 = uint_to_uniform_float(tl.where(first_pair, w1, w3))
    n_cos, n_sin = pair_uniform_to_normal(u1, u2)
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def normals_aligned(seed, counter, DRAW: tl.constexpr):
    """All four lanes of 2-D int64 ``counter [R, N]``, interleaved to ``[R, 4 N]``: element
    ``4 j + l`` is lane l of counter j. One Philox call per 4 elements (rows must start on a counter)."""
    w0, w1, w2, w3 = _philox_words(seed, counter, DRAW)
    n0, n1 = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    n2, n3 = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
    # join(join(n0, n2), join(n1, n3))[..., a, b] = n_(2a + b); the row-major reshape flattens (a, b)
    quad = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(quad, [counter.shape[0], 4 * counter.shape[1]])


# ---------------------------------------------------------------------------------------------
# slices of video tensors: s = b F + f (F = 1 for [B, C, H, W]; csrc/include/anisodiff/problem.h)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _slice_offset(s, F, sb, sf):
    """Element offset of slice ``s = b F + f`` of a ``[B, C, F, H, W]`` tensor: ``b sb + f sf``."""
    b = s // F
    return b * sb + (s - b * F) * sf


@triton.jit
def _stream_plane(s, c, C, F, HW):
    """Stream index of element (b, c, f, 0, 0) of slice ``s = b F + f``: ``((b C + c) F + f) H W``
    (the row-major index of ``[B, C, F, H, W]``; F = 1 is the 4-D stream)."""
    b = s // F
    return ((b * C + c) * F + (s - b * F)) * HW


# ---------------------------------------------------------------------------------------------
# per-sample coefficients, channel squeeze, mixing
# ---------------------------------------------------------------------------------------------
@triton.jit
def _coef_row(timesteps_ptr, sample, num_rows):
    """This sample's row of the coefficient table, clamped so nothing is read out of bounds, and
    whether the timestep was valid. For an invalid timestep (a device tensor: the host could not
    check it without a sync) the kernels make a = NaN and the noise NaN, so x_t and every target
    derived from the noise (epsilon, v, flow; the shaped_noise output) become NaN, while the x0
    target is x0 itself (it does not involve the noise). The CUDA kernel behaves the same."""
    t = tl.load(timesteps_ptr + sample)
    valid = (t >= 0) & (t < num_rows)
    return tl.where(valid, t, 0), valid


@triton.jit
def _complement_gain(coef_ptr, row, C: tl.constexpr, K: tl.constexpr, HEISENBERG: tl.constexpr):
    """g in S = g (I - V V^T) + V diag(exp(-r)) V^T: 1 (SDM) or exp(sum_k r_k / (C - k)) (HDM)."""
    g = 1.0
    if HEISENBERG:
        sum_r = 0.0
        for k in tl.static_range(K):
            sum_r += tl.load(coef_ptr + row * (2 + K) + 2 + k)
        g = tl.exp(sum_r / (C - K))
    return g


@triton.jit
def _axis_term(e, axes_ptr, chan, f_minus_g, k, C: tl.constexpr, K: tl.constexpr):
    """``(f_k - g) (v_k . e) v_k`` for a ``[CP, N]`` tile (channels x pixels): the axis-k part of a
    channel matrix ``g I + sum_k (f_k - g) v_k v_k^T``."""
    v_k = tl.load(axes_ptr + chan * K + k, mask=chan < C, other=0.0)
    projection = tl.sum(v_k[:, None] * e, axis=0)  # v_k . e per pixel
    return (f_minus_g * v_k)[:, None] * projection[None, :]


@triton.jit
def _squeeze_tile(eps, coef_ptr, axes_ptr, row, chan, C: tl.constexpr, K: tl.constexpr,
                  HEISENBERG: tl.constexpr):
    """S e = g e + sum_k (f_k - g) (v_k . e) v_k for a ``[CP, N]`` tile (channels x pixels)."""
    n = eps
    if K > 0:
        g = _complement_gain(coef_ptr, row, C, K, HEISENBERG)
        n = g * eps
        for k in tl.static_range(K):
            f_minus_g = tl.exp(-tl.load(coef_ptr + row * (2 + K) + 2 + k)) - g
            n += _axis_term(eps, axes_ptr, chan, f_minus_g, k, C, K)
    return n


@triton.jit
def _step_matrix_tile(e, m_ptr, axes_ptr, chan, C: tl.constexpr, K: tl.constexpr, INVERSE: tl.constexpr):
    """M e for a ddpm_step channel matrix given by its eigenvalues ``m = (perp, axes[K])``:
    ``M = perp I + sum_k (m_k - perp) v_k v_k^T`` (INVERSE: the reciprocal eigenvalues), on a
    ``[CP, N]`` tile; as csrc/include/anisodiff/squeeze.h step_matrix."""
    g = tl.load(m_ptr)
    if INVERSE:
        g = 1.0 / g
    n = g * e
    for k in tl.static_range(K):
        f = tl.load(m_ptr + 1 + k)
        if INVERSE:
            f = 1.0 / f
        n += _axis_term(e, axes_ptr, chan, f - g, k, C, K)
    return n


@triton.jit
def _step_and_store(n, x_ptr, e_ptr, xprev_ptr, x0hat_ptr, x_offs, e_offs, xprev_offs, x0hat_offs, mask,
                    params_ptr, axes_ptr, sample, chan, clip_range, C: tl.constexpr, K: tl.constexpr,
                    CLIP: tl.constexpr):
    """One DDPM step on a ``[CP, N]`` tile, n the generated step noise N(T_w z) (no squeeze): per
    sample, params holds a_t, b_t, then (perp, axes[K]) of S(t), C0, Ct and Sig (problem.h):
    x0_hat = (x_t - b_t eps) / a_t, clipped (CLIP 1: as is, 2: in S(t)^-1 coordinates),
    x_prev = C0 x0_hat + Ct x_t + Sig n."""
    q = params_ptr + sample * (2 + 4 * (1 + K))
    a = tl.load(q)
    b = tl.load(q + 1)
    s_ptr = q + 2
    c0_ptr = s_ptr + (1 + K)
    ct_ptr = c0_ptr + (1 + K)
    sig_ptr = ct_ptr + (1 + K)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + e_offs, mask=mask, other=0.0).to(tl.float32)
    x0 = (x - b * e) / a
    if CLIP == 2:
        x0 = _step_matrix_tile(x0, s_ptr, axes_ptr, chan, C, K, True)
    if CLIP != 0:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    if CLIP == 2:
        x0 = _step_matrix_tile(x0, s_ptr, axes_ptr, chan, C, K, False)
    tl.store(x0hat_ptr + x0hat_offs, x0.to(x0hat_ptr.dtype.element_ty), mask=mask)
    x_prev = (_step_matrix_tile(x, ct_ptr, axes_ptr, chan, C, K, False)
              + (_step_matrix_tile(x0, c0_ptr, axes_ptr, chan, C, K, False)
                 + _step_matrix_tile(n, sig_ptr, axes_ptr, chan, C, K, False)))
    tl.store(xprev_ptr + xprev_offs, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mix_and_store(n, x0_ptr, xt_ptr, out_ptr, x0_offs, xt_offs, out_offs, mask, a, b,
                   HAS_X0: tl.constexpr, TARGET: tl.constexpr, n_in):
    """add_noise: x_t = a x0 + b n_in and the target from n (n_in: n + gamma n' under input
    perturbation, else n itself); shaped_noise (no x0): out = n."""
    if HAS_X0:
        x0 = tl.load(x0_ptr + x0_offs, mask=mask, other=0.0).to(tl.float32)
        x_t = a * x0 + b * n_in
        if TARGET == TARGET_V:
            target = a * n - b * x0
        elif TARGET == TARGET_X0:
            target = x0
        elif TARGET == TARGET_FLOW:
            target = n - x0
        else:  # epsilon: the shaped noise
            target = n
        tl.store(xt_ptr + xt_offs, x_t.to(xt_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_offs, target.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + out_offs, n.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# no spatial part: elementwise over pixels, all channels of a pixel in one program
# ---------------------------------------------------------------------------------------------
@triton.jit
def _block_coords(H, W, C: tl.constexpr, CP: tl.constexpr, BLOCK_PIX: tl.constexpr):
    """This program's sample, first pixel, pixels (h * W + w), h, w, channels and mask; h, w and
    the channels are int64 (they are multiplied by strides), pix stays int32. The grid is 1-D,
    ``B * cdiv(H W, BLOCK_PIX)`` programs, sample-major (ops.elementwise_grid): any batch size (a grid's
    y dimension stops at 65535)."""
    per_sample = tl.cdiv(H * W, BLOCK_PIX)
    pid = tl.program_id(0)
    sample_i32 = pid // per_sample
    sample = sample_i32.to(tl.int64)
    first_pix = (pid - sample_i32 * per_sample) * BLOCK_PIX  # int32: a plane has < 2**31 pixels
    pix = first_pix + tl.arange(0, BLOCK_PIX)  # h * W + w
    chan = tl.arange(0, CP).to(tl.int64)
    mask = (chan[:, None] < C) & (pix[None, :] < H * W)
    h = pix // W  # int32 division, then int64 for the stride products
    w = pix - h * W
    return sample, first_pix, pix, h.to(tl.int64), w.to(tl.int64), chan, mask


@triton.jit
def _white_tile(noise_ptr, n_sb, n_sc, n_sh, n_sw, n_sf, F, stream_ptr, sample, chan, first_pix, pix, h, w, mask,
                HW, C: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_PIX: tl.constexpr,
                DRAW: tl.constexpr = 0):
    """White noise (draw DRAW) of a ``[CP, BLOCK_PIX]`` tile of slice ``sample``: the caller's, or
    the canonical stream."""
    if HAS_NOISE:
        offs = _slice_offset(sample, F, n_sb, n_sf) + chan[:, None] * n_sc + (h * n_sh + w * n_sw)[None, :]
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(stream_ptr)
        offset = tl.load(stream_ptr + 1)
        plane_start = _stream_plane(sample, chan, C, F, HW)  # linear index of (b, c, f, 0, 0)
        if ALIGNED:  # HW % 4 == 0: every block row starts on a counter
            counter = offset + ((plane_start + first_pix) >> 2)[:, None] + tl.arange(0, BLOCK_PIX // 4)[None, :]
            eps = normals_aligned(seed, counter, DRAW)
        else:
            eps = normals_per_element(seed, offset, plane_start[:, None] + pix[None, :], DRAW)
    return eps


@triton.jit
def squeeze_mix_kernel(
    x0_ptr, noise_ptr, xt_ptr, out_ptr,
    timesteps_ptr, coef_ptr, axes_ptr, stream_ptr,
    H, W, num_rows, gamma,
    x0_sb, x0_sc, x0_sh, x0_sw,
    n_sb, n_sc, n_sh, n_sw,
    xt_sb, xt_sc, xt_sh, xt_sw,
    out_sb, out_sc, out_sh, out_sw,
    F, x0_sf, n_sf, xt_sf, out_sf, perturb,
    C: tl.constexpr, K: tl.constexpr, HEISENBERG: tl.constexpr, HAS_X0: tl.constexpr,
    HAS_NOISE: tl.constexpr, TARGET: tl.constexpr, ALIGNED: tl.constexpr, CP: tl.constexpr,
    BLOCK_PIX: tl.constexpr, PERTURB: tl.constexpr = False,
):
    sample, first_pix, pix, h, w, chan, mask = _block_coords(H, W, C, CP, BLOCK_PIX)  # sample: the slice b F + f
    HW = H * W
    eps = gamma * _white_tile(noise_ptr, n_sb, n_sc, n_sh, n_sw, n_sf, F, stream_ptr, sample, chan, first_pix,
                              pix, h, w, mask, HW, C, HAS_NOISE, ALIGNED, BLOCK_PIX)

    row, valid = _coef_row(timesteps_ptr, sample // F, num_rows)
    a = tl.where(valid, tl.load(coef_ptr + row * (2 + K)), float("nan"))
    b = tl.load(coef_ptr + row * (2 + K) + 1)

    n = tl.where(valid, _squeeze_tile(eps, coef_ptr, axes_ptr, row, chan, C, K, HEISENBERG), float("nan"))
    n_in = n
    if PERTURB:  # input perturbation: n' from draw 1 of the stream (always; one draw per elementwise spec)
        eps2 = gamma * _white_tile(noise_ptr, n_sb, n_sc, n_sh, n_sw, n_sf, F, stream_ptr, sample, chan, first_pix,
                                   pix, h, w, mask, HW, C, False, ALIGNED, BLOCK_PIX, 1)
        n_in = n + perturb * _squeeze_tile(eps2, coef_ptr, axes_ptr, row, chan, C, K, HEISENBERG)

    x0_offs = _slice_offset(sample, F, x0_sb, x0_sf) + chan[:, None] * x0_sc + (h * x0_sh + w * x0_sw)[None, :]
    xt_offs = _slice_offset(sample, F, xt_sb, xt_sf) + chan[:, None] * xt_sc + (h * xt_sh + w * xt_sw)[None, :]
    out_offs = _slice_offset(sample, F, out_sb, out_sf) + chan[:, None] * out_sc + (h * out_sh + w * out_sw)[None, :]
    _mix_and_store(n, x0_ptr, xt_ptr, out_ptr, x0_offs, xt_offs, out_offs, mask, a, b, HAS_X0, TARGET, n_in)


@triton.jit
def step_elementwise_kernel(
    x_ptr, e_ptr, noise_ptr, xprev_ptr, x0hat_ptr, params_ptr, axes_ptr, stream_ptr,
    H, W, gamma, clip_range,
    x_sb, x_sc, x_sh, x_sw,
    e_sb, e_sc, e_sh, e_sw,
    n_sb, n_sc, n_sh, n_sw,
    p_sb, p_sc, p_sh, p_sw,
    o_sb, o_sc, o_sh, o_sw,
    F, x_sf, e_sf, n_sf, p_sf, o_sf,
    C: tl.constexpr, K: tl.constexpr, CLIP: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr,
    CP: tl.constexpr, BLOCK_PIX: tl.constexpr,
):
    """ddpm_step without a spatial part: the white step noise of squeeze_mix_kernel (no squeeze)."""
    sample, first_pix, pix, h, w, chan, mask = _block_coords(H, W, C, CP, BLOCK_PIX)  # sample: the slice b F + f
    n = gamma * _white_tile(noise_ptr, n_sb, n_sc, n_sh, n_sw, n_sf, F, stream_ptr, sample, chan, first_pix, pix,
                            h, w, mask, H * W, C, HAS_NOISE, ALIGNED, BLOCK_PIX)
    c2 = chan[:, None]
    h2 = h[None, :]
    w2 = w[None, :]
    _step_and_store(n, x_ptr, e_ptr, xprev_ptr, x0hat_ptr,
                    _slice_offset(sample, F, x_sb, x_sf) + c2 * x_sc + h2 * x_sh + w2 * x_sw,
                    _slice_offset(sample, F, e_sb, e_sf) + c2 * e_sc + h2 * e_sh + w2 * e_sw,
                    _slice_offset(sample, F, p_sb, p_sf) + c2 * p_sc + h2 * p_sh + w2 * p_sw,
                    _slice_offset(sample, F, o_sb, o_sf) + c2 * o_sc + h2 * o_sh + w2 * o_sw,
                    mask, params_ptr, axes_ptr, sample // F, chan, clip_range, C, K, CLIP)


# ---------------------------------------------------------------------------------------------
# spatial part: one program per sample, planes on chip
# ---------------------------------------------------------------------------------------------
@triton.jit
def _white_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                 DRAW: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr,
                 HP: tl.constexpr, WP: tl.constexpr):
    """White plane c_in of slice ``sample`` (= b F + f) of draw DRAW as an ``[HP, WP]`` tile, zero
    outside ``H x W``. HAS_NOISE: the caller's draw DRAW (0 or 1), else the stream."""
    rows = tl.arange(0, HP).to(tl.int64)
    cols = tl.arange(0, WP).to(tl.int64)
    mask = (rows[:, None] < H) & (cols[None, :] < W)
    if HAS_NOISE:
        c64 = tl.full([], c_in, tl.int64)  # the loop index is int32
        # DRAW is 0 or 1: DRAW * n_sd cannot wrap; it is added to the int64 part
        offs = (_slice_offset(sample, F, n_sb, n_sf) + c64 * n_sc + (rows[:, None] * n_sh + cols[None, :] * n_sw)
                + DRAW * n_sd)
        eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        row_start = _stream_plane(sample, c_in, C, F, H * W) + rows * W  # linear index of (b, c_in, f, h, 0)
        if ALIGNED:  # W % 4 == 0: every row starts on a counter
            counter = offset + (row_start >> 2)[:, None] + tl.arange(0, WP // 4)[None, :]
            eps = normals_aligned(seed, counter, DRAW)
        else:
            eps = normals_per_element(seed, offset, row_start[:, None] + cols[None, :], DRAW)
        eps = tl.where(mask, eps, 0.0)
    return eps


@triton.jit
def _to_scratch(scratch_ptr, re, im, HP: tl.constexpr, WP: tl.constexpr):
    """Store a complex ``[HP, WP]`` tile (real part, imaginary part) to this program's scratch,
    between barriers: every thread of the program has finished reading the previous contents, and
    sees all of the new ones before it reads them (the DFT loops read rows / columns that other
    threads wrote). The scratch is global memory, but it stays in L1/L2: the program writes and
    reads it back at once (``2 HP WP`` floats, 32 KB at 64 x 64)."""
    offs = tl.arange(0, HP)[:, None] * WP + tl.arange(0, WP)[None, :]
    tl.debug_barrier()
    tl.store(scratch_ptr + offs, re)
    tl.store(scratch_ptr + HP * WP + offs, im)
    tl.debug_barrier()


@triton.jit
def _dft_left(scratch_ptr, cos_ptr, sin_ptr, HP: tl.constexpr, WP: tl.constexpr, KB: tl.constexpr):
    """``(C p + S q, S p - C q)`` with ``p + i q`` the complex ``[HP, WP]`` tile in the scratch and
    C, S the symmetric ``[HP, HP]`` DFT tables, as a loop of rank-KB updates over the table rows (row
    k of C is column k; the zero rows of the padding add zeros): only the two accumulators stay
    live, whatever the plane size (a tl.dot keeps whole operand rows / columns per thread and
    spilled from 32 x 32 planes on). KB: 1 on a GPU, 16 in the interpreter (fewer, vectorised steps)."""
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    kb = tl.arange(0, KB)
    first = tl.zeros([HP, WP], dtype=tl.float32)
    second = tl.zeros([HP, WP], dtype=tl.float32)
    # constexpr bounds (the interpreter cannot range over a runtime int), not unrolled (registers)
    for k0 in tl.range(0, HP, KB, loop_unroll_factor=1):
        if KB == 1:  # rank-1 update: 2-D tiles only (a [1, HP, WP] sum costs registers on sm_90)
            p = tl.load(scratch_ptr + k0 * WP + cols)[None, :]  # row k0
            q = tl.load(scratch_ptr + HP * WP + k0 * WP + cols)[None, :]
            c = tl.load(cos_ptr + k0 * HP + rows)[:, None]  # column k0
            s = tl.load(sin_ptr + k0 * HP + rows)[:, None]
            first += c * p + s * q
            second += s * p - c * q
        else:
            k = k0 + kb
            p = tl.load(scratch_ptr + k[:, None] * WP + cols[None, :])[:, None, :]  # rows k: [KB, 1, WP]
            q = tl.load(scratch_ptr + HP * WP + k[:, None] * WP + cols[None, :])[:, None, :]
            c = tl.load(cos_ptr + k[:, None] * HP + rows[None, :])[:, :, None]  # columns k: [KB, HP, 1]
            s = tl.load(sin_ptr + k[:, None] * HP + rows[None, :])[:, :, None]
            first += tl.sum(c * p + s * q, axis=0)
            second += tl.sum(s * p - c * q, axis=0)
    return first, second


@triton.jit
def _dft_right(scratch_ptr, cos_ptr, sin_ptr, HP: tl.constexpr, WP: tl.constexpr, KB: tl.constexpr):
    """``(p C - q S, p S + q C)`` with ``p + i q`` the complex ``[HP, WP]`` tile in the scratch and
    C, S the symmetric ``[WP, WP]`` DFT tables: rank-KB updates over the table rows (as _dft_left)."""
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    kb = tl.arange(0, KB)
    first = tl.zeros([HP, WP], dtype=tl.float32)
    second = tl.zeros([HP, WP], dtype=tl.float32)
    for k0 in tl.range(0, WP, KB, loop_unroll_factor=1):
        if KB == 1:
            p = tl.load(scratch_ptr + rows * WP + k0)[:, None]  # column k0
            q = tl.load(scratch_ptr + HP * WP + rows * WP + k0)[:, None]
            c = tl.load(cos_ptr + k0 * WP + cols)[None, :]  # row k0
            s = tl.load(sin_ptr + k0 * WP + cols)[None, :]
            first += p * c - q * s
            second += p * s + q * c
        else:
            k = k0 + kb
            p = tl.load(scratch_ptr + rows[None, :] * WP + k[:, None])[:, :, None]  # columns k: [KB, HP, 1]
            q = tl.load(scratch_ptr + HP * WP + rows[None, :] * WP + k[:, None])[:, :, None]
            c = tl.load(cos_ptr + k[:, None] * WP + cols[None, :])[:, None, :]  # rows k: [KB, 1, WP]
            s = tl.load(sin_ptr + k[:, None] * WP + cols[None, :])[:, None, :]
            first += tl.sum(p * c - q * s, axis=0)
            second += tl.sum(p * s + q * c, axis=0)
    return first, second


@triton.jit
def _table(ptr, N: tl.constexpr):
    """A symmetric ``[N, N]`` DFT table (cos or sin; zero outside the plane's n x n)."""
    i = tl.arange(0, N)
    return tl.load(ptr + i[:, None] * N + i[None, :])


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b in float32 accumulation. PREC 0: tf32x3 (three TF32 tensor-core products, float32-grade),
    -1: ieee (float32 FMAs, no tensor cores). The interpreter computes both in float32 (numpy)."""
    if PREC == 0:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _filter_plane_dot(x, w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, H, W,
                      HP: tl.constexpr, WP: tl.constexpr, PREC: tl.constexpr):
    """:func:`_filter_plane` as matrix products (tl.dot; tensor cores with tf32x3): with C, S the
    symmetric cos / sin tables and x real, y = F_H x F_W = (a C_W - b S_W) - i (a S_W + b C_W) with
    a = C_H x, b = S_H x; z = w' y (DC bin zeroed, 1 / (H W) folded in); out = Re(conj(F_H) z conj(F_W))
    = u C_W - v S_W with u = C_H z_re + S_H z_imneg, v = S_H z_re - C_H z_imneg. 12 products of
    [HP, HP] x [HP, WP] / [HP, WP] x [WP, WP], no scratch. Returns (the AC part, the DC term)."""
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    plane_mask = (rows[:, None] < H) & (cols[None, :] < W)
    dc = tl.load(w_ptr) * (tl.sum(tl.sum(x, axis=1), axis=0) / (H * W))  # w[0, 0] mean(x) (padding is zero)
    c_h = _table(cos_h_ptr, HP)
    s_h = _table(sin_h_ptr, HP)
    c_w = _table(cos_w_ptr, WP)
    s_w = _table(sin_w_ptr, WP)
    a = _mm(c_h, x, PREC)
    b = _mm(s_h, x, PREC)
    dc_bin = (rows[:, None] == 0) & (cols[None, :] == 0)
    w = tl.load(w_ptr + rows[:, None] * W + cols[None, :], mask=plane_mask & ~dc_bin, other=0.0) * (1.0 / (H * W))
    z_re = w * (_mm(a, c_w, PREC) - _mm(b, s_w, PREC))
    z_imneg = w * (_mm(a, s_w, PREC) + _mm(b, c_w, PREC))
    u = _mm(c_h, z_re, PREC) + _mm(s_h, z_imneg, PREC)
    v = _mm(s_h, z_re, PREC) - _mm(c_h, z_imneg, PREC)
    out = _mm(u, c_w, PREC) - _mm(v, s_w, PREC)
    return out, dc


@triton.jit
def _filter_plane(x, w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, H, W,
                  HP: tl.constexpr, WP: tl.constexpr, KB: tl.constexpr):
    """``(Re(ifft2(w' * fft2(x))), w[0, 0] mean(x))``: the plane filtered by w' = w with the DC bin
    zeroed, and the DC term apart (DC is its own bin, as anisodiff.reference.filter_parts: a huge DC
    weight never costs float32 accuracy in the other bins; the caller adds it) as real DFTs, F = cos - i sin (symmetric), from ``[HP, HP]`` /
    ``[WP, WP]`` tables whose zero padding keeps the padded rows/columns at zero. Each of the four
    one-dimensional transforms is a loop of rank-1 updates (:func:`_dft_left`, :func:`_dft_right`)
    reading its input back from the program's ``[2, HP, WP]`` scratch, so the registers hold two
    ``[HP, WP]`` accumulators (plus the caller's sample): on sm_90 nothing spills up to the "auto"
    limits of anisodiff._autoselect (64 x 64 planes). Plain float32 FMAs (no TF32)."""
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    plane_mask = (rows[:, None] < H) & (cols[None, :] < W)
    dc = tl.load(w_ptr) * (tl.sum(tl.sum(x, axis=1), axis=0) / (H * W))  # w[0, 0] mean(x) (padding is zero)
    # F_H x = a - i b: a = C_H x, b = S_H x (x real: the imaginary part is zero)
    _to_scratch(scratch_ptr, x, tl.zeros([HP, WP], dtype=tl.float32), HP, WP)
    a, b = _dft_left(scratch_ptr, cos_h_ptr, sin_h_ptr, HP, WP, KB)
    # y = F_H x F_W = (a C_W - b S_W) - i (a S_W + b C_W)
    _to_scratch(scratch_ptr, a, b, HP, WP)
    y_re, y_im_neg = _dft_right(scratch_ptr, cos_w_ptr, sin_w_ptr, HP, WP, KB)
    # the weights, with the 1 / (H W) of the inverse transform; the DC bin apart (added at the end)
    dc_bin = (rows[:, None] == 0) & (cols[None, :] == 0)
    w = tl.load(w_ptr + rows[:, None] * W + cols[None, :], mask=plane_mask & ~dc_bin, other=0.0) * (1.0 / (H * W))
    # Re(conj(F_H) z conj(F_W)) with z = w y: (C_H + i S_H) z = u + i v, then Re((u + i v)(C_W + i S_W))
    _to_scratch(scratch_ptr, w * y_re, w * y_im_neg, HP, WP)
    u, v = _dft_left(scratch_ptr, cos_h_ptr, sin_h_ptr, HP, WP, KB)  # z_re + i z_im_neg in the scratch
    _to_scratch(scratch_ptr, u, v, HP, WP)
    out, _ = _dft_right(scratch_ptr, cos_w_ptr, sin_w_ptr, HP, WP, KB)  # u C_W - v S_W
    return out, dc


@triton.jit
def _normalize_plane(x, mask, num_pixels, dc):
    """The SAGD appendix normalisation (x + dc) / (std(x, ddof=0) + 1e-8), the std from x alone (the
    constant DC term does not change it: no accuracy lost to a huge one); padding entries are zero."""
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / num_pixels
    centred = tl.where(mask, x - mean, 0.0)
    std = tl.sqrt(tl.sum(tl.sum(centred * centred, axis=1), axis=0) / num_pixels)
    return tl.where(mask, x + dc, 0.0) * (1.0 / (std + 1e-8))


@triton.jit
def _spatial_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                   w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, plane_mask,
                   DRAW: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr,
                   FILTER: tl.constexpr, NORMALIZE: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                   DFT_BLOCK: tl.constexpr):
    """N(T_w eps) for one plane of one draw."""
    x = _white_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                     DRAW, HAS_NOISE, ALIGNED, HP, WP)
    dc = 0.0
    if FILTER:
        if DFT_BLOCK <= 0:  # DFT as matrix products (tl.dot): 0 = tf32x3, -1 = ieee
            x, dc = _filter_plane_dot(x, w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, H, W, HP, WP, DFT_BLOCK)
        else:  # rank-DFT_BLOCK update loops through the scratch
            x, dc = _filter_plane(x, w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, H, W, HP, WP,
                                  DFT_BLOCK)
    if NORMALIZE:
        x = _normalize_plane(x, plane_mask, H * W, dc)
    elif FILTER:
        x = tl.where(plane_mask, x + dc, 0.0)
    return x


@triton.jit
def _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                  w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, plane_mask, gamma0, gamma1,
                  DRAWS: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr,
                  FILTER: tl.constexpr, NORMALIZE: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                  DFT_BLOCK: tl.constexpr, FIRST_DRAW: tl.constexpr = 0):
    """sum_d gamma_d N(T_{w_d} eps_d) for one plane (before any channel squeeze); draw d is counter
    word 2 = FIRST_DRAW + d of the stream (FIRST_DRAW = DRAWS: the input perturbation's eps')."""
    plane = gamma0 * _spatial_plane(
        noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
        w_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, plane_mask,
        FIRST_DRAW, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
    if DRAWS == 2:  # independent two-band mixture: the second white draw (counter word 2 = 1)
        plane += gamma1 * _spatial_plane(
            noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
            w_ptr + H * W, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr, plane_mask,
            FIRST_DRAW + 1, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
    return plane


@triton.jit
def _stream_words(stream_ptr, HAS_NOISE: tl.constexpr):
    """(seed, offset) of the canonical stream, or zeros when the caller gave the noise."""
    seed = 0
    offset = 0
    if not HAS_NOISE:
        seed = tl.load(stream_ptr)
        offset = tl.load(stream_ptr + 1)
    return seed, offset


@triton.jit
def spectral_kernel(
    x0_ptr, noise_ptr, xt_ptr, out_ptr,
    timesteps_ptr, coef_ptr, axes_ptr, stream_ptr,
    weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr,
    H, W, num_rows, gamma0, gamma1,
    x0_sb, x0_sc, x0_sh, x0_sw,
    n_sd, n_sb, n_sc, n_sh, n_sw,
    xt_sb, xt_sc, xt_sh, xt_sw,
    out_sb, out_sc, out_sh, out_sw,
    F, x0_sf, n_sf, xt_sf, out_sf, perturb,
    C: tl.constexpr, K: tl.constexpr, HEISENBERG: tl.constexpr, DRAWS: tl.constexpr, FILTER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_X0: tl.constexpr, HAS_NOISE: tl.constexpr, TARGET: tl.constexpr,
    ALIGNED: tl.constexpr, CP: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, DFT_BLOCK: tl.constexpr,
    PERTURB: tl.constexpr = False,
):
    sample = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    chan = tl.arange(0, CP)
    plane_mask = (rows[:, None] < H) & (cols[None, :] < W)

    seed, offset = _stream_words(stream_ptr, HAS_NOISE)
    scratch = scratch_ptr + sample * (2 * HP * WP)  # this program's [2, HP, WP] (FILTER only)

    row, valid = _coef_row(timesteps_ptr, sample // F, num_rows)
    g = 1.0
    if K > 0:
        g = _complement_gain(coef_ptr, row, C, K, HEISENBERG)

    noise = tl.zeros([CP, HP, WP], dtype=tl.float32)
    pert = tl.zeros([CP, HP, WP], dtype=tl.float32)  # the input perturbation n' (PERTURB only)
    p_seed = tl.load(stream_ptr)  # eps' always comes from the stream, also when the caller gave eps
    p_offset = tl.load(stream_ptr + 1)
    for c_in in range(0, C):  # C is a constexpr: a plain loop (the interpreter cannot range over a runtime int)
        plane = _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                              weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch, plane_mask,
                              gamma0, gamma1, DRAWS, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
        # column c_in of S(t) = g I + sum_k (f_k - g) v_k v_k^T
        column = tl.where(chan == c_in, g, 0.0)
        for k in tl.static_range(K):
            f_minus_g = tl.exp(-tl.load(coef_ptr + row * (2 + K) + 2 + k)) - g
            v_k = tl.load(axes_ptr + chan * K + k, mask=chan < C, other=0.0)
            column += (f_minus_g * tl.load(axes_ptr + c_in * K + k)) * v_k
        noise += column[:, None, None] * plane[None, :, :]
        if PERTURB:  # the same operator on draws DRAWS + d of the stream
            plane2 = _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, p_seed, p_offset, sample, c_in,
                                   C, H, W, weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch,
                                   plane_mask, gamma0, gamma1, DRAWS, False, ALIGNED, FILTER, NORMALIZE, HP, WP,
                                   DFT_BLOCK, DRAWS)
            pert += column[:, None, None] * plane2[None, :, :]

    a = tl.where(valid, tl.load(coef_ptr + row * (2 + K)), float("nan"))
    b = tl.load(coef_ptr + row * (2 + K) + 1)
    noise = tl.where(valid, noise, float("nan"))
    c3 = chan.to(tl.int64)[:, None, None]
    h3 = rows.to(tl.int64)[None, :, None]
    w3 = cols.to(tl.int64)[None, None, :]
    mask = (c3 < C) & plane_mask[None, :, :]
    x0_offs = _slice_offset(sample, F, x0_sb, x0_sf) + c3 * x0_sc + h3 * x0_sh + w3 * x0_sw
    xt_offs = _slice_offset(sample, F, xt_sb, xt_sf) + c3 * xt_sc + h3 * xt_sh + w3 * xt_sw
    out_offs = _slice_offset(sample, F, out_sb, out_sf) + c3 * out_sc + h3 * out_sh + w3 * out_sw
    noise_in = noise
    if PERTURB:
        noise_in = noise + perturb * tl.where(valid, pert, float("nan"))
    _mix_and_store(noise, x0_ptr, xt_ptr, out_ptr, x0_offs, xt_offs, out_offs, mask, a, b, HAS_X0, TARGET, noise_in)


@triton.jit
def spectral_channels_kernel(
    x0_ptr, noise_ptr, xt_ptr, out_ptr,
    timesteps_ptr, coef_ptr, axes_ptr, stream_ptr,
    weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr,
    H, W, num_rows, gamma0, gamma1,
    x0_sb, x0_sc, x0_sh, x0_sw,
    n_sd, n_sb, n_sc, n_sh, n_sw,
    xt_sb, xt_sc, xt_sh, xt_sw,
    out_sb, out_sc, out_sh, out_sw,
    F, x0_sf, n_sf, xt_sf, out_sf,
    C: tl.constexpr, K: tl.constexpr, HEISENBERG: tl.constexpr, DRAWS: tl.constexpr, FILTER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_X0: tl.constexpr, HAS_NOISE: tl.constexpr, TARGET: tl.constexpr,
    ALIGNED: tl.constexpr, KP: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, DFT_BLOCK: tl.constexpr,
):
    """:func:`spectral_kernel` for samples too large to keep on chip (many channels: SD3 / Flux 16,
    representation-autoencoder 768): one program per slice holds only the k projections
    ``u_k = v_k . n_sp`` (``[KP, HP, WP]``) and one plane. Pass 1 filters every plane and accumulates
    u; pass 2 filters each plane again (the same stream, the same float32 ops: the same values) and
    stores ``S n_sp = g n_sp + sum_k (f_k - g) v_k u_k`` channel by channel, mixed with x0. DRAM
    traffic stays one pass; the spatial work doubles when there is a squeeze (K > 0), and without
    one there is only pass 2."""
    sample = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    kk = tl.arange(0, KP)
    plane_mask = (rows[:, None] < H) & (cols[None, :] < W)
    seed, offset = _stream_words(stream_ptr, HAS_NOISE)
    scratch = scratch_ptr + sample * (2 * HP * WP)

    row, valid = _coef_row(timesteps_ptr, sample // F, num_rows)
    g = 1.0
    if K > 0:
        g = _complement_gain(coef_ptr, row, C, K, HEISENBERG)
    r = tl.load(coef_ptr + row * (2 + K) + 2 + kk, mask=kk < K, other=0.0)
    f_minus_g = tl.where(kk < K, tl.exp(-r) - g, 0.0)  # [KP]
    u = tl.zeros([KP, HP, WP], dtype=tl.float32)
    if K > 0:
        for c_in in range(0, C):
            plane = _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C,
                                  H, W, weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch, plane_mask,
                                  gamma0, gamma1, DRAWS, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
            v_c = tl.load(axes_ptr + c_in * K + kk, mask=kk < K, other=0.0)  # row c_in of the axes
            u += v_c[:, None, None] * plane[None, :, :]

    a = tl.where(valid, tl.load(coef_ptr + row * (2 + K)), float("nan"))
    b = tl.load(coef_ptr + row * (2 + K) + 1)
    h2 = rows.to(tl.int64)[:, None]
    w2 = cols.to(tl.int64)[None, :]
    x0_base = _slice_offset(sample, F, x0_sb, x0_sf) + h2 * x0_sh + w2 * x0_sw
    xt_base = _slice_offset(sample, F, xt_sb, xt_sf) + h2 * xt_sh + w2 * xt_sw
    out_base = _slice_offset(sample, F, out_sb, out_sf) + h2 * out_sh + w2 * out_sw
    for c_in in range(0, C):
        plane = _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C,
                              H, W, weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch, plane_mask,
                              gamma0, gamma1, DRAWS, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
        n = plane
        if K > 0:
            v_c = tl.load(axes_ptr + c_in * K + kk, mask=kk < K, other=0.0)
            n = g * plane + tl.sum((f_minus_g * v_c)[:, None, None] * u, axis=0)
        n = tl.where(valid, n, float("nan"))
        c64 = tl.full([], c_in, tl.int64)
        _mix_and_store(n, x0_ptr, xt_ptr, out_ptr, x0_base + c64 * x0_sc, xt_base + c64 * xt_sc,
                       out_base + c64 * out_sc, plane_mask, a, b, HAS_X0, TARGET, n)


@triton.jit
def step_spectral_kernel(
    x_ptr, e_ptr, noise_ptr, xprev_ptr, x0hat_ptr, params_ptr, axes_ptr, stream_ptr,
    weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch_ptr,
    H, W, gamma0, gamma1, clip_range,
    x_sb, x_sc, x_sh, x_sw,
    e_sb, e_sc, e_sh, e_sw,
    n_sd, n_sb, n_sc, n_sh, n_sw,
    p_sb, p_sc, p_sh, p_sw,
    o_sb, o_sc, o_sh, o_sw,
    F, x_sf, e_sf, n_sf, p_sf, o_sf,
    C: tl.constexpr, K: tl.constexpr, CLIP: tl.constexpr, DRAWS: tl.constexpr, FILTER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_NOISE: tl.constexpr, ALIGNED: tl.constexpr, CP: tl.constexpr,
    HP: tl.constexpr, WP: tl.constexpr, DFT_BLOCK: tl.constexpr,
):
    """ddpm_step with spectral weights and/or per-sample normalisation: the step noise of
    spectral_kernel without the squeeze (its channel part is the step's Sig), then the step on the
    sample, flattened to a ``[CP, HP WP]`` tile."""
    sample = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, HP)
    cols = tl.arange(0, WP)
    chan = tl.arange(0, CP)
    plane_mask = (rows[:, None] < H) & (cols[None, :] < W)
    seed, offset = _stream_words(stream_ptr, HAS_NOISE)
    scratch = scratch_ptr + sample * (2 * HP * WP)  # this program's [2, HP, WP] (FILTER only)

    noise = tl.zeros([CP, HP, WP], dtype=tl.float32)
    for c_in in range(0, C):
        plane = _shaped_plane(noise_ptr, n_sd, n_sb, n_sc, n_sh, n_sw, n_sf, F, seed, offset, sample, c_in, C, H, W,
                              weights_ptr, cos_h_ptr, sin_h_ptr, cos_w_ptr, sin_w_ptr, scratch, plane_mask,
                              gamma0, gamma1, DRAWS, HAS_NOISE, ALIGNED, FILTER, NORMALIZE, HP, WP, DFT_BLOCK)
        noise += tl.where(chan == c_in, 1.0, 0.0)[:, None, None] * plane[None, :, :]

    n = tl.reshape(noise, [CP, HP * WP])  # row-major: pixel h * WP + w
    pix = tl.arange(0, HP * WP)
    h2 = (pix // WP).to(tl.int64)[None, :]
    w2 = (pix % WP).to(tl.int64)[None, :]
    c2 = chan.to(tl.int64)[:, None]
    mask = (c2 < C) & (h2 < H) & (w2 < W)
    _step_and_store(n, x_ptr, e_ptr, xprev_ptr, x0hat_ptr,
                    _slice_offset(sample, F, x_sb, x_sf) + c2 * x_sc + h2 * x_sh + w2 * x_sw,
                    _slice_offset(sample, F, e_sb, e_sf) + c2 * e_sc + h2 * e_sh + w2 * e_sw,
                    _slice_offset(sample, F, p_sb, p_sf) + c2 * p_sc + h2 * p_sh + w2 * p_sw,
                    _slice_offset(sample, F, o_sb, o_sf) + c2 * o_sc + h2 * o_sh + w2 * o_sw,
                    mask, params_ptr, axes_ptr, sample // F, chan, clip_range, C, K, CLIP)
