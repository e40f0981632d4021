"""Tests of the collection, in three parts: the card (each script briefly, on the CPU and on each other device
there is, named with --device: the loss goes down, the 1-NFE samples have the data's shape and beat an
untrained model), the methods' correctness (on the CPU: a GPU's TF32 convolutions differ at 1e-3), and
behaviour at the command line.  Run:  python -m pytest -q test_all.py"""
import ast
import importlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SCRIPTS = ["fm", "rectified_flow", "reflow", "imf", "imf_reflow"]
mods = {name: importlib.import_module(name) for name in SCRIPTS + ["evaluate"]}
fm, rectified_flow, reflow, imf, imf_reflow, evaluate = (mods[n] for n in SCRIPTS + ["evaluate"])
TWO_STAGE = {"reflow", "imf_reflow"}
DEVICES = ["cpu"] + [d for d, ok in [("cuda", torch.cuda.is_available()),
                                     ("mps", torch.backends.mps.is_available())] if ok]
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")


def brief_flags(script, steps=300):
    """Flags of a brief moons run; the two-stage scripts also get a short stage 2 on few pairs."""
    flags = ["--steps", str(steps), "--n-eval", "300"]
    if script in TWO_STAGE:
        flags += ["--reflow-steps", str(max(1, 2 * steps // 3)), "--n-pairs", "1024"]
    return flags


def run(script, out, *flags):
    """A script's run on its parsed flags, writing to out; returns its metrics."""
    mod = mods[script]
    return mod.run(mod.get_args(["--out", str(out), "--device", "cpu", *flags]))


def cli(script, *flags, cwd=None):
    """The script as a user runs it: (exit code, stdout + stderr)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, f"{script}.py"), *flags], capture_output=True,
                         text=True, timeout=300, cwd=cwd)
    return out.returncode, out.stdout + out.stderr


def net(mod, n_times, n_classes=0, shape=(2,), channels=8):
    """The network a script builds for 2D points (ResMLP) or images (SmallUNet, channels-last)."""
    if shape == (2,):
        return mod.ResMLP(n_times, n_classes)
    return mod.SmallUNet(shape, n_times, channels, n_classes).to(memory_format=torch.channels_last)


def losses(out, script):
    """The loss curve of each stage, from the files a run wrote."""
    names = ["stage1", "stage2"] if script in TWO_STAGE else ["checkpoint"]
    return {n: torch.load(os.path.join(out, f"{n}.pt"), weights_only=True)["losses"] for n in names}


ONE_STEP = {"fm": "ode", "rectified_flow": "ode", "reflow": "stage2_nfe1", "imf": "nfe1",
            "imf_reflow": "stage2_nfe1"}
# trained W2 / 1-step-trained W2, measured at 0.40, 0.39, 0.28, 0.47 and 0.35 (one thread)
AT_MOST = {"fm": 0.5, "rectified_flow": 0.5, "reflow": 0.35, "imf": 0.6, "imf_reflow": 0.45}


# ============================================================ 1. the card: each script briefly, each device
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_brief_run_trains_and_samples(script, device, tmp_path):
    """A brief moons run: every stage's loss goes down, the 1-NFE samples have the data's shape and are
    finite, and the method's sampler (one step; the ODE for fm and rectified_flow) beats a 1-step-trained
    model of the same script by far."""
    metrics = run(script, tmp_path / "trained", *brief_flags(script), "--device", device)
    for name, curve in losses(tmp_path / "trained", script).items():
        assert len(curve) >= 200 and np.mean(curve[-50:]) < 0.9 * np.mean(curve[:50]), name
    saved = np.load(tmp_path / "trained" / "samples.npz")
    one_step = "stage2_nfe1" if script in TWO_STAGE else "nfe1"
    assert saved[one_step].shape == saved["real"].shape == (300, 2) and np.isfinite(saved[one_step]).all()
    assert os.path.getsize(tmp_path / "trained" / "results.png") > 20_000
    untrained = run(script, tmp_path / "untrained", *brief_flags(script, 1), "--device", device)
    key = ONE_STEP[script]
    print(script, device, "W2 trained", metrics[f"w2_{key}"], "untrained", untrained[f"w2_{key}"])
    assert metrics[f"w2_{key}"] < AT_MOST[script] * untrained[f"w2_{key}"]
    assert json.load(open(tmp_path / "trained" / "metrics.json"))["command"].startswith(f"python {script}.py")


# ============================================================ 2. the methods, on the CPU
@pytest.fixture
def float64():
    """Finite differences need float64: every tensor the code makes, too."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("shape", [(2,), (1, 16, 16)])
def test_meanflow_jvp_matches_finite_difference(shape, float64):
    """d/dt u(z_t, r, t) along dz/dt = v is a central difference of u(z + h v, r, t + h), through the MLP
    and the channels-last U-Net; a tangent that also moves r (a plausible bug) gives another derivative."""
    for mod in (imf, imf_reflow):
        torch.manual_seed(0)
        model = net(mod, 2, shape=shape, channels=4)
        z, v = torch.randn(6, *shape), torch.randn(6, *shape)
        t = torch.rand(6) * 0.8 + 0.1
        r = t * torch.rand(6)
        u, dudt = mod.meanflow_jvp(model, z, r, t, v)
        h = 1e-5
        with torch.no_grad():
            fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
            fd_wrong = (model(z + h * v, r + h, t + h) - model(z - h * v, r - h, t - h)) / (2 * h)
            assert torch.allclose(u, model(z, r, t))
        assert torch.allclose(dudt, fd, rtol=1e-5, atol=1e-7), (dudt - fd).abs().max()
        assert not torch.allclose(dudt, fd_wrong, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("module", ["imf", "imf_reflow"])
@pytest.mark.parametrize("cond", [False, True])
def test_imf_loss_matches_a_finite_difference_target(module, cond, float64):
    """The whole iMF loss: ||u + (t - r) sg(d/dt u) - v_g||^2, d/dt u along dz/dt = u(z, t, t), rebuilt with a
    finite difference, for the value and the gradient. cond: labels (a quarter dropped), each row's scale w
    log-uniform in [1, 4] an input g = 1 - 1/w, and v_g = (e - x) + g sg(v(z | label, w) - v(z | none, 1)) on
    labelled rows, by hand."""
    mod = mods[module]
    torch.manual_seed(0)
    model = net(mod, 2 + cond, n_classes=3 if cond else 0)
    x, e = torch.randn(64, 2), torch.randn(64, 2)
    y = torch.arange(64) % 4 if cond else None                    # 3 = no label
    torch.manual_seed(3)
    loss = mod.imf_loss(model, x, e, y, boundary_t="max")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(3)
    r, t, nb = mod.sample_r_t(64, "cpu", "max")
    assert 0 < nb < 64 and (r[nb:] < t[nb:]).all()
    g = 1 - 1 / 4.0 ** torch.rand(64)
    assert not cond or 0 <= g.min() < 0.1 and 0.7 < g.max() <= 0.75
    scale = [g] if cond else []
    z = (1 - t[:, None]) * x + t[:, None] * e
    h = 1e-6
    with torch.no_grad():
        v = model(z, t, t, *scale, labels=y)
        ahead = model(z + h * v, r, t + h, *scale, labels=y)
        back = model(z - h * v, r, t - h, *scale, labels=y)
        dudt = (ahead - back) / (2 * h)
        target = e - x
        if cond:
            v_null = model(z, t, t, torch.zeros(64), labels=torch.full_like(y, 3))
            target = torch.where((y != 3)[:, None], e - x + g[:, None] * (v - v_null), e - x)
    ref = ((model(z, r, t, *scale, labels=y) + (t - r)[:, None] * dudt - target) ** 2).mean()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-6), (loss, ref)
    for g, g_ref in zip(grads, ref_grads):                     # the JVP and guidance terms carry no gradient
        assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8)


def test_imf_guided_target_by_hand_and_unguided_at_scale_one(float64):
    """A tiny net whose velocity is known: v(z | label k, g) = k + 10 g, v(z | none) = 3 (+ 10 g). At r = t
    the loss is ||v(z | label, w) - v_g||^2 with v_g = (e - x) + g (v(label, w) - v(none, 1)), so it is
    mean((k + 10 g - (e - x) - g (k + 10 g - 3))^2), by hand; at w = 1 (w_max 1) the target is e - x."""
    class Tiny(torch.nn.Module):
        n_classes = 3

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, z, r, t, g, labels=None):
            return (self.a * labels.to(z.dtype) + 10 * g)[:, None] + 0 * z + 0 * (t - r)[:, None]

    x, e = torch.zeros(8, 2), torch.ones(8, 2)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for mod in (imf, imf_reflow):
        torch.manual_seed(5)
        loss = mod.imf_loss(Tiny(), x, e, y, boundary_t="max")
        torch.manual_seed(5)
        mod.sample_r_t(8, "cpu", "max")
        g = (1 - 1 / 4.0 ** torch.rand(8))
        v = y + 10 * g
        v_g = torch.where(y == 3, 1.0, 1 + g * (v - 3))
        assert torch.allclose(loss, ((v - v_g) ** 2).mean()), mod
        unguided = mod.imf_loss(Tiny(), x, e, y, boundary_t="max", w_max=1.0)   # g = 0: v = k, v_g = e - x
        assert torch.allclose(unguided, ((y - 1.0) ** 2).mean())


def test_imf_time_sampler_blocks_and_boundary_times():
    """Blocks r = t, r = 0 (with the one-step corner (0, 1)), sorted pairs; the boundary t is
    logit-normal(-0.4, 1) (median 0.40, 16% below 0.2) or the larger of two uniforms (4% below 0.2)."""
    for n in (3, 7, 512, 1000):
        r, t, nb = imf.sample_r_t(n, "cpu")
        n0 = int(((r == 0) & (torch.arange(n) >= nb)).sum())
        assert nb == round(n * 0.7) and n0 == round(n * 0.2) and torch.all(r <= t)
    torch.manual_seed(0)
    r, t, nb = imf.sample_r_t(20000, "cpu", "logit-normal")
    assert torch.equal(r[:nb], t[:nb]) and torch.all(r[nb:18000] == 0) and torch.all(r[18000:] < t[18000:])
    assert ((r < 0.05) & (t > 0.95)).sum() > 50                   # the one-step corner is trained
    assert abs(t[:nb].median().item() - 0.401) < 0.01 and 0.14 < (t[:nb] < 0.2).float().mean() < 0.18
    r, t, nb = imf.sample_r_t(20000, "cpu", "max")
    assert (t[:nb] < 0.2).float().mean() < 0.05


class Spy(torch.nn.Module):
    """Records the (z, r, t) a sampler passes; its output is 1 everywhere."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, r, t, labels=None):
        self.calls.append((z.clone(), r.clone(), t.clone()))
        return torch.ones_like(z)


def test_imf_sampler_time_convention(tmp_path):
    """One step is x = e - u(e, r=0, t=1): the z input is the state at time t (noise at t = 1); two steps
    go 1 -> 0.5 -> 0. A trained model gives clearly worse samples with the seed text's call u(e, r=1, t=0)."""
    for mod in (imf, imf_reflow):
        e, spy = torch.randn(7, 2), Spy()
        assert torch.allclose(mod.sample(spy, e, 1), e - 1)
        (z, r, t), = spy.calls
        assert torch.equal(z, e) and torch.all(r == 0) and torch.all(t == 1)
        spy = Spy()
        mod.sample(spy, e, 2)
        (z1, r1, t1), (z2, r2, t2) = spy.calls
        assert torch.equal(z1, e) and torch.all(r1 == 0.5) and torch.all(t1 == 1)
        assert torch.allclose(z2, e - 0.5) and torch.all(r2 == 0) and torch.all(t2 == 0.5)
    metrics = run("imf", tmp_path, "--steps", "400", "--n-eval", "500")
    model = net(imf, 2)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["ema"])
    data = imf.Data("moons", "data", 0, torch.device("cpu"), 500)
    e = imf.eval_noise(data, 3000, "cpu")
    with torch.no_grad():
        wrong = imf.w2_distance(data.to_data(e - model(e, torch.ones(500), torch.zeros(500))), data.heldout)
    right = imf.w2_distance(data.to_data(imf.sample(model, e, 1)), data.heldout)
    assert abs(right - metrics["w2_nfe1"]) < 1e-4
    assert metrics["w2_nfe1"] < 0.5 * wrong, (metrics["w2_nfe1"], wrong)       # measured 0.35


