"""pnc.zoo: datasets, clone tasks, small architectures, training and the checkpoint store."""
from pnc.zoo.archs import create
from pnc.zoo.datasets import DatasetSplits, ImageData, load_dataset
from pnc.zoo.store import ModelCard, ZooStore
from pnc.zoo.tasks import CloneTask, parse_classes

__all__ = ["create", "DatasetSplits", "ImageData", "load_dataset", "ModelCard", "ZooStore", "CloneTask",
           "parse_classes"]
