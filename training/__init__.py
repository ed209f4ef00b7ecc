"""End-to-end preference training with the fused ops (see training/train.py)."""
