"""jaxcnn: classic convolutional networks in JAX/Flax, with a complete training stack."""
from jaxcnn._xla import configure_xla_cpu

configure_xla_cpu()  # must run before JAX builds its CPU backend; see jaxcnn/_xla.py

from jaxcnn._malloc import reexec_with_huge_pages, release_free_memory  # noqa: E402
from jaxcnn.models import create_model, list_models, model_info, register_model  # noqa: E402
from jaxcnn.summary import summary  # noqa: E402

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "register_model", "summary",
           "reexec_with_huge_pages", "release_free_memory", "__version__"]
