"""Shared test helpers: cheap model variables without compiling `init`."""
import os

# Tests run on the CPU; keep XLA from grabbing every thread for compiles in parallel runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def random_variables(model, input_shape, seed=0):
    """Variables with the model's exact tree, filled in numpy: He-scaled kernels, random BN affine
    and running statistics. Avoids compiling `model.init`, which costs more than the forward."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "kernel" in name:
            fan_in = int(np.prod(shape[:-1]))
            return jnp.asarray(rng.normal(0, np.sqrt(2.0 / fan_in), shape), leaf.dtype)
        if "scale" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, shape), leaf.dtype)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, shape), leaf.dtype)
        return jnp.asarray(rng.normal(0, 0.1, shape), leaf.dtype)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture
def make_variables():
    return random_variables
