"""Guided samplers of at most about 8 NFE for a finished class-conditional fm.py run: equal Euler steps with
guidance on every step, on a shifted time grid, or only inside an interval of t (Kynkaanniemi et al.,
"Applying Guidance in a Limited Interval Improves Sample and Distribution Quality", NeurIPS 2024), and Heun.

    python fm.py --data mnist --cond --guidance 2 --out outputs/fm_mnist
    python benchmarks/fm_guidance_interval.py outputs/fm_mnist     # writes outputs/fm_mnist/variants/
    python evaluate.py outputs/fm_mnist/variants                    # FD vs floor and accuracy per variant

The samples come from the run's evaluation noise and labels, as fm.py's own. It imports fm.py."""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fm  # noqa: E402

# name: (Euler steps, time shift s of the grid, the steps guided (1) or not (0), Heun's correction)
VARIANTS = {"all_4": (4, 1.0, [1, 1, 1, 1], False),                    # fm.py before the interval
            "shift0.5_4": (4, 0.5, [1, 1, 1, 1], False),
            "shift2_4": (4, 2.0, [1, 1, 1, 1], False),
            "shift3_4": (4, 3.0, [1, 1, 1, 1], False),
            "skip_first_4": (4, 1.0, [0, 1, 1, 1], False),              # fm.py on mnist: [0, 0.9]
            "skip_first_5": (5, 1.0, [0, 1, 1, 1, 1], False),
            "skip_first_last_5": (5, 1.0, [0, 1, 1, 1, 0], False),
            "skip_two_5": (5, 1.0, [0, 0, 1, 1, 1], False),
            "skip_last_two_5": (5, 1.0, [1, 1, 1, 0, 0], False),
            "none_8": (8, 1.0, [0] * 8, False),
            "heun_2": (2, 1.0, [1, 1], True),
            "heun_skip_first_3": (3, 1.0, [0, 1, 1], True)}


@torch.no_grad()
def sample(model, e, labels, w, steps, shift, guided, heun):
    """Euler (Heun but on the last step) from t = 1 to 0 on t' = s t / (1 + (s - 1) t); returns z, NFE."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    ts = (shift * t / (1 + (shift - 1) * t)).tolist()
    z, nfe = e, 0
    for i in range(steps):
        w_i = w if guided[i] else 1.0
        v = fm.velocity(model, z, torch.full((len(z),), ts[i]), labels, w_i)
        z_next, nfe = z + (ts[i + 1] - ts[i]) * v, nfe + (2 if w_i != 1 else 1)
        if heun and ts[i + 1] > 0:
            v2 = fm.velocity(model, z_next, torch.full((len(z),), ts[i + 1]), labels, w_i)
            z_next, nfe = z + (ts[i + 1] - ts[i]) * (v + v2) / 2, nfe + (2 if w_i != 1 else 1)
        z = z_next
    return z, nfe


def main(argv=None):
    p = argparse.ArgumentParser(description="Guided few-step samplers of a finished fm.py run.")
    p.add_argument("out", help="the --out folder of a class-conditional fm.py run")
    args = p.parse_args(argv)
    run = json.load(open(os.path.join(args.out, "metrics.json")))["command"].split()[2:]
    cfg = fm.get_args(run + ["--device", "cpu"])            # the run's device may not be here
    if not cfg.cond:
        p.error(f"{args.out} holds an unconditional run: guidance needs --cond")
    saved = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    data = fm.Data(cfg.data, cfg.data_dir, cfg.seed, torch.device("cpu"), cfg.n_eval)
    if data.shape == (2,):                                  # the network fm.py trains on this data
        model = fm.ResMLP(1, data.n_classes)
    else:
        model = fm.SmallUNet(data.shape, 1, cfg.channels, data.n_classes)
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(saved["ema"])
    e = fm.eval_noise(data, cfg.seed + 3000, "cpu")
    labels = torch.as_tensor(data.heldout_labels)
    samples, nfes = {}, {}
    for name, (steps, shift, guided, heun) in VARIANTS.items():
        x, nfes[name] = sample(model, e, labels, cfg.guidance, steps, shift, guided, heun)
        samples[name] = data.to_data(x)
        print(f"{name:>18}: {nfes[name]} NFE")
    os.makedirs(os.path.join(args.out, "variants"), exist_ok=True)
    np.savez(os.path.join(args.out, "variants", "samples.npz"), **samples, labels=data.heldout_labels,
             real=data.heldout, data=data.name, data_dir=data.data_dir, seed=data.seed)
    return nfes


if __name__ == "__main__":
    main()
