"""Box AP of detections with pycocotools' COCOeval, in Detectron2's units (percent)."""
import contextlib
import io
from typing import Dict, List

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(image_id: int, detection: Dict[str, torch.Tensor]) -> List[dict]:
    """One COCO result record (xywh box, score, category id) per detected box."""
    boxes = detection["boxes"].detach().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": [round(float(v), 3) for v in box],
         "score": float(score)}
        for box, label, score in zip(boxes, detection["labels"].tolist(), detection["scores"].tolist())
    ]


def _empty_results(coco_gt: COCO) -> COCO:
    """A detection set with no box (`loadRes` rejects an empty list), so that COCOeval still scores the misses."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []
    }
    coco_dt.createIndex()
    return coco_dt


def coco_box_ap(coco_gt: COCO, results: List[dict], image_ids: List[int]) -> Dict[str, float]:
    """COCOeval bbox metrics on `image_ids`; nan where COCOeval finds no ground truth (its -1)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: 100.0 * float(v) if v >= 0 else float("nan") for name, v in zip(METRICS, evaluator.stats)}
