"""The trainer for CRD's batches (upstream's `crd`)."""
from typing import Dict, Tuple

import torch

from .trainer import BaseTrainer, register_trainer


@register_trainer("crd")
class CRDTrainer(BaseTrainer):
    """Batches (image, target, index, contrastive_index) from the CRD sample datasets; the distiller receives the
    indices (and `epoch`, which upstream's CRD trainer did not pass)."""

    contrastive_batches = True

    def unpack_batch(self, data) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        if len(data) != 4:
            raise ValueError(
                f"the '{self.cfg.SOLVER.TRAINER}' trainer expects batches (image, target, index, contrastive_index), "
                f"got {len(data)} items: use a distiller with contrastive batches (CRD)"
            )
        image, target, index, contrastive_index = data
        return image, target, {"index": index, "contrastive_index": contrastive_index}
