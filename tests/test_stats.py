"""The statistics file refuses what it cannot serve, one line naming what is missing."""

from __future__ import annotations

import pytest
import torch

from moekit.errors import MoekitError
from moekit.profile.stats import ExpertStats


def test_missing_statistic_is_named(tmp_path):
    stats = ExpertStats(meta={"layers": [0]})
    stats.set("rank_counts", torch.ones(4, 2), 0)
    back = ExpertStats.load(stats.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.get("rank_counts", 0), torch.ones(4, 2))
    with pytest.raises(MoekitError, match="merging needs gram"):
        back.require("rank_counts", "gram", what="merging")
    with pytest.raises(MoekitError, match="no 'gram'"):
        back.get("gram", 0)
    with pytest.raises(MoekitError, match="for layer 3"):
        back.get("rank_counts", 3)


def test_foreign_files_are_refused(tmp_path):
    with pytest.raises(MoekitError, match="does not exist"):
        ExpertStats.load(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MoekitError, match="not a moekit statistics file"):
        ExpertStats.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(MoekitError, match="no moekit metadata"):
        ExpertStats.load(tmp_path / "plain.safetensors")
