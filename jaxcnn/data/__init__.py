"""Data pipeline: sources -> uint8 arrays in memory -> deterministic batches -> jitted augmentation."""
from jaxcnn.data.augment import AugmentConfig, preprocess
from jaxcnn.data.loader import Loader, pipeline_throughput, prefetch, shard_batch
from jaxcnn.data.sources import KNOWN_TFDS_DATASETS, ArrayDataset, DataSplits, channel_stats, load_data

__all__ = [
    "ArrayDataset", "DataSplits", "load_data", "KNOWN_TFDS_DATASETS", "channel_stats",
    "AugmentConfig", "preprocess",
    "Loader", "shard_batch", "prefetch", "pipeline_throughput",
]
