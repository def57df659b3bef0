import pytest
import torch
from torch import nn

from moekit.core.hooks import Hooks, StopForward, inputs_of


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_hooks_see_inputs_and_outputs_and_are_removed():
    net, x = _net(), torch.randn(3, 4)
    pre, post = [], []
    with Hooks() as hooks:
        hooks.pre(net[2], lambda m, a: pre.append(a[0].clone()))
        hooks.forward(net[0], lambda m, a, out: post.append(out.clone()))
        y = net(x)
    assert torch.equal(pre[0], torch.relu(net[0](x)))
    assert torch.equal(post[0], net[0](x))
    net(x)  # hooks removed: nothing more recorded
    assert len(pre) == 1 and len(post) == 1
    assert torch.equal(y, net(x))


def test_hooks_are_removed_when_the_forward_raises():
    net = _net()

    def boom(m, a):
        raise ValueError("boom")

    with pytest.raises(ValueError), Hooks() as hooks:
        hooks.pre(net[0], boom)
        net(torch.randn(1, 4))
    net(torch.randn(1, 4))  # no hook left to raise


def test_stop_forward_ends_the_pass_and_inputs_of_returns_the_first_call():
    net, x = _net(), torch.randn(2, 4)
    ran = []
    with Hooks() as hooks:
        hooks.forward(net[2], lambda m, a, out: ran.append(1))
        hooks.pre(net[1], lambda m, a: (_ for _ in ()).throw(StopForward))
        net(x)
    assert ran == []
    args, kwargs = inputs_of(net, net[2], x)
    assert torch.equal(args[0], torch.relu(net[0](x))) and kwargs == {}
