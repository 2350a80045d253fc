"""Lightning data modules. Every option of the `data` config group builds one of these."""

from kdpipe.data.base import TensorDataModule
from kdpipe.data.cifar import CIFARDataModule
from kdpipe.data.digits import DigitsDataModule
from kdpipe.data.idx import IDXDataModule
from kdpipe.data.image_folder import ImageFolderDataModule
from kdpipe.data.synthetic import SyntheticDataModule

__all__ = ["TensorDataModule", "CIFARDataModule", "DigitsDataModule", "IDXDataModule",
           "ImageFolderDataModule", "SyntheticDataModule"]
