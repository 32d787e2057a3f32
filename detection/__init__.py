"""COCO detection distillation (DKD / ReviewKD / ReviewDKD) on torchvision's Faster R-CNN + FPN.

Kept outside the `mdistiller` package like upstream's `detection/` project; run it with
`python3 detection/train_net.py --config-file detection/configs/DKD/DKD-R18-R101.yaml` from the repository root.
"""
