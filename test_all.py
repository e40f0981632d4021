"""Tests for the collection: brief CPU runs (and CUDA when present), shapes, quality against an untrained
model, the JVP against finite differences, the MNIST loader on IDX files written here, clear errors,
and the sections that must be byte-identical across scripts.  Run:  python -m pytest -q test_all.py"""
import json
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import imf  # noqa: E402

SCRIPTS = ["fm.py", "rectified_flow.py", "reflow.py", "imf.py", "imf_reflow.py"]
SHARED_SECTIONS = ["data", "model", "training", "evaluation"]
ALL_SECTIONS = ["method", "model", "data", "training", "evaluation", "config", "main"]
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # inside torch.func.jvp
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_imf(tmp_path, *flags):
    out = str(tmp_path / "out")
    metrics = imf.main(["--out", out, "--seed", "0", *flags])
    return out, metrics


# ---------------------------------------------------------------- brief runs
@pytest.fixture(scope="module")
def brief(tmp_path_factory):
    """One 600-step moons run shared by several tests."""
    tmp = tmp_path_factory.mktemp("brief")
    out, metrics = run_imf(tmp, "--steps", "600", "--n-eval", "500")
    return out, metrics


def test_imf_loss_goes_down(brief):
    out, metrics = brief
    losses = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["losses"]
    assert len(losses) == 600
    assert np.mean(losses[-100:]) < 0.85 * np.mean(losses[:50])


def test_imf_outputs_and_1nfe_shape(brief):
    out, metrics = brief
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["nfe1"].shape == (500, 2) and s["nfe2"].shape == (500, 2) and s["real"].shape == (500, 2)
    assert np.isfinite(s["nfe1"]).all()
    saved = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("w2_nfe1", "w2_nfe2", "w2_floor", "w2_ratio_nfe1", "ms_per_step", "train_seconds"):
        assert key in saved
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000


def test_imf_trained_beats_untrained(brief):
    """1-NFE samples of the trained model are far closer to the data than an untrained model's."""
    out, metrics = brief
    args = imf.get_args(["--n-eval", "500"])
    data = imf.Data("moons", "data", 0, torch.device("cpu"), 500)
    torch.manual_seed(1)
    untrained = imf.make_model(data.shape, 2, args.hidden, args.depth)
    e = torch.randn(500, 2, generator=torch.Generator().manual_seed(5))
    w2_untrained = imf.w2_distance(data.to_data(imf.sample(untrained, e, 1)), data.heldout)
    assert metrics["w2_nfe1"] < 0.5 * w2_untrained, (metrics["w2_nfe1"], w2_untrained)
    # and the trained network, queried with the convention error of the seed text (noise at "t = 0",
    # model(z, r=1, t=0)), gives clearly worse samples than the correct call e - u(e, r=0, t=1)
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    model = imf.make_model(data.shape, 2, args.hidden, args.depth)
    model.load_state_dict(ckpt["ema"])
    with torch.no_grad():
        wrong = e - model(e, torch.ones(500), torch.zeros(500))
    right = imf.sample(model, e, 1)
    w2_wrong = imf.w2_distance(data.to_data(wrong), data.heldout)
    w2_right = imf.w2_distance(data.to_data(right), data.heldout)
    print("W2 trained", metrics["w2_nfe1"], "untrained", w2_untrained, "right", w2_right, "wrong", w2_wrong)
    assert w2_right < 0.7 * w2_wrong, (w2_right, w2_wrong)


