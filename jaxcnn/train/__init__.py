"""Training: config and recipes, state, optimizer, jitted steps, loop, checkpoints, prediction."""
from jaxcnn.train.config import TrainConfig
from jaxcnn.train.recipes import RECIPES, Recipe, build_config, get_recipe

__all__ = ["TrainConfig", "RECIPES", "Recipe", "build_config", "get_recipe", "train_and_evaluate",
           "evaluate"]


def __getattr__(name):
    # The loop pulls in orbax, tqdm and the data pipeline; import it only when used.
    if name in ("train_and_evaluate", "evaluate"):
        from jaxcnn.train import loop
        return getattr(loop, name)
    raise AttributeError(name)
