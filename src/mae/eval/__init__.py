"""Evaluation protocols beyond top-1: ImageNet-C's mean Corruption Error (`mae.eval.imagenet_c`)."""
