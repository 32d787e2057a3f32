"""mdistiller / Exp-KD: config-driven knowledge distillation with explanation-based distillation."""

__version__ = "0.2.0"
