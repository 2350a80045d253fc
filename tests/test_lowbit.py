"""Weights below int8 (int4 grouped, binary, k-means clustered): the packed form decodes to exactly
what the forward pass used, the file holds the packed bytes, and a pipeline ships and evaluates it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.compress import lowbit
from kdpipe.models import cnn
from kdpipe.models.io import load_model, save_model

from .conftest import run_job, stage_runs

ARCH = {"_target_": "kdpipe.models.cnn", "in_shape": [1, 8, 8], "num_classes": 4, "width": 8, "depth": 2}


@pytest.mark.parametrize("bits", range(1, 9))
def test_indices_pack_to_their_bits_and_back(bits):
    idx = torch.randint(0, 2 ** bits, (1001,))
    packed = lowbit.pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(lowbit.unpack_bits(packed, bits, 1001), idx)


def test_each_format_stores_what_it_promises():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)  # rows of 45 weights: int4 groups of 32 leave a short last group
    q = lowbit.decode(lowbit.encode(w, "int4", group_size=32))
    rows, qrows = w.reshape(6, 45), q.reshape(6, 45)
    for lo, hi in ((0, 32), (32, 45)):
        scale = rows[:, lo:hi].abs().amax(1, keepdim=True) / 7
        assert torch.all((rows[:, lo:hi] - qrows[:, lo:hi]).abs() <= scale / 2 + 1e-6)
        assert torch.allclose(qrows[:, lo:hi] / scale, torch.round(qrows[:, lo:hi] / scale), atol=1e-4)
    b = lowbit.decode(lowbit.encode(w, "binary")).reshape(6, 45)
    alpha = rows.abs().mean(1, keepdim=True)
    assert torch.allclose(b, torch.where(rows >= 0, alpha, -alpha))
    stored = lowbit.encode(w, "kmeans", bits=3)
    k = lowbit.decode(stored)
    assert k.unique().numel() <= 8 and (k - w).abs().mean() < (w - w.mean()).abs().mean() / 4
    # bytes: 270 weights at 3 bits = 102 bytes of indices, plus 8 levels and 1 scale of 4 bytes
    assert lowbit.stored_bytes(stored) == 102 + 4 * 9


@pytest.mark.parametrize("fmt", lowbit.FORMATS)
def test_a_trained_low_bit_model_round_trips_through_its_file(fmt, tmp_path):
    torch.manual_seed(0)
    model = cnn((1, 8, 8), 4, width=8, depth=2)
    layers = lowbit.target_layers(model, skip_first_last=fmt == "binary")
    assert layers and (fmt != "binary" or len(layers) < len(lowbit.target_layers(model, False)))
    lowbit.attach(model, layers, fmt, bits=2, group_size=16)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 4, (64,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    if fmt == "kmeans":  # the shared values train; the latent weights are not used
        assert any(n.endswith("centroids") for n in moved) and not any(n.endswith("original") for n in moved)
    else:  # straight-through: the latent fp32 weights train
        assert any(n.endswith("original") for n in moved)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    state, packed = lowbit.pack_model(model, layers, fmt, bits=2, group_size=16)
    assert set(packed) == {f"{p}.weight" for p in layers} and not set(packed) & set(state)
    path = save_model(model, ARCH, tmp_path / "m.pt", state_dict=state, lowbit=packed)
    dense = save_model(model, ARCH, tmp_path / "dense.pt")
    assert path.stat().st_size < dense.stat().st_size
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), expected)
    if fmt == "kmeans":
        for p in layers:
            assert load_model(path).get_submodule(p).weight.unique().numel() <= 4


def test_the_pipeline_ships_a_clustered_model_and_evaluates_what_the_stage_measured(store, tmp_path):
    run_job(["prune=none", "quantize=kmeans", "quantize.bits=3", "quantize.epochs=1"], tmp_path / "job")
    runs = stage_runs()
    quant = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "quantize")
    parent = next(r for r in runs if r.data.tags.get("kdpipe.run_type") == "pipeline")
    assert parent.data.tags["kdpipe.final_stage"] == "quantize"
    assert parent.data.metrics["val/acc"] == pytest.approx(quant.data.metrics["quantize/val_acc"], abs=1e-6)
    distill = next(r for r in runs if r.data.tags.get("kdpipe.stage") == "distill")
    # 3-bit indices instead of 32-bit floats (plus 8 shared values a layer); the file also holds
    # torch.save's container, which dominates at this size, and is smaller all the same
    assert quant.data.metrics["quantize/lowbit_weight_bytes"] < 0.2 * 4 * quant.data.metrics["model/params"]
    assert quant.data.metrics["model/size_bytes"] < distill.data.metrics["model/size_bytes"]
    assert "kmeans" in parent.info.run_name