class Spy(torch.nn.Module):
    """Records the (r, t) a sampler asks for and which input z it passes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, r, t, labels=None):
        self.calls.append((z.clone(), r.clone(), t.clone()))
        return torch.ones_like(z)


def test_imf_sampler_time_convention():
    """1-NFE is x = e - u(e, r=0, t=1): the z input is the state at time t (noise at t = 1)."""
    e = torch.randn(7, 2)
    spy = Spy()
    x = imf.sample(spy, e, 1)
    (z, r, t), = spy.calls
    assert torch.equal(z, e) and torch.all(r == 0) and torch.all(t == 1)
    assert torch.allclose(x, e - 1)
    spy = Spy()
    imf.sample(spy, e, 2)
    (z1, r1, t1), (z2, r2, t2) = spy.calls
    assert torch.equal(z1, e) and torch.all(r1 == 0.5) and torch.all(t1 == 1)
    assert torch.allclose(z2, e - 0.5) and torch.all(r2 == 0) and torch.all(t2 == 0.5)


def test_imf_time_sampler_covers_boundary_and_corner():
    torch.manual_seed(0)
    r, t, nb = imf.sample_r_t(1000, "cpu", 0.7, 0.2)
    assert nb == 700 and torch.all(r <= t) and torch.all(r[:nb] == t[:nb])
    assert torch.all(r[700:900] == 0) and torch.all(t[700:900] > 0)
    assert ((r < 0.05) & (t > 0.95)).sum() >= 5   # the 1-NFE corner (r, t) = (0, 1) is trained
    assert (t[nb:] - r[nb:] > 0.5).float().mean() > 0.3  # wide intervals are trained too


def test_imf_boundary_time_distributions():
    """The r = t rows: logit-normal(-0.4, 1) by default (median sigmoid(-0.4) = 0.40, 16% below t = 0.2, where
    the larger of two uniforms has 4%), uniform, or max; an unknown name is an error, not a silent 'max'."""
    share = {}
    for kind in ("logit-normal", "uniform", "max"):
        torch.manual_seed(0)
        r, t, nb = imf.sample_r_t(20000, "cpu", 0.7, 0.2, kind)
        assert nb == 14000 and torch.equal(r[:nb], t[:nb]) and torch.all(r[nb:16000] == 0)
        share[kind] = (t[:nb] < 0.2).float().mean().item()
        if kind == "logit-normal":
            assert abs(t[:nb].median().item() - 0.401) < 0.01
    assert 0.14 < share["logit-normal"] < 0.18 and 0.18 < share["uniform"] < 0.22 and share["max"] < 0.05, share
    torch.manual_seed(0)
    r, t, nb = imf.sample_r_t(1000, "cpu", 0.7, 0.2)
    torch.manual_seed(0)
    assert torch.equal(t, imf.sample_r_t(1000, "cpu", 0.7, 0.2, "logit-normal")[1])   # the default
    with pytest.raises(ValueError, match="boundary_t"):
        imf.sample_r_t(10, "cpu", 0.7, 0.2, "max-of-two")


def test_boundary_t_flag_reaches_the_loss_and_the_config(tmp_path, monkeypatch):
    """--boundary-t: imf.py defaults to logit-normal, imf_reflow.py's iMF stage to max; the choice reaches
    sample_r_t and the checkpoint/stage config (which omits it for max, as the files made before the flag)."""
    for mod, flags, default in ((imf, [], "logit-normal"), (imf_reflow, ["--reflow-steps", "3", "--n-pairs", "64"],
                                                            "max")):
        assert mod.get_args([]).boundary_t == default
        for kind in ("uniform", "logit-normal", "max"):
            seen, real = [], mod.sample_r_t
            monkeypatch.setattr(mod, "sample_r_t", lambda *a: seen.append(a[4]) or real(*a))
            out = tmp_path / f"{mod.__name__}-{kind}"
            mod.main(["--out", str(out), "--steps", "3", "--n-eval", "50", "--boundary-t", kind, *flags])
            monkeypatch.setattr(mod, "sample_r_t", real)
            assert seen and set(seen) == {kind}
            ckpt = out / ("checkpoint.pt" if mod is imf else "stage2.pt")
            config = torch.load(ckpt, weights_only=True)["config"]
            assert config.get("boundary_t") == (None if kind == "max" else kind)
    with pytest.raises(SystemExit) as err:                 # a setting only the saved checkpoint has is named too
        imf.main(["--out", str(tmp_path / "imf-uniform"), "--steps", "6", "--n-eval", "50", "--boundary-t", "max",
                  "--resume"])
    assert "boundary_t='uniform' there but None here" in str(err.value.code)


@pytest.mark.parametrize("device", DEVICES)
def test_imf_brief_run_each_device(tmp_path, device):
    out, metrics = run_imf(tmp_path, "--steps", "300", "--n-eval", "300", "--device", device)
    losses = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True, map_location="cpu")["losses"]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    assert np.load(os.path.join(out, "samples.npz"))["nfe1"].shape == (300, 2)


def test_imf_digits_1nfe_shape(tmp_path):
    out, metrics = run_imf(tmp_path, "--data", "digits", "--steps", "40", "--n-eval", "100", "--channels", "8")
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["nfe1"].shape == (100, 1, 8, 8) and s["real"].shape == (100, 1, 8, 8)
    assert s["nfe1"].min() >= 0 and s["nfe1"].max() <= 1
    losses = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# ---------------------------------------------------------------- the JVP
def test_meanflow_jvp_matches_finite_difference():
    """d/dt u(z_t, r, t) along dz/dt = v equals a central difference of u(z + h v, r, t + h)."""
    torch.manual_seed(0)
    args = imf.get_args(["--hidden", "32", "--depth", "2"])
    model = imf.make_model((2,), 2, args.hidden, args.depth).double()
    z, v = torch.randn(16, 2, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.8 + 0.1
    r = t * torch.rand(16, dtype=torch.float64)
    u, dudt = imf.meanflow_jvp(model, z, r, t, v)
    h = 1e-5
    with torch.no_grad():
        fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
        assert torch.allclose(u, model(z, r, t))
    assert torch.allclose(dudt, fd, rtol=1e-5, atol=1e-7), (dudt - fd).abs().max()
    # a wrong tangent (dr = 1 as well) would give a different derivative: the test can tell them apart
    with torch.no_grad():
        fd_wrong = (model(z + h * v, r + h, t + h) - model(z - h * v, r - h, t - h)) / (2 * h)
    assert not torch.allclose(dudt, fd_wrong, rtol=1e-3, atol=1e-5)


def test_imf_loss_is_flow_matching_on_the_boundary():
    """With r = t everywhere the compound prediction is u(z, t, t): the loss is plain flow matching."""
    torch.manual_seed(0)
    args = imf.get_args(["--boundary-frac", "1", "--r0-frac", "0", "--hidden", "32"])
    model = imf.make_model((2,), 2, args.hidden)
    x, e = torch.randn(64, 2), torch.randn(64, 2)
    torch.manual_seed(1)
    loss = imf.imf_loss(model, x, e, None, 1.0, 1.0, 0.0)
    torch.manual_seed(1)
    r, t, _ = imf.sample_r_t(64, "cpu", 1.0, 0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    assert torch.allclose(loss, ((model(z, t, t) - (e - x)) ** 2).mean())


# ---------------------------------------------------------------- MNIST from IDX files
def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, array.ndim))
        f.write(struct.pack(">" + "I" * array.ndim, *array.shape))
        f.write(array.tobytes())


def test_mnist_loader_reads_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (12, 28, 28))
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", rng.integers(0, 10, 40))
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 12))
    train, labels, heldout, heldout_labels = imf.load_images("mnist", str(tmp_path))
    assert train.shape == (40, 1, 28, 28) and heldout.shape == (12, 1, 28, 28) and labels.shape == (40,)
    assert heldout_labels.shape == (12,)
    assert torch.allclose(train[3, 0], torch.tensor(train_x[3], dtype=torch.float32) / 255)
    out, metrics = run_imf(tmp_path, "--data", "mnist", "--data-dir", str(tmp_path), "--steps", "4",
                           "--channels", "8", "--batch-size", "8")
    assert np.load(os.path.join(out, "samples.npz"))["nfe1"].shape == (12, 1, 28, 28)


def test_mnist_failure_suggests_digits(tmp_path, monkeypatch):
    import torchvision.datasets

    class NoNetwork:
        def __init__(self, *a, **k):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", NoNetwork)
    with pytest.raises(imf.RunError) as err:           # functions raise; main prints one line
        imf.load_images("mnist", str(tmp_path))
    msg = str(err.value)
    assert "--data digits" in msg and "\n" not in msg


# ---------------------------------------------------------------- errors, checkpoints, interruptions
@pytest.mark.parametrize("flags, text", [(["--data", "swissroll"], "invalid choice"),
                                         (["--steps", "0"], "positive integer"),
                                         (["--steps", "-5"], "positive integer"),
                                         (["--lr", "nan"], "positive number"),
                                         (["--seed", "-1"], "0 or a positive integer")])
def test_bad_flags_are_argparse_errors(flags, text, capsys):
    with pytest.raises(SystemExit) as err:
        imf.get_args(flags)
    assert err.value.code == 2
    assert text in capsys.readouterr().err


def test_checkpoint_from_other_config_is_refused(tmp_path):
    run_imf(tmp_path, "--steps", "20", "--hidden", "32", "--n-eval", "50")
    with pytest.raises(SystemExit) as err:
        run_imf(tmp_path, "--steps", "40", "--hidden", "64", "--n-eval", "50", "--resume")
    msg = str(err.value.code)
    assert "another config" in msg and "hidden" in msg and "\n" not in msg


def test_checkpoint_of_another_network_is_a_clear_error(tmp_path):
    """Same config, other weights (an MNIST checkpoint made before the U-Net's third level, say): a one-line
    error, not a traceback from load_state_dict; two-stage scripts reuse stage files through the same path."""
    run_imf(tmp_path, "--steps", "20", "--n-eval", "50")
    path = tmp_path / "out" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("out.")}
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as err:
        run_imf(tmp_path, "--steps", "40", "--n-eval", "50", "--resume")
    msg = str(err.value.code)
    assert "does not fit the network" in msg and "\n" not in msg


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "imf.py"), "--out", str(out), "--resume",
                           "--steps", "10", "--n-eval", "50"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read checkpoint"), proc.stderr


def test_resume_continues_and_keeps_history(tmp_path):
    out, _ = run_imf(tmp_path, "--steps", "60", "--n-eval", "50", "--hidden", "32")
    first = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    out, metrics = run_imf(tmp_path, "--steps", "100", "--n-eval", "50", "--hidden", "32", "--resume")
    second = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert first["step"] == 60 and second["step"] == 100 and metrics["steps"] == 100
    assert len(second["losses"]) == 100 and second["losses"][:60] == first["losses"]
    assert set(second) >= {"model", "ema", "optimizer", "step", "config"}


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run_imf(tmp_path, "--steps", "50", "--n-eval", "50", "--hidden", "32", "--ckpt-every", "50")
    good = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    real_loss, calls = imf.imf_loss, []

    def exploding(*a):
        calls.append(1)
        loss = real_loss(*a)
        return loss * float("nan") if len(calls) >= 20 else loss

    monkeypatch.setattr(imf, "imf_loss", exploding)
    with pytest.raises(SystemExit) as err:
        run_imf(tmp_path, "--steps", "150", "--n-eval", "50", "--hidden", "32", "--resume", "--ckpt-every", "50")
    msg = str(err.value.code)
    assert "non-finite at step 70" in msg and "--lr" in msg
    kept = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert kept["step"] == good["step"] == 50


def test_ctrl_c_saves_checkpoint_and_figures(tmp_path, monkeypatch):
    real_loss, calls = imf.imf_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return real_loss(*a)

    monkeypatch.setattr(imf, "imf_loss", interrupted)
    with pytest.raises(SystemExit) as err:
        run_imf(tmp_path, "--steps", "1000", "--n-eval", "50", "--hidden", "32")
    assert err.value.code == 130
    out = tmp_path / "out"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 29
    assert (out / "results.png").exists() and (out / "samples.npz").exists()


# ---------------------------------------------------------------- the collection's structure
def sections(path):
    src = open(path, encoding="utf-8").read()
    hits = list(re.finditer(r"^# --- (\w[\w ]*) ---\s*$", src, re.M))
    return {m.group(1): src[m.end():(hits[i + 1].start() if i + 1 < len(hits) else len(src))]
            for i, m in enumerate(hits)}, [m.group(1) for m in hits]


PRESENT = [s for s in SCRIPTS if os.path.exists(os.path.join(HERE, s))]


@pytest.mark.parametrize("script", PRESENT)
def test_script_has_the_skeleton(script):
    secs, order = sections(os.path.join(HERE, script))
    assert order == ALL_SECTIONS, order
    src = open(os.path.join(HERE, script), encoding="utf-8").read()
    assert src.startswith('"""') and "t = 0" in src.split('"""')[1]  # docstring states the convention
    assert not re.search(r"^\s*(from|import) (fm|rectified_flow|reflow|imf|imf_reflow)\b", src, re.M)


@pytest.mark.parametrize("name", SHARED_SECTIONS)
def test_shared_sections_are_byte_identical(name):
    bodies = {s: sections(os.path.join(HERE, s))[0].get(name) for s in PRESENT}
    assert all(b is not None for b in bodies.values()), bodies.keys()
    reference = bodies["imf.py"]
    different = [s for s, b in bodies.items() if b != reference]
    assert not different, f"section '{name}' differs from imf.py in {different}"


# ---------------------------------------------------------------- fm.py and rectified_flow.py
import fm  # noqa: E402
import rectified_flow  # noqa: E402


@pytest.fixture(scope="module")
def fm_brief(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fm") / "out")
    metrics = fm.main(["--out", out, "--steps", "800", "--n-eval", "400"])
    return out, metrics


def test_fm_loss_goes_down_and_shapes(fm_brief):
    out, metrics = fm_brief
    losses = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["losses"]
    assert np.mean(losses[-100:]) < 0.85 * np.mean(losses[:50])
    s = np.load(os.path.join(out, "samples.npz"))
    for key in ("nfe1", "nfe2", "nfe4", "nfe8", "ode", "real"):
        assert s[key].shape == (400, 2), key
    assert metrics["ode_nfe"] > 8


def test_fm_dopri5_beats_one_euler_step(fm_brief):
    out, metrics = fm_brief
    assert metrics["w2_ode"] < 0.5 * metrics["w2_nfe1"], metrics
    assert metrics["w2_ode"] < metrics["w2_nfe2"]


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_fm_fixed_step_solvers_count_evaluations(solver):
    args = fm.get_args(["--solver", solver, "--ode-steps", "5", "--hidden", "16"])
    model = fm.make_model((2,), 1, args.hidden)
    x, nfe = fm.ode_generate(model, torch.randn(10, 2), args.solver, args.rtol, args.atol, args.ode_steps)
    assert x.shape == (10, 2) and nfe == 5 * {"euler": 1, "midpoint": 2, "rk4": 4}[solver]
    # the hand-written Euler sampler and torchdiffeq's euler agree
    if solver == "euler":
        e = torch.randn(10, 2)
        x_ode = fm.ode_generate(model, e, args.solver, args.rtol, args.atol, args.ode_steps)[0]
        assert torch.allclose(x_ode, fm.euler_sample(model, e, 5), atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "logit-normal", "u-shaped"])
def test_fm_time_sampling(kind):
    t = fm.sample_t(20000, "cpu", kind)
    assert t.min() >= 0 and t.max() <= 1
    middle = ((t > 0.25) & (t < 0.75)).float().mean().item()
    # P(1/4 < t < 3/4): uniform 1/2; logit-normal P(|N(0,1)| < log 3) = 0.7275; Beta(1/2, 1/2) 1/3
    expected = {"uniform": 0.5, "logit-normal": 0.7275, "u-shaped": 1 / 3}[kind]
    assert abs(middle - expected) < 0.03, (kind, middle)


def test_fm_digits_1nfe_shape(tmp_path):
    metrics = fm.main(["--out", str(tmp_path / "o"), "--data", "digits", "--steps", "30", "--n-eval", "64",
                       "--channels", "8", "--solver", "rk4", "--ode-steps", "4"])
    s = np.load(tmp_path / "o" / "samples.npz")
    assert s["nfe1"].shape == (64, 1, 8, 8) and s["ode"].shape == (64, 1, 8, 8)


def test_rf_straightness_and_shapes(tmp_path):
    metrics = rectified_flow.main(["--out", str(tmp_path / "o"), "--steps", "400", "--n-eval", "300"])
    assert 0 < metrics["straightness"] < 10 and np.isfinite(metrics["straightness"])
    assert metrics["transport_cost"] > 0
    s = np.load(tmp_path / "o" / "samples.npz")
    assert s["nfe1"].shape == (300, 2) and s["ode"].shape == (300, 2)
    losses = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["losses"]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])


def test_rf_straightness_is_zero_for_a_constant_field():
    """A field that is constant along each path gives straight paths: S = 0, and C = |v|^2."""
    class Constant(torch.nn.Module):
        def forward(self, z, t, labels=None):
            return torch.full_like(z, 0.5)
    e = torch.randn(50, 2)
    x, S, C = rectified_flow.straightness(Constant(), e, 10)
    assert S < 1e-10 and abs(C - 0.5) < 1e-5 and torch.allclose(x, e - 0.5)


def test_rf_transfer_mode_runs(tmp_path):
    metrics = rectified_flow.main(["--out", str(tmp_path / "o"), "--source", "8gaussians", "--steps", "200",
                                   "--n-eval", "200"])
    assert metrics["source"] == "8gaussians" and np.isfinite(metrics["w2_ode"])
    assert (tmp_path / "o" / "results.png").exists()


def test_rf_digits_1nfe_shape(tmp_path):
    rectified_flow.main(["--out", str(tmp_path / "o"), "--data", "digits", "--steps", "30", "--n-eval", "64",
                         "--channels", "8", "--ode-steps", "4"])
    assert np.load(tmp_path / "o" / "samples.npz")["nfe1"].shape == (64, 1, 8, 8)


def test_rf_toy_source_needs_toy_data(capsys):
    with pytest.raises(SystemExit) as err:
        rectified_flow.get_args(["--source", "moons", "--data", "digits"])
    assert err.value.code == 2 and "2D toy" in capsys.readouterr().err


@pytest.mark.parametrize("name", imf.TOY_DATA)
def test_every_toy_is_normalised_and_runs(name, tmp_path):
    """Fixed constants bring each toy to about zero mean and unit scale; a short run works on each."""
    data = imf.Data(name, "data", 0, torch.device("cpu"), 100)
    x, y = data.draw(20000)
    assert x.shape == (20000, 2) and y.shape == (20000,)
    assert x.mean(0).abs().max() < 0.2 and ((x.std(0) > 0.7) & (x.std(0) < 1.4)).all(), (x.mean(0), x.std(0))
    raw = data.pool[:5]                                       # to_data undoes the normalisation
    assert np.allclose(data.to_data((raw - data.center) / data.scale), raw.numpy(), atol=1e-5)
    metrics = imf.main(["--out", str(tmp_path / "o"), "--data", name, "--steps", "20", "--n-eval", "100"])
    assert np.isfinite(metrics["w2_nfe1"]) and metrics["w2_floor"] > 0


# ---------------------------------------------------------------- reflow.py and imf_reflow.py
import imf_reflow  # noqa: E402
import reflow  # noqa: E402


def test_all_five_scripts_are_present():
    assert PRESENT == SCRIPTS  # so that the section-identity tests above cover all five


def stage_losses(out, name):
    return torch.load(os.path.join(out, f"{name}.pt"), weights_only=True, map_location="cpu")["losses"]


REFLOW_BRIEF = ["--steps", "400", "--reflow-steps", "300", "--n-eval", "300", "--n-pairs", "2048"]


@pytest.fixture(scope="module")
def reflow_brief(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reflow") / "out")
    metrics = reflow.main(["--out", out, *REFLOW_BRIEF, "--distill", "--distill-steps", "150"])
    return out, metrics


def test_reflow_each_stage_loss_goes_down_and_shapes(reflow_brief):
    out, metrics = reflow_brief
    # stage 1 keeps the irreducible loss of independent pairs (as fm.py); on the deterministic
    # coupling the reflow and distillation losses fall towards zero (measured 0.75, 0.008, 0.005)
    for name, n, drop in (("stage1", 400, 0.85), ("stage2", 300, 0.03), ("distill", 150, 0.03)):
        losses = stage_losses(out, name)
        assert len(losses) == n and np.mean(losses[-30:]) < drop * np.mean(losses[:30]), name
    s = np.load(os.path.join(out, "samples.npz"))
    for key in ("stage1_nfe1", "stage1_nfe2", "stage1_nfe4", "stage1_ode", "stage2_nfe1", "stage2_ode",
                "distill_nfe1", "nfe1", "real"):
        assert s[key].shape == (300, 2) and np.isfinite(s[key]).all(), key
    assert np.array_equal(s["nfe1"], s["stage2_nfe1"])  # plain keys are the last reflow stage
    assert os.path.getsize(os.path.join(out, "results.png")) > 10_000


def test_reflow_straightens_paths_and_improves_one_step(reflow_brief):
    out, metrics = reflow_brief
    s1, s2 = metrics["stages"]["stage1"], metrics["stages"]["stage2"]
    print("straightness", s1["straightness"], s2["straightness"], "1-NFE", metrics["w2_stage1_nfe1"],
          metrics["w2_stage2_nfe1"])
    assert s2["straightness"] < 0.02 * s1["straightness"]                  # measured 0.003
    assert metrics["w2_stage2_nfe1"] < 0.3 * metrics["w2_stage1_nfe1"]     # measured 0.18
    # reflow keeps the marginals: the 2-RF ODE is about as good as the 1-RF ODE that made its pairs
    assert metrics["w2_stage2_ode"] < 1.2 * metrics["w2_stage1_ode"]       # measured 1.01


def test_reflow_pairs_are_the_stage1_ode(reflow_brief):
    """pairs1.pt holds x_hat = ODE_1(e) for its own e (not shuffled, not another model's)."""
    out, _ = reflow_brief
    args = reflow.get_args(REFLOW_BRIEF)
    pairs = torch.load(os.path.join(out, "pairs1.pt"), weights_only=True)
    assert pairs["x"].shape == pairs["e"].shape == (2048, 2)
    model = reflow.make_model((2,), 1, args.hidden, args.depth)
    model.load_state_dict(torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["ema"])
    path, nfe = reflow.ode_generate(model, pairs["e"][:64], args.rtol, args.atol)
    assert torch.allclose(path[-1], pairs["x"][:64], atol=5e-4), (path[-1] - pairs["x"][:64]).abs().max()  # 6e-5
    assert not torch.allclose(path[-1], pairs["x"][64:128], atol=1e-1)


def test_reflow_reuses_matching_stages_and_recomputes_others(reflow_brief, tmp_path, capsys):
    """More stage-2 steps: stage 1 and the pairs are reused, stage 2 is retrained. Another stage-1
    setting: nothing is reused, and the run says why."""
    src, _ = reflow_brief
    out = tmp_path / "out"
    out.mkdir()
    for f in ("stage1.pt", "pairs1.pt", "stage2.pt"):
        (out / f).write_bytes(open(os.path.join(src, f), "rb").read())
    before = (out / "stage1.pt").read_bytes()
    flags = ["--steps", "400", "--n-eval", "300", "--n-pairs", "2048"]
    metrics = reflow.main(["--out", str(out), *flags, "--reflow-steps", "320"])
    text = capsys.readouterr().out
    assert metrics["stages"]["stage1"]["reused"] and metrics["pairs"]["pairs1"]["reused"]
    assert not metrics["stages"]["stage2"]["reused"] and len(stage_losses(out, "stage2")) == 320
    assert "stage2.pt was made with other settings" in text and "320" in text
    assert (out / "stage1.pt").read_bytes() == before
    metrics = reflow.main(["--out", str(out), "--steps", "30", "--reflow-steps", "20", "--n-eval", "100",
                           "--n-pairs", "256"])
    text = capsys.readouterr().out
    assert not metrics["stages"]["stage1"]["reused"] and not metrics["pairs"]["pairs1"]["reused"]
    assert "stage1.pt was made with other settings (steps=400 there but 30 here)" in text
    assert torch.load(out / "stage1.pt", weights_only=True)["config"]["steps"] == 30
    assert torch.load(out / "pairs1.pt", weights_only=True)["x"].shape == (256, 2)


def test_reflow_corrupt_pairs_file_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pairs1.pt").write_bytes(b"\x80\x02 not a pairs file")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "reflow.py"), "--out", str(out), "--steps", "20",
                           "--reflow-steps", "10", "--n-eval", "50", "--n-pairs", "128"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read pairs file") and "pairs1.pt" in last, proc.stderr


def test_reflow_pairs_file_of_wrong_shape_is_a_clear_error(tmp_path):
    args = reflow.get_args(["--out", str(tmp_path), "--n-pairs", "16"])
    (tmp_path / "stage1.pt").write_bytes(b"a finished stage 1")
    _, get_pairs, _, _ = reflow.stage_files(args, None, (2,), 0, torch.device("cpu"))
    config = {**reflow.stage_config(args, "pairs1"),
              "made_from": f"stage1.pt {reflow.file_sha256(str(tmp_path / 'stage1.pt'))}"}
    reflow.save_checkpoint(str(tmp_path / "pairs1.pt"), {"x": torch.zeros(8, 2), "e": torch.zeros(8, 2),
                                                         "config": config})
    with pytest.raises(reflow.RunError) as err:
        get_pairs(1, None, 1.0)
    assert "does not hold 16 finite pairs" in str(err.value)


def test_reflow_distill_loss_queries_only_the_noise_at_t1():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, z, t, labels=None):
            calls.append((z.clone(), t.clone()))
            return torch.zeros_like(z)

    x, e = torch.randn(9, 2), torch.randn(9, 2)
    loss = reflow.distill_loss(Spy(), x, e)
    (z, t), = calls
    assert torch.equal(z, e) and torch.all(t == 1) and torch.allclose(loss, ((e - x) ** 2).mean())


def test_reflow_t1_fraction_and_straightness_of_a_constant_field():
    seen = []

    class Constant(torch.nn.Module):
        def forward(self, z, t, labels=None):
            seen.append(t.clone())
            return torch.full_like(z, 0.5)

    reflow.rf_loss(Constant(), torch.randn(100, 2), torch.randn(100, 2), t1_frac=0.3)
    assert (seen[0] == 1).sum() == 30
    args = reflow.get_args([])
    e = torch.randn(50, 2)
    path, nfe = reflow.ode_generate(Constant(), e, n_grid=10)
    S, C = reflow.straightness(Constant(), path)
    assert path.shape == (11, 50, 2) and torch.allclose(path[-1], e - 0.5, atol=1e-5)
    assert S < 1e-8 and abs(C - 0.5) < 1e-4


def test_reflow_ctrl_c_in_stage2_saves_and_exits(tmp_path, monkeypatch):
    real, calls = reflow.rf_loss, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 60 + 25:                               # 25 steps into stage 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reflow, "rf_loss", interrupted)
    with pytest.raises(SystemExit) as err:
        reflow.main(["--out", str(tmp_path / "o"), "--steps", "60", "--reflow-steps", "500", "--n-eval", "100",
                     "--n-pairs", "256"])
    assert err.value.code == 130
    assert torch.load(tmp_path / "o" / "stage2.pt", weights_only=True)["step"] == 24
    assert (tmp_path / "o" / "results.png").exists() and (tmp_path / "o" / "samples.npz").exists()


@pytest.mark.parametrize("script", [reflow, imf_reflow], ids=["reflow", "imf_reflow"])
def test_two_stage_digits_1nfe_shape(script, tmp_path):
    script.main(["--out", str(tmp_path / "o"), "--data", "digits", "--steps", "20", "--reflow-steps", "20",
                 "--n-eval", "64", "--n-pairs", "64", "--channels", "8", "--batch-size", "32"])
    s = np.load(tmp_path / "o" / "samples.npz")
    for key in ("stage1_nfe1", "stage2_nfe1", "nfe1"):
        assert s[key].shape == (64, 1, 8, 8) and s[key].min() >= 0 and s[key].max() <= 1, key
    assert torch.load(tmp_path / "o" / "pairs1.pt", weights_only=True)["x"].shape == (64, 1, 8, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", [reflow, imf_reflow], ids=["reflow", "imf_reflow"])
def test_two_stage_brief_run_each_device(script, device, tmp_path):
    out = str(tmp_path / "o")
    script.main(["--out", out, "--steps", "150", "--reflow-steps", "100", "--n-eval", "200", "--n-pairs", "512",
                 "--device", device])
    for name, drop in (("stage1", 0.9), ("stage2", 0.1)):                 # measured 0.76-0.80, 0.02-0.04
        losses = stage_losses(out, name)
        assert np.mean(losses[-20:]) < drop * np.mean(losses[:20]), name
    assert np.load(os.path.join(out, "samples.npz"))["stage2_nfe1"].shape == (200, 2)
    metrics = script.main(["--out", out, "--steps", "150", "--reflow-steps", "100", "--n-eval", "200",
                           "--n-pairs", "512", "--device", device])    # again: every stage file is reused
    assert metrics["stages"]["stage1"]["reused"] and metrics["stages"]["stage2"]["reused"]


@pytest.fixture(scope="module", params=["fm", "imf"])
def imf_reflow_brief(tmp_path_factory, request):
    out = str(tmp_path_factory.mktemp("imf_reflow") / "out")
    metrics = imf_reflow.main(["--out", out, "--teacher", request.param, "--steps", "500", "--reflow-steps", "400",
                               "--n-eval", "300", "--n-pairs", "2048"])
    return out, metrics, request.param


def test_imf_reflow_each_stage_loss_goes_down_and_shapes(imf_reflow_brief):
    out, metrics, teacher = imf_reflow_brief
    for name, drop in (("stage1", 0.85), ("stage2", 0.05)):                # measured 0.78, 0.006-0.014
        losses = stage_losses(out, name)
        assert np.mean(losses[-30:]) < drop * np.mean(losses[:30]), (teacher, name)
    s = np.load(os.path.join(out, "samples.npz"))
    for key in ("stage1_nfe1", "stage1_nfe2", "stage1_ode", "stage2_nfe1", "stage2_nfe2", "nfe1", "nfe2"):
        assert s[key].shape == (300, 2) and np.isfinite(s[key]).all(), key
    assert torch.load(os.path.join(out, "stage1.pt"), weights_only=True)["config"]["teacher"] == teacher


def test_imf_reflow_stage2_one_step_is_near_the_teacher_ode(imf_reflow_brief):
    """Stage 2's one step lands near the quality of the stage-1 ODE that made its pairs, far better
    than one Euler step of a flow-matching teacher. (That it beats an iMF teacher's own one step shows
    only in longer runs: see the README.)"""
    out, m, teacher = imf_reflow_brief
    print(teacher, "1-NFE stage 1", m["w2_stage1_nfe1"], "stage 2", m["w2_stage2_nfe1"], "ODE", m["w2_stage1_ode"])
    assert m["w2_stage2_nfe1"] < 1.25 * m["w2_stage1_ode"]                 # measured 1.07 (fm), 0.99 (imf)
    if teacher == "fm":
        assert m["w2_stage2_nfe1"] < 0.3 * m["w2_stage1_nfe1"]             # measured 0.16


def test_imf_reflow_stage2_uses_the_pairs(tmp_path, monkeypatch):
    """Stage 2 trains iMF on (x_hat, e) from pairs1.pt, not on fresh data and noise."""
    seen = []
    real = imf_reflow.imf_loss

    def spy(model, x, e, *a):
        seen.append((x.clone(), e.clone()))
        return real(model, x, e, *a)

    monkeypatch.setattr(imf_reflow, "imf_loss", spy)
    out = tmp_path / "o"
    imf_reflow.main(["--out", str(out), "--steps", "20", "--reflow-steps", "5", "--n-eval", "50",
                     "--n-pairs", "256"])
    pairs = torch.load(out / "pairs1.pt", weights_only=True)
    assert len(seen) == 5                                       # the fm teacher does not use imf_loss
    for x, e in seen:
        match = torch.cdist(e, pairs["e"], compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        assert torch.allclose(pairs["e"][match], e) and torch.allclose(pairs["x"][match], x)


def test_reflow_k_stages_chain_their_configs(tmp_path):
    """--reflows 2: stage 3 trains on pairs of stage 2; each file records the sha256 of the file it came from."""
    out = tmp_path / "o"
    metrics = reflow.main(["--out", str(out), "--reflows", "2", "--steps", "40", "--reflow-steps", "30",
                           "--n-eval", "100", "--n-pairs", "256"])
    assert set(metrics["stages"]) == {"stage1", "stage2", "stage3"} and set(metrics["pairs"]) == {"pairs1", "pairs2"}
    # each file records the sha256 of the file it was made from: stage1 -> pairs1 -> stage2 -> pairs2 -> stage3
    for name, parent in (("pairs1", "stage1"), ("stage2", "pairs1"), ("pairs2", "stage2"), ("stage3", "pairs2")):
        cfg = torch.load(out / f"{name}.pt", weights_only=True)["config"]
        assert cfg["made_from"] == f"{parent}.pt {reflow.file_sha256(str(out / f'{parent}.pt'))}", name
    assert torch.load(out / "stage1.pt", weights_only=True)["config"]["steps"] == 40
    assert np.load(out / "samples.npz")["nfe1"].shape == (100, 2)
    with pytest.raises(SystemExit):
        reflow.get_args(["--distill", "--reflows", "0"])


# ---------------------------------------------------------------- the losses against independent computations
@pytest.mark.parametrize("module", ["imf", "imf_reflow"])
@pytest.mark.parametrize("cond", [False, True])
def test_imf_loss_off_the_boundary_matches_a_finite_difference_target(module, cond):
    """On rows with r < t the loss is ||u + (t - r) sg(d/dt u) - v_tgt||^2 with d/dt u the total derivative
    along dz/dt = u(z, t, t): rebuilt here with a central finite difference, for the value and the gradient.
    cond: labels (a quarter dropped) and guidance 2.5, so v_tgt = 2.5 (e - x) - 1.5 sg(u(z, t, t | no label))
    on labelled rows, and every network call sees the row's label."""
    mod = {"imf": imf, "imf_reflow": imf_reflow}[module]
    torch.manual_seed(0)
    model = mod.make_model((2,), 2, 32, 2, n_classes=3 if cond else 0).double()
    x, e = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    y = torch.arange(32) % 4 if cond else None                    # 3 = no label
    w = 2.5 if cond else 1.0
    torch.manual_seed(3)
    loss = mod.imf_loss(model, x, e, y, w, boundary_frac=0.0, r0_frac=0.3)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.manual_seed(3)
    r, t, nb = mod.sample_r_t(32, "cpu", 0.0, 0.3)
    r, t = r.double(), t.double()
    assert nb == 0 and (r < t).all()
    z = (1 - t[:, None]) * x + t[:, None] * e
    h = 1e-6
    with torch.no_grad():
        v = model(z, t, t, labels=y)
        dudt = (model(z + h * v, r, t + h, labels=y) - model(z - h * v, r, t - h, labels=y)) / (2 * h)
        target = e - x
        if cond:
            v_null = model(z, t, t, labels=torch.full_like(y, 3))
            target = torch.where((y != 3)[:, None], w * (e - x) + (1 - w) * v_null, e - x)
    ref = ((model(z, r, t, labels=y) + (t - r)[:, None] * dudt - target) ** 2).mean()
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-6), (loss, ref)
    for g, g_ref in zip(grads, ref_grads):                     # the JVP and guidance terms carry no gradient (sg)
        assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8)


def test_w2_distance_of_a_shifted_set_is_the_shift():
    a = np.random.default_rng(0).standard_normal((300, 2))
    c = np.array([0.3, -0.4])
    assert abs(imf.w2_distance(a, a + c) - 0.5) < 1e-9
    assert imf.w2_distance(a, a[::-1].copy()) < 1e-6                  # a permutation is no distance


@pytest.mark.parametrize("script", [fm, rectified_flow], ids=["fm", "rectified_flow"])
def test_fm_and_rf_trained_beat_untrained(script, tmp_path):
    """The ODE samples of a briefly trained model are far closer to the data than an untrained model's
    (a sign error in the loss, regressing x - e, fails this)."""
    metrics = script.main(["--out", str(tmp_path / "o"), "--steps", "400", "--n-eval", "400"])
    data = script.Data("moons", "data", 0, torch.device("cpu"), 400)
    torch.manual_seed(1)
    untrained = script.make_model((2,), 1)
    e = torch.randn(400, 2, generator=torch.Generator().manual_seed(5))
    w2_untrained = script.w2_distance(data.to_data(script.euler_sample(untrained, e, 50)), data.heldout)
    print(script.__name__, "ODE W2 trained", metrics["w2_ode"], "untrained", w2_untrained)
    assert metrics["w2_ode"] < 0.45 * w2_untrained, (metrics["w2_ode"], w2_untrained)  # measured 0.38 (both)


# ---------------------------------------------------------------- resume, checkpoints, stage files
@pytest.mark.parametrize("device", DEVICES)
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, device):
    """Ctrl-C at step 60 of 100, then --resume: the same weights, losses and samples as one 100-step run
    (the checkpoint holds the RNG states and the schedule's length)."""
    flags = ["--steps", "100", "--n-eval", "100", "--hidden", "32", "--device", device]
    full = imf.main(["--out", str(tmp_path / "a"), *flags])
    real, calls = imf.imf_loss, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 61:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(imf, "imf_loss", interrupted)
    with pytest.raises(SystemExit):
        imf.main(["--out", str(tmp_path / "b"), *flags])
    monkeypatch.setattr(imf, "imf_loss", real)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 60
    resumed = imf.main(["--out", str(tmp_path / "b"), *flags, "--resume"])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True, map_location="cpu")
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, map_location="cpu")
    if device == "cpu":                                        # bit for bit on the CPU
        assert a["losses"] == b["losses"] and resumed["w2_nfe1"] == full["w2_nfe1"]
        assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    else:                                                      # GPU kernels need not be deterministic
        assert np.allclose(a["losses"], b["losses"], rtol=1e-3)
        assert all(torch.allclose(a["ema"][k], b["ema"][k], rtol=1e-3, atol=1e-5) for k in a["ema"])


