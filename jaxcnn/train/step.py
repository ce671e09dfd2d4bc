"""Pure, jitted train and eval steps, data-parallel over a ('data',) device mesh.

The batch is sharded over the mesh's `data` axis and the state replicated, so under jit XLA
computes BatchNorm statistics and gradient means over the global batch (no pmap, no explicit
all-reduce). uint8 images cross host->device; augmentation and normalisation run in the step.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

from jaxcnn._xla import eval_compiler_options, train_compiler_options
from jaxcnn.layers import FOLDED, fold_batchnorm
from jaxcnn.train import fused
from jaxcnn.train.optim import cross_entropy, smooth_labels
from jaxcnn.train.precision import all_finite
from jaxcnn.train.state import TrainState, data_sharded, replicated

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class TraceCounter:
    """Counts how often each step function is traced: each trace is one XLA compilation."""

    def __init__(self):
        self.counts: Dict[str, int] = {}

    def hit(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...] taking every k-th example, so each device's contiguous shard of
    the batch stays on that device."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def lookahead_update(fast, slow, t, every: int, total: int):
    """airbench's lookahead after update `t` (1-based) of `total`: every `every` updates the slow
    weights move (1 - d) of the way to the fast ones and the fast restart from them, with d =
    0.95^5 (t / total)^3 (no pull early on, 0.77 at the end); update `total` itself ends on the
    slow weights (d = 1), which are then what is evaluated. Returns (fast, slow)."""
    t = jnp.asarray(t, jnp.int32)
    last = t >= total
    d = jnp.where(last, 1.0, 0.95 ** 5 * (t.astype(jnp.float32) / total) ** 3)
    sync = last | (t % every == 0)
    slow = jax.tree.map(lambda s, f: jnp.where(sync, d * s + (1.0 - d) * f, s), slow, fast)
    return jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast), slow


def make_train_step(*, num_classes: int, mean: Sequence[float], std: Sequence[float], augment,
                    label_smoothing: float = 0.0, grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    lookahead: int = 0, total_steps: int = 0, compute_dtype=jnp.float32, mesh=None,
                    counter: Optional[TraceCounter] = None, recomputes: bool = False) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Returns `train_step(state, batch) -> (state, metrics)`, jitted with the state donated.

    Args:
      num_classes, mean, std, augment: passed to jaxcnn.data.preprocess (augment: AugmentConfig).
      label_smoothing: applied to the (possibly mixed) soft labels.
      grad_accum_steps: the batch is split into this many micro-batches whose gradients are
        averaged before one update (BatchNorm statistics are per micro-batch).
      ema_decay: when > 0, state.ema_params tracks an EMA of the parameters.
      lookahead, total_steps: when lookahead > 0, state.ema_params holds the slow weights of
        `lookahead_update` (the run's last step is `total_steps`).
      compute_dtype: dtype of activations; parameters stay float32.
      mesh: a ('data',) Mesh; the batch is sharded over it and the state replicated.
      counter: a TraceCounter to prove the step compiles once.
      recomputes: the model recomputes activations in its backward pass
        (`jaxcnn.layers.recomputes(model)`); picks XLA:CPU's scheduler (see
        jaxcnn._xla.train_compiler_options).

    metrics (all scalars): loss (mean over the batch), correct, count, grad_norm, param_norm,
    update_norm, finite (bool: the step was applied), loss_scale.
    """
    from jaxcnn.data import preprocess
    k = grad_accum_steps
    if lookahead and total_steps < 1:
        raise ValueError("lookahead needs total_steps, the run's number of updates (its schedule "
                         "reaches the slow weights' full weight there)")

    def train_step(state: TrainState, batch):
        if counter is not None:
            counter.hit("train_step")
        step_key = jax.random.fold_in(state.rng, state.step)
        aug_key, dropout_key = jax.random.split(step_key)
        images, soft = preprocess(aug_key, batch["image"], batch["label"], num_classes=num_classes,
                                  mean=mean, std=std, augment=augment, dtype=compute_dtype)
        soft = smooth_labels(soft, label_smoothing)
        mask = batch["mask"].astype(jnp.float32)
        labels = batch["label"]

        def loss_fn(params, batch_stats, x, y, m, key):
            logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True,
                                             rngs={"dropout": key}, mutable=["batch_stats"])
            loss = jnp.sum(cross_entropy(logits, y) * m) / jnp.maximum(jnp.sum(m), 1.0)
            return state.loss_scale.scale_loss(loss), (loss, logits, updates["batch_stats"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if k == 1:
            (_, (loss, logits, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, images, soft, mask, dropout_key)
            correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
        else:
            def micro(carry, xs):
                grads_acc, batch_stats, loss_acc, correct_acc = carry
                x, y, m, lab, i = xs
                (_, (loss, logits, batch_stats)), g = grad_fn(
                    state.params, batch_stats, x, y, m, jax.random.fold_in(dropout_key, i))
                grads_acc = jax.tree.map(jnp.add, grads_acc, g)
                correct_acc = correct_acc + jnp.sum((jnp.argmax(logits, -1) == lab) * m)
                return (grads_acc, batch_stats, loss_acc + loss, correct_acc), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            xs = (_micro_batches(images, k), _micro_batches(soft, k), _micro_batches(mask, k),
                  _micro_batches(labels, k), jnp.arange(k))
            (grads, batch_stats, loss, correct), _ = jax.lax.scan(
                micro, (zeros, state.batch_stats, jnp.zeros(()), jnp.zeros(())), xs)
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = loss / k
        grads = state.loss_scale.unscale(grads)
        finite = all_finite(grads) if state.loss_scale.enabled else jnp.isfinite(loss)

        one_pass = None if state.loss_scale.enabled else fused.update(
            state.tx, grads, state.opt_state, state.params, state.lr_scale)
        if one_pass is not None:  # AdamW on the CPU: update and norms in one pass (jaxcnn.train.fused)
            params, opt_state, (grad_sq, param_sq, update_sq) = one_pass
        else:
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
            updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
            params = optax.apply_updates(state.params, updates)
            grad_sq, param_sq, update_sq = (fused.sum_sq(t) for t in (grads, params, updates))
        ema = state.ema_params
        if ema_decay:
            # Warm-up (as tf.train.ExponentialMovingAverage's num_updates): with a fixed decay the
            # random initial weights would still weigh decay**N after N steps.
            d = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        if lookahead:
            params, ema = lookahead_update(params, state.ema_params, state.step + 1, lookahead, total_steps)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats, ema_params=ema,
                            loss_scale=state.loss_scale.update(finite))
        if state.loss_scale.enabled:
            # fp16: a step with non-finite gradients changes nothing but the step and loss scale.
            keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(finite, x, y), a, b)
            new = new.replace(params=keep(new.params, state.params),
                              opt_state=keep(new.opt_state, state.opt_state),
                              batch_stats=keep(new.batch_stats, state.batch_stats),
                              ema_params=keep(new.ema_params, state.ema_params))
        metrics = dict(loss=loss, correct=correct, count=jnp.sum(mask),
                       grad_norm=jnp.sqrt(grad_sq), param_norm=jnp.sqrt(param_sq),
                       update_norm=jnp.sqrt(update_sq), finite=finite,
                       loss_scale=state.loss_scale.scale)
        return new, metrics

    opts = train_compiler_options(recomputes)
    if mesh is None:
        return jax.jit(train_step, donate_argnums=0, compiler_options=opts)
    return jax.jit(train_step, donate_argnums=0, compiler_options=opts,
                   in_shardings=(replicated(mesh), data_sharded(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)))


def make_eval_step(*, num_classes: int, mean: Sequence[float], std: Sequence[float],
                   label_smoothing: float = 0.0, use_ema: bool = False, tta_flip: bool = False,
                   tta_translate: int = 0, compute_dtype=jnp.float32,
                   mesh=None, counter: Optional[TraceCounter] = None):
    """Returns `eval_step(state, batch, folded=None) -> metrics`: summed loss and correct over the
    examples with mask=True (padding is ignored), their count, and the per-example predictions
    [B]. `folded`: `make_fold_step`'s output for this state, to run the conv-BN units on weights
    folded once per evaluation instead of once per batch. Test-time augmentation: `tta_flip` adds
    each view's mirror image; `tta_translate` P > 0 adds the image shifted by P pixels up-left and
    down-right (reflect padding), each at half the weight of the centred view (airbench's level 2).
    The logits are the weighted mean over the views, so the loss stays that of one prediction."""
    from jaxcnn.data import preprocess

    def eval_step(state: TrainState, batch, folded=None):
        if counter is not None:
            counter.hit("eval_step")
        images, soft = preprocess(jax.random.PRNGKey(0), batch["image"], batch["label"],
                                  num_classes=num_classes, mean=mean, std=std, augment=None,
                                  dtype=compute_dtype)
        variables = eval_variables(state, use_ema, folded)
        def views_logits(x):
            out = state.apply_fn(variables, x, train=False)
            if tta_flip:  # mirror images are as likely as the originals: average both views
                out = 0.5 * (out + state.apply_fn(variables, x[:, :, ::-1], train=False))
            return out

        logits = views_logits(images)
        if tta_translate:
            p, (h, w) = tta_translate, images.shape[1:3]
            padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
            shifted = views_logits(padded[:, :h, :w]) + views_logits(padded[:, 2 * p:2 * p + h, 2 * p:2 * p + w])
            logits = 0.5 * logits + 0.25 * shifted
        mask = batch["mask"].astype(jnp.float32)
        pred = jnp.argmax(logits, -1)
        loss = cross_entropy(logits, smooth_labels(soft, label_smoothing))
        return dict(loss_sum=jnp.sum(loss * mask), correct=jnp.sum((pred == batch["label"]) * mask),
                    count=jnp.sum(mask), pred=pred)

    opts = eval_compiler_options()
    if mesh is None:
        return jax.jit(eval_step, compiler_options=opts)
    sharded = jax.jit(eval_step, in_shardings=(replicated(mesh), data_sharded(mesh), replicated(mesh)),
                      out_shardings=replicated(mesh), compiler_options=opts)
    # in_shardings must name every positional argument, so `folded` is always passed ({}: none)
    return lambda state, batch, folded=None: sharded(state, batch, {} if folded is None else folded)


def eval_variables(state: TrainState, use_ema: bool, folded=None) -> Dict:
    """The variables inference applies the model with: the (EMA) parameters, the BatchNorm
    statistics and, when given, `make_fold_step`'s folded conv-BN weights."""
    v = {"params": state.ema_params if use_ema else state.params, "batch_stats": state.batch_stats}
    return {**v, FOLDED: folded} if folded else v


def make_fold_step(*, use_ema: bool = False, compute_dtype=jnp.float32):
    """Returns `fold(state, image_shape) -> folded`, for `eval_step(state, batch, folded)`: the
    kernels and biases of the conv-BN units with their BatchNorm folded in
    (`jaxcnn.layers.fold_batchnorm`), computed once per evaluation. `image_shape`: one
    preprocessed image's (H, W, C). Empty (and the step unchanged) where nothing folds: several
    devices, other platforms."""
    def fold(state: TrainState, image_shape):
        return fold_batchnorm(state.apply_fn, eval_variables(state, use_ema), image_shape, compute_dtype)[FOLDED]

    return jax.jit(fold, static_argnames="image_shape")


def normalization(normalize: str, data_mean, data_std):
    """(mean, std) on the 0..255 scale: the data set's own, or ImageNet's (seed 004)."""
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(m) for m in data_mean), tuple(float(s) for s in data_std)
