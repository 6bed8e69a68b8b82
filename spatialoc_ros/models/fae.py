"""FAE: Frequency Aware Encoder (the cell's global descriptor from its object tokens).

For each object token x (D numbers) three linear projections (the 1x1 convolutions of the paper)
feed three frequency branches, each with a residual to x; the FFT runs along the FEATURE axis
(one object at a time, ``norm='ortho'`` so the branches keep the scale of x):

    magnitude:  |FFT(W1 x)|                                    (D numbers, full FFT)
    re + im:    Re FFT(W2 x) + Im FFT(W2 x)                     (a Hartley-like real transform)
    high-pass:  irfft(rfft(W3 x) with the lowest ``highpass_ratio`` of its D/2+1 bins zeroed)

(The high-pass uses the one-sided rfft so that "lowest bins" really are the lowest frequencies; a
full FFT stores negative frequencies after the positive ones, and zeroing its first 70 % of indices
would keep the low negative frequencies.)

Fusion: a learned attention over the three branches (one score per branch and object, softmax over
the branches), residual + LayerNorm. Then a bidirectional GRU runs over the cell's REAL objects in
their slot order (packed sequences, so padding never enters it; note that the GRU makes the
descriptor depend on object order, which :func:`cells_to_batch` keeps deterministic), another
residual + LayerNorm, a masked max-pool over objects and an MLP give the global descriptor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from spatialoc_ros.models.layers import masked_max, mlp


def _real_first_order(mask: torch.Tensor) -> torch.Tensor:
    """(B, O) bool -> (B, O) long permutation putting real slots first, keeping their order."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


class FrequencyBranches(nn.Module):
    """x (B, O, D) -> (B, O, 3, D): magnitude, re+im and high-pass branches (each + x)."""

    def __init__(self, *, embed_dim: int, highpass_ratio: float) -> None:
        super().__init__()
        self.proj_magnitude = nn.Linear(embed_dim, embed_dim)
        self.proj_reim = nn.Linear(embed_dim, embed_dim)
        self.proj_high = nn.Linear(embed_dim, embed_dim)
        num_bins = embed_dim // 2 + 1
        keep = torch.ones(num_bins)
        keep[: int(num_bins * highpass_ratio)] = 0.0
        self.register_buffer("highpass_keep", keep, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        magnitude = torch.fft.fft(self.proj_magnitude(x), dim=-1, norm="ortho").abs()
        spectrum = torch.fft.fft(self.proj_reim(x), dim=-1, norm="ortho")
        reim = spectrum.real + spectrum.imag
        high_spec = torch.fft.rfft(self.proj_high(x), dim=-1, norm="ortho") * self.highpass_keep
        high = torch.fft.irfft(high_spec, n=dim, dim=-1, norm="ortho")
        return torch.stack([magnitude + x, reim + x, high + x], dim=-2)  # (B, O, 3, D)


class FAE(nn.Module):
    """Object tokens (B, O, D) + mask (B, O) -> global descriptor (B, D) (not normalised)."""

    def __init__(self, *, embed_dim: int, highpass_ratio: float = 0.7, dropout: float = 0.0) -> None:
        super().__init__()
        assert embed_dim % 2 == 0, "FAE's bidirectional GRU needs an even embed_dim"
        self.branches = FrequencyBranches(embed_dim=embed_dim, highpass_ratio=highpass_ratio)
        self.branch_score = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 4), nn.Tanh(), nn.Linear(embed_dim // 4, 1, bias=False)
        )
        self.fuse_norm = nn.LayerNorm(embed_dim)
        self.gru = nn.GRU(embed_dim, embed_dim // 2, batch_first=True, bidirectional=True)
        self.gru_norm = nn.LayerNorm(embed_dim)
        self.out = mlp([embed_dim, embed_dim, embed_dim], dropout=dropout)

    def run_gru(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Bidirectional GRU over the real objects of each cell: (B, O, D) -> (B, O, D), 0 at padding."""
        order = _real_first_order(mask)  # (B, O)
        gather_index = order.unsqueeze(-1).expand_as(x)
        compact = torch.gather(x, 1, gather_index)  # real objects first
        lengths = mask.sum(dim=1).clamp_min(1).cpu()  # an empty cell reads one (padded) slot
        packed = pack_padded_sequence(compact, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        restored = torch.zeros_like(out).scatter(1, gather_index, out)  # back to slot order
        return restored * mask.unsqueeze(-1).to(out.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, O, D), mask: (B, O) bool -> (B, D)."""
        keep = mask.unsqueeze(-1).to(x.dtype)
        x = x * keep
        branches = self.branches(x)  # (B, O, 3, D)
        weights = torch.softmax(self.branch_score(branches).squeeze(-1), dim=-1)  # (B, O, 3)
        fused = torch.einsum("bok,bokd->bod", weights, branches)
        h = self.fuse_norm(x + fused) * keep  # (B, O, D)
        h = self.gru_norm(h + self.run_gru(h, mask)) * keep
        return self.out(masked_max(h, mask, dim=1))  # (B, D)