class One(torch.nn.Module):
    """v = 1 everywhere."""
    n_classes = 0

    def forward(self, z, *times, labels=None):
        return torch.ones_like(z)


def test_euler_and_ode_samplers_run_from_noise_to_data():
    """Euler goes t = 1 -> 0 with z <- z + (t_next - t) v: a constant field v = 1 moves e to e - 1, in any
    number of steps and with every solver; fixed-step solvers count their evaluations."""
    e = torch.randn(5, 2)
    for mod in (fm, rectified_flow, reflow, imf_reflow):                            # (z, NFE)
        assert torch.allclose(mod.euler_sample(One(), e, 3)[0], e - 1)
    for solver, evals in (("euler", 4), ("midpoint", 8), ("rk4", 16), ("dopri5", None)):
        path, nfe = fm.ode_generate(One(), e, solver, 4)
        assert torch.allclose(path[-1], e - 1, atol=1e-5) and (evals is None or nfe == evals)


def test_w2_of_a_shifted_set_is_the_shift_and_sets_must_match():
    a = np.random.default_rng(0).standard_normal((300, 2))
    for mod in (fm, evaluate):
        assert abs(mod.w2_distance(a, a + np.array([0.3, -0.4])) - 0.5) < 1e-9
        assert mod.w2_distance(a, a[::-1].copy()) < 1e-6             # a permutation is no distance
        with pytest.raises(mod.RunError, match="one size"):
            mod.w2_distance(a[:40], a)                               # never a partial matching


