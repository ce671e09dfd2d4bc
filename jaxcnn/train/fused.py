"""AdamW's update and the step's three norms in one pass over the parameters, on the CPU.

`make_train_step` applies the optimizer and reports the norms of the gradient, of the new
parameters and of the update. XLA:CPU fuses AdamW alone into one loop per parameter, but those
norms split it: the update is materialised for its norm, and the gradient's square is shared
with the second moment's. For resnet18_cifar's 11.2M parameters on the 2-core Xeon that was 37-41
ms per update against 11-12 for the update alone. jaxcnn's compiled library
(jaxcnn/csrc/native.c, `jaxcnn_adamw`) reads p, g, m, v once, writes p, m, v in place and sums
g^2, p^2 and u^2 on the way, split over XLA's thread pool: 14-16 ms for the same update with
its norms. In the training step (one process, both steps alternated, 2-core Xeon, session 33):
simple_cnn at batch 32 2,329 -> 3,038 images/s, resnet18_cifar at batch 32 65.8 -> 71.8 and at
batch 128 77.9 -> 79.5. Each call waits for the whole gradient (see `update`); without that XLA copied every
parameter twice per step.

It applies to the AdamW chain `jaxcnn.train.optim.make_optimizer` builds (gradient clipping and
per-parameter multipliers included), float32 parameters, on the CPU, with the library built
(`jaxcnn.native.path`), without fp16's loss scale. `update` returns None anywhere else and the
step uses optax. JAXCNN_FUSED_ADAMW=0 turns it off (A/B measurements).
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

TARGET = "jaxcnn_adamw"


class AdamWSpec(NamedTuple):
    """What the fused update needs of the chain make_optimizer built: optax's own
    hyperparameters, the schedule, the clip and the per-parameter trees (callables of params)."""
    b1: float
    b2: float
    eps: float
    eps_root: float
    weight_decay: float
    schedule: optax.Schedule
    clip_norm: float            # 0: no clip
    decay_mask: object          # params -> tree of bool
    multipliers: object         # params -> tree of float (jaxcnn.train.optim.grad_multipliers)


class FusableTransformation(optax.GradientTransformation):
    """An optax GradientTransformation (the chain itself: its init and update) that also carries
    the `AdamWSpec` `update` below needs."""

    def __new__(cls, tx: optax.GradientTransformation, spec: AdamWSpec):
        self = super().__new__(cls, tx.init, tx.update)
        self.spec = spec
        return self


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """The compiled handler is built and registered with XLA (CPU)."""
    if os.environ.get("JAXCNN_FUSED_ADAMW", "1") in ("0", "false", "False"):
        return False
    from jaxcnn import native
    where = native.path()
    if where is None:
        return False
    try:
        lib = ctypes.CDLL(where)
        fn = lib.jaxcnn_adamw
    except (OSError, AttributeError):
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(fn), platform="cpu")
    return True


def sum_sq(tree) -> jax.Array:
    """The sum of squares of every element of `tree`, in float32 (a norm's square)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def adamw_leaf(p, g, m, v, h):
    """One parameter's (p, m, v) after the update and its float32[3] sums (g^2, p^2, u^2); `h`
    float32[12] as native.c's AdamW section lists. The results reuse p's, m's and v's buffers."""
    f32 = jax.ShapeDtypeStruct
    call = jax.ffi.ffi_call(TARGET, (f32(p.shape, jnp.float32), f32(m.shape, jnp.float32),
                                     f32(v.shape, jnp.float32), f32((3,), jnp.float32)),
                            input_output_aliases={0: 0, 2: 1, 3: 2})
    return call(p, g, m, v, h)


def update(tx, grads, opt_state, params, lr_scale):
    """One AdamW step of `tx` fused: (params, opt_state, (grad_sq, param_sq, update_sq)), the
    sums of squares of the gradient (as given: before clip and multipliers), of the new
    parameters and of the applied update (`lr_scale` included), as optax's chain computes them up
    to float32 rounding. None where it does not apply (see the module docstring)."""
    spec = getattr(tx, "spec", None)
    if spec is None or jax.default_backend() != "cpu" or not available():
        return None
    if any(jnp.dtype(p.dtype) != jnp.float32 for p in jax.tree.leaves(params)):
        return None
    try:  # make_optimizer's chain: (clip or its stand-in, (adam, masked decay, schedule))
        clip_state, (adam, decay_state, sched) = opt_state
    except (TypeError, ValueError):
        return None
    if not (isinstance(adam, optax.ScaleByAdamState) and isinstance(sched, optax.ScaleByScheduleState)):
        return None
    count = optax.safe_increment(adam.count)
    c1 = 1.0 / (1.0 - spec.b1 ** count)   # optax.tree.bias_correction divides by these
    c2 = 1.0 / (1.0 - spec.b2 ** count)
    step = -spec.schedule(sched.count) * lr_scale
    gscale = jnp.ones((), jnp.float32)
    grad_sq = None
    if spec.clip_norm:  # optax.clip_by_global_norm, before the multipliers
        grad_sq = sum_sq(grads)
        norm = jnp.sqrt(grad_sq)
        gscale = jnp.where(norm < spec.clip_norm, 1.0, spec.clip_norm / norm)
    mults = spec.multipliers(params) if spec.multipliers else jax.tree.map(lambda _: 1.0, params)
    decays = spec.decay_mask(params)
    treedef = jax.tree.structure(params)
    # Every call waits for the whole gradient (one element of each leaf, summed, rides in `h`):
    # a call may overwrite its parameter in place only once nothing reads it any more, and the
    # backward pass reads layer L's kernel (for the gradient of layer L - 1's output) after layer
    # L's own gradient exists. Without this XLA copied every parameter, twice, to be safe.
    after = sum(g.ravel()[0] for g in jax.tree.leaves(grads)) * 0.0
    out = []
    for p, g, m, v, k, d in zip(*(treedef.flatten_up_to(t) for t in (params, grads, adam.mu, adam.nu, mults, decays))):
        h = jnp.stack([jnp.asarray(x, jnp.float32) for x in
                       (gscale * k, spec.b1, 1.0 - spec.b1, spec.b2, 1.0 - spec.b2, spec.eps, spec.eps_root, c1, c2,
                        spec.weight_decay if d else 0.0, step, after)])
        out.append(adamw_leaf(p, g, m, v, h))
    new_p, new_m, new_v, sums = (treedef.unflatten([o[i] for o in out]) for i in range(4))
    sums = jnp.sum(jnp.stack(jax.tree.leaves(sums)), axis=0)
    opt_state = (clip_state, (adam._replace(count=count, mu=new_m, nu=new_v), decay_state,
                              sched._replace(count=optax.safe_increment(sched.count))))
    return new_p, opt_state, (sums[0] if grad_sq is None else grad_sq, sums[1], sums[2])