def test_resume_with_more_steps_keeps_the_schedule(tmp_path, monkeypatch):
    """--resume --steps 90 after a 60-step run goes on at lr / 20 instead of climbing the cosine again."""
    run_imf(tmp_path, "--steps", "60", "--n-eval", "50", "--hidden", "32", "--lr", "1e-3")
    seen = []
    real = imf.lr_at
    monkeypatch.setattr(imf, "lr_at", lambda step, lr, total: seen.append((step, total)) or real(step, lr, total))
    run_imf(tmp_path, "--steps", "90", "--n-eval", "50", "--hidden", "32", "--lr", "1e-3", "--resume")
    assert [s for s, _ in seen] == list(range(60, 90)) and all(total == 60 for _, total in seen)
    assert all(abs(real(s, 1e-3, 60) - 5e-5) < 1e-12 for s, _ in seen)
    assert real(30, 1e-3, 60) > 5e-4                             # mid-schedule for comparison
    assert torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["schedule_steps"] == 60


def test_ckpt_every_is_the_real_interval(tmp_path, monkeypatch):
    saved = []
    real = imf.save_checkpoint
    monkeypatch.setattr(imf, "save_checkpoint", lambda path, state: saved.append(state["step"]) or real(path, state))
    run_imf(tmp_path, "--steps", "100", "--n-eval", "50", "--hidden", "32", "--ckpt-every", "30")
    assert saved == [30, 60, 90, 100]


