"""DINO / iBOT / KoLeo / Sinkhorn-Knopp / centering / EMA on small tensors, against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from sslkit.methods import dino_losses as L
from sslkit.methods.dinov2 import DINOHead
from sslkit.methods.ema import ema_update, freeze

T = 0.1  # student temperature


def logits_for(probs: list[float], temp: float = T) -> torch.Tensor:
    """Logits whose softmax at ``temp`` is ``probs``: temp * log(p)."""
    return temp * torch.log(torch.tensor([probs], dtype=torch.float64)).float()


def test_cross_entropy_hand_values() -> None:
    s = logits_for([0.25, 0.75])
    assert L.cross_entropy(torch.tensor([[1.0, 0.0]]), s, T).item() == pytest.approx(math.log(4), rel=1e-5)
    assert L.cross_entropy(torch.tensor([[0.0, 1.0]]), s, T).item() == pytest.approx(math.log(4 / 3), rel=1e-5)
    assert L.cross_entropy(torch.tensor([[0.5, 0.5]]), s, T).item() == pytest.approx(
        0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel=1e-5)


def test_dino_loss_pairs_and_normalization() -> None:
    # student crops: global 0 -> (1/4, 3/4), global 1 -> (1/2, 1/2), local -> (3/4, 1/4)
    s = [logits_for([0.25, 0.75]), logits_for([0.5, 0.5]), logits_for([0.75, 0.25])]
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]  # teacher probs of global 0 / 1
    # terms: (s0, t1) ln 4/3, (s1, t0) ln 2, (s2, t0) ln 4/3, (s2, t1) ln 4; never (s0, t0) or (s1, t1)
    expected = (math.log(4 / 3) + math.log(2) + math.log(4 / 3) + math.log(4)) / 4
    assert L.dino_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    # only the two globals: 2 terms
    assert L.dino_loss(s[:2], t, T).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-5)


def test_dino_loss_batch_mean() -> None:
    s0 = torch.cat([logits_for([0.25, 0.75]), logits_for([0.5, 0.5])])  # (2, 2): two images
    s1 = torch.zeros(2, 2)
    t0, t1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # (s0, t1): image 0 ln 4/3, image 1 ln 2 -> mean; (s1, t0): ln 2
    expected = ((math.log(4 / 3) + math.log(2)) / 2 + math.log(2)) / 2
    assert L.dino_loss([s0, s1], [t0, t1], T).item() == pytest.approx(expected, rel=1e-5)


def test_dino_loss_needs_two_views() -> None:
    with pytest.raises(ValueError):
        L.dino_loss([torch.zeros(1, 2)], [torch.tensor([[1.0, 0.0]])], T)


def test_ibot_loss_weights_each_image_once() -> None:
    # image 0 has 2 masked tokens (CE ln 4 and ln 4/3), image 1 has 1 (CE ln 2), image 2 none: n_images 3
    s = torch.cat([logits_for([0.25, 0.75]), logits_for([0.25, 0.75]), logits_for([0.5, 0.5])])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([0.5, 0.5, 1.0])
    expected = ((math.log(4) + math.log(4 / 3)) / 2 + math.log(2)) / 3
    assert L.ibot_loss(s, t, w, 3, T).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_no_masked_tokens_is_zero_with_graph() -> None:
    s = torch.zeros(0, 4, requires_grad=True)
    out = L.ibot_loss(s, torch.zeros(0, 4), torch.zeros(0), 2, T)
    assert out.item() == 0.0 and out.requires_grad


def test_koleo_hand_value_and_scale_invariance() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # every nearest neighbour at distance sqrt(2)
    assert L.koleo_loss(x).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    assert L.koleo_loss(7.0 * x).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    # 4 points on a square: nearest neighbours at distance sqrt(2) too; a 5th point near (1, 0) shrinks two
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [math.cos(0.1), math.sin(0.1)]])
    d_small = 2 * math.sin(0.05)  # chord of angle 0.1
    d_mid = 2 * math.sin((math.pi / 2 - 0.1) / 2)  # (0, 1) to the 5th point
    expected = -(2 * math.log(d_small) + math.log(d_mid) + 2 * math.log(math.sqrt(2))) / 5
    assert L.koleo_loss(y).item() == pytest.approx(expected, abs=1e-5)


def test_koleo_duplicate_is_finite_in_fp16() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for t in (x, x.half(), x.bfloat16()):
        out = L.koleo_loss(t)
        assert out.dtype == torch.float32 and torch.isfinite(out), t.dtype
    with pytest.raises(ValueError):
        L.koleo_loss(torch.zeros(1, 3))


def test_koleo_gradient_pushes_neighbours_apart() -> None:
    x = torch.tensor([[1.0, 0.0], [math.cos(0.2), math.sin(0.2)], [-1.0, 0.0]], requires_grad=True)
    L.koleo_loss(x).backward()
    assert x.grad is not None and x.grad[1, 1] < 0  # descending moves point 1 away from point 0


def test_sinkhorn_knopp_one_iteration_by_hand() -> None:
    temp = 0.05
    e = torch.tensor([[1.0, 3.0], [1.0, 1.0]])  # exp(logits / temp), (N, K)
    q = L.sinkhorn_knopp(temp * torch.log(e), temp, iterations=1)
    # Q = E^T / 6 = [[1/6, 1/6], [1/2, 1/6]]; rows / row sums / K = [[1/4, 1/4], [3/8, 1/8]];
    # columns / column sums / N = [[1/5, 1/3], [3/10, 1/6]]; times N, transposed:
    expected = torch.tensor([[2 / 5, 3 / 5], [2 / 3, 1 / 3]])
    torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_knopp_properties() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g)
    q = L.sinkhorn_knopp(logits, 0.1, iterations=200)
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # each sample a distribution
    torch.testing.assert_close(q.sum(0), torch.full((5,), 12 / 5), rtol=1e-4, atol=1e-4)  # equal prototype mass
    # balanced input (circulant): Sinkhorn-Knopp changes nothing, the result is the plain softmax
    c = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    torch.testing.assert_close(L.sinkhorn_knopp(c, 0.5), torch.softmax(c / 0.5, dim=1))
    # large logits do not overflow; no samples (no masked patch this step) is fine
    assert torch.isfinite(L.sinkhorn_knopp(100.0 * logits, 0.04)).all()
    assert L.sinkhorn_knopp(torch.zeros(0, 5), 0.04).shape == (0, 5)


def test_softmax_center_update_and_probs() -> None:
    c = L.SoftmaxCenter(2, momentum=0.9)
    logits = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    p0 = c.probs(logits, 1.0)
    torch.testing.assert_close(p0, torch.softmax(logits, 1))
    c.update(logits)
    torch.testing.assert_close(c.center, torch.tensor([[0.2, 0.4]]))
    c.update(logits)
    torch.testing.assert_close(c.center, torch.tensor([[0.9 * 0.2 + 0.2, 0.9 * 0.4 + 0.4]]))
    torch.testing.assert_close(c.probs(logits, 2.0), torch.softmax((logits - c.center) / 2.0, 1))
    assert "center" in c.state_dict()
    before = c.center.clone()
    c.update(torch.zeros(0, 2))  # nothing to average: unchanged
    torch.testing.assert_close(c.center, before)


def test_entropy() -> None:
    assert L.entropy(torch.full((3, 4), 0.25)).item() == pytest.approx(math.log(4), rel=1e-6)
    assert L.entropy(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-9)


def test_dino_head_cosine_logits_and_freeze() -> None:
    torch.manual_seed(0)
    h = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6, layers=3)
    x = torch.randn(5, 8)
    out = h(x)
    assert out.shape == (5, 16)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck vs unit prototype rows (g = 1): cosines
    out.sum().backward()
    assert h.weight_v.grad is not None and h.weight_g.grad is not None
    h.zero_grad(set_to_none=True)
    frozen = h(x, freeze_last_layer=True)
    torch.testing.assert_close(frozen, out.detach())
    frozen.sum().backward()
    assert h.weight_v.grad is None and h.weight_g.grad is None
    assert all(p.grad is not None for p in h.mlp.parameters())


def test_ema_update_formula_and_freeze() -> None:
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = freeze(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
    student[1].running_mean.fill_(0.5)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.75)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.75 * b + 0.25 * s)
        assert not t.requires_grad
    torch.testing.assert_close(teacher[1].running_mean, torch.full((4,), 0.5))
    ema_update(teacher, student, 1.0)  # momentum 1: unchanged
    with pytest.raises(RuntimeError):
        ema_update(teacher, torch.nn.Linear(3, 4), 0.5)
