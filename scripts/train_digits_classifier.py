"""Train the digits classifier that ``diffusers_stf.evaluation`` ships as its default feature extractor.

The classifier sees only the 797-image training split; the 1000 held-out digits measure its accuracy. With the fixed
seed and one thread the run is deterministic on a given machine (about 5 s on a CPU core):

    python scripts/train_digits_classifier.py                       # overwrites the shipped weights
    python scripts/train_digits_classifier.py --output_dir /tmp/clf # somewhere else
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffusers_stf.digits import digits_tensor
from diffusers_stf.evaluation.feature_extractors import DIGITS_CLASSIFIER_PATH, DigitsClassifier


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 1, noise: float = 0.05) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (the background, −1, fills the border) plus Gaussian noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    return out + noise * torch.randn(out.shape, generator=generator)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == y).double().mean())


def train(epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> DigitsClassifier:
    """Adam on cross-entropy over the augmented training split, ``epochs`` passes."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = digits_tensor("train")
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", default=DIGITS_CLASSIFIER_PATH)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # deterministic reductions
    model = train(args.epochs, args.batch_size, args.lr, args.seed)
    x_train, y_train = digits_tensor("train")
    x_held, y_held = digits_tensor("heldout")
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}, held-out accuracy {accuracy(model, x_held, y_held):.4f}")
    model.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")


if __name__ == "__main__":
    main()
