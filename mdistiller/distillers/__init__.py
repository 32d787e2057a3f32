"""Distillers: `distiller_dict[cfg.DISTILLER.TYPE]`. Every module of this package is imported here and registers
its classes with `@register_distiller` (docs/extending.md), so a new method is one new file. Each registered class
is also an attribute of the package (`from mdistiller.distillers import KD`), as upstream."""
import importlib
import pkgutil

from ._base import (
    Distiller,
    FeatureDistiller,
    StudentTraining,
    Vanilla,
    distiller_class,
    distiller_dict,
    register_distiller,
)

__all__ = ["Distiller", "FeatureDistiller", "StudentTraining", "Vanilla", "distiller_class", "distiller_dict",
           "register_distiller"]


def _import_all() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for cls in list(distiller_dict.values()):
        if cls.__module__.startswith(__name__ + "."):
            globals()[cls.__name__] = cls
            __all__.append(cls.__name__)


_import_all()
