"""Optimizers and learning-rate schedules built from a TrainConfig."""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import optax

from jaxcnn.train.config import TrainConfig
from jaxcnn.train.whiten import is_stem_kernel, stem_kernel_path


def decay_mask(params):
    """True for parameters that get weight decay: kernels (ndim > 1). BatchNorm scales/biases and
    all biases are 1-D and are left alone (decaying BN scales just fights the normalisation)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def scale_biases(grads, factor: float):
    """`grads` with those of the parameters named `bias` (BatchNorm shifts, layer biases) times
    `factor`. Before SGD's L2 term this is a learning-rate multiplier for those parameters alone
    (they never decay: `decay_mask`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: g * jnp.asarray(factor, g.dtype) if getattr(path[-1], "key", None) == "bias" else g,
        grads)


def freeze_stem(grads, params):
    """`grads` with the first convolution's kernel's zeroed (`whiten_stem='frozen'`): with its
    decay masked too (`frozen_decay_mask`), every optimizer here leaves it unchanged."""
    stem = stem_kernel_path(params)
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if is_stem_kernel(path, stem) else g, grads)


def freeze_scales(grads):
    """`grads` with those of the parameters named `scale` (the normalisation layers' gains) zeroed:
    they stay at their init (1), as airbench's BatchNorm weights do. They never decay."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if getattr(path[-1], "key", None) == "scale" else g, grads)


def frozen_decay_mask(params):
    """decay_mask without the (frozen) first convolution's kernel."""
    stem = stem_kernel_path(params)
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim > 1 and not is_stem_kernel(path, stem), params)


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
    same, so a run may resume with a different clip_norm. Then `bias_lr_scale` (airbench's
    `bias_scaler`) multiplies the biases' gradients: with SGD (linear in the gradient) that is
    their learning rate times the factor; Adam, invariant to a per-parameter scale, ignores it.
    `whiten_stem='frozen'` zeroes the first convolution's gradient there and masks its decay;
    `freeze_norm_scales` zeroes the normalisation layers' scales' gradients.
    """
    schedule = make_schedule(config, steps_per_epoch)
    clip = optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity()
    frozen = config.whiten_stem == "frozen"
    if config.bias_lr_scale != 1.0 or frozen or config.freeze_norm_scales:
        # One stateless step (either clip keeps no state), not a chain: the optimizer state, and
        # so the checkpoints, keep one structure whatever the settings.
        def adjust(g, p, c=clip):
            g = c.update(g, optax.EmptyState(), p)[0]
            g = scale_biases(g, config.bias_lr_scale) if config.bias_lr_scale != 1.0 else g
            g = freeze_scales(g) if config.freeze_norm_scales else g
            return freeze_stem(g, p) if frozen else g
        clip = optax.stateless(adjust)
    mask = frozen_decay_mask if frozen else decay_mask
    wd = config.weight_decay
    if config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=wd, mask=mask)
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
