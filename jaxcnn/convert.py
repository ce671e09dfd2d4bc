"""PyTorch `state_dict` -> Flax variables for jaxcnn models (no torch import needed).

One generic rule does the work: a torch key `a.b.c.weight` names the Flax module `a/b/c` and
its leaf (`weight` -> `kernel` for conv/linear, `scale` for BatchNorm; `running_mean` -> `mean`,
`running_var` -> `var` in `batch_stats`). Each family only lists the module renames where its
PyTorch layout differs from jaxcnn's. Every Flax leaf must be filled and every torch key used;
anything else raises `ConversionError` naming the keys.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcnn.models import (DenseNet, MobileNetV1, ResDenseNet, ResNet, SimpleCNN, VGG, create_model,
                           model_info)

Rename = Tuple[str, Union[str, Callable[[re.Match], str]]]


class ConversionError(ValueError):
    """The state_dict does not fit the model: unknown keys, missing keys or wrong shapes."""


# Renames act on the torch module path (the key without its leaf name), in order.
# torchvision DenseNet (ImageNet and the CIFAR stem): everything lives under `features.`.
_DENSENET: Sequence[Rename] = [(r"^features\.", "")]
# torchvision ResNet (+ jaxcnn's preact variant): `layer1.0` is one Flax module, `layer1_0`;
# the shortcut Sequential `downsample.{0,1}` is (conv, BN).
_RESNET: Sequence[Rename] = [(r"^layer(\d+)\.(\d+)", r"layer\1_\2"),
                             (r"\.downsample\.0$", ".downsample_conv"),
                             (r"\.downsample\.1$", ".downsample_bn")]
# Seed 004's ResDenseNet: ModuleLists are 0-based and the dense layers use bn1/bn2.
_RESDENSENET: Sequence[Rename] = [
    (r"^stem\.0$", "stem_conv"), (r"^stem\.1$", "stem_bn"),
    (r"^stages\.(\d+)\.dense_layers\.(\d+)\.bn(\d)$",
     lambda m: f"block{int(m[1]) + 1}.dense.denselayer{int(m[2]) + 1}.norm{m[3]}"),
    (r"^stages\.(\d+)\.dense_layers\.(\d+)\.conv(\d)$",
     lambda m: f"block{int(m[1]) + 1}.dense.denselayer{int(m[2]) + 1}.conv{m[3]}"),
    (r"^stages\.(\d+)\.compress\.0$", lambda m: f"block{int(m[1]) + 1}.compress_norm"),
    (r"^stages\.(\d+)\.compress\.2$", lambda m: f"block{int(m[1]) + 1}.compress_conv"),
    (r"^transitions\.(\d+)\.bn$", lambda m: f"transition{int(m[1]) + 1}.norm"),
    (r"^transitions\.(\d+)\.conv$", lambda m: f"transition{int(m[1]) + 1}.conv")]
# jaxcnn.torch_ref's SimpleCNN and VGG already use the Flax names; MobileNetV1's stem is `conv_stem`
# in Flax (`stem` names its output in `intermediates`).
_MOBILENET: Sequence[Rename] = [(r"^stem\.", "conv_stem.")]
_FAMILIES: Sequence[Tuple[type, Sequence[Rename]]] = [
    (DenseNet, _DENSENET), (ResNet, _RESNET), (ResDenseNet, _RESDENSENET),
    (SimpleCNN, ()), (VGG, ()), (MobileNetV1, _MOBILENET)]

# torch leaf -> (Flax collection, leaf) for conv/linear modules and for BatchNorm.
_DENSE_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_IGNORED = ("num_batches_tracked",)
# The final linear layer of each family, used to infer num_classes.
_HEADS = ("classifier.weight", "fc.weight", "head.weight")


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def torch_to_flax_layout(x: np.ndarray, leaf: str) -> np.ndarray:
    """Conv OIHW -> HWIO (grouped/depthwise: (O, I/g, kh, kw) -> (kh, kw, I/g, O)); Linear
    (out, in) -> (in, out); vectors unchanged."""
    if leaf == "kernel" and x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    if leaf == "kernel" and x.ndim == 2:
        return x.T
    return x


def rename_key(key: str, renames: Sequence[Rename]) -> Tuple[str, str]:
    """`'layer1.0.downsample.1.running_var'` -> (`'layer1_0/downsample_bn'`, `'running_var'`)."""
    module, _, leaf = key.rpartition(".")
    for pattern, repl in renames:
        module = re.sub(pattern, repl, module)
    return module.replace(".", "/"), leaf


def _family(model) -> Sequence[Rename]:
    for cls, renames in _FAMILIES:
        if isinstance(model, cls):
            return renames
    raise ConversionError(f"no PyTorch name map for {type(model).__name__}")


def from_torch(name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Dict[str, Any]:
    """Convert a PyTorch state_dict into Flax variables for `jaxcnn.create_model(name, ...)`.

    Args:
      name: a jaxcnn model name (`jaxcnn.list_models()`); its family picks the key renames
        (torchvision DenseNet/ResNet layouts, seed 004's ResDenseNet, `jaxcnn.torch_ref`).
      state_dict: torch key -> `torch.Tensor` or `np.ndarray`, e.g. `model.state_dict()` or a
        torchvision checkpoint. `num_batches_tracked` entries are ignored.
      **model_kwargs: passed to `create_model`; `num_classes` defaults to the row count of the
        state_dict's classifier (`classifier`/`fc`/`head`).

    Returns:
      `{'params': ..., 'batch_stats': ...}` with every leaf of `model.init`'s tree filled, in
      the model's `param_dtype`.

    Raises:
      ConversionError (a ValueError) listing every torch key with no place in the model, every
      model leaf no key fills, and every shape mismatch (torch shape and expected shape).
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items() if k.rpartition(".")[2] not in _IGNORED}
    if "num_classes" not in model_kwargs:
        heads = [k for k in _HEADS if k in sd and sd[k].ndim == 2]
        if heads:
            model_kwargs["num_classes"] = sd[heads[0]].shape[0]
    model = create_model(name, **model_kwargs)
    size = model_info(name).image_size
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    flat_target = traverse_util.flatten_dict({c: target[c] for c in ("params", "batch_stats")
                                              if c in target}, sep="/")
    modules = {k.rpartition("/")[0].partition("/")[2] for k in flat_target}  # 'a/b' from 'params/a/b/x'

    renames = _family(model)
    filled: Dict[str, np.ndarray] = {}
    unknown: List[str] = []
    mismatched: List[str] = []
    for key, value in sd.items():
        module, leaf = rename_key(key, renames)
        is_bn = f"batch_stats/{module}/mean" in flat_target
        table = _BN_LEAVES if is_bn else _DENSE_LEAVES
        if module not in modules or leaf not in table:
            unknown.append(f"{key!r} (-> {module}/{leaf})")
            continue
        collection, flax_leaf = table[leaf]
        path = f"{collection}/{module}/{flax_leaf}"
        if path not in flat_target:
            unknown.append(f"{key!r} (-> {path})")
            continue
        want = flat_target[path]
        arr = torch_to_flax_layout(value, flax_leaf)
        if arr.shape != tuple(want.shape):
            mismatched.append(f"{key!r}: torch shape {tuple(value.shape)} -> {tuple(arr.shape)}, "
                              f"but {path} expects {tuple(want.shape)}")
            continue
        filled[path] = arr.astype(want.dtype)
    missing = [f"{p} {tuple(s.shape)}" for p, s in flat_target.items() if p not in filled]

    if unknown or missing or mismatched:
        parts = [f"state_dict does not fit jaxcnn model {name!r} ({type(model).__name__}):"]
        for title, items in [("unknown keys", unknown), ("missing (no key fills)", missing),
                             ("shape mismatches", mismatched)]:
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {len(items)} {title}:\n    " + "\n    ".join(shown))
        raise ConversionError("\n".join(parts))
    return traverse_util.unflatten_dict({tuple(p.split("/")): jnp.asarray(v) for p, v in filled.items()})
