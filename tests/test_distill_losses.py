"""Each loss term of the catalogue against a value computed by hand on small tensors, and the
weighted sum that composes them from `distill.terms`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.losses import (
    AttentionTransfer,
    CrossEntropy,
    DistillOutputs,
    Hint,
    InterClassRelation,
    IntraClassRelation,
    LogitStandardizedKL,
    NonTargetClassKD,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
    SoftTargetKL,
    TargetClassKD,
    WeightedSum,
    WeightL1,
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
    loss = WeightedSum.from_config({
        "ce": {"_target_": "kdpipe.losses.CrossEntropy"},
        "tckd": {"_target_": "kdpipe.losses.TargetClassKD", "weight": alpha, "temperature": T},
        "nckd": {"_target_": "kdpipe.losses.NonTargetClassKD", "weight": beta, "temperature": T}})
    terms = loss(DistillOutputs(s, t, y))
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert terms["tckd"].item() == pytest.approx(alpha * tckd / 2 * T**2, rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(beta * nckd / 2 * T**2, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_dkd_reassembles_classic_kd_per_sample():
    """Zhao et al. 2022, eq. 4: KD = TCKD + (1 - p_t^T(target)) * NCKD."""
    torch.manual_seed(0)
    s, t, y = torch.randn(1, 6), torch.randn(1, 6), torch.tensor([3])
    T = 4.0
    out = DistillOutputs(s, t, y)
    p_t = F.softmax(t / T, dim=-1)[0, 3]
    rebuilt = TargetClassKD(T)(out) + (1 - p_t) * NonTargetClassKD(T)(out)
    assert rebuilt.item() == pytest.approx(soft_kl(s, t, T).item(), rel=1e-4)


def test_fitnet_hint_is_half_the_mse_of_the_regressed_student_feature():
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    loss = Hint(student_layer="1", teacher_layer="1")
    loss.setup(student, teacher, torch.zeros(2, 1, 2, 2))
    assert isinstance(loss.adapter.proj, nn.Linear)
    assert tuple(loss.adapter.proj.weight.shape) == (3, 2)  # inferred by probing, never typed
    with torch.no_grad():
        loss.adapter.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.adapter.proj.bias.zero_()
    fs, ft = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0, 5.0]])
    # regressed [1, 2, 3] vs [0, 2, 5]: squared errors 1, 0, 4 -> mean 5/3; hint = 0.5 * 5/3
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"1": fs}, {"1": ft})
    assert loss(out).item() == pytest.approx(5 / 6, rel=1e-6)


def test_fitnet_adapter_is_a_1x1_conv_resized_to_the_teacher_map():
    student = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1))
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2))
    loss = Hint(student_layer="0", teacher_layer="1")
    loss.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    assert loss.adapter.proj.kernel_size == (1, 1) and loss.adapter.proj.out_channels == 8
    assert loss.adapter(torch.zeros(2, 4, 8, 8)).shape == (2, 8, 4, 4)


def test_attention_transfer_matches_hand_computed_normalised_maps():
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])            # 1 channel: map [1, 0, 0, 1] / sqrt(2)
    ft = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # mean of squares [2, 0, 0, 2]
    loss = AttentionTransfer(student_layers=["a"], teacher_layers=["b"])
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"a": fs}, {"b": ft})
    assert loss(out).item() == pytest.approx(0.0, abs=1e-6)  # same normalised map, widths differ
    ft2 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])            # map [1, 1, 0, 0] / sqrt(2)
    out = DistillOutputs(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), {"a": fs}, {"b": ft2})
    diff = [0.0, -1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]
    expected = sum(d * d for d in diff) / 4  # the paper's beta/2 is the term's weight in config
    assert loss(out).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_distance_and_angle_on_a_3_4_5_triangle():
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    distance, angle = RKDDistance(), RKDAngle()
    same = DistillOutputs(s, 2 * s, torch.tensor([0, 1, 0]))   # a scaled teacher: same relations
    assert distance(same).item() == pytest.approx(0.0, abs=1e-6)
    assert angle(same).item() == pytest.approx(0.0, abs=1e-6)
    # teacher: an equilateral triangle (all distances equal -> normalised 1; all angles 60 deg)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    out = DistillOutputs(s, t, torch.tensor([0, 1, 0]))
    # student pair distances 3, 4, 5 over their mean 4: 0.75, 1, 1.25; diffs 0.25, 0, 0.25 on 6 off-diagonal
    # entries (x2 each); smooth L1 below 1 is d^2 / 2
    assert distance(out).item() == pytest.approx((4 * 0.25**2 / 2) / 9, rel=1e-5)
    assert angle(out).item() > 0


def test_similarity_preserving_matches_hand_computed_gram_matrices():
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])      # G = I (rows already unit)
    ft = torch.tensor([[1.0, 1.0], [1.0, 1.0]])      # G = all 2 -> rows normalised to 1/sqrt(2)
    loss = SimilarityPreserving(student_layers=["a"], teacher_layers=["b"])
    out = DistillOutputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), {"a": fs}, {"b": ft})
    r = 1 / math.sqrt(2)
    expected = (2 * (1 - r) ** 2 + 2 * r**2) / 2**2
    assert loss(out).item() == pytest.approx(expected, rel=1e-5)


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


def test_soft_kl_matches_hand_computation_with_T_squared_and_batchmean():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    T = 2.0
    expected = sum(_kl(_softmax([x / T for x in trow]), _softmax([x / T for x in srow]))
                   for srow, trow in zip(s.tolist(), t.tolist(), strict=True))
    assert soft_kl(s, t, T).item() == pytest.approx(expected / 2 * T**2, rel=1e-5)  # batchmean, times T^2
    assert soft_kl(s, s.clone(), 4.0).abs().item() < 1e-6


def test_classic_kd_is_ce_and_soft_targets_weighted_by_alpha_and_its_complement():
    """conf/distill/kd.yaml: CE at 1 - alpha, the softened KL at alpha (Hinton et al. 2015)."""
    from tests.conftest import make_cfg

    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    cfg = make_cfg(["distill=kd", "distill.alpha=0.25", "distill.temperature=3"])
    terms = WeightedSum.from_config(cfg.distill.terms)(DistillOutputs(s, t, y))
    assert set(terms) == {"kd", "ce"}
    assert torch.isclose(terms["kd"], 0.25 * soft_kl(s, t, 3.0))
    assert torch.isclose(terms["ce"], 0.75 * F.cross_entropy(s, y))
    assert torch.isclose(CrossEntropy()(DistillOutputs(s, t, y)), F.cross_entropy(s, y))
    assert torch.isclose(SoftTargetKL(3.0)(DistillOutputs(s, t, y)), soft_kl(s, t, 3.0))


def test_a_term_of_weight_zero_is_not_built_and_asks_for_no_layer():
    loss = WeightedSum.from_config({
        "ce": {"_target_": "kdpipe.losses.CrossEntropy", "weight": 1.0},
        "at": {"_target_": "kdpipe.losses.AttentionTransfer", "weight": 0,
               "student_layers": ["a"], "teacher_layers": ["b"]}})
    assert set(loss.terms) == {"ce"}
    assert loss.teacher_layers == () and not loss.needs_teacher


@pytest.mark.parametrize("terms, message", [
    ({"kd": {"_target_": "kdpipe.losses.SoftTargetKL", "temperature": float("nan")}},
     "distill.terms.kd: distill.temperature=nan must be a finite number"),
    ({"kd": {"_target_": "kdpipe.losses.SoftTargetKL", "weight": -1}},
     "distill.terms.kd.weight=-1 must be >= 0"),
    ({"kd": {"_target_": "kdpipe.losses.NoSuchTerm"}},
     "distill.terms.kd cannot be built from kdpipe.losses.NoSuchTerm"),
    ({"kd": {"weight": 1}}, "distill.terms.kd must be a mapping with a _target_"),
    ({}, "distill.terms is empty"),
])
def test_a_bad_term_is_a_config_error_naming_it(terms, message):
    with pytest.raises(ConfigError, match=message):
        WeightedSum.from_config(terms)


def test_logit_standardised_kd_matches_a_hand_computed_value_and_ignores_logit_scale():
    """z([1, 2, 3]) = [-1, 0, 1] and z([3, 2, 1]) = [1, 0, -1]: at T=1 the teacher's softmax is
    (e, 1, 1/e) / Z and log(p_t / p_s) is 2, 0, -2, so the KL is 2 (e - 1/e) / (e + 1 + 1/e)."""
    s, t, y = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([0])
    term = LogitStandardizedKL(temperature=1.0)
    e = math.e
    assert term(DistillOutputs(s, t, y)).item() == pytest.approx(2 * (e - 1 / e) / (e + 1 + 1 / e), rel=1e-5)
    # a student whose logits are the teacher's times 10 plus 5 already matches it: loss 0 (plain KD: not)
    scaled = DistillOutputs(t * 10 + 5, t, y)
    assert term(scaled).item() == pytest.approx(0.0, abs=1e-6)
    assert SoftTargetKL(temperature=1.0)(scaled).item() > 0.5
    # T^2 scaling, as in Hinton's KD
    z_s, z_t = torch.tensor([-0.5, 0.0, 0.5]), torch.tensor([0.5, 0.0, -0.5])  # z / T at T=2
    by_hand = 4 * F.kl_div(F.log_softmax(z_s, -1), F.softmax(z_t, -1), reduction="sum").item()
    assert LogitStandardizedKL(2.0)(DistillOutputs(s, t, y)).item() == pytest.approx(by_hand, rel=1e-5)


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Pearson correlation of matching rows, with numpy's corrcoef."""
    import numpy as np

    return float(np.mean([np.corrcoef(x, z)[0, 1] for x, z in zip(a.numpy(), b.numpy(), strict=True)]))


