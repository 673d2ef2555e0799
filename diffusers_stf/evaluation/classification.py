"""What a classifier sees in a sample set: how confident it is, and how evenly the classes are covered.

* ``confidence``: the mean of max_c p(c | x), low for ambiguous or malformed samples;
* ``class_entropy``: the entropy (nats) of the histogram of predicted classes argmax_c p(c | x), at most ln C when every
  class is generated equally often; dropped modes lower it.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch


def class_statistics(logits) -> Dict[str, object]:
    """Mean confidence, class entropy (nats) and class histogram of classifier ``logits`` (n, C).

    Args:
        logits: unnormalised class scores, one row per sample.
    """
    logits = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (num_samples >= 1, num_classes >= 2), got {tuple(logits.shape)}")
    probs = logits.softmax(dim=1)
    counts = torch.bincount(probs.argmax(dim=1), minlength=logits.shape[1]).double()
    freq = counts / counts.sum()
    entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
    return {
        "confidence": float(probs.max(dim=1).values.mean()),
        "class_entropy": float(entropy),
        "max_class_entropy": float(np.log(logits.shape[1])),
        "class_histogram": [int(c) for c in counts],
    }
