"""Top-k predictions of a saved model for image files."""
from __future__ import annotations

import os
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn._xla import eval_compiler_options
from jaxcnn.train.checkpoint import open_for_reading
from jaxcnn.train.config import TrainConfig
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.precision import compute_dtype
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import eval_variables, make_fold_step


class Predictor:
    """A model restored from a checkpoint (work directory, checkpoints/ folder or epoch folder):
    the best epoch's weights (EMA weights when the run kept them) and its class names."""

    def __init__(self, checkpoint: str, batch_size: int = 32):
        from jaxcnn.train.loop import build_model
        store, epoch = open_for_reading(checkpoint)
        try:
            meta = store.meta(epoch)
            config = TrainConfig.from_dict(meta["config"])
            data = meta["data"]
            self.class_names: List[str] = list(data["class_names"])
            self.image_size: int = int(data["image_size"])
            self.epoch, self.config = epoch, config
            model = build_model(config, len(self.class_names))
            tx, _ = make_optimizer(config, 1)
            dtype = compute_dtype(config.precision)
            abstract = jax.eval_shape(lambda: create_train_state(
                model, tx, image_size=self.image_size, seed=0, precision=config.precision,
                ema=config.ema_decay > 0, dtype=dtype))
            # place on one device whatever mesh the run was saved from
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), abstract)
            store.check_compatible(epoch, abstract, meta["config"], self.class_names)
            state, _ = store.restore(epoch, abstract)
        finally:
            store.close()
        use_ema = state.ema_params is not None
        # the conv-BN units' folded weights, computed once here rather than in every batch
        folded = make_fold_step(use_ema=use_ema, compute_dtype=dtype)(
            state, image_shape=(self.image_size, self.image_size, 3))
        self.variables = eval_variables(state, use_ema, folded)
        self.batch_size = batch_size
        mean, std, n = tuple(data["mean"]), tuple(data["std"]), len(self.class_names)

        @partial(jax.jit, compiler_options=eval_compiler_options())
        def probs(variables, images):
            from jaxcnn.data import preprocess
            x, _ = preprocess(jax.random.PRNGKey(0), images, jnp.zeros(images.shape[0], jnp.int32),
                              num_classes=n, mean=mean, std=std, augment=None, dtype=dtype)
            return jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32), -1)

        self._probs = probs

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] for uint8 images [N, S, S, 3] at the model's image size."""
        out = []
        b = self.batch_size
        for i in range(0, len(images), b):
            chunk = images[i:i + b]
            pad = b - len(chunk)  # one batch shape: one compilation
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            out.append(np.asarray(self._probs(self.variables, chunk))[:b - pad])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def predict_files(self, paths: Sequence[str], top_k: int = 5
                      ) -> List[Tuple[str, Union[List[Tuple[str, float]], str]]]:
        """[(path, [(class, probability)] * top_k)], or (path, error message) for unreadable files."""
        from jaxcnn.data.decode import decode_file
        decoded = [decode_file(p, self.image_size) for p in paths]
        ok = [i for i, d in enumerate(decoded) if d is not None]
        probs = self.predict(np.stack([decoded[i] for i in ok])) if ok else None
        results: List[Tuple[str, Union[List[Tuple[str, float]], str]]] = []
        k = min(top_k, len(self.class_names))
        for i, p in enumerate(paths):
            if decoded[i] is None:
                results.append((p, "not a readable image" if os.path.isfile(p) else "no such file"))
                continue
            row = probs[ok.index(i)]
            top = np.argsort(-row)[:k]
            results.append((p, [(self.class_names[j], float(row[j])) for j in top]))
        return results


def predict_files(checkpoint: str, paths: Sequence[str], top_k: int = 5, print_fn=print,
                  predictor: Optional[Predictor] = None) -> int:
    """Print the top-k classes of each image; returns the number of unreadable files."""
    predictor = predictor or Predictor(checkpoint)
    bad = 0
    for path, res in predictor.predict_files(paths, top_k):
        if isinstance(res, str):
            bad += 1
            print_fn(f"{path}: error: {res}")
        else:
            print_fn(f"{path}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in res))
    return bad
