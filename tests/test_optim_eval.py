import pytest
import torch
from torch import nn

from sslkit.evaluation import knn_classify
from sslkit.optim import apply_schedule, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.special = nn.Parameter(torch.zeros(4, 4))

    def no_weight_decay(self):
        return {"special"}


def test_no_weight_decay_on_norms_biases_tokens():
    groups = param_groups(Tiny(), weight_decay=0.05)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["lin.weight"]["weight_decay"] == 0.05
    for n in ("lin.bias", "norm.weight", "norm.bias", "mask_token", "special"):
        assert by_name[n]["weight_decay"] == 0.0, n


def test_apply_schedule_scales_per_group():
    groups = param_groups(Tiny(), weight_decay=0.05)
    opt = torch.optim.AdamW(groups, lr=1.0)
    apply_schedule(opt, lr=0.5, wd=0.1)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.1}
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_knn_hand_derived():
    # train: two points per class on the unit circle; test points near class 1
    tr = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    ty = torch.tensor([0, 0, 1, 1])
    te = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = knn_classify(tr, ty, te, torch.tensor([1, 0]), k=2, temperature=0.07)
    assert out["top1"] == 100.0
    # with k=4 the weights exp(sim/T) decide: for te[0] sims are (0, .6, 1, .8): class 1 wins
    out4 = knn_classify(tr, ty, te[:1], torch.tensor([1]), k=4, temperature=0.07)
    assert out4["top1"] == 100.0
    wrong = knn_classify(tr, ty, te[:1], torch.tensor([0]), k=4, temperature=0.07)
    assert wrong["top1"] == 0.0 and wrong["top5"] == 100.0