def test_straightness_is_zero_for_a_constant_field_and_counts_a_curved_one():
    class Field(torch.nn.Module):
        n_classes = 0

        def forward(self, z, t, labels=None):
            return torch.ones_like(z) + t[:, None] * torch.tensor([0.0, 2.0])
    e = torch.randn(8, 2)
    path, S, C = rectified_flow.straightness(Field(), e, 50)      # z_1 - z_0 = (1, 2), exactly
    assert path.shape == (51, 8, 2) and abs(C - 5) < 0.1 and abs(S - 1 / 3) < 0.03
    S2, _ = reflow.straightness(Field(), path)
    assert abs(S - S2) < 1e-5                                     # the same sum, from the path's points
    assert rectified_flow.straightness(One(), e, 10)[1] < 1e-10


def test_reflow_distillation_reads_the_one_step_corner():
    """The distillation regresses v(e, 1) on e - x_hat: it reads the network at z = e, t = 1 only."""
    seen = []

    class Spy1(torch.nn.Module):
        def forward(self, z, t, labels=None):
            seen.append((z.clone(), t.clone()))
            return torch.zeros_like(z)
    x, e = torch.randn(10, 2), torch.randn(10, 2)
    loss = reflow.distill_loss(Spy1(), x, e)
    assert torch.equal(seen[-1][0], e) and torch.all(seen[-1][1] == 1)
    assert torch.allclose(loss, ((e - x) ** 2).mean())
    reflow.rf_loss(Spy1(), x, e, t1_frac=0.5)                   # reflow's stages: half the batch at t = 1
    z, t = seen[-1]
    assert torch.all(t[:5] == 1) and torch.equal(z[:5], e[:5]) and torch.all(t[5:] < 1)


def test_guidance_combines_two_outputs_in_one_call_and_counts_both():
    torch.manual_seed(0)
    model = net(fm, 1, n_classes=3)
    z, t, y = torch.randn(16, 2), torch.rand(16), torch.randint(0, 3, (16,))
    null = torch.full_like(y, 3)
    assert torch.equal(fm.velocity(model, z, t, y, 1.0), model(z, t, labels=y))
    want = model(z, t, labels=null) + 2.5 * (model(z, t, labels=y) - model(z, t, labels=null))
    assert torch.allclose(fm.velocity(model, z, t, y, 2.5), want, atol=1e-6)
    assert torch.equal(model(z, t), model(z, t, labels=null))     # no labels: the "no label" index
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    _, nfe = fm.ode_generate(model, z, labels=y, w=2.0)           # guided: each call holds 2 x 16 rows,
    assert nfe == 2 * len(calls) and set(calls) == {32}            # counted as two evaluations
    model2, zero, half = net(imf, 3, n_classes=3), torch.zeros(16), torch.full((16,), 0.5)
    want = model2(z, t, t, zero, labels=null) + 2.0 * (model2(z, t, t, zero, labels=y) - model2(z, t, t, zero,
                                                                                                labels=null))
    assert torch.allclose(imf_reflow.velocity(model2, z, t, y, 2.0, cfg=True), want, atol=1e-6)   # fm teacher
    assert torch.equal(imf_reflow.velocity(model2, z, t, y, 2.0), model2(z, t, t, half, labels=y))  # 1 - 1/w


def test_guidance_interval_leaves_the_steps_outside_it_unguided():
    """fm.py and rectified_flow.py guide only for t in --guidance-interval, and so do the teachers' ODEs of
    reflow.py and imf_reflow.py, which make their pairs: with [0, 0.9], 4 Euler steps take their step at
    t = 1 without guidance (one evaluation) and the other three guided (two each): 7 NFE, in the ODE too."""
    torch.manual_seed(0)
    model = net(fm, 1, n_classes=3)
    z, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    want = z
    for t in (1.0, 0.75, 0.5, 0.25):
        want = want - 0.25 * fm.velocity(model, want, torch.full((16,), t), y, 1.0 if t > 0.9 else 2.0)
    rows = []
    model.register_forward_hook(lambda mod, inp, out: rows.append(len(inp[0])))
    x, nfe = fm.euler_sample(model, z, 4, y, 2.0, (0.0, 0.9))
    assert nfe == 7 and rows == [16, 32, 32, 32] and torch.allclose(x, want, atol=1e-6)
    assert torch.equal(rectified_flow.euler_sample(model, z, 4, y, 2.0, (0.0, 0.9))[0], x)
    rows.clear()
    path, nfe = fm.ode_generate(model, z, "euler", 4, y, 2.0, (0.0, 0.9))
    assert nfe == 7 and rows == [16, 32, 32, 32] and torch.allclose(path[-1], want, atol=1e-6)
    assert fm.euler_sample(model, z, 4, y, 2.0)[1] == 8                      # the default: every step
    for mod, teacher in ((reflow, model), (imf_reflow, net(imf, 3, n_classes=3))):   # their teachers
        cfg = {"cfg": True} if mod is imf_reflow else {}         # imf_reflow's fm teacher: classifier-free
        assert mod.euler_sample(teacher, z, 4, y, 2.0, (0.0, 0.9))[1] == 7
        assert mod is imf_reflow or torch.equal(mod.euler_sample(teacher, z, 4, y, 2.0, (0.0, 0.9))[0], x)
        pairs = mod.make_pairs(teacher, 16, (2,), 0, 3, (2.0,) if cfg else 2.0, (0.0, 0.9), steps=4, **cfg)
        assert pairs["nfe"] == 15                 # midpoint: t = 1 unguided, 0.875, 0.75, ..., 0.125 guided
        path, nfe = mod.ode_generate(teacher, pairs["e"], pairs["labels"], 2.0, (0.0, 0.9), steps=4, **cfg)
        assert nfe == 15 and torch.allclose(pairs["x_hat"], path[-1])
        all_guided = mod.ode_generate(teacher, pairs["e"], pairs["labels"], 2.0, steps=4, **cfg)[0][-1]
        assert not torch.equal(pairs["x_hat"], all_guided)


