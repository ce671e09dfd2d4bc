"""Seed 002's graph: 3 x (conv-BN-ReLU), max-pool after the first two, GAP, FC-128, dropout, logits."""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import ConvBNAct
from jaxcnn.models.registry import register_model


class SimpleCNN(nn.Module):
    """Seed 002's small CNN (Keras `Conv2D` default: convolutions carry a bias)."""
    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    dropout: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, w in enumerate(self.widths):
            x = ConvBNAct(w, 3, use_bias=True, name=f"block{i + 1}", **kw)(x, train)
            self.sow("intermediates", f"stage{i + 1}", x)
            if i < len(self.widths) - 1:
                x = ops.max_pool(x, 2, 2)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(nn.Dense(self.hidden, name="fc1", **kw)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="head", **kw)(x)


@register_model("simple_cnn", image_size=32, recipe="seed002",
                description="seed 002 CNN: 3x conv-BN-ReLU (32/64/128), GAP, FC-128, dropout 0.5")
def simple_cnn(**kw):
    return SimpleCNN(**kw)
