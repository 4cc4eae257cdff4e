"""Rotary position embeddings (full or partial) and adaptive XPos.

Shapes: B batch, H heads, T positions, D head dim, R rotary dims (the first R of D are rotated, R even).

RoPE (Su et al. 2021), "rotate half" layout as in transformers and MiniMax-Text-01: for i < R/2 the pair
(x_i, x_{i+R/2}) is rotated by the angle n * theta^(-2i/R) at position n. Dims R..D pass through unchanged.

XPos (Sun et al. 2022, "A Length-Extrapolatable Transformer") multiplies the rotated query at position n by
zeta_i^(g(n)/gamma) and the rotated key at position m by zeta_i^(-g(m)/gamma), zeta_i = (2i + 0.4R) / (1.4R), so that a
score carries the factor zeta_i^((g(n) - g(m))/gamma) < 1 for n > m: attention decays with distance.
With adaptation off, g(n) = n and gamma = xpos_scale_base: the score depends on n - m only.
With adaptation on (`xpos_adapt`):
    gamma_l = xpos_scale_base * (1 + l / max(L - 1, 1))        deeper layers decay more slowly (l in [0, L))
    g(n)    = n                        for n <= L0                (L0 = block_size, the trained length)
    g(n)    = L0 * (1 + ln(n / L0))    for n >  L0                distances beyond the trained length are compressed
g is continuous with slope 1 at L0 and increasing, so scores still decay with distance and never grow.
Because only differences g(n) - g(m) matter, both sides are computed relative to a reference r (the middle of the
current query span, `xpos_scales`): q by zeta^((g(n) - g(r))/gamma), k by zeta^(-(g(m) - g(r))/gamma). This keeps the
factors near 1 at any absolute position, is exact in real arithmetic, and lets cached keys be stored unscaled so that
incremental decoding equals one full pass.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions. Angles are formed in float64 (float32 on devices without it): at
    position 30k a float32 angle is off by ~2e-3 rad, enough to break the shift invariance of scores.

    The rows of positions 0 .. max_positions - 1 are computed once (a non-persistent buffer, in no checkpoint) and a
    forward whose positions are known to stay below `bound` gathers them: one indexing op instead of about a dozen
    (issue 21: a decode step runs this once per token). The rows are the same numbers `angles` gives (same
    arithmetic, tested); positions beyond the table, or no bound, are computed as before."""

    def __init__(self, rotary_dim: int, theta: float = 10000.0, max_positions: int = 0):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta
        table = torch.stack(self.angles(torch.arange(max_positions)[None]), dim=0)[:, 0, 0]  # (2, P, R) cos, sin
        self.register_buffer("table", table, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, R) float32, computed from the positions."""
        dtype = torch.float32 if positions.device.type == "mps" else torch.float64
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=dtype, device=positions.device) / self.rotary_dim
        freqs = positions[:, None, :, None].to(dtype) * self.theta ** -exponent  # (B, 1, T, R/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().float(), emb.sin().float()

    def forward(self, positions: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, R) float32, broadcast over heads. bound: a number every position
        is known to be below (the model passes its key count), so the table can serve them without reading them."""
        if bound is None or bound > self.table.shape[1] or self.table.device != positions.device:
            return self.angles(positions)
        cos, sin = self.table.float()[:, positions].unbind(0)  # 2 x (B, T, R)
        return cos[:, None], sin[:, None]

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}, max_positions={self.table.shape[1]}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of x (B, H, T, D) by cos/sin (B, 1, T, R); the rest passes through."""
    r = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class AdaptiveXPos(nn.Module):
    """The XPos decay factors of one layer (see the module docstring for the formula)."""

    def __init__(self, rotary_dim: int, scale_base: float, layer_idx: int, n_layer: int,
                 trained_length: int, adapt: bool = True):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.adapt = adapt
        self.trained_length = trained_length
        self.gamma = scale_base * (1 + layer_idx / max(n_layer - 1, 1)) if adapt else scale_base
        zeta = (torch.arange(0, rotary_dim, 2, dtype=torch.float64) + 0.4 * rotary_dim) / (1.4 * rotary_dim)
        log_zeta = torch.cat((zeta, zeta)).log()  # (R,), same pairing as rotate_half
        self.register_buffer("log_zeta", log_zeta.float(), persistent=False)

    def warp(self, positions: torch.Tensor) -> torch.Tensor:
        """g(n) in float32 (float64 when computing references)."""
        n = positions.float()
        if not self.adapt:
            return n
        l0 = float(self.trained_length)
        return torch.where(n <= l0, n, l0 * (1 + torch.log(n.clamp_min(1.0) / l0)))

    def xpos_scales(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales for rotated q (B, 1, T, R) and k (B, 1, S, R), relative to the middle of the query span."""
        gq, gk = self.warp(q_positions), self.warp(k_positions)  # (B, T), (B, S)
        ref = 0.5 * (gq.amin(dim=1, keepdim=True) + gq.amax(dim=1, keepdim=True))  # (B, 1)
        q_scale = torch.exp((gq - ref)[:, None, :, None] / self.gamma * self.log_zeta)
        k_scale = torch.exp(-(gk - ref)[:, None, :, None] / self.gamma * self.log_zeta)
        return q_scale, k_scale


def xpos_reference_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                          rotary_dim: int, theta: float, scale_base: float) -> torch.Tensor:
    """Plain XPos (adaptation off) scores q_n . k_m for tests: per pair i, the 2-D rotation by (n - m) * freq_i and the
    factor zeta_i^((n - m) / gamma), written out dimension by dimension. q (T, R), k (S, R) -> (T, S), float64."""
    q, k = q.double(), k.double()
    half = rotary_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    zeta = (2 * torch.arange(half, dtype=torch.float64) + 0.4 * rotary_dim) / (1.4 * rotary_dim)
    dist = (q_pos[:, None] - k_pos[None, :]).double()  # (T, S)
    scores = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for i in range(half):
        a = dist * freq[i]
        q1, q2 = q[:, i, None], q[:, i + half, None]
        k1, k2 = k[None, :, i], k[None, :, i + half]
        # rotation R(n)q . R(m)k = q^T R(m - n) k
        rot = (q1 * k1 + q2 * k2) * torch.cos(a) + (q1 * k2 - q2 * k1) * torch.sin(a)
        scores += rot * zeta[i] ** (dist / scale_base)
    return scores


def rope_reference(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE for tests: rotate each pair (x_i, x_{i+R/2}) by angle n * theta^(-2i/R), one pair at a time.
    x (T, D), positions (T,) -> (T, D), float64."""
    x = x.double().clone()
    half = rotary_dim // 2
    for i in range(half):
        a = positions.double() * theta ** (-2 * i / rotary_dim)
        x1, x2 = x[:, i].clone(), x[:, i + half].clone()
        x[:, i] = x1 * torch.cos(a) - x2 * torch.sin(a)
        x[:, i + half] = x1 * torch.sin(a) + x2 * torch.cos(a)
    return x
