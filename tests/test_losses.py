import math

import torch

from kdpipe.losses import DistillOutputs, HintonKD, soft_kl


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_soft_kl_matches_hand_computation_with_T_squared_and_batchmean():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    T = 2.0
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ps = _softmax([x / T for x in srow])
        pt = _softmax([x / T for x in trow])
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    expected = expected / 2 * T**2  # batchmean over 2 rows, times T^2
    assert math.isclose(soft_kl(s, t, T).item(), expected, rel_tol=1e-5)


def test_soft_kl_is_zero_for_identical_logits():
    x = torch.randn(4, 10)
    assert soft_kl(x, x.clone(), 4.0).abs().item() < 1e-6


def test_hinton_kd_weights_terms_by_alpha():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = HintonKD(temperature=3.0, alpha=0.25)(DistillOutputs(s, t, y))
    assert set(terms) == {"kd", "ce"}
    assert torch.isclose(terms["kd"], 0.25 * soft_kl(s, t, 3.0))
    assert torch.isclose(terms["ce"], 0.75 * torch.nn.functional.cross_entropy(s, y))
