"""The explicit training state and the device mesh it lives on."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcnn.train.precision import LossScale


class TrainState(train_state.TrainState):
    """Everything a step reads and writes; saved whole, so a resumed run continues exactly.

    `step` counts optimizer updates; the step's randomness is `fold_in(rng, step)`, so the RNG
    state is (rng, step). `lr_scale` multiplies the schedule (reduce-on-plateau lowers it).
    `ema_params` is None unless an EMA of the weights (or lookahead's slow weights) is kept.
    """
    batch_stats: Any
    rng: jax.Array
    lr_scale: jax.Array
    loss_scale: LossScale
    ema_params: Optional[Any] = None


def make_mesh(num_devices: Optional[int] = None, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D ('data',) mesh over the first `num_devices` local devices (default: all)."""
    devices = list(devices if devices is not None else jax.local_devices())
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(f"devices={n}: this host has {len(devices)} device(s) "
                         f"({devices[0].platform}); choose 1..{len(devices)}")
    return Mesh(np.array(devices[:n]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def create_train_state(model, tx: optax.GradientTransformation, *, image_size: int, seed: int,
                       precision: str = "fp32", ema: bool = False, dtype=jnp.float32,
                       init_params: Optional[Callable[[Any], Any]] = None) -> TrainState:
    """Initialise parameters and BatchNorm statistics from `seed` (call under jit or eval_shape).

    Args:
      model: a Flax module built with `dtype` as its compute dtype (parameters are float32).
      tx: the optimizer.
      image_size: side of the square NHWC input used to trace shapes.
      seed: the run's seed; the init key and the per-step key stream both derive from it.
      precision: 'fp16' enables the dynamic loss scale.
      ema: keep an exponential moving average of the parameters.
      dtype: dtype of the dummy input.
      init_params: applied to the initialised parameters before the optimizer and EMA see them
        (e.g. a data-dependent first layer: jaxcnn.train.whiten).
    """
    root = jax.random.PRNGKey(seed)
    init_key, dropout_key, step_key = jax.random.split(root, 3)
    variables = model.init({"params": init_key, "dropout": dropout_key},
                           jnp.zeros((1, image_size, image_size, 3), dtype), train=False)
    params = variables["params"]
    if init_params is not None:
        params = init_params(params)
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=tx,
        batch_stats=variables.get("batch_stats", {}), rng=step_key,
        lr_scale=jnp.ones((), jnp.float32), loss_scale=LossScale.create(precision),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None)
    # An explicit int32 step, not a weakly typed Python 0: a restored state then has exactly the
    # same types, so the jitted steps are not traced a second time after a resume.
    return state.replace(step=jnp.zeros((), jnp.int32))


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
