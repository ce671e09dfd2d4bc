"""The one model registry: `create_model(name, ...)` and `list_models()`."""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Dict, List

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the rest of the library needs to know about a registered model."""
    name: str
    fn: Callable[..., nn.Module]
    image_size: int          # native input resolution (square)
    num_classes: int         # default class count
    recipe: str              # name of the seed training recipe this model defaults to
    description: str


_REGISTRY: Dict[str, ModelInfo] = {}


def register_model(name: str, *, image_size: int, num_classes: int = 10, recipe: str = "default",
                   description: str = ""):
    """Decorator: register a function `(**kwargs) -> nn.Module` under `name`."""
    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, fn, image_size, num_classes, recipe,
                                    description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


def list_models() -> List[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; a ValueError listing the known names if there is none."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int | None = None, **overrides) -> nn.Module:
    """Build a registered model.

    Args:
      name: a name from `list_models()`.
      num_classes: size of the classifier; defaults to the model's registered class count.
      **overrides: any field of the model's module (e.g. `dtype=jnp.bfloat16`, `se=True`,
        `growth_rate=...`, `remat=True`).
    """
    info = model_info(name)
    num_classes = info.num_classes if num_classes is None else num_classes
    try:
        return info.fn(num_classes=num_classes, **overrides)
    except TypeError as e:
        # A misspelt override would otherwise surface as a dataclass __init__ TypeError.
        fields = model_fields(name)
        unknown = sorted(set(overrides) - set(fields))
        if not unknown:
            raise
        hints = [f"{u!r} (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(u, fields, n=1))
                 else repr(u) for u in unknown]
        raise ValueError(f"model {name!r} has no field {', '.join(hints)}. Its fields: "
                         f"{', '.join(fields)}") from e


def build_error(name: str, image_size: int, err: Exception, model_kwargs=None) -> ValueError:
    """The error for a model that could not be built (traced) for `image_size` px images: `err`
    (e.g. a kwarg of the wrong type, an image too small for the strides) and what to check."""
    kw = f" with model_kwargs {model_kwargs}" if model_kwargs else ""
    check = "--model-kwargs and --image-size" if model_kwargs else "--image-size"
    return ValueError(f"cannot build {name} for {image_size}x{image_size} images{kw}: "
                      f"{type(err).__name__}: {err}\nCheck {check} (the model's native size is "
                      f"{model_info(name).image_size} px).")


def model_fields(name: str) -> List[str]:
    """The fields of `name`'s module that `create_model` accepts as overrides, sorted."""
    info = model_info(name)
    module = info.fn(num_classes=info.num_classes)
    return sorted(f.name for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name"))
