"""Evaluation protocols: exact distributed classification metrics and feature extraction
(`mae.eval.classification`), ImageNet-C's mean Corruption Error (`mae.eval.imagenet_c`)."""
