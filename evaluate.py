"""evaluate.py: the collection's one evaluator, which scores the samples a script saved against real data.

  python evaluate.py OUT       # OUT: the --out folder of any of the five scripts, or a samples.npz

For each sampler setting in samples.npz it prints the distance to the held-out real set next to the floor,
the same distance for real data (so 1.0x is as good as real data):
  2D toys  the exact 2-Wasserstein distance (optimal matching); floor: the saved second real set
  images   the Frechet distance (FD) in the 64 features of a small classifier of the dataset's digits, as FID
           does with an Inception network; the classifier is trained on the training split the first time and
           cached in --data-dir. Floor: the mean FD of five training subsets the size of the held-out set
  labels   for conditional samples, the share classified as the class asked for (2D: the nearest real
           point's); for images it first prints the classifier's own accuracy on held-out real images
No script imports this file; it writes the numbers to OUT/scores.json too.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RunError(Exception):
    """A problem the user can fix (a file, a device, the data, a diverged loss): main prints one line."""


def load_images(name, data_dir):
    """(train, train labels, held-out, held-out labels): images (N, C, H, W) in [0, 1], int64 labels."""
    if name == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
        return x[perm[360:]], y[perm[360:]], x[perm[:360]], y[perm[:360]]
    try:
        from torchvision.datasets import MNIST
        train, test = MNIST(data_dir, train=True, download=True), MNIST(data_dir, train=False, download=True)
    except Exception as err:                                # no network, broken files, ...
        why = " ".join(str(err).split())[:120]              # (torchvision's message has several lines)
        raise RunError(f"cannot load MNIST in {data_dir!r} ({type(err).__name__}: {why}); "
                       "--data digits works offline") from None
    return train.data[:, None] / 255, train.targets, test.data[:2000, None] / 255, test.targets[:2000]


def save_checkpoint(path, state):
    """Write to a temporary file, then os.replace it: never a half-written file."""
    torch.save(state, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)


def w2_distance(a, b):
    """Exact 2-Wasserstein distance of two equal-size point sets, by an optimal matching."""
    from scipy.optimize import linear_sum_assignment
    a = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a.var(0).sum() < b.var(0).sum():                     # the same optimum, found faster
        a, b = b, a
    cost = (torch.cdist(a, b) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


class FeatureNet(nn.Module):
    """A small CNN classifier of the dataset's classes; its penultimate layer (64 features of the whole last
    feature map) is where image samples are compared. (Averaging that map instead, it classified only
    0.71-0.78 of real held-out MNIST digits right: benchmarks/classifier_check.py.)"""

    def __init__(self, shape, n_classes=10):
        super().__init__()
        h, w = (shape[1] + 3) // 4, (shape[2] + 3) // 4       # after two stride-2 convolutions
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * h * w, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def image_classifier(name, train, labels, data_dir, seed=0):
    """The FeatureNet of a dataset: read from data_dir/<name>_classifier.pt if it was made with these
    settings, else trained on (train, labels) (Adam, batch 128, 20 epochs within 300 to 2000 steps) and saved
    there."""
    steps = min(2000, max(300, 20 * len(train) // 128))
    settings = {"data": name, "shape": list(train.shape[1:]), "n_train": len(train), "steps": steps,
                "seed": seed, "net": "FeatureNet 32-64-64, flattened to 64"}
    path = os.path.join(data_dir, f"{name}_classifier.pt")
    net = FeatureNet(train.shape[1:])
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["settings"] == settings:
            net.load_state_dict(saved["model"])
            return net.eval()
        print(f"note: {path} was made with other settings; training the classifier again")
    except FileNotFoundError:
        pass
    except Exception as err:
        print(f"note: cannot read {path} ({type(err).__name__}); training the classifier again")
    with torch.random.fork_rng(devices=[]):                 # the caller's random state stays as it was
        torch.manual_seed(seed)
        net = FeatureNet(train.shape[1:])
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            i = torch.randint(len(train), (128,))
            loss = F.cross_entropy(net(train[i]), labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    try:
        os.makedirs(data_dir, exist_ok=True)
        save_checkpoint(path, {"model": net.state_dict(), "settings": settings})
    except OSError as err:
        print(f"note: cannot cache the classifier in {path} ({type(err).__name__}); it is trained each time")
    return net.eval()


def frechet_distance(f1, f2):
    """Frechet distance of Gaussians fitted to two feature sets: |m1 - m2|^2 + tr(C1 + C2 - 2 sqrt(C1 C2))."""
    from scipy import linalg
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    eye = 1e-6 * np.eye(f1.shape[1])                        # dead ReLU features make C singular
    c1, c2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


def evaluate(path, data_dir=None):
    """Score the samples.npz at path (the file, or the folder holding it): {sampler: {"distance", "floor",
    "ratio", and "accuracy" for conditional samples}}, printed as one line each. data_dir: where the images
    and the cached classifier are (None: the run's --data-dir)."""
    path = os.path.join(path, "samples.npz") if os.path.isdir(path) else path
    try:
        saved = dict(np.load(path))
        real, name, seed = saved.pop("real"), str(saved.pop("data")), int(saved.pop("seed", 0))
        data_dir = data_dir or str(saved.get("data_dir", "data"))
    except Exception as err:
        raise RunError(f"cannot read samples from {path} ({type(err).__name__}: {err})") from None
    floor_set, labels = saved.pop("floor", None), saved.pop("labels", None)
    saved.pop("data_dir", None)                             # the rest are sampler settings
    if real.ndim == 2:                                      # 2D: exact W2, and the nearest real point's label
        metric, floor = "W2", w2_distance(floor_set, real)
    else:                                                   # images: FD in the classifier's features
        metric, (train, train_labels, held, held_labels) = "FD", load_images(name, data_dir)
        net = image_classifier(name, train, train_labels, data_dir).requires_grad_(False)
        right = (net(held).argmax(1) == held_labels).float().mean()
        print(f"classifier: accuracy {right:.3f} on {len(held)} held-out real images")
        real_features, g = net.features(torch.as_tensor(real)), torch.Generator().manual_seed(seed + 2000)
        subsets = [train[torch.randperm(len(train), generator=g)[:len(real)]] for _ in range(5)]
        floor = float(np.mean([frechet_distance(net.features(x), real_features) for x in subsets]))
    scores = {}
    for key, x in saved.items():
        x = torch.as_tensor(x, dtype=torch.float32)
        if metric == "W2":
            nearest = torch.cdist(x, torch.as_tensor(real)).argmin(1).numpy()
            d, predicted = w2_distance(x, real), None if labels is None else labels[nearest]
        else:
            d, predicted = frechet_distance(net.features(x), real_features), net(x).argmax(1).numpy()
        scores[key] = {"distance": round(d, 5), "floor": round(floor, 5), "ratio": round(d / floor, 3)}
        if labels is not None:
            scores[key]["accuracy"] = round(float((predicted == labels).mean()), 4)
        acc = f"  accuracy {scores[key]['accuracy']:.3f}" if labels is not None else ""
        print(f"{key:>12}  {metric} {d:.4f}  floor {floor:.4f}  ({d / floor:.2f}x){acc}")
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a script's samples against held-out data and the floor.")
    p.add_argument("out", help="an --out folder of one of the scripts, or a samples.npz")
    p.add_argument("--data-dir", default=None,
                   help="where MNIST and the cached classifiers are (default: the run's --data-dir)")
    args = p.parse_args(argv)
    try:
        scores = evaluate(args.out, args.data_dir)
    except RunError as err:
        sys.exit(f"error: {err}")
    folder = args.out if os.path.isdir(args.out) else os.path.dirname(args.out) or "."
    with open(os.path.join(folder, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    return scores


if __name__ == "__main__":
    main()
