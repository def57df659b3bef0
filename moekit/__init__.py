"""moekit: make Mixture-of-Experts language models smaller and cheaper, with honest numbers.

The Python API reads top-down:

    model, tok = moekit.load_model("smollm2-moe")     # models.py
    layers = moekit.moe_layers(model)                 # arch.py: one view of every MoE family
    moekit.save_model(model, tok, "out/")             # export.py: atomic, verified

Each compression method is one module with a config object and one in-place verb.
"""

__version__ = "0.1.0"

from .arch import MoELayer, describe, moe_layers, param_counts  # noqa: E402
from .errors import MoekitError  # noqa: E402
from .export import save_model  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["MoELayer", "MoekitError", "describe", "load_model", "moe_layers", "param_counts", "save_model", "__version__"]
