"""The three profile plots are written as PNG files and the heatmap's numbers are selection fractions."""

from __future__ import annotations

import torch

from moekit.profile.plots import selection_frequency, write_plots
from moekit.profile.profile import ProfileConfig, profile
from tiny import ids, tiny_model


def test_plots_are_written(tmp_path):
    model = tiny_model("qwen2_moe")
    tokens = ids(batch=2, length=10)
    stats = profile(model, ProfileConfig(progress=False), tokens=tokens)
    paths = write_plots(stats, tmp_path / "plots")
    assert [p.name for p in paths] == ["selection_frequency.png", "super_experts.png", "massive_activations.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "plots").glob(".*tmp*"))
    freq = selection_frequency(stats)
    # each token selects top-k distinct experts: the fractions in a layer sum to top-k
    torch.testing.assert_close(freq.sum(1), torch.full((len(stats.layers),), 2.0, dtype=freq.dtype))
