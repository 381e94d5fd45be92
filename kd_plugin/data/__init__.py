"""arcface_torch data formats without mxnet: RecordIO, image folders, label lists, verification .bin, samplers."""

from kd_plugin.data.datasets import FaceDataset, FileListDataset, RecordDataset, open_dataset
from kd_plugin.data.sampler import IdentityBalancedBatchSampler
from kd_plugin.data.verification_bin import load_bin

__all__ = ["FaceDataset", "FileListDataset", "RecordDataset", "open_dataset", "IdentityBalancedBatchSampler", "load_bin"]
