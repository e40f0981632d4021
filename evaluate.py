"""evaluate.py: the collection's one evaluator, which scores the samples a script saved against real data.

  python evaluate.py OUT       # OUT: the --out folder of any of the five scripts, or a samples.npz

For each sampler setting in samples.npz it prints the distance to the held-out real set next to the floor:
  2D toys  the exact 2-Wasserstein distance (optimal matching); floor: the saved second real set
  images   the Frechet distance (FD) in the 64 features of a small classifier, as FID does with Inception; its
           weights are shipped in classifiers/, its features computed in float64: every machine scores alike.
           Floor: the mean FD of five training subsets (MNIST: those in --data-dir) the size of the held-out
           set. Compare with real data, not 1.0x: other real sets score 0.7-1.1x on digits, 0.9-1.5x on MNIST
  labels   conditional samples: the share classified as the class asked for (2D: the nearest real point's)
It refuses in one line what it cannot score honestly, and writes the numbers to OUT/scores.json too."""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


class RunError(Exception):
    """A problem the user can fix (a file, the data, a diverged loss): one line, no traceback."""


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
        why = " ".join(str(err).split())[:120]
        raise RunError(f"cannot load MNIST in {data_dir!r} ({why}); --data digits works offline") from None
    return train.data[:, None] / 255, train.targets, test.data[:2000, None] / 255, test.targets[:2000]


