"""Model families; importing this package registers every model."""
from jaxcnn.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from jaxcnn.models import densenet, mobilenet, resdensenet, resnet, simple_cnn, vgg  # noqa: F401  (registration)
from jaxcnn.models import fastnet  # noqa: F401  (registration)
from jaxcnn.models.densenet import DenseNet
from jaxcnn.models.mobilenet import MobileNetV1
from jaxcnn.models.resdensenet import ResDenseNet
from jaxcnn.models.resnet import ResNet
from jaxcnn.models.simple_cnn import SimpleCNN
from jaxcnn.models.vgg import VGG

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model", "DenseNet",
           "MobileNetV1", "ResDenseNet", "ResNet", "SimpleCNN", "VGG"]
