"""Datasets for anomaly detection: MVTec AD, BTAD and VisA layouts, plain folders, and a built-in synthetic one."""

from ad.data.base import IMAGENET_MEAN, IMAGENET_STD, AnomalyDataset, Sample
from ad.data.btad import BTAD
from ad.data.folder import Folder
from ad.data.io import IMAGE_EXTENSIONS, read_image, read_mask
from ad.data.mvtec import MVTecAD
from ad.data.synthetic import TEXTURES, Synthetic, make_mvtec_layout
from ad.data.visa import VisA

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "TEXTURES",
    "BTAD",
    "AnomalyDataset",
    "Folder",
    "ImageDataset",
    "MVTecAD",
    "Sample",
    "Synthetic",
    "VisA",
    "collate",
    "denormalize",
    "make_mvtec_layout",
    "normalize",
    "normalize_batch",
    "read_image",
    "read_mask",
]

#: Names that need torch, loaded on first use: finding and decoding files (the start-up prefetch
#: side process, ``ad.runtime.prefetch``) then never pays for importing torch.
_TENSOR_NAMES = {"ImageDataset", "collate", "denormalize", "normalize", "normalize_batch"}


def __getattr__(name: str):
    if name in _TENSOR_NAMES:
        from ad.data import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module 'ad.data' has no attribute {name!r}")
