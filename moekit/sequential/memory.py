"""The layer-by-layer walk over a model already in memory: the engine's :class:`~moekit.sequential.engine.Layer`
objects, nothing read from or written to disk.

Error-propagating methods (``propagate``) run the same per-layer code on both walks: on the checkpoint
(:class:`~moekit.sequential.engine.LayerSequential`, any size) and here (the recipe runner and the Python API hold
the model in memory). The calibration tokens are embedded once with the model's own forward (decoder layers stubbed
out, their call arguments recorded); then each layer sees the hidden states the layers before it computed, after
whatever the method did to them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from moekit.core import arch
from moekit.errors import MoekitError
from moekit.sequential.engine import Layer, record_calls


class InMemoryLayers:
    """Walk the decoder layers of ``model`` (in memory, on one device) with the calibration sequences ``tokens``
    [n_seq, seq_len]; hidden states wait on the CPU between layers, in the model's dtype."""

    def __init__(self, model, tokens: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                 desc: str = "layers"):
        devices = {p.device for p in model.parameters()} - {torch.device("meta")}
        if len(devices) != 1:
            raise MoekitError(f"the layer-by-layer walk needs the model on one device (it is on {sorted(map(str, devices))}): "
                              "load it on one device, or run the command with --mode sequential")
        self.model = model
        self.device = devices.pop()
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.layers = arch.decoder_layers(model)
        self.moe = {layer.index: layer for layer in arch.moe_layers(model)}
        self.progress, self.desc = progress, desc
        n_seq = tokens.shape[0]
        self.batches = [(i, min(i + batch_size, n_seq)) for i in range(0, n_seq, batch_size)]
        self.hidden = torch.empty(n_seq, tokens.shape[1], model.config.hidden_size, dtype=self.dtype)
        self.calls: dict[int, dict] = {}
        with torch.no_grad():
            for a, b in self.batches:
                calls = record_calls(model, self.layers, tokens[a:b].to(self.device))
                self.hidden[a:b] = calls[0][0].to("cpu", self.dtype)
                self.calls.setdefault(b - a, {j: (args, kwargs) for j, (_, args, kwargs) in calls.items()})

    def __iter__(self) -> Iterator[Layer]:
        for i, module in enumerate(tqdm(self.layers, desc=self.desc, disable=not self.progress)):
            yield Layer(i, module, self.moe.get(i), self)
