"""A torchsummary-style table for any Flax model: every submodule call with its output shape and
parameter count, then totals, multiply-accumulates and memory estimates.

Everything runs under `jax.eval_shape`, so a summary of a 224x224 model costs a trace, no FLOPs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence, Union

import jax
import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.models import create_model

_MB = 1024.0 ** 2


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _own_params(params: Dict[str, Any], path: Sequence[str]) -> int:
    """Parameters held by the module at `path` itself, not by its children (so rows add up)."""
    node = params
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return 0
        node = node[name]
    return sum(_count(v) for v in node.values() if not isinstance(v, dict)) if isinstance(node, dict) else 0


def _macs(module: nn.Module, args, out) -> int:
    """Multiply-accumulates of one Conv or Dense call, counted from its shapes (0 for others)."""
    if isinstance(module, nn.Conv):
        in_ch = args[0].shape[-1]
        return math.prod(out.shape) * math.prod(module.kernel_size) * in_ch // module.feature_group_count
    if isinstance(module, nn.Dense):
        return math.prod(out.shape) * args[0].shape[-1]
    return 0


def summary(model: Union[nn.Module, str], input_shape: Sequence[int], *, batch_size: int = 1,
            print_fn: Callable[[str], Any] = print, xla_flops: bool = False) -> Dict[str, Any]:
    """Print a torchsummary-like table for `model` and return the totals.

    Rows are every submodule call in call order, a module listed after its children (as
    torchsummary's forward hooks do): path, type, output shape, and the parameters the module
    holds itself (containers show 0), so the column adds up to the total.

    Args:
      model: a Flax module with `__call__(x, train=False)`, or a registered model name.
      input_shape: `(N, H, W, C)`, or `(H, W, C)` with `batch_size` prepended.
      batch_size: batch size used when `input_shape` has no batch dimension.
      print_fn: where each line goes (`print` by default; `None` prints nothing).
      xla_flops: also compile the forward pass and report XLA's cost-analysis flop count: 2 per
        multiply-add, but only for kernel taps inside the input (not on the zero padding), plus
        BatchNorm, activations and pooling; so close to, not equal to, 2 x `macs`.

    Returns:
      A dict: `total_params` (the `params` collection; equal to torchsummary's "Total params",
      which counts no buffers either), `trainable_params` (same), `non_trainable_params`
      (`batch_stats`: BatchNorm running statistics, not in the total), `macs` (multiply-
      accumulates of every Conv and Dense for the whole batch, counted from their shapes:
      output elements x kernel taps x input channels per group, padding taps included, as
      ptflops/fvcore count; BatchNorm, activations, pooling and additions are not counted), `input_size_mb`,
      `forward_backward_size_mb` (2 x the bytes of every row's output, torchsummary's
      estimate), `params_size_mb`, `batch_stats_size_mb`, `total_size_mb`, `rows` (a list of
      dicts: path, type, output_shape, params, macs) and, with `xla_flops`, `xla_flops`.
    """
    if isinstance(model, str):
        model = create_model(model)
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (batch_size,) + shape
    elif len(shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C) or (H, W, C), got {tuple(input_shape)}")
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    params = variables.get("params", {})
    stats = {k: v for k, v in variables.items() if k != "params"}

    rows: List[Dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mdl = context.module
        if context.method_name == "__call__" and mdl.scope is not None and mdl.scope.path:
            shapes = jax.tree.map(lambda a: tuple(a.shape), out)
            rows.append(dict(path="/".join(mdl.scope.path), type=type(mdl).__name__,
                             output_shape=shapes, params=_own_params(params, mdl.scope.path),
                             macs=_macs(mdl, args, out),
                             out_bytes=_nbytes(out)))
        return out

    def forward(v, x):
        # rows come from module calls, so trace without the inference-time conv-BN folding
        # (layers.conv_bn), which reads the BatchNorm's variables instead of calling it
        with nn.intercept_methods(record), ops.switched(FOLD_BN=False):
            return model.apply(v, x, train=False)

    out = jax.eval_shape(forward, variables, x)

    total = _count(params)
    non_trainable = _count(stats)
    macs = sum(r["macs"] for r in rows)
    input_mb = math.prod(shape) * 4 / _MB
    fwd_bwd_mb = 2 * sum(r.pop("out_bytes") for r in rows) / _MB
    params_mb = _nbytes(params) / _MB
    stats_mb = _nbytes(stats) / _MB
    result: Dict[str, Any] = dict(
        total_params=total, trainable_params=total, non_trainable_params=non_trainable, macs=macs,
        input_size_mb=input_mb, forward_backward_size_mb=fwd_bwd_mb, params_size_mb=params_mb,
        batch_stats_size_mb=stats_mb, total_size_mb=input_mb + fwd_bwd_mb + params_mb + stats_mb,
        output_shape=tuple(out.shape), rows=rows)
    if xla_flops:
        compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result["xla_flops"] = float(cost.get("flops", float("nan")))

    if print_fn is not None:
        names = [f"{r['path']} ({r['type']})" for r in rows]
        shapes = [str(list(r["output_shape"])) if isinstance(r["output_shape"], tuple)
                  else str(r["output_shape"]) for r in rows]
        w1 = max([len("Layer (type)")] + [len(n) for n in names]) + 2
        w2 = max([len("Output Shape")] + [len(s) for s in shapes]) + 2
        width = w1 + w2 + 14
        print_fn("-" * width)
        print_fn(f"{'Layer (type)':<{w1}}{'Output Shape':>{w2}}{'Param #':>14}")
        print_fn("=" * width)
        for n, s, r in zip(names, shapes, rows):
            print_fn(f"{n:<{w1}}{s:>{w2}}{r['params']:>14,}")
        print_fn("=" * width)
        print_fn(f"Total params: {total:,}")
        print_fn(f"Trainable params: {total:,}")
        print_fn(f"Non-trainable params (batch_stats, not in total): {non_trainable:,}")
        print_fn(f"MACs (Conv + Dense, counted from shapes, batch {shape[0]}): {macs:,} "
                 f"({macs / 1e9:.3f} G)")
        if xla_flops:
            print_fn(f"XLA cost-analysis flops: {result['xla_flops']:,.0f}")
        print_fn("-" * width)
        print_fn(f"Input size (MB): {input_mb:.2f}")
        print_fn(f"Forward/backward pass size (MB): {fwd_bwd_mb:.2f}")
        print_fn(f"Params size (MB): {params_mb:.2f}")
        print_fn(f"Batch stats size (MB): {stats_mb:.2f}")
        print_fn(f"Estimated Total Size (MB): {result['total_size_mb']:.2f}")
        print_fn("-" * width)
    return result


# `jaxcnn/__init__.py` re-exports this function as `jaxcnn.summary`, which shadows this module's
# attribute on the package; the alias keeps `jaxcnn.summary.summary(...)` working as well.
summary.summary = summary  # type: ignore[attr-defined]
