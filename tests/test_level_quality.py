"""ddq.report.level_quality: learned weight levels against the best uniform grid and k-means."""

import json

import pytest
import torch
from torch import nn

import ddq
from ddq.report import level_quality, summarize_level_quality, write_report

EXAMPLE = torch.zeros(1, 3, 8, 8)


def _net(mode: str, per_channel: bool, bits: int | None = None) -> nn.Module:
    """Gaussian-weighted conv + linear, prepared with every layer learning its bits."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.normal_(0, 0.05)
    weight = ddq.QuantizerConfig(mode=mode, per_channel=per_channel, bits=bits)
    cfg = ddq.DDQConfig(weight=weight, first_last_bits="learn")
    return ddq.prepare(net, cfg, example_inputs=EXAMPLE)


def _rows(net: nn.Module) -> dict:
    return {r["name"]: r for r in level_quality(net)}


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [3, 8])
def test_uniform_at_init_is_the_mse_searched_grid(per_channel, bits):
    rows = _rows(_net("uniform", per_channel, bits))
    assert set(rows) == {"0", "2", "5"}
    for r in rows.values():
        assert r["bits"] == bits and r["mode"] == "uniform" and r["per_channel"] is per_channel
        assert r["vs_uniform"] == pytest.approx(1.0, rel=1e-3)
        assert r["mse_learned"] > 0
        assert r["vs_kmeans"] == pytest.approx(r["mse_learned"] / r["mse_kmeans"])


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_adaptive_at_init_beats_uniform_on_gaussian_weights(per_channel, bits):
    for r in _rows(_net("adaptive", per_channel, bits)).values():
        assert r["vs_uniform"] <= 1.0
        assert r["vs_kmeans"] == pytest.approx(1.0, rel=1e-3)  # the start is k-means


def test_a_badly_clipped_grid_is_flagged_and_others_are_not():
    net = _net("uniform", per_channel=False, bits=4)
    wq = net[2].weight_quantizer
    amax = float(net[2].weight.detach().abs().max())
    wq.init_range(-4 * 8 / 7 * amax, 4 * amax)  # step 4x what covering the weight needs
    rows = _rows(net)
    assert rows["2"]["vs_uniform"] > 4
    assert rows["2"]["vs_kmeans"] > rows["2"]["vs_uniform"]
    assert rows["0"]["vs_uniform"] == pytest.approx(1.0, rel=1e-3)
    summary = summarize_level_quality(list(rows.values()))
    assert summary["layers"] == 3
    assert summary["vs_uniform"]["max"] == rows["2"]["vs_uniform"]
    assert summary["vs_uniform"]["median"] == pytest.approx(1.0, rel=1e-3)


def test_measuring_leaves_the_model_alone_and_uses_the_refit_levels():
    net = _net("adaptive", per_channel=True)  # fitted at 8 bits
    wq = net[2].weight_quantizer
    before = {k: v.clone() for k, v in wq.state_dict().items()}
    wq.set_bits(3, trainable=True)  # the next forward re-fits at 3 bits
    r = _rows(net)["2"]
    assert r["bits"] == 3
    assert r["vs_kmeans"] == pytest.approx(1.0, rel=0.02)  # re-fitted, not 8-bit levels merged
    assert int(wq.fit_bits) == 8
    after = wq.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "gate_logits")


@pytest.mark.parametrize("per_channel", [True, False])
def test_large_layers_are_measured_on_a_sample_that_agrees(per_channel):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1100, 512), nn.ReLU(), nn.Linear(512, 4))
    cfg = ddq.DDQConfig(
        weight=ddq.QuantizerConfig(mode="uniform", per_channel=per_channel, bits=4),
        first_last_bits="learn",
    )
    r = _rows(ddq.prepare(net, cfg))["0"]
    assert r["numel"] == 1100 * 512 and r["measured"] == 512 * 367 < r["numel"]
    assert r["vs_uniform"] == pytest.approx(1.0, rel=0.02)


def test_summary_filters_by_bits_and_handles_no_layers():
    rows = [
        {"bits": 2, "vs_uniform": 0.9, "vs_kmeans": 1.2},
        {"bits": 4, "vs_uniform": 0.7, "vs_kmeans": 1.0},
        {"bits": 8, "vs_uniform": 3.0, "vs_kmeans": 5.0},
    ]
    low = summarize_level_quality(rows, max_bits=4)
    assert low["layers"] == 2
    assert low["vs_uniform"] == {"median": pytest.approx(0.8), "min": 0.7, "max": 0.9}
    assert summarize_level_quality(rows)["vs_kmeans"]["max"] == 5.0
    none = summarize_level_quality(rows, max_bits=1)
    assert none["layers"] == 0 and none["vs_uniform"]["median"] is None


def test_report_has_the_level_quality_table(tmp_path):
    net = _net("adaptive", per_channel=True)
    net[2].weight_quantizer.set_bits(3, trainable=True)
    report = write_report(tmp_path, net, {"model": "tiny", "dataset": "none"})
    md = (tmp_path / "report.md").read_text()
    assert "## Level quality" in md
    assert "| layer | bits | learned/uniform | learned/k-means |" in md
    assert "| 2 | 3 | " in md
    lq = json.loads((tmp_path / "report.json").read_text())["level_quality"]
    assert [r["name"] for r in lq["layers"]] == ["0", "2", "5"]
    assert lq["summary"]["bits<=4"]["layers"] == 1
    assert lq["summary"]["all"]["layers"] == 3
    assert report["plots"]["levels"] == "plots/levels.png"
    assert (tmp_path / "plots" / "levels.png").stat().st_size > 0
