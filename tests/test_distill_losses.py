"""Each loss of the catalogue against a value computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.losses import (
    AttentionTransfer,
    DecoupledKD,
    DistillOutputs,
    FitNet,
    RelationalKD,
    SimilarityPreserving,
    soft_kl,
)
from kdpipe.models.ensemble import EnsembleTeacher


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def test_dkd_terms_match_hand_computation_with_T_squared_and_batchmean():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    t = torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 3.0]])
    y = torch.tensor([0, 2])
    T, alpha, beta = 2.0, 1.5, 8.0
    tckd = nckd = 0.0
    for srow, trow, k in zip(s.tolist(), t.tolist(), y.tolist(), strict=True):
        ps, pt = _softmax([v / T for v in srow]), _softmax([v / T for v in trow])
        tckd += _kl([pt[k], 1 - pt[k]], [ps[k], 1 - ps[k]])
        rest = [i for i in range(3) if i != k]
        nckd += _kl(_softmax([trow[i] / T for i in rest]), _softmax([srow[i] / T for i in rest]))
    terms = DecoupledKD(temperature=T, alpha=alpha, beta=beta)(DistillOutputs(s, t, y))
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(alpha * tckd / 2 * T**2, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(beta * nckd / 2 * T**2, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_dkd_reassembles_classic_kd_per_sample():
    """Zhao et al. 2022, eq. 4: KD = TCKD + (1 - p_t^T(target)) * NCKD."""
    torch.manual_seed(0)
    s, t, y = torch.randn(1, 6), torch.randn(1, 6), torch.tensor([3])
    T = 4.0
    terms = DecoupledKD(temperature=T, alpha=1.0, beta=1.0)(DistillOutputs(s, t, y))
    p_t = F.softmax(t / T, dim=-1)[0, 3]
    rebuilt = terms["tckd"] + (1 - p_t) * terms["nckd"]
    assert rebuilt.item() == pytest.approx(soft_kl(s, t, T).item(), rel=1e-4)


def test_fitnet_hint_is_half_the_mse_of_the_regressed_student_feature():
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loss = FitNet(student_layer="1", teacher_layer="1", hint_weight=2.0, alpha=0.0)
    loss.setup(student, teacher, torch.zeros(2, 1, 2, 2))
    assert isinstance(loss.adapter.proj, nn.Linear)
    assert tuple(loss.adapter.proj.weight.shape) == (3, 2)  # inferred by probing, never typed
    with torch.no_grad():
        loss.adapter.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.adapter.proj.bias.zero_()
    fs, ft = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0, 5.0]])
    # regressed [1, 2, 3] vs [0, 2, 5]: squared errors 1, 0, 4 -> mean 5/3; hint = 2 * 0.5 * 5/3
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"1": fs}, {"1": ft})
    assert loss(out)["hint"].item() == pytest.approx(5 / 3, rel=1e-6)


def test_fitnet_adapter_is_a_1x1_conv_resized_to_the_teacher_map():
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2))
    loss = FitNet(student_layer="0", teacher_layer="1")
    loss.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    assert loss.adapter.proj.kernel_size == (1, 1) and loss.adapter.proj.out_channels == 8
    assert loss.adapter(torch.zeros(2, 4, 8, 8)).shape == (2, 8, 4, 4)


def test_attention_transfer_matches_hand_computed_normalised_maps():
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])            # 1 channel: map [1, 0, 0, 1] / sqrt(2)
    ft = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # mean of squares [2, 0, 0, 2]
    loss = AttentionTransfer(student_layers=["a"], teacher_layers=["b"], beta=1000.0)
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"a": fs}, {"b": ft})
    assert loss(out)["at"].item() == pytest.approx(0.0, abs=1e-6)  # same normalised map, widths differ
    ft2 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])            # map [1, 1, 0, 0] / sqrt(2)
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"a": fs}, {"b": ft2})
    diff = [0.0, -1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]
    expected = 1000.0 / 2 * sum(d * d for d in diff) / 4
    assert loss(out)["at"].item() == pytest.approx(expected, rel=1e-5)


def test_rkd_distance_and_angle_on_a_3_4_5_triangle():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    loss = RelationalKD(distance_weight=25.0, angle_weight=50.0)
    same = loss(DistillOutputs(s, 2 * s, torch.tensor([0, 1, 0])))   # a scaled teacher: same relations
    assert same["distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["angle"].item() == pytest.approx(0.0, abs=1e-6)
    # teacher: an equilateral triangle (all distances equal -> normalised 1; all angles 60 deg)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    terms = loss(DistillOutputs(s, t, torch.tensor([0, 1, 0])))
    # student pair distances 3, 4, 5 over their mean 4: 0.75, 1, 1.25; diffs 0.25, 0, 0.25 on 6 off-diagonal
    # entries (x2 each); smooth L1 below 1 is d^2 / 2
    d_expected = 25.0 * (4 * 0.25**2 / 2) / 9
    assert terms["distance"].item() == pytest.approx(d_expected, rel=1e-5)
    assert terms["angle"].item() > 0


def test_similarity_preserving_matches_hand_computed_gram_matrices():
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])      # G = I (rows already unit)
    ft = torch.tensor([[1.0, 1.0], [1.0, 1.0]])      # G = all 2 -> rows normalised to 1/sqrt(2)
    loss = SimilarityPreserving(student_layers=["a"], teacher_layers=["b"], gamma=3000.0)
    out = DistillOutputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), {"a": fs}, {"b": ft})
    r = 1 / math.sqrt(2)
    expected = 3000.0 * (2 * (1 - r) ** 2 + 2 * r**2) / 2**2
    assert loss(out)["sp"].item() == pytest.approx(expected, rel=1e-5)


def test_ensemble_teacher_softened_output_is_the_mean_of_softened_members():
    torch.manual_seed(0)
    members = [nn.Linear(3, 4), nn.Linear(3, 4)]
    ens = EnsembleTeacher(members)
    ens.temperature = 4.0
    x = torch.randn(5, 3)
    mean = torch.stack([F.softmax(m(x) / 4.0, dim=-1) for m in members]).mean(0)
    assert torch.allclose(F.softmax(ens(x) / 4.0, dim=-1), mean, atol=1e-6)


def test_mismatched_layer_lists_are_a_config_error():
    with pytest.raises(ConfigError, match="one teacher layer per student layer"):
        AttentionTransfer(student_layers=["a", "b"], teacher_layers=["c"])
