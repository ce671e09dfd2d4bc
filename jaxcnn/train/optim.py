"""Optimizers and learning-rate schedules built from a TrainConfig."""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import optax

from jaxcnn.train import fused
from jaxcnn.train.config import TrainConfig
from jaxcnn.train.whiten import is_stem_kernel, stem_kernel_path


def grad_multipliers(params, config: TrainConfig):
    """Per parameter, the factor its gradient is multiplied by after the clip: 0 (frozen) for the
    first convolution's kernel under `whiten_stem='frozen'` and for normalisation scales under
    `freeze_norm_scales`; `bias_lr_scale` for parameters named `bias` (BatchNorm shifts, layer
    biases: with SGD, linear in the gradient, their learning rate times the factor); else 1."""
    stem = stem_kernel_path(params) if config.whiten_stem == "frozen" else None

    def factor(path, p) -> float:
        name = getattr(path[-1], "key", None)
        if (stem is not None and is_stem_kernel(path, stem)) or (name == "scale" and config.freeze_norm_scales):
            return 0.0
        return config.bias_lr_scale if name == "bias" else 1.0
    return jax.tree_util.tree_map_with_path(factor, params)


def _scaled(g, m: float):
    return g if m == 1.0 else jnp.zeros_like(g) if m == 0.0 else g * jnp.asarray(m, g.dtype)


def decay_mask(params, config: TrainConfig):
    """True for parameters that get weight decay: kernels (ndim > 1) that are not frozen
    (`grad_multipliers` 0). BatchNorm scales/biases and all biases are 1-D and are left alone
    (decaying BN scales just fights the normalisation)."""
    return jax.tree.map(lambda p, m: p.ndim > 1 and m != 0.0, params, grad_multipliers(params, config))


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (one step = one update).

    cosine: linear warm-up for `warmup_epochs`, then cosine to `min_lr` at the last step (seed 004's
      CosineAnnealingLR(T_max=epochs, eta_min) evaluated per step; equal at every epoch end).
    step: `learning_rate`, multiplied by `decay_factor` at each of `decay_epochs` (seed 000: 1e-3,
      1e-4 from epoch 50).
    onecycle: optax's cosine one-cycle peaking at `learning_rate` after `onecycle_pct` of the run.
    constant: `learning_rate` (seed 001; its reduce-on-plateau is applied on top by the loop).
    """
    lr, total = config.learning_rate, max(1, config.epochs * steps_per_epoch)
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "step":
        return optax.piecewise_constant_schedule(
            lr, {int(e * steps_per_epoch): config.decay_factor for e in config.decay_epochs})
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total, lr, pct_start=config.onecycle_pct)
    if config.schedule == "cosine":
        warmup = int(round(config.warmup_epochs * steps_per_epoch))
        if warmup == 0:
            return optax.cosine_decay_schedule(lr, total, alpha=config.min_lr / lr)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=config.min_lr)
    raise ValueError(f"unknown schedule {config.schedule!r}")


def make_optimizer(config: TrainConfig, steps_per_epoch: int
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer chain and its schedule.

    adamw: decoupled weight decay (lr * wd * w), as torch.optim.AdamW and Keras AdamW.
    adam, sgd: L2 decay added to the gradient (wd * w), as torch's `weight_decay=` and seed 000's
      "L2 1e-4". Either way only kernels decay (`decay_mask`).
    Gradient clipping comes first; when it is off an identity keeps the state's structure the
    same, so a run may resume with a different clip_norm. Then `grad_multipliers` scales each
    parameter's gradient (airbench's `bias_scaler`, frozen parameters; Adam, invariant to a
    per-parameter scale, ignores all but the zeros); frozen kernels are not decayed either.
    The adamw chain comes as a `jaxcnn.train.fused.FusableTransformation`: the same optax chain,
    which the train step runs as one compiled pass on the CPU (optax's own arithmetic).
    """
    schedule = make_schedule(config, steps_per_epoch)
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity()
    adjusts = config.bias_lr_scale != 1.0 or config.whiten_stem == "frozen" or config.freeze_norm_scales
    if adjusts:
        # One stateless step (either clip keeps no state), not a chain: the optimizer state, and
        # so the checkpoints, keep one structure whatever the settings.
        def adjust(g, p, c=clip):
            g = c.update(g, optax.EmptyState(), p)[0]
            return jax.tree.map(_scaled, g, grad_multipliers(p, config))
        clip = optax.stateless(adjust)
    mask = functools.partial(decay_mask, config=config)
    wd = config.weight_decay
    if config.optimizer == "adamw":
        eps, eps_root = 1e-8, 0.0  # optax's defaults, named so that the fused update uses the same
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=eps, eps_root=eps_root,
                          weight_decay=wd, mask=mask)
        multipliers = functools.partial(grad_multipliers, config=config) if adjusts else None
        spec = fused.AdamWSpec(b1=config.b1, b2=config.b2, eps=eps, eps_root=eps_root, weight_decay=wd,
                               schedule=schedule, clip_norm=config.clip_norm or 0.0,
                               decay_mask=mask, multipliers=multipliers)
        return fused.FusableTransformation(optax.chain(clip, opt), spec), schedule
    elif config.optimizer == "adam":
        opt = optax.chain(optax.add_decayed_weights(wd, mask=mask),
                          optax.adam(schedule, b1=config.b1, b2=config.b2))
    elif config.optimizer == "sgd":
        opt = optax.chain(optax.add_decayed_weights(wd, mask=mask),
                          optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return optax.chain(clip, opt), schedule


def smooth_labels(soft_labels: jax.Array, smoothing: float) -> jax.Array:
    """(1 - s) * y + s / C, as torch's CrossEntropyLoss(label_smoothing=s) and Keras."""
    if not smoothing:
        return soft_labels
    return soft_labels * (1.0 - smoothing) + smoothing / soft_labels.shape[-1]


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), soft_labels)