def test_reflow_resumed_stage2_equals_an_uninterrupted_run(reflow_brief, tmp_path, monkeypatch):
    """A two-stage run interrupted in stage 2 and continued with --resume reuses stage 1 and the pairs and
    ends with the stage 2 of an uninterrupted run."""
    src, _ = reflow_brief
    out = tmp_path / "out"
    out.mkdir()
    for f in ("stage1.pt", "pairs1.pt"):
        (out / f).write_bytes(open(os.path.join(src, f), "rb").read())
    real, calls = reflow.rf_loss, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reflow, "rf_loss", interrupted)
    with pytest.raises(SystemExit) as err:
        reflow.main(["--out", str(out), *REFLOW_BRIEF])
    assert err.value.code == 130 and torch.load(out / "stage2.pt", weights_only=True)["step"] == 99
    monkeypatch.setattr(reflow, "rf_loss", real)
    metrics = reflow.main(["--out", str(out), *REFLOW_BRIEF, "--resume"])
    assert metrics["stages"]["stage1"]["reused"] and metrics["pairs"]["pairs1"]["reused"]
    a = torch.load(os.path.join(src, "stage2.pt"), weights_only=True)
    b = torch.load(out / "stage2.pt", weights_only=True)
    assert a["losses"] == b["losses"] and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_reflow_changed_stage1_file_forces_new_pairs_and_stage2(reflow_brief, tmp_path, capsys):
    """Bug: pairs and stage 2 were matched to stage 1 by settings only. A stage1.pt with the same settings but
    other weights (another machine, or a run that overwrote it) must give new pairs and a new stage 2."""
    src, _ = reflow_brief
    out = tmp_path / "out"
    out.mkdir()
    for f in ("stage1.pt", "pairs1.pt", "stage2.pt"):
        (out / f).write_bytes(open(os.path.join(src, f), "rb").read())
    stage1 = torch.load(out / "stage1.pt", weights_only=True)
    stage1["ema"] = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                     for k, v in stage1["ema"].items()}
    reflow.save_checkpoint(str(out / "stage1.pt"), stage1)
    metrics = reflow.main(["--out", str(out), *REFLOW_BRIEF])
    text = capsys.readouterr().out
    assert metrics["stages"]["stage1"]["reused"]
    assert not metrics["pairs"]["pairs1"]["reused"] and not metrics["stages"]["stage2"]["reused"]
    assert "pairs1.pt was made from another stage1.pt" in text and "stage2.pt was made from another pairs1.pt" in text
    args = reflow.get_args(REFLOW_BRIEF)
    model = reflow.make_model((2,), 1, args.hidden, args.depth)
    model.load_state_dict(stage1["ema"])
    pairs = torch.load(out / "pairs1.pt", weights_only=True)
    path, _ = reflow.ode_generate(model, pairs["e"][:32], args.rtol, args.atol)
    assert torch.allclose(path[-1], pairs["x"][:32], atol=5e-4)  # the pairs come from the changed stage 1


