"""Logical axis names and the one table that maps them onto mesh axes.

Models annotate parameters (and a few activations) with the logical names below only; nothing in a
model mentions a mesh axis. ``LOGICAL_RULES`` maps each name onto the mesh axes ``data``, ``fsdp``
and ``tensor``: parameters are split over ``fsdp`` along their input features and over ``tensor``
along their output features (heads / hidden units); batches over ``data`` x ``fsdp``. The same
rules serve 1 CPU, 8 fake devices and a TPU pod slice: a mesh axis of size 1 shards nothing.
"""

# Parameter axes.
EMBED = "embed"          # input features of a dense/conv layer
MLP = "mlp"              # output features (hidden units, GEGLU width, conv filters)
HEADS = "heads"          # attention projections: heads x head_dim, flattened
CONTEXT = "context"      # text-embedding features entering cross-attention
NORM = "norm"            # GroupNorm/LayerNorm scale and bias
KERNEL = "kernel_space"  # spatial taps of a convolution

# Activation axes.
BATCH = "batch"
LENGTH = "length"        # tokens (H*W or text)
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES = (
    (BATCH, ("data", "fsdp")),
    (EMBED, "fsdp"),
    (CONTEXT, "fsdp"),
    (MLP, "tensor"),
    (HEADS, "tensor"),
    (NORM, None),
    (KERNEL, None),
    (LENGTH, None),
    (HEIGHT, None),
    (WIDTH, None),
    (CHANNELS, None),
)