@pytest.mark.parametrize("script", ["imf", "imf_reflow"])
def test_imf_guidance_scale_is_an_input_chosen_at_sampling(script, tmp_path, monkeypatch):
    """A conditional iMF run samples the sweep of scales from one model, one network call a step, and the
    scale changes the samples; a finished run asked for another --guidance samples again and trains nothing.
    An unconditional net has no scale input: the scale changes nothing."""
    mod = mods[script]
    flags = ["--cond", "--steps", "30", "--n-eval", "50"]
    two = script == "imf_reflow"                                  # an iMF teacher: imf_loss in both stages
    flags += ["--teacher", "imf", "--reflow-steps", "20", "--n-pairs", "50"] if two else []
    run(script, tmp_path, *flags, "--guidance", "2")
    name = "stage2" if two else "checkpoint"
    model = net(mod, 3, n_classes=2)
    model.load_state_dict(torch.load(tmp_path / f"{name}.pt", weights_only=True)["ema"])
    rows = []
    model.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
    e, y = torch.randn(50, 2), torch.randint(0, 2, (50,))
    x = mod.sample(model, e, 1, y, 2.0)
    assert rows == [50] and not torch.allclose(x, mod.sample(model, e, 1, 1 - y, 2.0), atol=1e-3)
    assert not torch.allclose(x, mod.sample(model, e, 1, y, 3.0), atol=1e-3)
    key = "stage2_nfe1" if two else "nfe1"
    assert {f"{key}_w{w}" for w in ("1", "1.5", "2", "3", "4")} <= set(np.load(tmp_path / "samples.npz"))
    files = {f: os.stat(tmp_path / f).st_mtime_ns for f in os.listdir(tmp_path) if f.endswith(".pt")}
    monkeypatch.setattr(mod, "imf_loss", lambda *a, **kw: pytest.fail("trained again"))
    monkeypatch.setattr(mod, "make_pairs", lambda *a, **kw: pytest.fail("made pairs again"), raising=False)
    run(script, tmp_path, *flags, "--guidance", "2.5")
    assert files == {f: os.stat(tmp_path / f).st_mtime_ns for f in files}
    assert np.isfinite(np.load(tmp_path / "samples.npz")[f"{key}_w2.5"]).all()
    plain = net(mod, 2)                                           # unconditional: no scale input
    assert plain.cond[0].in_features == 2 * 64
    assert torch.equal(mod.sample(plain, e, 1, None, 3.0), mod.sample(plain, e, 1))


@pytest.mark.parametrize("script", ["fm", "rectified_flow"])
def test_a_finished_run_is_sampled_again_at_another_guidance(script, tmp_path, monkeypatch, capsys):
    """Classifier-free guidance is a sampling setting: a finished run asked for another --guidance loads its
    checkpoint and samples again; nothing trains and the file stays as it was."""
    flags = ["--cond", "--steps", "30", "--n-eval", "50", "--ode-steps", "2"]
    run(script, tmp_path, *flags, "--guidance", "2")
    before = np.load(tmp_path / "samples.npz")["nfe2"]
    saved = os.stat(tmp_path / "checkpoint.pt").st_mtime_ns
    loss = "fm_loss" if script == "fm" else "rf_loss"
    monkeypatch.setattr(mods[script], loss, lambda *a, **kw: pytest.fail("trained again"))
    run(script, tmp_path, *flags, "--guidance", "3")
    assert "sampling the finished" in capsys.readouterr().out
    assert os.stat(tmp_path / "checkpoint.pt").st_mtime_ns == saved
    assert not np.allclose(np.load(tmp_path / "samples.npz")["nfe2"], before, atol=1e-4)


@pytest.mark.parametrize("script", ["reflow", "imf_reflow"])
def test_pairs_are_the_ode_endpoints_per_label(script, tmp_path):
    """The pairs are the endpoints of stage 1's dopri5 ODE from their noise; with --cond --guidance W their
    labels are balanced and the ODE is the guided one; reflow.py --distill trains on them too."""
    mod = mods[script]
    distill = ["--distill"] if script == "reflow" else []
    metrics = run(script, tmp_path, "--cond", "--guidance", "2", "--steps", "60", "--reflow-steps", "20",
                  "--n-pairs", "64", "--n-eval", "50", *distill)
    pairs = torch.load(tmp_path / "pairs1.pt", weights_only=True)
    assert torch.equal(torch.bincount(pairs["labels"]), torch.tensor([32, 32]))
    assert pairs["x_hat"].shape == (64, 2)
    model = net(mod, 3 if script == "imf_reflow" else 1, n_classes=2)
    model.load_state_dict(torch.load(tmp_path / "stage1.pt", weights_only=True)["ema"])
    if script == "reflow":
        guided = mod.ode_generate(model, pairs["e"], pairs["labels"], 2.0)[0][-1]
        plain = mod.ode_generate(model, pairs["e"], pairs["labels"], 1.0)[0][-1]
        assert torch.allclose(guided, pairs["x_hat"], atol=1e-5)
        assert not torch.allclose(plain, guided, atol=1e-3)
        assert "w2_ratio_stage2_nfe1" in metrics and "w2_ratio_stage1_nfe2" in metrics   # stage 1: 2 NFE
    else:                                         # a share of the pairs at each scale, by the fm teacher
        w = pairs["w"].tolist()
        assert w == sorted(w) and set(w) == {1, 1.5, 2, 3, 4}
        assert torch.bincount((pairs["w"] * 2).long()).max() - torch.bincount((pairs["w"] * 2).long())[2] <= 1
        for w in (1.0, 3.0):
            i = pairs["w"] == w
            guided = mod.ode_generate(model, pairs["e"][i], pairs["labels"][i], w, cfg=True)[0][-1]
            assert torch.allclose(guided, pairs["x_hat"][i], atol=1e-5)
        plain = mod.ode_generate(model, pairs["e"][i], pairs["labels"][i], 1.0, cfg=True)[0][-1]
        assert not torch.allclose(plain, guided, atol=1e-3)
        assert "w2_ratio_stage2_nfe1_w1.5" in metrics and "w2_ratio_stage1_nfe2_w2" in metrics
    assert script == "imf_reflow" or "w2_ratio_distill_nfe1" in metrics
    assert np.load(tmp_path / "samples.npz")["labels"].shape == (50,)


def test_short_runs_of_each_scripts_variants(tmp_path):
    """imf_reflow.py --teacher imf, rectified_flow.py --source 8gaussians and reflow.py --reflows 2 run
    through: the iMF teacher samples in one step, the source's points start the paths, 2-RF is trained."""
    metrics = run("imf_reflow", tmp_path / "a", "--teacher", "imf", *brief_flags("imf_reflow", 60))
    assert {"w2_ratio_stage1_nfe1", "w2_ratio_stage2_nfe1"} <= set(metrics)
    flags = brief_flags("rectified_flow", 60)
    metrics = run("rectified_flow", tmp_path / "b", "--source", "8gaussians", *flags)
    assert "w2_ratio_nfe1" in metrics and metrics["transport_cost"] > 0
    metrics = run("reflow", tmp_path / "c", "--reflows", "2", *brief_flags("reflow", 60))
    assert "w2_ratio_stage3_nfe1" in metrics and (tmp_path / "c" / "pairs2.pt").exists()