def test_dist_terms_are_one_minus_the_pearson_correlation_per_sample_and_per_class():
    # four samples: the intra-class correlation is taken over the batch (two samples always give +-1)
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [0.0, 1.0, 0.0], [2.0, 0.5, -1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, -2.0, 0.0], [0.5, 0.0, 1.5], [1.0, 1.0, -2.0]])
    y = torch.tensor([0, 1, 2, 0])
    out = DistillOutputs(s, t, y)
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    assert InterClassRelation(1.0)(out).item() == pytest.approx(1 - _pearson_rows(p_s, p_t), rel=1e-5)
    assert IntraClassRelation(1.0)(out).item() == pytest.approx(1 - _pearson_rows(p_s.T, p_t.T), rel=1e-5)
    # the first sample by hand: p_s = (1, e, e^2) / Z and p_t is p_s reversed; with x = p_s - 1/3 the
    # correlation is (2 x0 x2 + x1^2) / |x|^2 = -0.86709, so the loss is 1.86709
    first = DistillOutputs(s[:1], t[:1], y[:1])
    assert InterClassRelation(1.0)(first).item() == pytest.approx(1.867093, abs=1e-5)
    # the same ranking at another scale: a correlation of 1, loss 0; at T=4 the loss is scaled by 16
    same = DistillOutputs(2 * t, t, y)
    assert InterClassRelation(1.0)(DistillOutputs(t, t, y)).item() == pytest.approx(0.0, abs=1e-6)
    assert InterClassRelation(4.0)(same).item() == pytest.approx(
        16 * (1 - _pearson_rows(F.softmax(2 * t / 4, -1), F.softmax(t / 4, -1))), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(("scheme", "terms"), [("dist", {"ce", "inter", "intra"}), ("ls_kd", {"ce", "kd"}),
                                                ("crd", {"ce", "crd"})])
def test_the_newer_losses_compose_from_their_yaml(scheme, terms):
    from kdpipe.models import cnn
    from tests.conftest import make_cfg

    loss = WeightedSum.from_config(make_cfg([f"distill={scheme}"]).distill.terms)
    assert set(loss.terms) == terms
    student, teacher = cnn((1, 8, 8), 4, width=2, depth=2), cnn((1, 8, 8), 4, width=4, depth=2)
    loss.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    s, t, y = torch.randn(8, 4), torch.randn(8, 4), torch.randint(0, 4, (8,))
    feats = {"pool": torch.randn(8, 4)}, {"pool": torch.randn(8, 8)}
    parts = loss(DistillOutputs(s, t, y, *feats))
    assert set(parts) == terms and all(torch.isfinite(v) for v in parts.values())


def test_info_nce_by_hand():
    from kdpipe.losses.contrastive import info_nce

    # anchor . positive = 1, anchor . negative = 0, tau = 1: -log(e / (e + 1)) = log(1 + 1/e)
    a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert info_nce(a, p, n, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    # tau = 0.5 doubles the scores; two negatives at 0.6 and -0.8
    n2 = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    want = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2) + math.exp(-1.6)))
    assert info_nce(a, p, n2, 0.5).item() == pytest.approx(want, rel=1e-6)


