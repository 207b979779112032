"""Datasets for CP-CNN training: load into an `ImageSet`, split per class, augment, normalise."""

from training.data.augment import augment_batch, random_resized_crop, to_tensor
from training.data.imageset import ImageSet
from training.data.sources import DataConfig, load_dataset
from training.data.split import Splits, split_dataset

__all__ = [
    "DataConfig",
    "ImageSet",
    "Splits",
    "augment_batch",
    "load_dataset",
    "random_resized_crop",
    "split_dataset",
    "to_tensor",
]
