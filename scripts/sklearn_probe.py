"""A quick, independent check of frozen MAE features on builtin:mnist5k: scikit-learn's logistic regression on the
standardised class token, the average of the patch tokens, and both concatenated (train on the 4,000 training
digits, score on the 1,000 validation digits). Used for docs/results.md ("training progress"); `mae linprobe` is the
paper's protocol (BatchNorm + linear head, LARS).

    python scripts/sklearn_probe.py raw                       # raw pixels
    python scripts/sklearn_probe.py random                    # a randomly initialised micro encoder
    python scripts/sklearn_probe.py runs/demo/checkpoint-0039.pth [...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mae.data.builtin import _mnist5k
from mae.interop import load_model
from mae.models import build_model


def _images(split: str) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = _mnist5k()[split]
    return (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) - 0.5) / 0.5, labels


def _score(train: np.ndarray, val: np.ndarray, y_train: np.ndarray, y_val: np.ndarray) -> float:
    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train), y_train)
    return 100 * clf.score(scaler.transform(val), y_val)


@torch.no_grad()
def _features(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    tokens = torch.cat([model.forward_features(images[i:i + 500]) for i in range(0, len(images), 500)])
    return tokens[:, 0].numpy(), tokens[:, 1:].mean(1).numpy()


def main() -> None:
    torch.manual_seed(0)
    (x_train, y_train), (x_val, y_val) = _images("train"), _images("val")
    for source in sys.argv[1:] or ["raw"]:
        if source == "raw":
            print(f"raw pixels: {_score(x_train.flatten(1).numpy(), x_val.flatten(1).numpy(), y_train, y_val):.1f}")
            continue
        model = build_model("mae_vit_micro_patch4_28") if source == "random" else load_model(source)
        model.eval()
        (cls_t, avg_t), (cls_v, avg_v) = _features(model, x_train), _features(model, x_val)
        scores = (_score(cls_t, cls_v, y_train, y_val), _score(avg_t, avg_v, y_train, y_val),
                  _score(np.hstack([cls_t, avg_t]), np.hstack([cls_v, avg_v]), y_train, y_val))
        print(f"{source}: class token {scores[0]:.1f}, average pool {scores[1]:.1f}, both {scores[2]:.1f}")


if __name__ == "__main__":
    main()