def test_conditional_model_puts_samples_in_the_class_asked_for(tmp_path):
    """A conditional flow on moons puts each moon's samples on that moon (evaluate.py's accuracy)."""
    run("fm", tmp_path, "--cond", "--steps", "600", "--n-eval", "400")
    scores = evaluate.evaluate(str(tmp_path))
    assert scores["ode"]["accuracy"] > 0.95, scores["ode"]


def test_eval_noise_is_normal_and_splits_the_moons_evenly():
    data = fm.Data("moons", "data", 0, torch.device("cpu"), 2000)
    e = fm.eval_noise(data, 3000, "cpu")
    assert e.shape == (2000, 2) and abs(e.mean()) < 0.02 and abs(e.std() - 1) < 0.02
    assert abs((e[:, 0] > 0).float().mean() - 0.5) < 0.002       # i.i.d. noise: about +-0.011
    assert torch.equal(e, fm.eval_noise(data, 3000, "cpu"))


def test_every_toy_is_normalised_and_labelled():
    for name in fm.TOYS:
        data = fm.Data(name, "data", 0, torch.device("cpu"), 100)
        x = data.train
        assert x.shape == (2**16, 2) and x.mean(0).abs().max() < 0.2, name
        assert ((x.std(0) > 0.7) & (x.std(0) < 1.4)).all(), name
        raw = fm.toy_points(name, 2**16, np.random.default_rng(0))[0]       # the pool, in the toy's units
        assert np.allclose(data.to_data(x), raw, atol=1e-5), name
        assert data.heldout.shape == data.floor.shape == (100, 2) and len(data.heldout_labels) == 100
        classes = {-1} if name == "checkerboard" else set(range(fm.N_CLASSES[name]))
        assert set(data.labels.tolist()) == classes


def test_nan_samples_keep_the_files_and_the_report_says_so(tmp_path, monkeypatch, capsys):
    """NaN noise makes every sample NaN (dopri5 cannot step it): the run writes its files and says so."""
    monkeypatch.setattr(fm, "eval_noise", lambda data, seed, device: torch.full((50, 2), float("nan")))
    metrics = run("fm", tmp_path, "--steps", "20", "--n-eval", "50")
    assert "ode  non-finite samples: no W2" in capsys.readouterr().out and "w2_ode" not in metrics
    assert np.isnan(np.load(tmp_path / "samples.npz")["ode"]).all() and (tmp_path / "results.png").exists()


# ============================================================ evaluate.py: a fixed ruler, honest or silent
def samples_file(path, **arrays):
    """A valid samples file: 40 2D points (with labels: left or right), or 40 digit images; arrays replace
    or (None) leave out the defaults."""
    rng = np.random.default_rng(0)
    if arrays.pop("images", False):
        real = rng.uniform(0, 1, (40, 1, 8, 8)).astype(np.float32)
        saved = {"real": real, "data": "digits", "nfe1": real[::-1].copy(), "labels": np.arange(40) % 10}
    else:
        labels = np.arange(40) % 2                          # two clusters far apart, one a label
        real = 0.3 * rng.standard_normal((40, 2)) + np.stack([10.0 * labels, 0 * labels], 1)
        saved = {"real": real, "floor": real[::-1] + [0.6, 0.8], "data": "moons", "nfe1": real + [0.3, -0.4],
                 "labels": labels}
    saved.update(arrays)
    np.savez(path, **{k: v for k, v in saved.items() if v is not None})
    return str(path)


NAN_POINTS = np.where(np.arange(80).reshape(40, 2) == 7, np.nan, 0.0)
BAD_FILES = [({"real": None}, "no 'real' array"), ({"floor": None}, "'floor'"),
             ({"nfe1": NAN_POINTS}, "NaN or inf"), ({"floor": NAN_POINTS}, "NaN or inf"),
             ({"labels": np.arange(39) % 2}, "'labels'"), ({"labels": np.zeros(40)}, "'labels'"),
             ({"nfe1": np.full((40, 2), "x")}, "not numbers"), ({"nfe1": np.zeros(40)}, "'nfe1' in"),
             ({"nfe1": np.zeros((20, 2))}, "'nfe1' in"), ({"nfe1": np.zeros((40, 3))}, "'nfe1' in"),
             ({"real": np.zeros((2000, 2)), "floor": np.zeros((2000, 2))}, "(40, 2)"),
             ({"images": True, "nfe1": np.zeros((40, 1, 7, 7))}, "'nfe1' in"),
             ({"images": True, "data": "cifar10"}, "cifar10.pt"), ({"nfe1": None}, "no sample set"),
             ({"floor": np.zeros((40, 2)) + [10, 0], "real": np.zeros((40, 2)) + [10, 0]}, "the floor"),
             ({"images": True, "nfe1": np.full((40, 1, 8, 8), 255.0)}, "outside [0, 1]")]


@pytest.mark.parametrize("arrays, text", BAD_FILES)
def test_evaluate_refuses_what_it_cannot_score_honestly_in_one_line(arrays, text, tmp_path):
    """NaN, a partial set (40 of 2000 points once scored 0.00x), labels of another length, a 1-D or
    non-numeric array, another shape, 2D points without a floor, data without a classifier: one line, exit 1,
    no scores.json."""
    for path, text in [(samples_file(tmp_path / "samples.npz", **arrays), text),
                       (tmp_path / "bad.npz", "cannot read samples")]:
        (tmp_path / "bad.npz").write_text("not an npz file")
        with pytest.raises(SystemExit) as err:                     # main's exit: "error: ..." and code 1
            evaluate.main([str(path)])
        message = str(err.value.code)
        assert message.startswith("error: ") and "\n" not in message and text in message, message
    assert not (tmp_path / "scores.json").exists()


def test_evaluate_scores_2d_points_by_the_exact_w2_they_imply(tmp_path):
    """The floor set is the real one moved by (0.6, 0.8): W2 1; samples moved by (0.3, -0.4): 0.5 = 0.5x,
    each on its own side (accuracy 1)."""
    scores = evaluate.evaluate(samples_file(tmp_path / "samples.npz"))
    assert scores["nfe1"] == {"distance": 0.5, "floor": 1.0, "ratio": 0.5, "accuracy": 1.0}


def digits_samples(path):
    """Held-out digits as the real set; real training digits, uniform noise and the mean digit as samples."""
    train, _, heldout, labels = evaluate.load_images("digits", "data")
    rng = np.random.default_rng(1)
    np.savez(path, real=heldout.numpy(), data="digits", seed=0, labels=labels.numpy(),
             train=train[rng.choice(len(train), 360, replace=False)].numpy(),
             noise=rng.uniform(0, 1, (360, 1, 8, 8)),
             mean=np.repeat(train.mean(0, keepdim=True).numpy(), 360, 0))
    return str(path)


