"""Bipartite matching between source tokens (set A) and destination tokens (set B).

Everything works on padded batches: image ``i`` holds its real tokens in the first ``n_i``
positions and padding after them (padding has size 0). A split returns, per image, the positions
of its A and B tokens plus masks saying which slots are real. Slots that are not real point at a
*trash* position ``N`` (one past the last token), so scatters through them never touch a real
token. Callers append that row to their tensors before indexing (:func:`with_trash_row`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Positions of sources (A) and destinations (B) for each image of a batch."""

    a_idx: Tensor  # [B, Na] long, positions in [0, N]; N is the trash slot
    a_ok: Tensor  # [B, Na] bool, real source slots
    b_idx: Tensor  # [B, Nb] long
    b_ok: Tensor  # [B, Nb] bool
    # The same positions as slices when they are one arithmetic run for every image (the
    # alternating split): matching then reads A and B as views instead of gathering them.
    a_slice: slice | None = None
    b_slice: slice | None = None
    all_real: bool = False  # every slot is real (no padding): masks can be skipped


@dataclass(frozen=True)
class Matches:
    """Each source's best destination and the cosine similarity to it."""

    similarity: Tensor  # [B, Na] float, -inf for slots that are not real
    scores: Tensor  # [B, Na, Nb] float, cosine similarity of every pair, -inf where B is not real

    @property
    def dst(self) -> Tensor:
        """[B, Na] long: slot (into ``Split.b_idx``) of every source's best destination."""
        if self.scores.shape[-1] == 0:
            return torch.zeros(self.similarity.shape, device=self.scores.device, dtype=torch.long)
        return self.scores.argmax(dim=-1)

    def dst_of(self, image: Tensor, slot: Tensor) -> Tensor:
        """``dst[image, slot]``, computed for those sources only.

        Only the few sources that merge need their destination; ``max`` with indices over all
        scores costs ten times ``amax`` on CPU. Ties go to the first slot either way.
        """
        if len(image) == 0 or self.scores.shape[-1] == 0:
            return torch.zeros_like(image)
        return self.scores[image, slot].argmax(dim=-1)


def with_trash_row(t: Tensor) -> Tensor:
    """Append one zero row along dim 1: the slot that non-real split entries point at."""
    pad = t.new_zeros((t.shape[0], 1, *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def alternating_split(valid: Tensor, num_protected: int) -> Split:
    """ToMe's split: unprotected tokens at even positions are sources, odd ones destinations.

    Positions are absolute, so with one class token (position 0, protected) this is exactly
    ToMe's ``a, b = x[..., ::2, :], x[..., 1::2, :]`` with the class token removed from A.
    """
    batch, n = valid.shape
    positions = torch.arange(n, device=valid.device)
    a_pos = positions[num_protected:][(positions[num_protected:] % 2) == 0]
    b_pos = positions[num_protected:][(positions[num_protected:] % 2) == 1]
    a_ok = valid[:, a_pos]
    b_ok = valid[:, b_pos]
    trash = torch.full((), n, device=valid.device, dtype=torch.long)
    a_idx = torch.where(a_ok, a_pos.expand(batch, -1), trash)
    b_idx = torch.where(b_ok, b_pos.expand(batch, -1), trash)
    a_slice = slice(num_protected + num_protected % 2, n, 2)  # even positions past the protected
    b_slice = slice(num_protected + (num_protected + 1) % 2, n, 2)  # odd ones
    return Split(a_idx, a_ok, b_idx, b_ok, a_slice, b_slice)


def size_sorted_split(size: Tensor, num_protected: int) -> Split:
    """ATM's split for the final layers: the smaller half of tokens by size are the sources.

    Per image, the ``M`` real unprotected tokens are stable-sorted by size (ties keep position
    order); the first ``ceil(M/2)`` form A and the rest B. A large token can then only absorb
    smaller ones, never another large token (the costly case of Theorem 1).
    """
    batch, n = size.shape
    body = size[:, num_protected:]
    real = body > 0
    m = real.sum(dim=1)  # [B]
    key = torch.where(real, body, torch.full_like(body, float("inf")))
    order = torch.sort(key, dim=1, stable=True).indices + num_protected  # [B, n - P], padding last
    n_body = n - num_protected
    na_max = (n_body + 1) // 2
    nb_max = n_body // 2
    na = (m + 1) // 2  # [B]
    nb = m // 2

    slots_a = torch.arange(na_max, device=size.device).expand(batch, -1)
    a_ok = slots_a < na[:, None]
    a_idx = torch.where(a_ok, order[:, :na_max], n)

    slots_b = torch.arange(nb_max, device=size.device).expand(batch, -1)
    b_ok = slots_b < nb[:, None]
    b_src = (na[:, None] + slots_b).clamp(max=n_body - 1) if n_body > 0 else slots_b
    b_idx = torch.where(b_ok, order.gather(1, b_src), n) if n_body > 0 else slots_b
    return Split(a_idx, a_ok, b_idx, b_ok)


def best_matches(metric: Tensor, split: Split, normalized: bool = False) -> Matches:
    """Cosine similarity of every source to every destination, and each source's best.

    ``metric`` is [B, N, D] (a trash row N may be appended but is not needed: slots that are not
    real are masked). It is L2-normalised here so callers can pass raw head-averaged keys, unless
    ``normalized`` says its rows have unit length already (:func:`.costs.per_head_keys`).
    """
    if not normalized:
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    batch, rows, dim = metric.shape
    if split.a_slice is not None and split.b_slice is not None:
        a, b = metric[:, split.a_slice], metric[:, split.b_slice]
    else:
        flat = metric.reshape(-1, dim)
        offset = torch.arange(batch, device=metric.device)[:, None] * rows
        a = flat.index_select(0, (split.a_idx.clamp(max=rows - 1) + offset).view(-1)).view(batch, -1, dim)
        b = flat.index_select(0, (split.b_idx.clamp(max=rows - 1) + offset).view(-1)).view(batch, -1, dim)
    scores = torch.bmm(a, b.transpose(-1, -2))  # what ``@`` runs for [B, *, D] operands, in one op
    if b.shape[1] == 0:
        return Matches(torch.full(split.a_idx.shape, float("-inf"), device=metric.device, dtype=metric.dtype), scores)
    if split.all_real:
        return Matches(scores.amax(dim=-1), scores)
    if not bool(split.b_ok.all()):
        scores.masked_fill_(~split.b_ok[:, None, :], float("-inf"))
    similarity = scores.amax(dim=-1).masked_fill_(~split.a_ok, float("-inf"))
    return Matches(similarity, scores)