def w2_distance(a, b):
    """Exact 2-Wasserstein distance of two point sets of one size, by an optimal matching."""
    from scipy.optimize import linear_sum_assignment
    a = torch.as_tensor(a, dtype=torch.float64).reshape(len(a), -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise RunError(f"W2 needs two sets of one size and shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.var(0).sum() < b.var(0).sum():                     # the same optimum, found faster
        a, b = b, a
    cost = (torch.cdist(a, b) ** 2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


class FeatureNet(nn.Module):                                # its 64 penultimate features compare images
    def __init__(self, shape, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * ((shape[1] + 3) // 4) * ((shape[2] + 3) // 4), 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(train, labels, seed=0):
    """The shipped classifiers' recipe: Adam 2e-3, batch 128, seed 0, 20 epochs within 300 to 2000 steps."""
    steps = min(2000, max(300, 20 * len(train) // 128))
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
    return net.eval()


def image_classifier(name, shape):
    """The shipped FeatureNet of a dataset (classifiers/<name>.pt), in float64, for images of this shape."""
    path = os.path.join(HERE, "classifiers", f"{name}.pt")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureNet(saved["shape"])
        net.load_state_dict(saved["model"])
    except Exception as err:
        raise RunError(f"cannot load {path} ({type(err).__name__}); see --make-classifier") from None
    if list(shape) != saved["shape"]:
        raise RunError(f"the {name} classifier takes images of shape {saved['shape']}, not {list(shape)}")
    return net.double().eval().requires_grad_(False)


def features(net, x):                                       # float64: the same on every machine
    return torch.cat([net.features(b) for b in torch.as_tensor(x, dtype=torch.float64).split(500)])


def frechet_distance(f1, f2):
    """Frechet distance of Gaussians fitted to two feature sets: |m1 - m2|^2 + tr(C1 + C2 - 2 sqrt(C1 C2))."""
    from scipy import linalg
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    eye = 1e-6 * np.eye(f1.shape[1])                        # dead ReLU features make C singular
    c1, c2 = np.cov(f1, rowvar=False) + eye, np.cov(f2, rowvar=False) + eye
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


def evaluate(path, data_dir=None):
    """Score the samples.npz at path (or in the folder path): {setting: {"distance", "floor", "ratio", and
    "accuracy" for conditional samples}}, one line each; the file's other arrays are sampler settings."""
    path = os.path.join(path, "samples.npz") if os.path.isdir(path) else path
    try:
        with np.load(path) as f:
            samples = dict(f)
        name, real = str(samples.pop("data")), samples["real"]
        seed, run_dir = int(samples.pop("seed", 0)), str(samples.pop("data_dir", "data"))
    except KeyError as err:
        raise RunError(f"{path} has no {err} array") from None
    except Exception as err:                                # not a file, not an npz, pickled objects, ...
        why = " ".join(str(err).split())[:120]
        raise RunError(f"cannot read samples from {path} ({type(err).__name__}: {why})") from None
    labels = samples.pop("labels", None)
    if real.ndim == 2 and "floor" not in samples:
        raise RunError(f"{path} holds 2D points but no 'floor' (a second real set) to compare with")
    for key, x in samples.items():                          # real, floor, samples: never a partial set
        if x.dtype.kind not in "iuf" or x.ndim < 2 or x.shape != real.shape:
            raise RunError(f"'{key}' in {path} is {x.dtype} {x.shape}, not numbers of shape {real.shape}")
        if not np.isfinite(x).all() or real.ndim > 2 and not 0 <= x.min() <= x.max() <= 1:
            raise RunError(f"'{key}' in {path} holds NaN or inf, or images outside [0, 1]")
    if len(real) < 2 or not set(samples) - {"real", "floor"}:
        raise RunError(f"{path} has no sample set of two or more to score")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (len(real),)):
        raise RunError(f"'labels' in {path} must be {len(real)} integers, not {labels.dtype} {labels.shape}")
    real, floor_set = torch.as_tensor(samples.pop("real"), dtype=torch.float64), samples.pop("floor", None)
    if real.ndim == 2:                                      # 2D: exact W2, and the nearest real point's label
        metric, floor = "W2", w2_distance(floor_set, real)
    else:                                                   # images: FD in the classifier's features
        metric, net = "FD", image_classifier(name, real.shape[1:])
        train, _, held, held_labels = load_images(name, data_dir or run_dir)
        if len(train) < len(real):
            raise RunError(f"the floor needs {len(real)} training images; {name} has {len(train)}")
        right = (net.head(features(net, held)).argmax(1) == held_labels).double().mean()
        print(f"classifier: accuracy {right:.3f} on {len(held)} held-out real images")
        real_features, g = features(net, real), torch.Generator().manual_seed(seed + 2000)
        subsets = [train[torch.randperm(len(train), generator=g)[:len(real)]] for _ in range(5)]
        floor = float(np.mean([frechet_distance(features(net, x), real_features) for x in subsets]))
    if not floor > 0:
        raise RunError(f"the floor of {path} is {floor}: its real sets are the same")
    scores = {}
    for key, x in samples.items():
        x = torch.as_tensor(x, dtype=torch.float64)
        if metric == "W2":
            nearest = torch.cdist(x, real).argmin(1).numpy()
            d, predicted = w2_distance(x, real), None if labels is None else labels[nearest]
        else:
            f = features(net, x)
            d, predicted = frechet_distance(f, real_features), net.head(f).argmax(1).numpy()
        scores[key] = {"distance": round(d, 5), "floor": round(floor, 5), "ratio": round(d / floor, 3)}
        if labels is not None:
            scores[key]["accuracy"] = round(float((predicted == labels).mean()), 4)
        acc = f"  accuracy {scores[key]['accuracy']:.3f}" if labels is not None else ""
        print(f"{key:>16}  {metric} {d:.4f}  floor {floor:.4f}  ({d / floor:.2f}x){acc}")
    return scores


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a script's samples against held-out data and the floor.")
    p.add_argument("out", nargs="?", help="an --out folder of one of the scripts, or a samples.npz")
    p.add_argument("--data-dir", default=None, help="where MNIST is (default: the run's --data-dir, or data)")
    p.add_argument("--make-classifier", choices=["digits", "mnist"], help="train classifiers/NAME.pt again")
    args = p.parse_args(argv)
    if (args.out is None) == (args.make_classifier is None):
        p.error("give OUT, or --make-classifier NAME")
    try:
        if args.make_classifier:                            # the recipe, on the training split
            train, labels = load_images(args.make_classifier, args.data_dir or "data")[:2]
            state = {"model": train_classifier(train, labels).state_dict(), "shape": list(train.shape[1:])}
            torch.save(state, os.path.join(HERE, "classifiers", f"{args.make_classifier}.pt"))
            return print(f"wrote classifiers/{args.make_classifier}.pt")
        scores = evaluate(args.out, args.data_dir)
        folder = args.out if os.path.isdir(args.out) else os.path.dirname(args.out) or "."
        with open(os.path.join(folder, "scores.json"), "w") as f:
            json.dump(scores, f, indent=2)
    except RunError as err:
        sys.exit(f"error: {err}")
    return scores


if __name__ == "__main__":
    main()
