"""How much evaluate.py's image numbers depend on its classifier. It trains evaluate.FeatureNet (its last
feature map averaged to one value per channel) and a variant that flattens that map instead, each with a few
seeds and evaluate.py's recipe (seed 0 of the first is the classifier evaluate.py trains), prints each one's
accuracy on the held-out real images, then scores the samples of the OUT folders given with every one (FD /
floor and label accuracy, as evaluate.py does). From the repository root:

    python benchmarks/classifier_check.py --data-dir DIR --seeds 0 1 2 -- OUT [OUT ...]   # MNIST runs

It imports evaluate.py and changes nothing on disk."""
import argparse
import contextlib
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


class FlatFeatureNet(nn.Module):
    """evaluate.FeatureNet with its last feature map flattened into the 64 features, not averaged."""

    def __init__(self, shape, n_classes=10):
        super().__init__()
        h, w = (shape[1] + 3) // 4, (shape[2] + 3) // 4       # two stride-2 convolutions
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * h * w, 64), nn.ReLU())
        self.head = nn.Linear(64, n_classes)

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(kind, name, train, labels, seed):
    """'averaged': evaluate.image_classifier itself, cached in a temporary folder; 'flattened': its training
    loop (Adam 2e-3, batch 128, its number of steps) on FlatFeatureNet."""
    if kind == "averaged":
        with tempfile.TemporaryDirectory() as folder:
            return evaluate.image_classifier(name, train, labels, folder, seed).requires_grad_(False)
    steps = min(2000, max(300, 20 * len(train) // 128))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FlatFeatureNet(train.shape[1:])
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            i = torch.randint(len(train), (128,))
            loss = F.cross_entropy(net(train[i]), labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description="Score image samples with several classifiers.")
    p.add_argument("outs", nargs="*", help="--out folders (or samples.npz files) of the scripts")
    p.add_argument("--data", default="mnist", choices=["digits", "mnist"], help="the images the runs used")
    p.add_argument("--data-dir", default="data", help="where MNIST is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="classifier seeds")
    args = p.parse_args(argv)
    train, labels, held, held_labels = evaluate.load_images(args.data, args.data_dir)
    nets, rows = {}, ["| classifier | seed | accuracy on held-out real images |", "|---|---|---|"]
    for kind in ["averaged", "flattened"]:
        for seed in args.seeds:
            net = nets[kind, seed] = train_classifier(kind, args.data, train, labels, seed)
            right = (net(held).argmax(1) == held_labels).float().mean()
            rows.append(f"| {kind} | {seed} | {right:.3f} |")
    print("\n".join(rows))
    rows = ["| run | sampler | " + " | ".join(f"{kind} {seed}" for kind, seed in nets) + " |",
            "|---|---|" + "---|" * len(nets)]
    real_image_classifier = evaluate.image_classifier
    for out in args.outs:
        path = os.path.join(out, "samples.npz") if os.path.isdir(out) else out
        if str(np.load(path)["data"]) != args.data:
            p.error(f"{out} holds samples of {np.load(path)['data']}, not of --data {args.data}")
        scores = {}
        for key, net in nets.items():
            evaluate.image_classifier = lambda *a, net=net, **k: net
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    scores[key] = evaluate.evaluate(out, args.data_dir)
            finally:
                evaluate.image_classifier = real_image_classifier
        for sampler in scores[next(iter(nets))]:
            cells = [f"{s[sampler]['ratio']:.2f}x" for s in scores.values()]
            if "accuracy" in scores[next(iter(nets))][sampler]:
                cells = [f"{c} ({s[sampler]['accuracy']:.3f})" for c, s in zip(cells, scores.values())]
            rows.append(f"| {out} | {sampler} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    return nets


if __name__ == "__main__":
    main()
