"""How much evaluate.py's image numbers depend on its classifier. It trains evaluate.FeatureNet (its last
feature map flattened into the 64 features) and the variant evaluate.py used before 2026-12-07, which averages
that map to one value per channel, each with a few seeds and evaluate.py's recipe (seed 0 of the first is
how evaluate.py's shipped classifier was made), prints each one's accuracy on the held-out real images, then
scores with every one the samples of the OUT folders given (FD / floor and label accuracy, as evaluate.py
does) and real training images with defects of known size (pixel noise, blur, a shift, thicker strokes), to
show what each FD notices. From the repository root:

    python benchmarks/classifier_check.py --data-dir DIR --seeds 0 1 2 -- OUT [OUT ...]   # MNIST runs

It imports evaluate.py and changes nothing on disk."""
import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402


class AveragedFeatureNet(nn.Module):
    """evaluate.FeatureNet with its last feature map averaged over the pixels, not flattened."""

    def __init__(self, shape, n_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(kind, name, train, labels, seed):
    """'flattened': evaluate.train_classifier itself; 'averaged': its training loop (Adam 2e-3, batch 128, its
    number of steps) on AveragedFeatureNet."""
    if kind == "flattened":
        return evaluate.train_classifier(train, labels, seed).requires_grad_(False)
    steps = min(2000, max(300, 20 * len(train) // 128))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = AveragedFeatureNet(train.shape[1:])
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            i = torch.randint(len(train), (128,))
            loss = F.cross_entropy(net(train[i]), labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def degraded(train, n, seed=5):
    """n real training images, as they are and with one defect each: {name: images in [0, 1]}."""
    g = torch.Generator().manual_seed(seed)
    x = train[torch.randperm(len(train), generator=g)[:n]]
    noisy = {f"noise_{s}": (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.05, 0.1, 0.2)}
    speckle = torch.where(torch.rand(x.shape, generator=g) < 0.02, torch.rand(x.shape, generator=g), x)
    return {"train": x, **noisy, "random_2pct_of_pixels": speckle,
            "blur_3x3_mean": F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1),
            "shift_2px_right": F.pad(x, (2, 0))[..., :-2], "thicker_3x3_max": F.max_pool2d(x, 3, 1, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description="Score image samples with several classifiers.")
    p.add_argument("outs", nargs="*", help="--out folders (or samples.npz files) of the scripts")
    p.add_argument("--data", default="mnist", choices=["digits", "mnist"], help="the images the runs used")
    p.add_argument("--data-dir", default="data", help="where MNIST is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    args = p.parse_args(argv)
    for out in args.outs:                                   # before the classifiers are trained
        path = os.path.join(out, "samples.npz") if os.path.isdir(out) else out
        if str(np.load(path)["data"]) != args.data:
            p.error(f"{out} holds samples of {np.load(path)['data']}, not of --data {args.data}")
    train, labels, held, held_labels = evaluate.load_images(args.data, args.data_dir)
    nets, rows = {}, ["| classifier | seed | accuracy on held-out real images |", "|---|---|---|"]
    for kind in ["flattened", "averaged"]:
        for seed in args.seeds:
            net = nets[kind, seed] = train_classifier(kind, args.data, train, labels, seed)
            right = (net(held).argmax(1) == held_labels).float().mean()
            rows.append(f"| {kind} | {seed} | {right:.3f} |")
    print("\n".join(rows))
    rows = ["| run | sampler | " + " | ".join(f"{kind} {seed}" for kind, seed in nets) + " |",
            "|---|---|" + "---|" * len(nets)]
    real_image_classifier = evaluate.image_classifier
    with tempfile.TemporaryDirectory() as folder:
        defects = os.path.join(folder, "samples.npz")        # scored as a run's samples are
        images = {k: x.numpy() for k, x in degraded(train, len(held)).items()}
        np.savez(defects, real=held.numpy(), data=args.data, **images)
        for out in [*args.outs, defects]:
            scores = {}
            for key, net in nets.items():
                evaluate.image_classifier = lambda *a, net=copy.deepcopy(net).double(), **k: net
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        scores[key] = evaluate.evaluate(out, args.data_dir)
                finally:
                    evaluate.image_classifier = real_image_classifier
            for sampler in scores[next(iter(nets))]:
                cells = [f"{s[sampler]['distance'] / s[sampler]['floor']:.2f}x" for s in scores.values()]
                if "accuracy" in scores[next(iter(nets))][sampler]:
                    cells = [f"{c} ({s[sampler]['accuracy']:.3f})" for c, s in zip(cells, scores.values())]
                name = "real training images" if out == defects else out
                rows.append(f"| {name} | {sampler} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    return nets


if __name__ == "__main__":
    main()
