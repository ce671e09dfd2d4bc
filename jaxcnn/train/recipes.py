"""Named training recipes: the seeds' published settings as TrainConfig overrides.

A model's registry entry names its recipe (`jaxcnn.model_info(name).recipe`); `--recipe` picks
another, and every field stays overridable from the command line. Where a seed left a choice open
the recipe says what was filled in and why.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

from jaxcnn.train.config import TrainConfig
from jaxcnn.train.fast import FAST_RECIPE, FAST_SOURCE


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    source: str                  # which seed (or none) the values come from
    values: Mapping[str, Any]    # TrainConfig fields this recipe sets
    notes: str = ""

    def describe(self) -> str:
        vals = ", ".join(f"{k}={v}" for k, v in self.values.items())
        return f"recipe {self.name} ({self.source}): {vals}" + (f"\n  note: {self.notes}" if self.notes else "")


RECIPES: Dict[str, Recipe] = {r.name: r for r in [
    Recipe("default", "no seed: a plain CIFAR baseline",
           dict(optimizer="adamw", learning_rate=1e-3, weight_decay=5e-2, schedule="cosine",
                warmup_epochs=1.0, epochs=30, batch_size=128, crop_padding=4, flip=True,
                label_smoothing=0.1)),
    Recipe("seed000", "seed 000, DenseNet-BC on CIFAR-10 (TensorFlow 2.x guide)",
           dict(optimizer="adam", learning_rate=1e-3, schedule="step", decay_epochs=(50,),
                decay_factor=0.1, epochs=100, batch_size=64, crop_padding=0, flip=True,
                brightness=0.1, label_smoothing=0.1, weight_decay=1e-4, clip_norm=5.0,
                early_stopping_patience=5, early_stopping_metric="val_loss"),
           notes="the seed's 'L2 1e-4' is applied as L2 decay added to the gradient of kernels "
                 "(optimizer=adam); its early stopping watched a validation loss, here the "
                 "--val-fraction split rather than the test set."),
    Recipe("seed001", "seed 001, ResNet-18 on CIFAR-10 (TensorFlow 2.0)",
           dict(optimizer="adam", learning_rate=1e-3, weight_decay=0.0, schedule="constant",
                epochs=50, batch_size=128, crop_padding=0, flip=True, rotation=15.0, shift=0.1,
                zoom=0.1, plateau_patience=3, plateau_factor=0.1, plateau_metric="val_loss",
                early_stopping_patience=10, early_stopping_metric="val_loss", keep_best=True),
           notes="Keras ReduceLROnPlateau(factor=0.1, patience=3) and EarlyStopping(patience=10) "
                 "on val_loss; the best checkpoint is chosen by validation accuracy."),
    Recipe("seed002", "seed 002, CNN optimisation guide (Keras AdamW + CosineDecay)",
           dict(optimizer="adamw", learning_rate=1e-4, weight_decay=1e-5, schedule="cosine",
                min_lr=0.0, epochs=10, batch_size=32, crop_padding=4, flip=True),
           notes="the seed gives no augmentation or epoch count; pad-crop + flip and its tuner's "
                 "10 epochs are filled in."),
    Recipe("seed004", "seed 004, ResDenseNet (PyTorch, image folder, 80/20 split)",
           dict(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, label_smoothing=0.1,
                schedule="cosine", warmup_epochs=0.0, min_lr=1e-6, epochs=10, batch_size=8,
                crop_padding=0, flip=True, brightness=0.2, contrast=0.2, saturation=0.1,
                normalize="imagenet", test_fraction=0.2, keep_best=True),
           notes="CosineAnnealingLR(T_max=epochs, eta_min=1e-6) per step instead of per epoch "
                 "(the same value at each epoch end); 224 px comes from experiments/imagefolder.py; "
                 "the best model is picked on the validation split, not on the test set."),
    Recipe("fast", FAST_SOURCE, FAST_RECIPE,
           notes="budget, measured accuracy and sources: jaxcnn/train/fast.py"),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def default_recipe_for(model: str) -> str:
    """The recipe a model's registry entry names, or 'default' when that is not a preset."""
    from jaxcnn.models import model_info
    name = model_info(model).recipe
    return name if name in RECIPES else "default"


def build_config(recipe: str | None = None, *, base: Mapping[str, Any] = (), **overrides) -> TrainConfig:
    """TrainConfig defaults < `base` (a script's defaults) < the recipe < `overrides`.

    Args:
      recipe: a name from RECIPES; None picks the model's own (see default_recipe_for).
      base: defaults of the calling script (e.g. imagefolder.py's image_size=224).
      **overrides: explicit settings (the flags a user typed).
    """
    model = overrides.get("model", dict(base).get("model", TrainConfig.model))
    recipe = recipe or default_recipe_for(model)
    return TrainConfig(**{**dict(base), **get_recipe(recipe).values, **overrides, "recipe": recipe})


def describe(config: TrainConfig) -> str:
    """The recipe and every resolved setting, printed at the start of a run."""
    head = get_recipe(config.recipe).describe() if config.recipe else "no recipe"
    return head + "\nsettings: " + ", ".join(
        f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config) if f.name != "recipe")
