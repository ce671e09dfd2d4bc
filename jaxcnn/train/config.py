"""TrainConfig: every setting of a run, as data. Each field is a command-line flag (see cli.py)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Tuple


def _field(default, help: str, group: str, **meta):
    """A config field with its help text, flag group and optional `choices` / `check`."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata=dict(help=help, group=group, **meta))
    return dataclasses.field(default=default, metadata=dict(help=help, group=group, **meta))


# Value checks shared by TrainConfig.validate and the argparse types: (predicate, description).
POSITIVE = (lambda v: v > 0, "a number > 0")
NONNEG = (lambda v: v >= 0, "a number >= 0")
FRACTION = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")
UNIT = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "a number in (0, 1)")

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "step", "onecycle", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
MONITORS = ("val_loss", "val_acc")
NORMALIZATIONS = ("dataset", "imagenet")
WHITEN_STEM = ("off", "init", "frozen")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults < script defaults < recipe (recipes.py) < explicit flags."""
    # --- model
    model: str = _field("resnet18_cifar", "registered model name (jaxcnn.list_models())", "model")
    num_classes: Optional[int] = _field(None, "classifier width; default: the data set's class count",
                                        "model", check=POSITIVE)
    model_kwargs: Dict[str, Any] = _field({}, "model overrides as KEY=VALUE (Python literals), e.g. "
                                          "growth_rate=12 block_config=(3,3,3)", "model")
    # --- data
    dataset: str = _field("cifar10", "TFDS data set name (or which CIFAR batches inside --data-dir)", "data")
    data_dir: Optional[str] = _field(None, "image folder (DIR/train/<class>/, DIR/test/<class>/ or "
                                     "DIR/<class>/), cifar-10-batches-py folder or TFDS data dir", "data")
    image_size: Optional[int] = _field(None, "resize images to SxS; default: the data's own size", "data",
                                       check=POSITIVE)
    val_fraction: float = _field(0.1, "share of train held out for validation (model selection, "
                                 "early stopping, plateau); 0 monitors the test set", "data", check=FRACTION)
    test_fraction: float = _field(0.2, "test share when an image folder has no test/ split", "data",
                                  check=OPEN_UNIT)
    limit_per_class: Optional[int] = _field(None, "use only the first N images per class and split",
                                            "data", check=POSITIVE)
    cache_dir: Optional[str] = _field(None, "cache for decoded image folders", "data")
    normalize: str = _field("dataset", "per-channel mean/std: the training set's, or ImageNet's "
                            "(seed 004)", "data", choices=NORMALIZATIONS)
    # --- augmentation (jaxcnn.data.AugmentConfig, applied per batch inside the jitted step)
    crop_padding: int = _field(4, "random crop after padding by P pixels (0 = off)", "augmentation",
                               check=NONNEG)
    flip: bool = _field(True, "random horizontal flip", "augmentation")
    alternate_flip: bool = _field(False, "with --flip: mirror a fixed random half of the images in "
                                  "odd epochs and the other half in even ones (airbench's "
                                  "derandomised flip) instead of a coin per image and epoch",
                                  "augmentation")
    brightness: float = _field(0.0, "random brightness delta (fraction of 255)", "augmentation", check=NONNEG)
    contrast: float = _field(0.0, "random contrast factor range", "augmentation", check=UNIT)
    saturation: float = _field(0.0, "random saturation factor range", "augmentation", check=UNIT)
    rotation: float = _field(0.0, "random rotation, max degrees", "augmentation", check=NONNEG)
    shift: float = _field(0.0, "random shift, max fraction of height/width", "augmentation", check=FRACTION)
    zoom: float = _field(0.0, "random zoom range", "augmentation", check=FRACTION)
    cutout: int = _field(0, "cutout square side in pixels (0 = off)", "augmentation", check=NONNEG)
    mixup_alpha: float = _field(0.0, "mixup Beta(alpha, alpha) (0 = off)", "augmentation", check=NONNEG)
    cutmix_alpha: float = _field(0.0, "cutmix Beta(alpha, alpha) (0 = off)", "augmentation", check=NONNEG)
    # --- optimisation
    # In Python, recipes.build_config(recipe, ...) applies a recipe; this field only records it.
    recipe: Optional[str] = _field(None, "named preset the other settings start from (see "
                                   "jaxcnn/train/recipes.py); default: the model's seed recipe",
                                   "optimization")
    optimizer: str = _field("adamw", "adamw (decoupled decay), adam or sgd (L2 decay added to the "
                            "gradient, as torch/Keras do)", "optimization", choices=OPTIMIZERS)
    learning_rate: float = _field(1e-3, "peak learning rate", "optimization", check=POSITIVE)
    weight_decay: float = _field(0.0, "weight decay on kernels only (never BatchNorm or biases)",
                                 "optimization", check=NONNEG)
    b1: float = _field(0.9, "Adam beta1", "optimization", check=OPEN_UNIT)
    b2: float = _field(0.999, "Adam beta2", "optimization", check=OPEN_UNIT)
    momentum: float = _field(0.9, "SGD momentum (0 = plain SGD)", "optimization", check=(lambda v: 0 <= v < 1, "a number in [0, 1)"))
    nesterov: bool = _field(False, "SGD Nesterov momentum", "optimization")
    bias_lr_scale: float = _field(1.0, "learning-rate multiplier for parameters named bias "
                                  "(BatchNorm shifts, layer biases) under sgd; airbench uses 64",
                                  "optimization", check=POSITIVE)
    whiten_stem: str = _field("off", "start the first convolution as a patch-whitening filter bank "
                              "computed from 5,000 training images (airbench): +/- the leading "
                              "eigenvectors of the patch covariance; 'frozen' also keeps it fixed "
                              "(no updates, no decay)", "optimization", choices=WHITEN_STEM)
    freeze_norm_scales: bool = _field(False, "keep the normalisation layers' scales at 1 (airbench "
                                      "freezes its BatchNorm weights and trains their biases at "
                                      "--bias-lr-scale 64)", "optimization")
    clip_norm: Optional[float] = _field(None, "clip gradients by global norm (none = off)", "optimization",
                                        check=POSITIVE)
    label_smoothing: float = _field(0.0, "label smoothing", "optimization", check=FRACTION)
    schedule: str = _field("cosine", "learning-rate schedule", "optimization", choices=SCHEDULES)
    warmup_epochs: float = _field(0.0, "linear warm-up epochs (cosine)", "optimization", check=NONNEG)
    min_lr: float = _field(0.0, "final learning rate of cosine (eta_min)", "optimization", check=NONNEG)
    decay_epochs: Tuple[int, ...] = _field((), "step schedule: epochs at which lr *= decay_factor",
                                           "optimization", check=POSITIVE)
    decay_factor: float = _field(0.1, "step schedule factor", "optimization", check=OPEN_UNIT)
    onecycle_pct: float = _field(0.3, "one-cycle: share of steps spent rising", "optimization",
                                 check=OPEN_UNIT)
    plateau_patience: int = _field(0, "reduce lr when --plateau-metric has not improved for N epochs "
                                   "(0 = off)", "optimization", check=NONNEG)
    plateau_factor: float = _field(0.1, "reduce-on-plateau factor", "optimization", check=OPEN_UNIT)
    plateau_metric: str = _field("val_loss", "metric watched by reduce-on-plateau", "optimization",
                                 choices=MONITORS)
    plateau_min_lr: float = _field(0.0, "reduce-on-plateau floor", "optimization", check=NONNEG)
    early_stopping_patience: int = _field(0, "stop when --early-stopping-metric has not improved for N "
                                          "epochs (0 = off)", "optimization", check=NONNEG)
    early_stopping_metric: str = _field("val_loss", "metric watched by early stopping", "optimization",
                                        choices=MONITORS)
    keep_best: bool = _field(True, "evaluate the test set with the checkpoint of best validation "
                             "accuracy (else the last)", "optimization")
    epochs: int = _field(30, "training epochs", "optimization", check=POSITIVE)
    batch_size: int = _field(128, "global batch size (all devices, one optimizer update)", "optimization",
                             check=POSITIVE)
    eval_batch_size: Optional[int] = _field(None, "evaluation batch size; default --batch-size",
                                            "optimization", check=POSITIVE)
    grad_accum_steps: int = _field(1, "split each batch into N micro-batches and accumulate gradients",
                                   "optimization", check=POSITIVE)
    ema_decay: float = _field(0.0, "keep an exponential moving average of the weights and evaluate "
                              "with it (0 = off)", "optimization", check=FRACTION)
    lookahead: int = _field(0, "every N steps pull the weights towards a slow copy and restart from "
                            "it (airbench's lookahead: slow += (1 - d) (fast - slow), d rising as "
                            "0.95^5 (t/T)^3; the last step takes the slow copy); 0 = off, airbench "
                            "uses 5", "optimization", check=NONNEG)
    eval_every: int = _field(1, "evaluate the validation (or test) split every N epochs and after the "
                             "last; 0 = only after the last (epochs between log no val figures)",
                             "optimization", check=NONNEG)
    tta_flip: bool = _field(False, "evaluate on each image and its mirror image, averaging the logits "
                            "(flip test-time augmentation)", "optimization")
    tta_translate: int = _field(0, "also evaluate on each image shifted by P pixels up-left and "
                                "down-right (reflect padding), at half weight each; with --tta-flip, "
                                "their mirror images too (airbench's level-2 TTA: 6 views)",
                                "optimization", check=NONNEG)
    steps_per_epoch: Optional[int] = _field(None, "cap on optimizer steps per epoch (quick runs)",
                                            "optimization", check=POSITIVE)
    seed: int = _field(0, "seed of initialisation, data order, augmentation and dropout", "optimization")
    # --- hardware
    precision: str = _field("fp32", "fp32; bf16 compute with f32 weights; fp16 compute with dynamic "
                            "loss scaling", "hardware", choices=PRECISIONS)
    devices: Optional[int] = _field(None, "data-parallel over the first N local devices (default all)",
                                    "hardware", check=POSITIVE)
    # --- run
    workdir: Optional[str] = _field(None, "run directory (checkpoints, logs, plots); default "
                                    "runs/<model>-<dataset>; re-running into it resumes", "run")
    keep_checkpoints: int = _field(3, "keep the last N epoch checkpoints (plus the best)", "run",
                                   check=POSITIVE)
    resume: bool = _field(False, "require a checkpoint in --workdir to resume from (re-running into "
                          "a work directory resumes anyway)", "run")
    eval_only: bool = _field(False, "evaluate --checkpoint on the test set and exit", "run")
    checkpoint: Optional[str] = _field(None, "checkpoint to evaluate: a work directory, its "
                                       "checkpoints/ folder or one epoch's folder", "run")
    progress: bool = _field(True, "progress bar per epoch", "run")

    # ------------------------------------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decay_epochs"] = list(self.decay_epochs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {sorted(names)}")
        d = dict(d)
        if "decay_epochs" in d:
            d["decay_epochs"] = tuple(int(e) for e in d["decay_epochs"])
        if "model_kwargs" in d:  # JSON turned tuples into lists; Flax module fields want tuples
            d["model_kwargs"] = {k: _tuples(v) for k, v in d["model_kwargs"].items()}
        return cls(**d)

    @property
    def resolved_workdir(self) -> str:
        return self.workdir or f"runs/{self.model}-{self.dataset}"

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the first bad field; returns self."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise ValueError(f"{f.name}={v!r} is not one of {', '.join(choices)}")
            check = f.metadata.get("check")
            if check is not None and v is not None:
                ok, what = check
                vals = v if isinstance(v, tuple) else (v,)
                if not all(ok(x) for x in vals):
                    raise ValueError(f"{f.name}={v!r}: must be {what}")
        if self.schedule == "step" and not self.decay_epochs:
            raise ValueError("schedule=step needs decay_epochs (e.g. --decay-epochs 50)")
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)):
            raise ValueError(f"decay_epochs={self.decay_epochs} must be increasing")
        if self.warmup_epochs >= self.epochs and self.schedule == "cosine" and self.warmup_epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by "
                             f"grad_accum_steps={self.grad_accum_steps}")
        if self.alternate_flip and not self.flip:
            raise ValueError("alternate_flip decides how --flip mirrors the images; it needs flip "
                             "(drop --no-flip or --alternate-flip)")
        if self.eval_every != 1 and (self.plateau_patience or self.early_stopping_patience):
            raise ValueError(f"eval_every={self.eval_every}: reduce-on-plateau and early stopping count "
                             "epochs of validation figures; use --eval-every 1 with them")
        if self.lookahead and self.ema_decay:
            raise ValueError("lookahead and ema_decay each keep a second copy of the weights in the "
                             "same place; use one (--lookahead 0 or --ema-decay 0)")
        if self.eval_only and not self.checkpoint:
            raise ValueError("eval_only needs checkpoint (--checkpoint DIR)")
        return self

    def augment_config(self):
        """The jaxcnn.data.AugmentConfig these settings describe."""
        from jaxcnn.data import AugmentConfig
        # alternate_flip: the loader mirrors the images (it knows each one's index and the epoch)
        return AugmentConfig(crop_padding=self.crop_padding, flip=self.flip and not self.alternate_flip,
                             brightness=self.brightness,
                             contrast=self.contrast, saturation=self.saturation, rotation=self.rotation,
                             shift=self.shift, zoom=self.zoom, cutout=self.cutout,
                             mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _jsonable(o):
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")