def test_fd_ranks_real_digits_near_the_floor_and_noise_far_above_on_any_thread_count(tmp_path, capsys):
    """The shipped classifier (no training at scoring time, nothing written but scores.json) gets held-out
    digits right; real training digits score near 1x, noise and the mean digit far above; one and two
    threads give the same numbers."""
    f = np.random.default_rng(0).standard_normal((200, 5))
    assert abs(evaluate.frechet_distance(f, f)) < 1e-6 and evaluate.frechet_distance(f, f + 1) > 4.9
    path, threads, scores = digits_samples(tmp_path / "samples.npz"), torch.get_num_threads(), []
    shipped = [os.path.join(HERE, "classifiers", f) for f in ("digits.pt", "mnist.pt")]
    classifiers = {f: os.path.getmtime(f) for f in shipped}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            scores.append(evaluate.main([path]))
    finally:
        torch.set_num_threads(threads)
    assert scores[0] == scores[1] and sorted(os.listdir(tmp_path)) == ["samples.npz", "scores.json"]
    assert classifiers == {f: os.path.getmtime(os.path.join(HERE, "classifiers", f)) for f in classifiers}
    assert float(capsys.readouterr().out.split("classifier: accuracy ")[1].split()[0]) > 0.9    # 0.964
    train, noise, mean = (scores[0][k]["ratio"] for k in ("train", "noise", "mean"))
    assert train < 1.6 and noise > 10 and mean > 30                      # 0.90x, 21.65x, 84.67x measured
    assert scores[0]["noise"]["accuracy"] < 0.3


def test_evaluate_scores_a_run_as_the_script_did(tmp_path):
    metrics = run("imf", tmp_path, "--steps", "50", "--n-eval", "300")
    scores = evaluate.main([str(tmp_path)])
    for key in ("nfe1", "nfe2"):
        assert abs(scores[key]["ratio"] - metrics[f"w2_ratio_{key}"]) < 1e-3
    tiny_mnist(tmp_path / "data")                                  # the shipped MNIST classifier, 28x28
    train, _, heldout, labels = evaluate.load_images("mnist", tmp_path / "data")
    np.savez(tmp_path / "m.npz", real=heldout.numpy(), data="mnist", labels=labels.numpy(),
             data_dir=str(tmp_path / "data"), nfe1=train[:12].numpy())
    assert evaluate.evaluate(str(tmp_path / "m.npz"))["nfe1"]["ratio"] > 0


# ============================================================ 3. the command line
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, text", [(["--data", "swissroll"], "invalid choice"),
                                         (["--steps", "0"], "--steps: must be a positive number"),
                                         (["--lr", "nan"], "--lr: must be a positive number"),
                                         (["--seed", "-1"], "--seed must be 0 or more"),
                                         (["--steps", "1.5"], "invalid int value"),
                                         (["--cond", "--data", "checkerboard"], "--cond needs data with"),
                                         (["--guidance", "2"], "--guidance needs --cond")])
def test_bad_flags_are_one_line_errors(script, flags, text, capsys):
    with pytest.raises(SystemExit) as err:
        mods[script].get_args(flags)
    assert err.value.code == 2 and text in capsys.readouterr().err


def test_method_flags_are_checked(capsys):
    for mod, flags, text in [(reflow, ["--reflows", "0", "--distill"], "--distill needs"),
                             (rectified_flow, ["--source", "moons", "--data", "digits"], "toy --source"),
                             (fm, ["--ode-steps", "0"], "--ode-steps: must be"),
                             (fm, ["--guidance-interval", "0.9", "0.1"], "0 <= LO <= HI <= 1"),
                             (reflow, ["--guidance-interval", "0.5", "0.2"], "0 <= LO <= HI <= 1"),
                             (reflow, ["--reflows", "-1"], "--reflows must be 0 or more"),
                             (imf_reflow, ["--ode-steps", "-1"], "--ode-steps must be 0 or more"),
                             (imf_reflow, ["--teacher", "dit"], "invalid choice")]:
        with pytest.raises(SystemExit):
            mod.get_args(flags)
        assert text in capsys.readouterr().err
    with pytest.raises(fm.RunError, match="cannot make the --out folder"):    # under a file
        fm.run(fm.get_args(["--out", os.path.join(__file__, "out")]))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            fm.get_args(["--device", "cuda"])
        assert "--device cuda is not available here" in capsys.readouterr().err


def test_help_shows_the_defaults_per_dataset_and_works_under_python_OO(capsys):
    for path in [f"{script}.py" for script in SCRIPTS] + ["evaluate.py"]:
        out = subprocess.run([sys.executable, "-OO", os.path.join(HERE, path), "--help"],
                             capture_output=True, text=True, timeout=120)     # -OO: no docstrings
        assert out.returncode == 0 and "usage" in out.stdout, (path, out.stderr)
    for script in SCRIPTS:
        with pytest.raises(SystemExit):
            mods[script].get_args(["--help"])
        steps = mods[script].DEFAULTS
        printed = " ".join(capsys.readouterr().out.split())      # the epilog lists DEFAULTS per dataset
        assert f"toys: steps={steps['toys']['steps']}," in printed
        assert f"mnist: steps={steps['mnist']['steps']}," in printed
        args = mods[script].get_args(["--data", "digits", "--lr", "0.01"])
        assert args.steps == steps["digits"]["steps"] and args.lr == 0.01     # a flag given always wins
    mnist = [mods[script].get_args(["--data", "mnist"]) for script in SCRIPTS]   # the laptop CPU command
    assert {(a.channels, a.batch_size, a.n_eval) for a in mnist} == {(16, 64, 1000)}
    assert all(a.steps <= 6000 and getattr(a, "reflow_steps", 0) <= 5000 for a in mnist)
    assert mods["fm"].get_args(["--data", "mnist"]).solver == "midpoint"              # not dopri5's 280 NFE
    for script in ["fm", "reflow", "imf_reflow"]:                                     # not at t = 1
        assert mods[script].get_args(["--data", "mnist"]).guidance_interval == [0.0, 0.9]


def test_errors_at_the_command_line_are_one_line(tmp_path):
    """A user's view: an unreadable checkpoint and a broken MNIST download end in one line and exit 1."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "checkpoint.pt").write_bytes(b"garbage")
    code, out = cli("fm", "--out", str(tmp_path / "a"), "--steps", "5", "--resume")
    assert code == 1 and out.startswith("error: cannot read") and out.count("\n") == 1, out
    tiny_mnist(tmp_path / "d")
    (tmp_path / "d" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"broken")
    code, out = cli("imf", "--data", "mnist", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"))
    assert code == 1 and out.startswith("error: cannot load MNIST") and "--data digits" in out, out
    assert out.count("\n") == 1


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def tiny_mnist(folder, n_train=40, n_test=12):
    """MNIST's four IDX files under folder/MNIST/raw, random 28x28 images and labels; returns the arrays."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