# ---------------------------------------------------------------- devices
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", [fm, rectified_flow], ids=["fm", "rectified_flow"])
def test_fm_and_rf_brief_run_each_device(script, device, tmp_path):
    metrics = script.main(["--out", str(tmp_path / "o"), "--steps", "200", "--n-eval", "200", "--device", device])
    losses = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True, map_location="cpu")["losses"]
    assert np.mean(losses[-50:]) < np.mean(losses[:50]) and np.isfinite(metrics["w2_ode"])
    assert np.load(tmp_path / "o" / "samples.npz")["nfe1"].shape == (200, 2)


class Float64Spy(torch.overrides.TorchFunctionMode):
    """Records every torch function that returns a float64 tensor while it is active."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64
               for o in (out if isinstance(out, (tuple, list)) else [out])):
            self.seen.add(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize("script", [fm, reflow, imf_reflow], ids=["fm", "reflow", "imf_reflow"])
def test_dopri5_time_dtype_as_on_mps(script):
    """MPS has no float64, and torchdiffeq's dopri5 keeps its time in float64 unless told otherwise: the scripts
    ask for float32 time on MPS. Here on the CPU: with float32 time the solver makes no float64 tensor at all
    (what MPS needs), with the CPU default it does (so the check can fail), and x_hat barely moves."""
    import torchdiffeq  # noqa: F401  (its float64 Butcher tableaus are made once, at import)
    assert script.ode_time_dtype(torch.device("mps")) == torch.float32
    assert script.ode_time_dtype(torch.device("cpu")) == torch.float64
    torch.manual_seed(0)
    net = script.make_model((2,), 1 if script is not imf_reflow else 2, 32, 2)
    e = torch.randn(64, 2)

    def solve(time_dtype):
        with Float64Spy() as spy:
            out = script.ode_generate(net, e, time_dtype=time_dtype)[0]
        return (out if script is fm else out[-1]), spy.seen

    x32, seen32 = solve(torch.float32)
    x64, seen64 = solve(None)
    assert not seen32, seen32
    assert seen64                                              # the default on the CPU: float64 time
    assert torch.allclose(x32, x64, atol=1e-4), (x32 - x64).abs().max()


def test_step_cost_benchmark_runs_and_checks_its_flags(capsys):
    """benchmarks/imf_step_cost.py (timing lives there, not in the tests): it runs, and bad flags are argparse
    errors, not tracebacks."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import imf_step_cost
    ms = imf_step_cost.main(["--steps", "2", "--batch-size", "16"])
    assert set(ms) == {"flow matching", "iMF"} and all(v > 0 for v in ms.values())
    for flags in (["--steps", "-1"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as err:
            imf_step_cost.main(flags)
        assert err.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_eval_noise_is_normal_and_splits_modes_evenly():
    """Evaluation noise for moons: standard normal, reproducible, and the share of points on each side of a line
    through the mean is even to 0.3% at n = 2000 for every seed (i.i.d. draws: +-1.1%, so five seeds all within
    0.3% would happen by chance about once in 2500). For i.i.d.-drawn data (8gaussians) it is i.i.d. too."""
    moons = imf.Data("moons", "data", 0, torch.device("cpu"), 2000)
    e = imf.eval_noise(moons, 7)
    assert e.shape == (2000, 2) and torch.equal(e, imf.eval_noise(moons, 7))
    assert e.mean(0).abs().max() < 0.02 and (e.std(0) - 1).abs().max() < 0.03
    for seed in range(5):
        e = imf.eval_noise(moons, seed)
        assert abs((e[:, 0] < 0).float().mean().item() - 0.5) < 0.003, seed
        assert abs((e[:, 0] + e[:, 1] < 0).float().mean().item() - 0.5) < 0.003, seed
    gauss = imf.Data("8gaussians", "data", 0, torch.device("cpu"), 2000)
    assert torch.equal(imf.eval_noise(gauss, 7), torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)))
    digits = imf.Data("digits", "data", 0, torch.device("cpu"), 10)
    assert imf.eval_noise(digits, 0).shape == (10, 1, 8, 8)


