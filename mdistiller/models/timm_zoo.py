"""`timm:<name>` models: any timm CNN whose head globally average-pools a map into a Linear classifier, under the
zoo's contract (docs/models.md). timm is an optional dependency (`pip install 'mdistiller[timm]'`), imported only
when such a name is used."""
import difflib
from typing import Dict, List

import torch.fx as fx
import torch.nn as nn

from ..errors import ConfigError
from .external import ExternalModel, hub_model, wrap_classifier

PREFIX = "timm:"


def _timm(name: str, key: str):
    try:
        import timm
    except ImportError as error:
        raise ConfigError(f"{key} = {name!r} needs timm: pip install 'mdistiller[timm]'") from error
    return timm


def check_name(arch: str, key: str) -> None:
    """A ConfigError naming `key` and close timm names when timm has no model `arch` (pretrained tags allowed)."""
    timm = _timm(PREFIX + arch, key)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        hint = f"close names: {', '.join(PREFIX + c for c in close)}" if close else "see timm.list_models()"
        raise ConfigError(f"{key} = {PREFIX + arch!r} is not a timm model; {hint}")


def feature_info_stages(model: nn.Module, graph: fx.Graph, qualname: Dict[fx.Node, str], gap: fx.Node) -> List[str]:
    """timm's own stage outputs (`feature_info`: the stem, then each stage end), with the `stem` module first where
    timm does not list it (ConvNeXt), so that feats[0] is the stem as in the zoo."""
    names = [info["module"] for info in model.feature_info]
    if isinstance(getattr(model, "stem", None), nn.Module) and all(n.split(".")[0] != "stem" for n in names):
        names.insert(0, "stem")
    return names


def build(arch: str, num_classes: int, image_size: int, pretrained: bool, key: str) -> ExternalModel:
    """timm model `arch` for `num_classes`, freshly initialised, or with the hub's weights (downloaded) when
    `pretrained`: a new classifier when the class counts differ."""
    check_name(arch, key)
    timm = _timm(PREFIX + arch, key)
    if pretrained:
        model = hub_model(lambda: timm.create_model(arch, pretrained=True, num_classes=num_classes), PREFIX + arch, key)
    else:
        model = timm.create_model(arch, num_classes=num_classes)
    from timm.layers import get_notrace_functions, get_notrace_modules

    return wrap_classifier(model, PREFIX + arch, num_classes, image_size, feature_info_stages, get_notrace_modules(),
                           get_notrace_functions())
