"""Class labels of the training images, the one place they are read: the digits' classes, the class subfolders of an
image folder (the ``imagefolder`` builder names them in a ``label`` column, classes in sorted folder order), or any
label column of a ``datasets`` set (``--label_column``).

A label is an integer class index in [0, K). The K class names come from a ``ClassLabel`` feature (the folders'
names), from the sorted distinct values of a string column, or are the indices themselves for an integer column.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

DEFAULT_LABEL_COLUMN = "label"
LABEL_SOURCES = ("the embedded digits (their classes)", "a --train_data_dir with one subfolder per class",
                 "a --dataset_name with a label column (--label_column)")


def read_labels(dataset, column: Optional[str] = None) -> Tuple[Optional[torch.Tensor], Optional[List[str]]]:
    """The class indices (N,) and the class names of ``dataset[column]``.

    With ``column`` None the ``label`` column is read when the set has one that holds classes (a ``ClassLabel``, or
    non-negative integers or strings), and (None, None) is returned otherwise, so an unlabelled set still trains
    unconditionally. A ``column`` that was asked for must exist and hold classes: anything else is a ``ValueError``
    naming ``--label_column``.
    """
    import datasets

    asked = column is not None
    column = column or DEFAULT_LABEL_COLUMN
    if column not in dataset.column_names:
        if asked:
            raise ValueError(f"--label_column {column!r} is not a column of the dataset (columns: "
                             f"{dataset.column_names})")
        return None, None
    feature = dataset.features.get(column)
    flag = f"--label_column {column!r}"
    if isinstance(feature, datasets.ClassLabel):
        labels = torch.tensor(dataset[column], dtype=torch.long)
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        values = list(dataset[column])
        if any(v is None for v in values):
            return _refuse(asked, f"{flag} has missing values")
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        labels = torch.tensor([index[v] for v in values], dtype=torch.long)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        values = list(dataset[column])
        if any(v is None for v in values):
            return _refuse(asked, f"{flag} has missing values")
        labels = torch.tensor(values, dtype=torch.long)
        names = None
    else:
        return _refuse(asked, f"{flag} holds {feature}, not classes (a ClassLabel, integers or strings)")
    if len(labels) and int(labels.min()) < 0:
        return _refuse(asked, f"{flag} has negative labels (e.g. {int(labels.min())}, an 'unlabelled' marker); class "
                              "labels must be indices >= 0")
    return labels, names


def _refuse(asked: bool, message: str):
    if asked:
        raise ValueError(message)
    return None, None


def num_classes(labels: Optional[torch.Tensor], class_names: Optional[List[str]] = None) -> Optional[int]:
    """K: the number of class names when known, else the largest label + 1; None without labels."""
    if labels is None:
        return None
    if class_names is not None:
        return len(class_names)
    return int(labels.max()) + 1 if len(labels) else 0


def require_labels(data, flag: str) -> int:
    """K of a labelled training set (:class:`~diffusers_stf.training.data.ImageData`), or a ``ValueError`` naming
    ``flag`` (the option that needs labels) and the sources of labels."""
    if data.labels is None:
        raise ValueError(f"{flag} needs labelled images, and {data.name} has none: use "
                         + ", ".join(LABEL_SOURCES[:-1]) + f" or {LABEL_SOURCES[-1]}")
    return data.num_classes