def test_reflow_u_shaped_times_follow_their_density():
    """--u-shaped: t has density 2 (exp(4t) + exp(4 - 4t)) / (e^4 - 1), i.e. ~ cosh(4 (t - 1/2)), symmetric,
    about 3.8x as dense at the ends as in the middle; without it t is uniform."""
    import math
    for u_shaped in (True, False):
        seen = []

        class Spy(torch.nn.Module):
            def forward(self, z, t, labels=None):
                seen.append(t.clone())
                return torch.zeros_like(z)

        torch.manual_seed(0)
        reflow.rf_loss(Spy(), torch.randn(200000, 2), torch.randn(200000, 2), None, 0.0, u_shaped)
        hist = torch.histc(seen[0], 10, 0, 1) / len(seen[0]) * 10
        centres = [0.05 + 0.1 * i for i in range(10)]
        want = [2 * (math.exp(4 * c) + math.exp(4 - 4 * c)) / math.expm1(4) if u_shaped else 1.0 for c in centres]
        assert all(abs(h - w) < 0.05 * w + 0.02 for h, w in zip(hist.tolist(), want)), (u_shaped, hist, want)


def test_imf_paper_recipe_benchmark_runs(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import imf_paper_recipe
    original, original_config, calls = imf.imf_loss, imf.run_config, []
    real = imf_paper_recipe.paper_loss

    def counted(*a, **kw):
        calls.append((*a[5:], kw))
        return real(*a, **kw)

    imf_paper_recipe.paper_loss = counted
    try:
        m = imf_paper_recipe.main(["--sampler", "logit-normal", "--adaptive-p", "1", "--out", str(tmp_path / "o"),
                                   "--steps", "20", "--n-eval", "100", "--boundary-frac", "0.75"])
    finally:                                                    # the benchmark patches imf
        imf.imf_loss, imf.run_config, imf_paper_recipe.paper_loss = original, original_config, real
    assert len(calls) == 20 and np.isfinite(m["w2_nfe1"])
    assert calls[0] == ("logit-normal", 1.0, 1e-3, {"boundary_t": "logit-normal"})   # imf.py's --boundary-t reaches it
    saved = json.load(open(tmp_path / "o" / "metrics.json"))
    assert saved["command"].startswith("python benchmarks/imf_paper_recipe.py --sampler logit-normal")
    config = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["config"]
    assert config["sampler"] == "logit-normal" and "boundary_t" not in config     # the pair ignores --boundary-t
    calls.clear()
    imf_paper_recipe.paper_loss = counted
    try:
        imf_paper_recipe.main(["--sampler", "split", "--boundary-t", "uniform", "--out", str(tmp_path / "s"),
                               "--steps", "3", "--n-eval", "50"])
    finally:
        imf.imf_loss, imf.run_config, imf_paper_recipe.paper_loss = original, original_config, real
    assert calls[0] == ("split", 0.0, 1e-3, {"boundary_t": "uniform"})
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)["config"]["boundary_t"] == "uniform"
    r, t, nb = imf_paper_recipe.sample_r_t_logit_normal(1000, "cpu", 0.75)
    assert nb == 750 and torch.all(r <= t) and torch.all(r[:nb] == t[:nb]) and torch.all(r[nb:] < t[nb:])


