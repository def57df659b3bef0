"""moekit: make Mixture-of-Experts language models smaller and cheaper, with honest numbers.

The Python API reads top-down:

    model, tok = moekit.load_model("smollm2-moe")     # models.py
    layers = moekit.moe_layers(model)                 # arch.py: one view of every MoE family
    moekit.save_model(model, tok, "out/")             # export.py: atomic, verified

Each compression method is one module with a config object and one in-place verb.
"""

from moekit.version import __version__  # noqa: E402

from moekit.core.arch import MoELayer, describe, moe_layers, param_counts
from moekit.errors import MoekitError
from moekit.checkpoint.save import save_model
from moekit.checkpoint.load import load_model

__all__ = ["MoELayer", "MoekitError", "describe", "load_model", "moe_layers", "param_counts", "save_model", "__version__"]
