"""Padding removal: several sequences side by side in one row for a forward, outputs put back.

The trainer's rows are ``[left padding | prompt | response | right padding]``, so each
sequence's real tokens are one contiguous span. :func:`plan_packing` places the spans,
longest first, into the first row of width W (the longest span) with room for them; the
forward then computes about the real tokens instead of rows x width (on the tiny online
step 32 x 26 positions become ~20 x 26). Attention is blocked between sequences that share a
row and padding keys are never seen, so each token attends to exactly the tokens it does in the
padded layout, at the same relative distances: with rotary position embeddings (every model
family here) its outputs are the padded layout's up to float rounding. The last stage's
outputs are read in the padded layout's terms: all of them (:meth:`PackPlan.unpack`, zeros on
padding), or only the positions a loss reads (:meth:`PackPlan.at_positions`: the response
tokens' logits, without a [N, L, V] copy), so every loss, metric and value downstream sees the
rows it always did.

verl calls this ``use_remove_padding``, OpenRLHF ``packing_samples``, TRL ``padding_free``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PackPlan:
    """Where each sequence of a [N, L] micro-batch sits in the packed [R, W] rows."""

    rows: int
    """R, packed rows."""
    width: int
    """W, the longest sequence's real tokens."""
    source: torch.Tensor
    """[R * W] long: flat index into the [N * L] layout of the token at each packed position (0 on padding);
    this and every tensor below are on the micro-batch's device."""
    real: torch.Tensor
    """[R * W] bool: the packed position holds a token."""
    segments: torch.Tensor
    """[R, W] long: 1 + the sequence a position belongs to, 0 on padding."""
    positions: torch.Tensor
    """[R, W] long: each token's position within its sequence."""
    shape: tuple[int, int]
    """(N, L), the padded layout."""

    def pack(self, tensor: torch.Tensor, fill: int = 0) -> torch.Tensor:
        """[N, L] -> [R, W] (``fill`` on padding)."""
        flat = tensor.reshape(-1)[self.source]
        return flat.masked_fill(~self.real, fill).view(self.rows, self.width)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Last-stage output [R, W, ...] -> [N, L, ...] with zeros where the padded layout has padding.
        Differentiable (the gradient flows back to the packed positions)."""
        rest = packed.shape[2:]
        values = packed.reshape(self.rows * self.width, *rest)[self.real]
        out = packed.new_zeros(self.shape[0] * self.shape[1], *rest)
        out = out.index_copy(0, self.source[self.real], values)
        return out.view(*self.shape, *rest)

    def packed_positions(self, flat: torch.Tensor) -> torch.Tensor:
        """[len(flat)] indices into the packed rows' flat [R * W] positions of the padded layout's flat positions
        ``flat`` (``row * L + column``, each a real token's)."""
        packed_index = torch.full((self.shape[0] * self.shape[1],), -1, dtype=torch.long, device=self.source.device)
        packed_index[self.source[self.real]] = self.real.nonzero().flatten()
        index = packed_index[flat]
        if bool((index < 0).any()):
            raise ValueError("packed positions exist for real tokens only; a position given is padding")
        return index

    def at_positions(self, packed: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Output [R, W, ...] -> [len(flat), ...]: the outputs at the padded layout's flat positions ``flat``
        (``row * L + column``, each a real token's). Differentiable."""
        return packed.reshape(self.rows * self.width, *packed.shape[2:])[self.packed_positions(flat)]

    def blocked_attention(self) -> torch.Tensor:
        """Boolean [R, 1, W, W] mask, True = blocked: a token sees the earlier tokens of its own sequence
        and itself; a padding position sees only itself (so no row is fully blocked)."""
        segments = self.segments
        width = self.width
        position = torch.arange(width, device=segments.device)
        future = position[None, :] > position[:, None]  # [W(q), W(k)]
        itself = position[None, :] == position[:, None]
        other = segments[:, :, None] != segments[:, None, :]  # [R, W(q), W(k)]
        padding_query = (segments == 0)[:, :, None]
        blocked = future[None] | other | (padding_query & ~itself[None])
        return blocked[:, None]


def plan_packing(attention_mask: torch.Tensor) -> Optional[PackPlan]:
    """The packing of a [N, L] micro-batch (``attention_mask`` 1 on real tokens, each row's real tokens
    contiguous), or ``None`` when it would not save a row. First-fit decreasing, ties in row order, so
    every rank that sees the same micro-batch packs it the same way."""
    mask = attention_mask.detach().to("cpu").bool()
    count, length = mask.shape
    lengths = mask.sum(dim=1)
    if count == 0 or int(lengths.max()) == 0:
        return None
    starts = mask.int().argmax(dim=1)
    ends = length - 1 - mask.flip(1).int().argmax(dim=1)
    gaps = (lengths > 0) & (ends - starts + 1 != lengths)
    if bool(gaps.any()):
        raise ValueError(f"rows {gaps.nonzero().flatten().tolist()} have padding between real tokens: packing "
                         "needs each row's real tokens contiguous (left-padded prompt, right-padded response)")
    spans = list(zip(starts.tolist(), lengths.tolist()))
    width = max(n for _, n in spans)
    used: list[int] = []
    placement: dict[int, tuple[int, int]] = {}
    for i in sorted(range(count), key=lambda i: (-spans[i][1], i)):
        n = spans[i][1]
        if n == 0:
            continue
        row = next((r for r, filled in enumerate(used) if filled + n <= width), None)
        if row is None:
            row = len(used)
            used.append(0)
        placement[i] = (row, used[row])
        used[row] += n
    rows = len(used)
    if rows >= count:
        return None
    # one index list per field, written in one scatter each (a slice per sequence costs ~1.5 ms at 32 rows)
    at: list[int] = []
    from_index: list[int] = []
    segment: list[int] = []
    position: list[int] = []
    for i, (row, offset) in placement.items():
        start, n = spans[i]
        at.extend(range(row * width + offset, row * width + offset + n))
        from_index.extend(range(i * length + start, i * length + start + n))
        segment.extend([i + 1] * n)
        position.extend(range(n))
    at_t = torch.tensor(at, dtype=torch.long)
    device = attention_mask.device

    def placed(values: list[int]) -> torch.Tensor:  # [R * W]: ``values`` at the packed positions, 0 elsewhere
        return torch.zeros(rows * width, dtype=torch.long).index_put_((at_t,), torch.tensor(values, dtype=torch.long))

    real = torch.zeros(rows * width, dtype=torch.bool).index_fill_(0, at_t, True)
    return PackPlan(rows=rows, width=width, source=placed(from_index).to(device), real=real.to(device),
                    segments=placed(segment).view(rows, width).to(device),
                    positions=placed(position).view(rows, width).to(device), shape=(count, length))