def test_one_step_routes_table_from_finished_runs(tmp_path, capsys):
    """benchmarks/one_step_routes.py --keep builds the table from the runs' metrics.json (medians, ranges)."""
    sys.path.insert(0, os.path.join(HERE, "benchmarks"))
    import one_step_routes
    for route, script, flags, key, nfe, stages in one_step_routes.ROUTES:
        for seed, ratio in zip((0, 1, 2), (1.5, 1.1, 1.3)):
            folder = tmp_path / ("".join([script[:-3], *flags]).replace("--", "-") + f"-s{seed}")
            folder.mkdir(exist_ok=True)
            path = folder / "metrics.json"
            m = json.load(open(path)) if path.exists() else {
                "command": " ".join(["python", script, "--seed", str(seed), "--out", str(folder), *flags]),
                "train_seconds": 10.0, "ode_nfe": 80,
                "stages": {s: {"train_seconds": 5.0} for s in ("stage1", "stage2", "distill")},
                "pairs": {"pairs1": {"train_seconds": 1.0}}}
            m[f"w2_ratio_{key}"] = ratio
            json.dump(m, open(path, "w"))
    table = one_step_routes.main(["--keep", "--out", str(tmp_path)])
    assert len(table) == 2 + len(one_step_routes.ROUTES)
    assert all("**1.30x** (1.10-1.50)" in row for row in table[2:])
    assert "| 11 |" in table[5]                                 # 2-RF: stage 1 + pairs + stage 2 seconds
    assert (tmp_path / "routes.md").read_text().count("\n") == len(table)


# ---------------------------------------------------------------- the image quality number
def test_frechet_distance_of_a_set_to_itself_is_zero_and_grows_with_a_shift():
    f = np.random.default_rng(0).standard_normal((500, 8))
    assert abs(imf.frechet_distance(f, f)) < 1e-6
    assert abs(imf.frechet_distance(f, f + 2.0) - 8 * 4.0) < 1e-6         # |mean shift|^2, same covariance


def test_image_fd_ranks_real_digits_near_the_floor_and_noise_far_above(tmp_path, capsys):
    """In the classifier's features: another real set scores near the floor, uniform noise and the mean
    digit (what pixel W2 used to rank as good) score far above it. A corrupt cached classifier is retrained
    with a one-line note."""
    data = imf.Data("digits", str(tmp_path), 0, torch.device("cpu"), 360)
    net = imf.image_classifier(data)
    assert (tmp_path / "digits_classifier.pt").exists()
    real = data.heldout.reshape(-1, 1, 8, 8)
    with torch.no_grad():
        acc = (net(torch.tensor(real)).argmax(1).numpy() == _digit_labels()[:360]).mean()
    assert acc > 0.94, acc                                               # measured 0.964
    samples = {"real": ((data.train[-360:] + 1) / 2).reshape(360, -1).numpy(),    # other real digits
               "noise": np.random.default_rng(0).random((360, 64)),
               "mean": np.repeat(real.mean(0, keepdims=True), 360, 0)}
    m = imf.report(samples, data)
    assert m["metric"] == "FD" and m["ratio_real"] < 1.25, m             # measured 1.03 (floor: mean of 5 real subsets)
    assert m["ratio_noise"] > 18 and m["ratio_mean"] > 80, m             # measured 26 and 112
    (tmp_path / "digits_classifier.pt").write_bytes(b"not a classifier")
    capsys.readouterr()
    imf.image_classifier(data)
    out = capsys.readouterr().out
    assert "cannot read" in out and "training the classifier again" in out and "Traceback" not in out
    assert torch.load(tmp_path / "digits_classifier.pt", weights_only=True)["settings"]["data"] == "digits"


def _digit_labels():
    from sklearn.datasets import load_digits
    y = load_digits().target
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1234)).numpy()]


# ---------------------------------------------------------------- class conditioning and guidance
MODULES = {"fm.py": fm, "rectified_flow.py": rectified_flow, "reflow.py": reflow, "imf.py": imf,
           "imf_reflow.py": imf_reflow}
COND_FLAGS = {"fm.py": ["--steps", "40", "--ode-steps", "4"], "rectified_flow.py": ["--steps", "40", "--ode-steps", "4"],
              "imf.py": ["--steps", "40"],
              "reflow.py": ["--steps", "40", "--reflow-steps", "20", "--n-pairs", "64"],
              "imf_reflow.py": ["--steps", "40", "--reflow-steps", "20", "--n-pairs", "64"]}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("data", ["8gaussians", "digits"])
def test_conditional_brief_runs_save_labels(script, data, tmp_path):
    """--cond --guidance 2: every script runs on a labelled toy and on digits, saves the requested labels
    (the held-out set's) with samples of the data's shape, and reports the accuracy of every sampler setting."""
    flags = ["--data", data, "--cond", "--guidance", "2", "--n-eval", "80", "--out", str(tmp_path)]
    metrics = MODULES[script].main(flags + COND_FLAGS[script] + (["--channels", "8"] if data == "digits" else []))
    s = np.load(tmp_path / "samples.npz")
    data_obj = imf.Data(data, str(tmp_path), 0, torch.device("cpu"), 80)
    assert np.array_equal(s["labels"], data_obj.heldout_labels)
    shape = (80, 2) if data == "8gaussians" else (80, 1, 8, 8)
    keys = [k for k in s.files if k not in ("real", "labels")]
    assert keys and all(s[k].shape == shape and np.isfinite(s[k]).all() for k in keys)
    acc = {k: v for k, v in metrics.items() if k.startswith("accuracy_")}
    assert all(0 <= v <= 1 for v in acc.values())
    assert all(f"accuracy_{k}" in acc or any(a.endswith("_" + k) for a in acc) for k in keys), (keys, acc)


