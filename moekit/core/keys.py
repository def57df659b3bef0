"""Every key moekit writes into a model's config or state dict, in one place.

Plain transformers ignores unknown config keys, so these record what moekit did; the ones marked
"needs moekit's loader" change how the model runs and make the checkpoint moekit's own form.
"""

# needs moekit's loader: layers with different expert counts / top-k, per-layer routing rules
PER_LAYER_EXPERTS_KEY = "moekit_experts_per_layer"
PER_LAYER_TOP_K_KEY = "moekit_top_k_per_layer"
ROUTE_KEY = "moekit_route"
MEAN_OUT = "moekit_mean_out"  # buffer on an experts module: routing-weighted mean outputs (route's compensate)

# records only (provenance)
KEPT_KEY = "moekit_kept_experts"  # prune: surviving source experts per layer
CARVE_KEY = "moekit_carve"  # carve: the carving record
DENSIFIED_KEY = "moekit_densified"  # densify: provenance of the dense model
EMBEDDED_KEY = "moekit_embedded"  # the embedded default's build record

# safetensors metadata key of a distillation checkpoint's trainer state (step, losses, optimiser layout)
DISTILL_STATE_KEY = "moekit_distill"