@pytest.mark.parametrize("script", SCRIPTS)
def test_mnist_path_of_each_script_on_tiny_idx_files(script, tmp_path, capsys):
    """Each script runs class-conditional, guided MNIST on tiny IDX files: 28x28 samples in [0, 1] with the
    labels asked for; the two-stage scripts simulate their pairs balanced per label, of MNIST's shape."""
    arrays = tiny_mnist(tmp_path / "data")
    flags = ["--data", "mnist", "--data-dir", str(tmp_path / "data"), "--steps", "3", "--channels", "4",
             "--batch-size", "4", "--cond", "--guidance", "2"]
    flags += ["--reflow-steps", "2", "--n-pairs", "20"] if script in TWO_STAGE else []
    flags += {"fm": ["--solver", "euler", "--ode-steps", "2"], "rectified_flow": ["--ode-steps", "2"]}.get(
        script, [])
    run(script, tmp_path / "out", *flags)
    assert f"python evaluate.py {tmp_path / 'out'}" in capsys.readouterr().out      # how to score the images
    saved = np.load(tmp_path / "out" / "samples.npz")
    assert np.allclose(saved["real"][:, 0] * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3)
    one_step = {"rectified_flow": "nfe2", "reflow": "stage2_nfe1", "imf": "nfe1_w2",
                "imf_reflow": "stage2_nfe1_w2"}.get(script, "nfe1")
    x = saved[one_step]
    assert x.shape == saved["real"].shape == (12, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert saved["labels"].shape == (12,) and str(saved["data"]) == "mnist"
    if script in TWO_STAGE:
        pairs = torch.load(tmp_path / "out" / "pairs1.pt", weights_only=True)
        assert torch.equal(torch.bincount(pairs["labels"]), torch.full((10,), 2))
        assert pairs["x_hat"].shape == pairs["e"].shape == (20, 1, 28, 28)
        model = net(mods[script], 3 if script == "imf_reflow" else 1, 10, (1, 28, 28), 4)
        model.load_state_dict(torch.load(tmp_path / "out" / "stage1.pt", weights_only=True)["ema"])
        steps = mods[script].DEFAULTS["mnist"]["ode_steps"]                  # mnist: fixed midpoint steps
        lo, hi = mods[script].DEFAULTS["mnist"]["guidance_interval"]
        i = pairs["w"] == 2.0 if script == "imf_reflow" else slice(None)     # imf_reflow: a scale's share
        cfg = {"cfg": True} if script == "imf_reflow" else {}
        x_hat = mods[script].ode_generate(model, pairs["e"][i], pairs["labels"][i], 2.0, (lo, hi),
                                          steps=steps, **cfg)[0][-1]
        times = [1 - k / (2 * steps) for k in range(2 * steps)]               # midpoint: 2 evaluations a step
        assert steps > 0 and pairs["nfe"] == sum(2 if lo <= t <= hi else 1 for t in times)    # guided: 2 each
        assert torch.allclose(x_hat, pairs["x_hat"][i], atol=1e-6)


def test_resume_continues_with_new_batches_and_refuses_another_run(tmp_path, monkeypatch, capsys):
    """A run stopped at step 40 of 70 (as Ctrl-C leaves it) goes on from its saved state with --resume, and
    its resumed steps draw new batches, not the run's first ones again; another seed, lr, batch size or
    number of steps is refused in one line."""
    seen, imf_loss = [], imf.imf_loss

    def stop_at_40(model, x, e, labels=None, **kw):
        if len(seen) == 40:
            raise KeyboardInterrupt
        seen.append(x.clone())
        return imf_loss(model, x, e, labels, **kw)
    monkeypatch.setattr(imf, "imf_loss", stop_at_40)
    flags = ["--steps", "70", "--n-eval", "50"]
    with pytest.raises(KeyboardInterrupt):
        run("imf", tmp_path, *flags)
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["step"] == 40 and "interrupted at step 40" in capsys.readouterr().out
    monkeypatch.setattr(imf, "imf_loss", lambda *a, **kw: seen.append(a[1].clone()) or imf_loss(*a, **kw))
    run("imf", tmp_path, *flags, "--resume")
    second = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert second["step"] == 70 and second["losses"][:40] == first["losses"]
    assert second["optimizer"]["state"][0]["step"] == 70               # Adam went on from its saved state
    assert len(seen) == 70 and not any(torch.equal(seen[40 + i], seen[i]) for i in range(30))
    for flag, value in [("--seed", "1"), ("--lr", "1e-3"), ("--batch-size", "64"), ("--steps", "80")]:
        other = {**dict(zip(flags[::2], flags[1::2])), flag: value}
        with pytest.raises(imf.RunError, match=f"another {flag[2:].replace('-', '_')}: drop --resume"):
            run("imf", tmp_path, *[s for item in other.items() for s in item], "--resume")
    for resume in (["--resume"], []):                                 # finished: sampled again, no training
        run("imf", tmp_path, *flags, *resume)
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 70 and len(seen) == 70
    assert "sampling the finished" in capsys.readouterr().out
    run("imf", tmp_path, "--steps", "10", "--n-eval", "50")              # other settings: a new run, said so
    assert "made with another steps; making it again" in capsys.readouterr().out


def test_two_stage_files_are_reused_only_from_the_same_upstream(tmp_path, capsys):
    """A rerun reuses every file; a changed stage-2 setting retrains stage 2 only; a changed stage 1 (other
    settings, or another file with the same settings) never meets its old pairs: pairs and stage 2 are
    made again, with --resume too (only another setting stops it)."""
    flags = ["--steps", "40", "--reflow-steps", "20", "--n-pairs", "64", "--n-eval", "50"]
    out = tmp_path / "o"
    mtime = lambda name: os.stat(out / name).st_mtime_ns  # noqa: E731
    run("reflow", out, *flags)
    times = {n: mtime(n) for n in ("stage1.pt", "pairs1.pt", "stage2.pt")}
    run("reflow", out, *flags)
    assert times == {n: mtime(n) for n in times}
    run("reflow", out, *flags[:2], "--reflow-steps", "30", *flags[4:])
    assert mtime("stage1.pt") == times["stage1.pt"] and mtime("pairs1.pt") == times["pairs1.pt"]
    assert torch.load(out / "stage2.pt", weights_only=True)["step"] == 30
    stage1 = torch.load(out / "stage1.pt", weights_only=True)           # the same settings, other weights
    stage1["model"] = {k: v + 0.01 for k, v in stage1["model"].items()}
    stage1["ema"] = stage1["model"]
    torch.save(stage1, out / "stage1.pt")
    capsys.readouterr()
    run("reflow", out, *flags[:2], "--reflow-steps", "30", *flags[4:], "--resume")
    printed = capsys.readouterr().out
    assert "pairs1.pt was made with another made_from" in printed
    assert "stage2.pt was made with another made_from" in printed
    pairs = torch.load(out / "pairs1.pt", weights_only=True)
    model = net(reflow, 1)
    model.load_state_dict(stage1["ema"])
    assert torch.allclose(reflow.ode_generate(model, pairs["e"])[0][-1], pairs["x_hat"], atol=1e-5)
    with pytest.raises(reflow.RunError, match="stage1.pt was made with another lr: drop --resume"):
        run("reflow", out, *flags, "--lr", "1e-3", "--resume")      # --resume never trains other settings


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_checkpoint(tmp_path):
    run("fm", tmp_path, "--steps", "20", "--n-eval", "50")
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    code, out = cli("fm", "--out", str(tmp_path), "--steps", "400", "--lr", "1e9", "--n-eval", "50")
    message = out.strip().splitlines()[-1]
    assert code == 1 and "diverged to" in message and "lower --lr" in message
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]["inp.weight"],
                       good["model"]["inp.weight"])


