"""Contrastive representation distillation (Tian et al., ICLR 2020): NCE between student and teacher embeddings,
with negatives drawn from two memory banks of past embeddings (one per network)."""
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ._base import Distiller, register_distiller
from ._common import count_parameters


class Embed(nn.Module):
    """Linear projection followed by L2 normalisation."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def contrast_loss(x: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE loss of (B, K+1) scores whose column 0 is the positive: −Σ[log D(pos) + Σ_K log(1 − D(neg))] / B with
    D(s) = s / (s + K/N), N the memory size (uniform noise distribution)."""
    batch_size = x.shape[0]
    m = x.size(1) - 1
    noise = m / float(num_data)
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / batch_size


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (any first dimension) from every rank; itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world_size = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((max_size,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s.item())] for g, s in zip(gathered, sizes)])


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class ContrastMemory(nn.Module):
    """Two memory banks (N × dim): `memory_v1` holds student embeddings, `memory_v2` teacher embeddings.
    Buffer names and the `params` layout [K, T, Z_v1, Z_v2, momentum] are upstream's, so checkpoints interchange."""

    def __init__(self, input_size: int, output_size: int, k: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        self.k = k
        self.register_buffer("params", torch.tensor([k, temperature, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(input_size / 3)
        self.register_buffer("memory_v1", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv))

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K+1) memory indices: the sample itself first, then K uniform draws (upstream's alias sampler with
        uniform probabilities, on the memory's device)."""
        idx = torch.randint(0, self.memory_v1.shape[0], (index.shape[0], self.k + 1), device=self.memory_v1.device)
        idx[:, 0] = index
        return idx

    def _scores(self, memory: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, temperature: float):
        batch_size, dim = v.shape
        weight = torch.index_select(memory, 0, idx.reshape(-1)).detach().view(batch_size, -1, dim)
        return torch.exp(torch.bmm(weight, v.view(batch_size, dim, 1)).squeeze(2) / temperature)

    def forward(
        self, v1: torch.Tensor, v2: torch.Tensor, index: torch.Tensor, contrast_idx: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised exp-similarities (B, K+1) of v1 against teacher memory and of v2 against student memory.
        The normalisation constants Z are fixed at the first call (averaged over ranks under DDP)."""
        temperature = self.params[1].item()
        if contrast_idx is None:
            contrast_idx = self.sample(index)
        out_v2 = self._scores(self.memory_v1, v2, contrast_idx, temperature)
        out_v1 = self._scores(self.memory_v2, v1, contrast_idx, temperature)
        num_data = self.memory_v1.shape[0]
        if self.params[2].item() < 0:
            self.params[2] = _mean_over_ranks(out_v1.detach().mean()) * num_data
        if self.params[3].item() < 0:
            self.params[3] = _mean_over_ranks(out_v2.detach().mean()) * num_data
        return out_v1 / self.params[2].item(), out_v2 / self.params[3].item()

    @torch.no_grad()
    def update(self, v1: torch.Tensor, v2: torch.Tensor, index: torch.Tensor) -> None:
        """Momentum update of the rows `index` with the new embeddings, re-normalised. Under DDP every rank applies
        the updates of all ranks, so the banks stay identical and no rank's update is lost."""
        v1, v2, index = _all_gather(v1.detach()), _all_gather(v2.detach()), _all_gather(index)
        momentum = self.params[4].item()
        for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
            rows = torch.index_select(memory, 0, index.view(-1)).mul_(momentum).add_(v.to(memory) * (1 - momentum))
            memory.index_copy_(0, index.view(-1), rows / rows.pow(2).sum(1, keepdim=True).sqrt())


@register_distiller("CRD", defaults={
    "MODE": "exact",  # "exact" or "relax"
    "FEAT": {"DIM": 128, "STUDENT_DIM": 256, "TEACHER_DIM": 256},
    "LOSS": {"CE_WEIGHT": 1.0, "FEAT_WEIGHT": 0.8},
    "NCE": {"K": 16384, "MOMENTUM": 0.5, "TEMPERATURE": 0.07},
})
class CRD(Distiller):
    """Needs `num_data` (training-set size, the memory length) and, per step, the dataset's `index` and
    `contrastive_index` (CIFAR100InstanceSample); the banks are updated after the loss, inside this module (no
    replicas: the framework never uses DataParallel)."""

    contrastive_batches = True  # batches (image, target, index, contrastive_index)

    def __init__(self, student, teacher, cfg, num_data: int):
        super().__init__(student, teacher)
        self.ce_loss_weight = cfg.CRD.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.CRD.LOSS.FEAT_WEIGHT
        self.num_data = num_data
        feat = cfg.CRD.FEAT
        self.embed_s = Embed(feat.STUDENT_DIM, feat.DIM)
        self.embed_t = Embed(feat.TEACHER_DIM, feat.DIM)
        nce = cfg.CRD.NCE
        self.contrast = ContrastMemory(feat.DIM, num_data, nce.K, nce.TEMPERATURE, nce.MOMENTUM)

    def get_learnable_parameters(self):
        return super().get_learnable_parameters() + list(self.embed_s.parameters()) + list(self.embed_t.parameters())

    def get_extra_parameters(self) -> int:
        """Embeddings plus memory banks (upstream counts the buffers too)."""
        return count_parameters(self.embed_s, self.embed_t) + sum(b.numel() for b in self.contrast.buffers())

    def crd_loss(self, f_s, f_t, index, contrastive_index=None) -> torch.Tensor:
        checks = (("student", "STUDENT_DIM", f_s, self.embed_s), ("teacher", "TEACHER_DIM", f_t, self.embed_t))
        for name, key, f, embed in checks:
            if f[0].numel() != embed.linear.in_features:
                raise ValueError(
                    f"CRD.FEAT.{key}={embed.linear.in_features} but the {name}'s pooled_feat has {f[0].numel()} "
                    "features: set it to that number"
                )
        v1, v2 = self.embed_s(f_s), self.embed_t(f_t)
        out_s, out_t = self.contrast(v1, v2, index, contrastive_index)
        loss = contrast_loss(out_s, self.num_data) + contrast_loss(out_t, self.num_data)
        self.contrast.update(v1, v2, index)
        return loss

    def forward_train(self, image, target, index, contrastive_index=None, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        loss_crd = self.crd_loss(
            feature_student["pooled_feat"], feature_teacher["pooled_feat"], index, contrastive_index
        )
        losses_dict = {
            "loss_ce": self.ce_loss_weight * self.ce_loss(logits_student, target),
            "loss_kd": self.feat_loss_weight * loss_crd,
        }
        return logits_student, losses_dict
