"""Mixed precision: compute dtypes per policy and fp16 dynamic loss scaling.

Parameters and optimizer state are always float32; only activations (the model's `dtype`) drop to
bf16/fp16. BatchNorm statistics stay float32 because jaxcnn.layers' BatchNorm promotes them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str):
    if precision not in COMPUTE_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(COMPUTE_DTYPES)}, got {precision!r}")
    return COMPUTE_DTYPES[precision]


class LossScale(struct.PyTreeNode):
    """Dynamic loss scale (as in Flax's DynamicScale and torch.cuda.amp.GradScaler).

    The loss is multiplied by `scale` before differentiation so small fp16 gradients do not flush
    to zero; a step whose gradients are not finite is skipped and the scale halved; after
    `growth_interval` finite steps in a row the scale doubles. With `enabled=False` (fp32, bf16)
    the scale is 1 and every method is the identity.
    """
    scale: jax.Array                 # f32 scalar
    good_steps: jax.Array            # int32 scalar: finite steps since the last change
    enabled: bool = struct.field(pytree_node=False, default=False)
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)
    minimum: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, precision: str, init_scale: float = 2.0 ** 15) -> "LossScale":
        on = precision == "fp16"
        return cls(scale=jnp.asarray(init_scale if on else 1.0, jnp.float32),
                   good_steps=jnp.zeros((), jnp.int32), enabled=on)

    def scale_loss(self, loss):
        return loss * self.scale if self.enabled else loss

    def unscale(self, grads):
        if not self.enabled:
            return grads
        inv = 1.0 / self.scale
        return jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)

    def update(self, finite: jax.Array) -> "LossScale":
        if not self.enabled:
            return self
        grow = finite & (self.good_steps + 1 >= self.growth_interval)
        scale = jnp.where(finite, jnp.where(grow, self.scale * self.factor, self.scale),
                          jnp.maximum(self.scale / self.factor, self.minimum))
        good = jnp.where(finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