def test_a_finite_runaway_loss_stops_too(tmp_path, monkeypatch):
    """A loss 10^4 times its first is a diverged run (imf.py on MNIST once went to 1e31 and stayed finite):
    it stops in one line at that step, before the weights take it; 10^3 times goes on."""
    calls, imf_loss = [], imf.imf_loss

    def runaway(model, x, e, labels=None, **kw):
        calls.append(1)
        loss = imf_loss(model, x, e, labels, **kw)
        return loss / loss.detach() * (2e4 if len(calls) == 8 else 1e3 if len(calls) == 5 else 1.0)
    monkeypatch.setattr(imf, "imf_loss", runaway)
    with pytest.raises(imf.RunError, match="diverged to 2e\\+04 at step 8 of training; try a lower --lr"):
        run("imf", tmp_path, "--steps", "20", "--n-eval", "50")
    assert len(calls) == 8 and not (tmp_path / "checkpoint.pt").exists()


def test_ctrl_c_saves_the_checkpoint_and_says_resume_continues(tmp_path):
    """SIGINT while training: the checkpoint is written at the step reached, one line says that --resume
    continues, no figure, exit code 130."""
    flags = ["--steps", "100000", "--n-eval", "100", "--out", str(tmp_path)]
    # SIGINT at its default in the child: a shell's background job ignores it, and Python started there too
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "imf.py"), *flags], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, started = time.time() + 120, ""
    while not re.search(r" [1-9]\d*/100000", started) and time.time() < deadline:   # steps are done
        started += os.read(proc.stdout.fileno(), 1000).decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    try:
        output = started + proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:                  # no orphan left training; show how far it got
        proc.kill()
        pytest.fail("no exit 120 s after SIGINT: " + proc.communicate()[0].replace("\r", "\n")[-2000:])
    assert proc.returncode == 130, output
    step = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 100000 and f"interrupted at step {step}" in output and "--resume continues" in output
    assert not (tmp_path / "results.png").exists()


def test_benchmarks_run(tmp_path, capsys):
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    step, unet, pairs, interval, check, routes = map(importlib.import_module, [
        "imf_step_cost", "unet_cpu_cost",
        "pairs_ode_cost", "fm_guidance_interval", "classifier_check", "one_step_routes"])
    assert set(step.main(["--steps", "2", "--repeats", "1", "--device", "cpu"])) == {"flow matching", "iMF"}
    assert set(unet.main(["--steps", "1", "--repeats", "1"])) == set(unet.VARIANTS)
    run("reflow", tmp_path / "rf", "--steps", "20", "--reflow-steps", "5", "--n-pairs", "32",
        "--n-eval", "50")
    r = pairs.main([str(tmp_path / "rf" / "stage1.pt"), "--n", "8", "--chunks", "8"])   # rk4 beats euler
    assert r["dopri5 tol 1e-05"]["rms"] == 0 and r["rk4, 8 steps"]["rms"] < r["euler, 8 steps"]["rms"] < 1
    tiny_mnist(tmp_path / "data")
    run("fm", tmp_path / "fm", "--data", "mnist", "--data-dir", str(tmp_path / "data"), "--steps", "3",
        "--channels", "4", "--batch-size", "4", "--cond", "--guidance", "2")
    assert ([interval.main([str(tmp_path / "fm")])[k] for k in ["all_4", "skip_first_4", "heun_skip_first_3"]]
           == [8, 7, 8])
    nets = check.main(["--data-dir", str(tmp_path / "data"), "--seeds", "0", "--", str(tmp_path / "fm")])
    assert type(nets["flattened", 0]) is evaluate.FeatureNet and "fm | nfe1 | " in capsys.readouterr().out
    m = dict(ode_nfe=80, train_seconds=10, pairs={"pairs1": {"seconds": 2}},     # finished runs, for --keep
             stages={s: {"train_seconds": 10} for s in ["stage1", "stage2", "distill"]})
    for _, script, flags, key, *_ in routes.ROUTES:
        out = str(tmp_path / "routes" / ("".join([script[:-3], *flags]).replace("--", "-") + "-s0"))
        os.makedirs(mods[script[:-3]].get_args([*flags, "--out", out]).out, exist_ok=True)   # the flags exist
        command = f"python {script} --seed 0 --out {out} " + " ".join(flags)
        m.update({f"w2_ratio_{key}": 1.5, "command": command})
        json.dump(m, open(os.path.join(out, "metrics.json"), "w"))
    table = routes.main(["--keep", "--seeds", "0", "--out", str(tmp_path / "routes")])
    assert len(table) == 2 + len(routes.ROUTES) and "**1.50x**" in table[-1] and "| 22 |" in table[-1]


# ============================================================ the collection's shape
def sections(path):
    src = open(path).read()
    marks = [(m.start(), m.group(1)) for m in re.finditer(r"^# --- (\w+) ---$", src, re.M)]
    return {name: src[a:b] for (a, name), (b, _) in zip(marks, marks[1:] + [(len(src), None)])}


def top_level(src):
    tree = ast.parse(src)
    return {n.name: ast.get_source_segment(src, n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_skeleton_and_shared_helpers_read_the_same():
    """Every script has the sections in order, method first; a helper outside method, config and main is
    the same text in every file that has it (evaluate.py included); the method section uses nothing from
    the rest of its file."""
    shared = {}
    for script in SCRIPTS:
        parts = sections(os.path.join(HERE, f"{script}.py"))
        assert list(parts) == ["method", "model", "data", "training", "evaluation", "config", "main"], script
        for name in ("model", "data", "training", "evaluation"):
            for fn, text in top_level(parts[name]).items():
                shared.setdefault(fn, set()).add(text)
        method = top_level(parts["method"])
        used = {n.id for n in ast.walk(ast.parse(parts["method"])) if isinstance(n, ast.Name)}
        others = set(top_level(open(os.path.join(HERE, f"{script}.py")).read())) - set(method)
        assert not used & others, (script, used & others)
    for fn, text in top_level(open(os.path.join(HERE, "evaluate.py")).read()).items():
        if fn in shared:
            shared[fn].add(text)
    assert all(len(texts) == 1 for texts in shared.values()), [fn for fn, t in shared.items() if len(t) > 1]
