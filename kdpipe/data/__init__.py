"""Lightning data modules. Every option of the `data` config group builds one of these.

The modules are imported on first use (PEP 562), so `kdpipe.data.checks`, the torch-free file
checks the command line runs before any long import, can be imported without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_MODULES = {"TensorDataModule": "base", "CIFARDataModule": "cifar", "DigitsDataModule": "digits",
            "IDXDataModule": "idx", "ImageFolderDataModule": "image_folder",
            "SyntheticDataModule": "synthetic", "TextDataModule": "text", "FortunesDataModule": "text",
            "LanguageModelDataModule": "text", "MultiTaskTextDataModule": "text"}

__all__ = ["TensorDataModule", "CIFARDataModule", "DigitsDataModule", "IDXDataModule",
           "ImageFolderDataModule", "SyntheticDataModule", "TextDataModule", "FortunesDataModule",
           "LanguageModelDataModule", "MultiTaskTextDataModule"]

if TYPE_CHECKING:
    from kdpipe.data.base import TensorDataModule
    from kdpipe.data.cifar import CIFARDataModule
    from kdpipe.data.digits import DigitsDataModule
    from kdpipe.data.idx import IDXDataModule
    from kdpipe.data.image_folder import ImageFolderDataModule
    from kdpipe.data.synthetic import SyntheticDataModule
    from kdpipe.data.text import (
        FortunesDataModule,
        LanguageModelDataModule,
        MultiTaskTextDataModule,
        TextDataModule,
    )


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})