def test_crd_contrasts_both_ways_against_its_memory_banks_and_fills_them_as_a_queue():
    from kdpipe.losses import ContrastiveRepresentation
    from kdpipe.losses.contrastive import info_nce
    from kdpipe.models import cnn

    term = ContrastiveRepresentation(feat_dim=2, num_negatives=3, nce_temperature=0.5)
    student, teacher = cnn((1, 8, 8), 4, width=2, depth=2), cnn((1, 8, 8), 4, width=4, depth=2)
    term.setup(student, teacher, torch.zeros(2, 1, 8, 8))
    assert (term.embed_s.in_features, term.embed_t.in_features) == (4, 8)  # probed `pool` widths
    with torch.no_grad():  # embeddings that pass the first two feature columns through
        for lin in (term.embed_s, term.embed_t):
            lin.weight.zero_(), lin.bias.zero_()
            lin.weight[0, 0] = lin.weight[1, 1] = 1.0
    f_s = torch.tensor([[3.0, 4.0, 9.0, 9.0], [1.0, 0.0, 9.0, 9.0]])
    f_t = torch.tensor([[0.0, 2.0, *[5.0] * 6], [2.0, 0.0, *[5.0] * 6]])
    bank_s, bank_t = term.bank_s.clone(), term.bank_t.clone()
    out = DistillOutputs(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 1]),
                         {"pool": f_s}, {"pool": f_t})
    v_s, v_t = torch.tensor([[0.6, 0.8], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    want = info_nce(v_s, v_t, bank_t, 0.5) + info_nce(v_t, v_s, bank_s, 0.5)
    # the first row by hand: its own pair scores 0.8, against the teacher bank's three rows
    row = torch.cat([torch.tensor([0.8]), bank_t @ v_s[0]]) / 0.5
    assert -F.log_softmax(row, 0)[0].item() == pytest.approx(info_nce(v_s[:1], v_t[:1], bank_t, 0.5).item())
    assert term(out).item() == pytest.approx(want.item(), rel=1e-5)
    # the batch went into the banks (rows 0 and 1); the next batch wraps around to row 0
    assert torch.allclose(term.bank_s[:2], v_s) and torch.allclose(term.bank_t[:2], v_t)
    assert torch.equal(term.bank_s[2], bank_s[2]) and int(term.bank_next) == 2
    term(out)
    assert int(term.bank_next) == 1 and torch.allclose(term.bank_s[2], v_s[0])
    term.eval()
    term(out)
    assert int(term.bank_next) == 1, "evaluation does not write the banks"


def test_weight_l1_is_the_mean_absolute_conv_and_linear_weight_and_sparsifies_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, -0.5]]))
        model[2].weight.copy_(torch.tensor([[-4.0, 2.0]]))
    term = WeightL1()
    term.setup(model, None, torch.zeros(2, 3))
    out = DistillOutputs(torch.zeros(2, 1), None, torch.zeros(2, dtype=torch.long))
    assert term(out).item() == pytest.approx((1 + 2 + 0.5 + 0.5 + 4 + 2) / 8)  # biases, BN excluded

    def near_zero_after(l1_weight: float) -> float:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
        penalty = WeightL1()
        penalty.setup(net, None, torch.zeros(1, 20))
        x, y = torch.randn(256, 20), (torch.randn(256, 20)[:, 0] > 0).long()
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(200):
            opt.zero_grad()
            logits = net(x)
            loss = F.cross_entropy(logits, y) + l1_weight * penalty(DistillOutputs(logits, None, y))
            loss.backward()
            opt.step()
        w = torch.cat([net[0].weight.flatten(), net[2].weight.flatten()])
        return float((w.abs() < 1e-2).float().mean())

    assert near_zero_after(0.5) > 0.2 > 0.05 > near_zero_after(0.0)
