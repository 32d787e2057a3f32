"""How far the `detach_normalizers` gradient is from the full one, per layer: the cosine between the two parameter
gradients of the Exp-KD loss (NORM l2, DISTANCE mse) on LRP maps, and the ratio of their norms. Prints JSON.

    python benchmarks/detach_normalizers.py --teacher resnet32x4 --student resnet8x4 --batch 16 --topk 5
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mdistiller.distillers.ExpKD import exp_loss
from mdistiller.explain import explain_recorded, record
from mdistiller.models import cifar_model_dict


def student_gradient(student, image, classes, teacher_maps, layer: str, detach: bool) -> torch.Tensor:
    with record(student, layer) as tape:
        student(image)
    maps = explain_recorded(tape, classes, "lrp", layer, create_graph=True, detach_normalizers=detach)
    loss = exp_loss(maps, teacher_maps, 0, "l2", 1.0, "mse")
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(student.parameters(), grads)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--layers", nargs="+", default=["gap", "2", "1", "input"])
    args = parser.parse_args()
    torch.manual_seed(0)
    student = cifar_model_dict[args.student][0](num_classes=100).train()
    teacher = cifar_model_dict[args.teacher][0](num_classes=100).eval()
    image = torch.randn(args.batch, 3, 32, 32)
    rows = []
    for layer in args.layers:
        with torch.no_grad(), record(teacher, layer) as tape:
            logits = teacher(image)[0]
        classes = logits.topk(args.topk, 1).indices
        teacher_maps = explain_recorded(tape, classes, "lrp", layer)
        full, detached = (student_gradient(student, image, classes, teacher_maps, layer, d) for d in (False, True))
        rows.append({"layer": layer, "cosine": round(F.cosine_similarity(full, detached, 0).item(), 3),
                     "norm_ratio": round((detached.norm() / full.norm()).item(), 3)})
    print(json.dumps({"teacher": args.teacher, "student": args.student, "batch": args.batch, "topk": args.topk,
                      "weights": "random (seed 0)", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