def test_conditional_fm_honours_labels(tmp_path):
    """A briefly trained conditional model puts the samples asked for moon k nearer moon k's real points
    than the other moon's, for both moons and for nearly every sample."""
    metrics = fm.main(["--cond", "--steps", "600", "--n-eval", "400", "--ode-steps", "4", "--out", str(tmp_path)])
    s = np.load(tmp_path / "samples.npz")
    data = imf.Data("moons", "data", 0, torch.device("cpu"), 400)
    real, real_y = torch.tensor(data.heldout), data.heldout_labels
    for k in (0, 1):
        x = torch.tensor(s["ode"][s["labels"] == k])
        d_own = torch.cdist(x, real[real_y == k]).min(1).values
        d_other = torch.cdist(x, real[real_y != k]).min(1).values
        assert (d_own < d_other).float().mean() > 0.9, k
    assert metrics["accuracy_ode"] > 0.9                             # measured 1.0
    torch.manual_seed(0)
    untrained = imf.make_model((2,), 1, n_classes=2)
    x = fm.ode_generate(untrained, torch.randn(400, 2), labels=torch.tensor(real_y))[0]
    assert (imf.classify(data.to_data(x), data) == real_y).mean() < 0.6       # an untrained one does not (0.45)


def test_guidance_1_is_plain_conditional_sampling_and_w_combines_two_outputs():
    torch.manual_seed(0)
    model = imf.make_model((2,), 2, n_classes=3)
    z, r, t, y = torch.randn(16, 2), torch.rand(16), torch.rand(16), torch.randint(0, 3, (16,))
    assert torch.equal(imf.guided(model, z, (r, t), y, 1.0), model(z, r, t, labels=y))
    null = torch.full_like(y, 3)
    want = model(z, r, t, labels=null) + 2.5 * (model(z, r, t, labels=y) - model(z, r, t, labels=null))
    assert torch.allclose(imf.guided(model, z, (r, t), y, 2.5), want, atol=1e-6)
    assert torch.equal(model(z, r, t), model(z, r, t, labels=null))  # no labels: the "no label" index
    fm_model = fm.make_model((2,), 1, n_classes=3)
    e = torch.randn(16, 2)
    assert torch.equal(fm.euler_sample(fm_model, e, 3, y, 1.0), fm.euler_sample(fm_model, e, 3, y))
    calls = []
    fm_model.register_forward_hook(lambda mod, inp, out: calls.append(len(inp[0])))
    _, nfe = fm.ode_generate(fm_model, e, labels=y, w=2.0)       # guided: each call holds 2 x 16 rows,
    assert nfe == 2 * len(calls) and set(calls) == {32}            # counted as two evaluations


def test_imf_guided_one_step_is_one_network_evaluation(tmp_path):
    """iMF folds guidance into training: 1-NFE sampling with labels calls the network once per sample."""
    imf.main(["--cond", "--guidance", "2", "--steps", "30", "--n-eval", "50", "--out", str(tmp_path)])
    model = imf.make_model((2,), 2, n_classes=2)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["ema"])
    rows = []
    model.register_forward_hook(lambda mod, inp, out: rows.append(len(inp[0])))
    e, y = torch.randn(50, 2), torch.randint(0, 2, (50,))
    x = imf.sample(model, e, 1, y)
    assert rows == [50] and x.shape == (50, 2)
    assert not torch.allclose(x, imf.sample(model, e, 1, 1 - y), atol=1e-3)  # the labels are used


def test_imf_guided_target_on_the_boundary():
    """With r = t the guided iMF loss regresses u(z, t, t | y) on w (e - x) + (1 - w) u(z, t, t | no label),
    and rows whose label was dropped on e - x."""
    torch.manual_seed(0)
    model = imf.make_model((2,), 2, hidden=32, n_classes=2)
    x, e = torch.randn(64, 2), torch.randn(64, 2)
    y = torch.randint(0, 2, (64,))
    y[:16] = 2                                                     # dropped
    torch.manual_seed(1)
    loss = imf.imf_loss(model, x, e, y, 3.0, 1.0, 0.0)
    torch.manual_seed(1)
    r, t, _ = imf.sample_r_t(64, "cpu", 1.0, 0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        v_null = model(z, t, t, labels=torch.full_like(y, 2))
    target = torch.where((y != 2)[:, None], 3.0 * (e - x) + (1 - 3.0) * v_null, e - x)
    assert torch.allclose(loss, ((model(z, t, t, labels=y) - target) ** 2).mean())
    assert not torch.allclose(loss, ((model(z, t, t, labels=y) - (e - x)) ** 2).mean())


def test_reflow_pairs_are_per_label_on_the_guided_ode(tmp_path):
    """--cond --guidance W: the pairs carry balanced labels and are the endpoints of stage 1's guided ODE for
    their labels; stage 2 is sampled without guidance (one network evaluation per step)."""
    metrics = reflow.main(["--cond", "--guidance", "2", "--steps", "60", "--reflow-steps", "10", "--n-pairs", "64",
                           "--n-eval", "50", "--out", str(tmp_path)])
    pairs = torch.load(tmp_path / "pairs1.pt", weights_only=True)
    assert torch.equal(torch.bincount(pairs["labels"]), torch.tensor([32, 32]))
    args = reflow.get_args(["--cond", "--guidance", "2"])
    model = reflow.make_model((2,), 1, n_classes=2)
    model.load_state_dict(torch.load(tmp_path / "stage1.pt", weights_only=True)["ema"])
    path, nfe = reflow.ode_generate(model, pairs["e"], args.rtol, args.atol, labels=pairs["labels"], w=2.0)
    assert torch.allclose(path[-1], pairs["x"], atol=1e-5)
    unguided = reflow.ode_generate(model, pairs["e"], args.rtol, args.atol, labels=pairs["labels"])[0]
    assert not torch.allclose(unguided[-1], pairs["x"], atol=1e-3)
    assert "ratio_stage2_nfe1" in metrics and "ratio_stage1_nfe2" in metrics and "ratio_stage1_nfe1" not in metrics


@pytest.mark.parametrize("script", SCRIPTS)
def test_cond_and_guidance_flag_errors(script, capsys):
    for flags, words in ((["--cond", "--data", "checkerboard"], "--cond needs data with labels"),
                         (["--guidance", "2"], "--guidance needs --cond"),
                         (["--cond", "--guidance", "2", "--label-drop", "0"], "--label-drop > 0")):
        with pytest.raises(SystemExit) as err:
            MODULES[script].get_args(flags)
        assert err.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_per_dataset(script):
    mod = MODULES[script]
    for data in ("moons", "digits", "mnist"):
        args = mod.get_args(["--data", data])
        want = mod.DEFAULTS["toys" if data == "moons" else data]
        assert all(getattr(args, k) == v for k, v in want.items()), (data, vars(args))
    assert mod.get_args(["--data", "digits", "--steps", "7"]).steps == 7
    help_text = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True,
                               text=True).stdout
    assert f"{mod.DEFAULTS['digits']['steps']} on digits" in " ".join(help_text.split())


def test_unet_handles_rgb_and_any_even_size():
    for shape in ((3, 12, 10), (1, 28, 28), (3, 32, 32)):
        net = imf.make_model(shape, 2, channels=8, n_classes=10)
        z = torch.randn(4, *shape)
        assert net(z, torch.rand(4), torch.rand(4), labels=torch.arange(4)).shape == z.shape
    with pytest.raises(imf.RunError, match="even image height and width"):
        imf.make_model((1, 9, 8), 1)


def test_unet_quarter_level_only_for_larger_images():
    """28x28 and 32x32 get a quarter-resolution level (7x7, 8x8), which lets a corner output pixel see most of
    the image; 8x8 digits keep the two-level net they had (its parameter count, so old checkpoints still load)."""
    digits_net = imf.make_model((1, 8, 8), 2, channels=8, n_classes=10)
    assert not digits_net.deep and sum(p.numel() for p in digits_net.parameters()) == 18329
    assert not imf.make_model((1, 12, 12), 1, channels=8).deep          # sides under 16
    assert not imf.make_model((3, 12, 10), 1, channels=8).deep          # 10 is not a multiple of 4
    net = imf.make_model((1, 20, 20), 1, channels=8)                     # 20 -> 10 -> 5 -> 10 -> 20
    assert net.deep and net(torch.randn(2, 1, 20, 20), torch.rand(2)).shape == (2, 1, 20, 20)
    for shape in ((1, 28, 28), (3, 32, 32)):
        net = imf.make_model(shape, 1, channels=8)
        assert net.deep and net.down2.weight.shape == (32, 16, 4, 4)
        z = torch.zeros(1, *shape, requires_grad=True)
        net(z, torch.rand(1))[0, 0, 0, 0].backward()                      # the corner pixel's receptive field
        assert (z.grad[0, 0].abs() > 0).float().mean() > 0.5, "the corner output should see far into the image"
