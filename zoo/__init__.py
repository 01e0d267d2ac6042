"""pnc.zoo: datasets, clone tasks, small architectures, training and the checkpoint store."""

from pnc.zoo.archs import create
from pnc.zoo.datasets import DatasetSplits, ImageData, ImageFiles, load_dataset
from pnc.zoo.defaults import default_pair, ensure_default
from pnc.zoo.resolve import resolve_model
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask, parse_classes

__all__ = [
    "create",
    "DatasetSplits",
    "ImageData",
    "ImageFiles",
    "load_dataset",
    "default_pair",
    "ensure_default",
    "resolve_model",
    "ModelCard",
    "ZooStore",
    "CloneTask",
    "parse_classes",
]
