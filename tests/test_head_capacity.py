"""benchmarks/head_capacity.py: refitted heads read [pre-logits, branch features] and correct
the target's logits as F_c does; scores split Ori / Tar by the joint labels."""

import torch
from torch import nn

from pnc.bench.head_capacity import RefitHead, fit_bias, fit_head, render, scores


def test_scores_split_old_and_new_labels():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 2, 2])  # two target classes (0, 1), one new (2)
    assert scores(logits, labels, num_old=2) == {"ori": 50.0, "tar": 50.0, "avg": 50.0}


def test_refit_head_corrects_the_target_logits_and_adds_new_ones():
    head = RefitHead(width=5, num_old=2, num_classes=3, hidden=0)
    nn.init.zeros_(head.net.weight)
    nn.init.zeros_(head.net.bias)
    target_logits = torch.tensor([[1.0, -1.0]])
    out = head(torch.ones(1, 3), torch.ones(1, 2), target_logits)
    assert torch.equal(out, torch.tensor([[1.0, -1.0, 0.0]]))
    assert isinstance(RefitHead(5, 2, 3, hidden=8).net, nn.Sequential)


def test_fit_head_learns_a_class_the_target_cannot_predict():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (512,))
    feats = nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(512, 3)
    train = {"pre": torch.randn(512, 4), "feats": feats, "target": torch.zeros(512, 2), "clone": torch.zeros(512, 3)}
    head = fit_head(train, labels, hidden=0, epochs=40, seed=0)
    with torch.no_grad():
        fitted = head(train["pre"], train["feats"], train["target"])
    assert scores(fitted, labels, num_old=2)["avg"] > 95
    again = fit_head(train, labels, hidden=0, epochs=40, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))


def test_render_gives_each_heads_means():
    row = {"train": {"ori": 90.0, "tar": 80.0, "avg": 86.0}, "test": {"ori": 88.0, "tar": 78.0, "avg": 84.0}}
    result = {
        "target": "t",
        "source": "s",
        "scale": "M",
        "old_fraction": 0.3,
        "epochs": 30,
        "machine": {"cpu": "cpu"},
        "command": "cmd",
        "rows": [{"seed": 0, "head": "linear", **row}, {"seed": 1, "head": "linear", **row}],
    }
    text = render(result)
    assert "| linear | 0 | 90.00 / 80.00 / 86.00 | 88.00 / 78.00 / 84.00 |" in text
    assert "| linear | 86.00 | 84.00 |" in text


def test_fit_bias_undoes_a_shift_of_one_class_logits():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(200)
    logits = 3 * nn.functional.one_hot(labels, 3).float() + torch.randn(600, 3)
    shifted = logits - torch.tensor([0.0, 0.0, 4.0])  # class 2 almost never wins
    assert scores(shifted, labels, num_old=2)["tar"] < 20
    bias = fit_bias(shifted, labels)
    assert bias[2] - bias[:2].mean() > 3  # the shift comes back, within the noise
    assert scores(shifted + bias, labels, num_old=2)["avg"] > scores(shifted, labels, num_old=2)["avg"] + 20
