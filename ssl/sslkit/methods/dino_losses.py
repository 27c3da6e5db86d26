"""DINOv2 losses and teacher centering: DINO (CLS), iBOT (masked patches), KoLeo, Sinkhorn-Knopp, EMA center.

Facts from the DINOv2 paper and its reference code; written from the formulas. Conventions:

- Teacher targets are *probabilities* (rows sum to 1), computed in fp32 without gradient.
- Student terms take *logits*; the student temperature is applied here.
- Cross-entropy ``CE(t, s) = -sum_k t_k log softmax(s / T_s)_k``.
- Cross-rank sums (Sinkhorn-Knopp, center) use ``torch.distributed.all_reduce`` when a process group
  is initialized, and are the plain local sums otherwise (so a single process needs no group).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if _dist_on():
        dist.all_reduce(x, op=op)
    return x


def _world_size() -> int:
    return dist.get_world_size() if _dist_on() else 1


def cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-row ``-sum_k t_k log softmax(s / T)_k``: (N, K), (N, K) -> (N,), computed in fp32."""
    lsm = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # (N, K)
    return -(teacher_probs.float() * lsm).sum(dim=-1)


def dino_loss(student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float) -> Tensor:
    """DINO cross-view loss, the mean over loss terms of the batch-mean cross-entropy.

    ``student_logits``: one (B, K) tensor per student crop, global crops first (crop ``i`` for
    ``i < len(teacher_probs)`` is the same view as teacher crop ``i``); ``teacher_probs``: one (B, K)
    tensor per global crop. Every (student crop s, teacher crop t) pair with s != t is a term (a view is
    never compared with itself), so 2 global + 8 local crops give 2 + 16 = 18 terms.
    """
    n_t = len(teacher_probs)
    total, terms = student_logits[0].new_zeros((), dtype=torch.float32), 0
    for s, logits in enumerate(student_logits):
        lsm = F.log_softmax(logits.float() / student_temp, dim=-1)  # (B, K)
        for t, probs in enumerate(teacher_probs):
            if s == t:
                continue
            total = total - (probs.float() * lsm).sum(dim=-1).mean()
            terms += 1
    if terms == 0:
        raise ValueError(f"dino_loss needs a pair of different views; got {len(student_logits)} student and "
                         f"{n_t} teacher crops")
    return total / terms


def ibot_loss(student_logits: Tensor, teacher_probs: Tensor, token_weight: Tensor, n_images: int,
              student_temp: float) -> Tensor:
    """iBOT masked-patch loss.

    ``student_logits`` / ``teacher_probs``: (M, K) for the M masked patch tokens of all global crops;
    ``token_weight``: (M,) = 1 / (#masked tokens of that token's image), so each masked image counts once
    whatever its mask size. Returns ``sum_tokens w * CE / n_images`` where ``n_images`` is the number of
    global-crop images in the batch (masked or not), as DINOv2 normalizes it.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive
    ce = cross_entropy(teacher_probs, student_logits, student_temp)  # (M,)
    return (ce * token_weight.float()).sum() / max(1, int(n_images))


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy regularizer: ``-mean_i log(||x_i - x_nn(i)|| + eps)`` on L2-normalized rows.

    Computed in fp32 whatever the autocast dtype: in fp16, ``eps = 1e-8`` underflows to 0, so a
    duplicated sample (distance 0) gives ``-log(0) = inf``. In fp32 a duplicate costs ``-log(eps) ~ 18.4``.
    ``x``: (B, C) with B >= 2 (one device's CLS tokens of one global crop, as in DINOv2).
    """
    if x.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples per device, got {x.shape[0]}")
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # (B, C)
        with torch.no_grad():
            sim = x @ x.T  # (B, B) cosine similarity
            sim.fill_diagonal_(-2.0)  # never pick yourself
            nn_idx = sim.argmax(dim=1)  # (B,) nearest neighbour
        dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)  # (B,)
        return -torch.log(dist_nn + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2), fp32: (N, K) logits -> (N, K) probabilities.

    ``Q = exp(logits / temp)`` as a K x N matrix is alternately normalized so that every prototype gets
    the same total mass (rows sum to 1/K) and every sample is a distribution (columns sum to 1/N), with
    N the global number of samples (all ranks; for iBOT patches the counts differ per rank); the result
    is rescaled so each sample's row sums to 1.
    The largest logit is subtracted first (a constant factor cancels in the normalization), all-reduced
    across ranks so that every rank uses the same constant.
    """
    with torch.autocast(teacher_logits.device.type, enabled=False):
        z = teacher_logits.float() / temp  # (N, K)
        zmax = _all_reduce(z.max() if z.numel() else z.new_full((), -torch.inf), dist.ReduceOp.MAX)
        q = torch.exp(z - zmax).T  # (K, N)
        k_protos = q.shape[0]
        n_global = int(_all_reduce(torch.tensor(float(q.shape[1]), device=q.device)))  # ranks may differ (iBOT)
        tiny = torch.finfo(torch.float32).tiny  # a prototype (or sample) whose exp underflowed stays 0, not NaN
        q /= _all_reduce(q.sum())
        for _ in range(int(iterations)):
            q /= _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # (K, 1) prototype mass -> 1
            q /= k_protos
            q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # (1, N) sample mass -> 1 (columns are rank-local)
            q /= n_global
        q *= n_global
        return q.T  # (N, K), rows sum to 1


class SoftmaxCenter(nn.Module):
    """DINO's centering: ``softmax((logits - center) / temp)`` with an EMA ``center`` (momentum m).

    ``update(logits)`` sets ``center = m * center + (1 - m) * mean(logits)``, the mean over every
    rank's samples. The center is a buffer, so it is saved and restored with the method.
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def probs(self, teacher_logits: Tensor, temp: float) -> Tensor:
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)  # (N, K)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        total = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))  # (1, K)
        n = int(_all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=total.device)))
        if n == 0:  # e.g. no masked patch on any rank this step
            return
        self.center.mul_(self.momentum).add_(total / n, alpha=1.0 - self.momentum)


def entropy(probs: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of the rows of ``probs``: (N, K) -> scalar. Collapse shows as ~0
    (one prototype) or ~log K (uniform)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1).mean()
