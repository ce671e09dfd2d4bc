"""jaxcnn: classic convolutional networks in JAX/Flax, with a complete training stack."""
from jaxcnn.models import create_model, list_models, model_info, register_model
from jaxcnn.summary import summary

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "register_model", "summary", "__version__"]
