"""The profiler on the embedded default MoE (slow: builds it on first use)."""

from __future__ import annotations

import pytest
import torch

from moekit.core.arch import moe_layers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded(smollm2_moe):
    return smollm2_moe


def test_profile_and_stream_agree_on_the_embedded_moe(embedded):
    from moekit.profile.profile import ProfileConfig, profile
    from moekit.profile.stream import profile_stream

    path, model, _ = embedded
    tokens = torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    cfg = ProfileConfig(batch_size=2, gram_tokens=16, progress=False)
    mem = profile(model, cfg, tokens=tokens)
    streamed = profile_stream(path, tokens, cfg, device="cpu", dtype=torch.float32)
    assert streamed.meta["fingerprint"] == mem.meta["fingerprint"]
    for layer in moe_layers(model):
        rc = mem.get("rank_counts", layer.index)
        assert torch.equal(rc.sum(0), torch.full((layer.top_k,), float(tokens.numel()), dtype=rc.dtype))
    for key, value in mem.tensors.items():
        torch.testing.assert_close(streamed.tensors[key], value, rtol=1e-3, atol=1e-4, msg=key)
