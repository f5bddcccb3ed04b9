"""sde.py: each SDE's perturbation kernel is the forward SDE's (Monte Carlo) and VP's chain is DDPM's; the exact score of Gaussian
data minimises continuous DSM at its closed-form value; with that score PC sampling and the probability-flow ODE reproduce the
data and the ODE likelihood is the exact log-density; the Dormand-Prince solver against a closed form, Hutchinson's trace,
encoding then decoding, the corrector's signal-to-noise step, the bits/dim convention; learning; the CLI."""
import json
import math

import pytest
import torch

import sde as S
from conftest import PYTHON, run_script

MU, S0 = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5  # Gaussian data N(MU, S0^2 I) in 2D
KINDS = ("vp", "subvp", "ve")


def make(kind, **kw):
    return S.SDE(kind, **{**dict(sigma_max=20.0), **kw})


def gauss_score(sde, mu=MU):
    """The exact score of p_t = N(m(t) mu, (m^2 S0^2 + std^2) I) for data N(mu, S0^2 I): -(x - m mu) / v."""
    def score(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        m, std = S.bcast(sde.m(t), x), S.bcast(sde.std(t), x)
        return -(x - m * mu.to(x)) / (m ** 2 * S0 ** 2 + std ** 2)
    return score


def gauss_log_p(sde, x, t, mu):  # log p_t(x), p_t = N(m mu, v I), summed over dimensions
    m, std = float(sde.m(t)), float(sde.std(t))
    return torch.distributions.Normal(m * mu, math.sqrt(m ** 2 * S0 ** 2 + std ** 2)).log_prob(x).sum(1)


def data(n, seed=0, mu=MU):
    return mu + S0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- the SDEs
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_monte_carlo_of_the_forward_sde(kind):
    sde, n, steps = make(kind), 20000, 2000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    # VE's kernel std is sigma(t), not sqrt(sigma(t)^2 - sigma_min^2): x(0) is the data plus N(0, sigma_min^2)
    x = x0 + (sde.smin if kind == "ve" else 0.0) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    dt = 1.0 / steps
    for k in range(steps):  # Euler-Maruyama of dx = f dt + g dw
        t = k * dt
        x = x + sde.f(x, t) * dt + float(sde.g(t)) * math.sqrt(dt) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        if k + 1 in (steps * 3 // 10, steps):
            mean, std = sde.marginal(x0[None], (k + 1) * dt)
            se = float(std) / math.sqrt(n)
            assert (x.mean(0) - mean[0]).abs().max() < 4 * se + 1e-3
            assert x.std(0).div(float(std)).sub(1).abs().max() < 0.025


def test_vp_chain_is_ddpm():
    sde, N = make("vp"), 1000
    ts = torch.arange(N + 1, dtype=torch.float64) / N
    f, G = sde.discrete(ts)
    # the chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z has q(x_i | x_0) = N(sqrt(alpha_bar_i) x_0, 1 - alpha_bar_i), DDPM's
    # closed form; with these beta_i it equals the SDE's kernel at every t_i
    alpha_bar = torch.cumprod(1 - G ** 2, 0)
    assert torch.allclose((1 + f) ** 2, 1 - G ** 2, atol=1e-15)
    assert torch.allclose(alpha_bar.sqrt(), sde.m(ts[1:]), rtol=1e-10)
    assert torch.allclose((1 - alpha_bar).sqrt(), sde.std(ts[1:]), rtol=1e-8)
    # DDPM's own betas, linspace(1e-4, 0.02, 1000) = beta(t) / N: the same chain up to O(1/N^2) per step ((beta dt)^2 / 2 <= 2e-4)
    ddpm = torch.linspace(1e-4, 0.02, N, dtype=torch.float64)
    assert (ddpm - G ** 2).abs().max() < 3e-4
    assert (torch.cumprod(1 - ddpm, 0).sqrt() - sde.m(ts[1:])).abs().max() < 2e-3
    # Monte Carlo of the chain itself: DDPM's q(x_t | x_0) at t = 300
    gen, x0 = torch.Generator().manual_seed(0), 1.5
    x = torch.full((40000,), x0, dtype=torch.float64)
    for i in range(300):
        x = (1 + f[i]) * x + G[i] * torch.randn(len(x), generator=gen, dtype=torch.float64)
    assert abs(x.mean() - alpha_bar[299].sqrt() * x0) < 0.015 and abs(x.var() / (1 - alpha_bar[299]) - 1) < 0.03


def test_sde_coefficients():
    ve, vp, sub = make("ve", sigma_max=50.0), make("vp"), make("subvp")
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    # VE: g^2 = d sigma^2 / dt; VP: d std^2 / dt = beta (1 - std^2) ... = g^2 - beta std^2 (Ito); sub-VP: std = 1 - m^2
    h = 1e-6
    assert torch.allclose(ve.g(t) ** 2, (ve.sigma(t + h) ** 2 - ve.sigma(t - h) ** 2) / (2 * h), rtol=1e-6)
    for s in (vp, sub):
        dvar = (s.std(t[1:] + h) ** 2 - s.std(t[1:] - h) ** 2) / (2 * h)
        assert torch.allclose(dvar, s.g(t[1:]) ** 2 - s.beta(t[1:]) * s.std(t[1:]) ** 2, rtol=1e-5)
    assert torch.allclose(sub.std(t), 1 - vp.m(t) ** 2) and torch.allclose(vp.std(t) ** 2 + vp.m(t) ** 2, torch.ones(3, dtype=torch.float64))
    assert float(vp.std(1e-5)) == pytest.approx(math.sqrt(0.1 * 1e-5), rel=1e-3)  # from expm1: no 1 - m^2 cancellation
    assert float(ve.std(0.0)) == pytest.approx(0.01) and float(ve.std(1.0)) == pytest.approx(50.0)


# ----------------------------------------------------------------------------- objective
@pytest.mark.parametrize("kind", KINDS)
def test_exact_gaussian_score_minimises_dsm_at_its_closed_form_value(kind):
    sde, n = make(kind), 200_000
    x0, z = data(n), torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for tv in (0.01, 0.3, 0.9):
        t = torch.full((n,), tv, dtype=torch.float64)
        m, std = float(sde.m(tv)), float(sde.std(tv))
        v = m ** 2 * S0 ** 2 + std ** 2
        best = m ** 2 * S0 ** 2 / v  # E 1/2 ||std s* + z||^2 = D/2 m^2 S0^2 / v with D = 2
        loss = lambda score, w="sigma2": S.dsm_loss(score, sde, x0, t, z, w).mean().item()
        mc = loss(gauss_score(sde))
        assert mc == pytest.approx(best, rel=0.01)
        assert loss(gauss_score(sde), "likelihood") == pytest.approx(float(sde.g(tv)) ** 2 / std ** 2 * best, rel=0.01)
        # a scaled score c s*: the excess 1/2 std^2 E ||(c - 1) s*||^2 = (c - 1)^2 std^2 / v (D = 2)
        scaled = lambda x, t: 1.2 * gauss_score(sde)(x, t)
        assert loss(scaled) - mc == pytest.approx(0.04 * std ** 2 / v, rel=0.05)


# ----------------------------------------------------------------------------- samplers and the likelihood
@pytest.mark.parametrize("kind,predictor,corrector", [("ve", "reverse", "langevin"), ("vp", "reverse", "none"), ("vp", "euler", "langevin"),
                                                      ("subvp", "euler", "none"), ("ve", "none", "langevin")])
def test_pc_sampling_with_the_exact_score_reproduces_the_data(kind, predictor, corrector):
    sde, n, eps = make(kind), 20000, 1e-3 if kind != "ve" else 1e-5
    torch.manual_seed(0)
    x = torch.randn(n, 2, dtype=torch.float64) * sde.prior_std()
    N, M = (500, 1) if predictor != "none" else (200, 5)
    x, nfe = S.pc_sample(gauss_score(sde), sde, x, eps, N, predictor, corrector, snr=0.16, M=M)
    assert nfe == (N if predictor != "none" else 0) + (M * (N - 1) if corrector != "none" else 0)
    m, std = float(sde.m(eps)), float(sde.std(eps))
    assert (x.mean(0) - m * MU).abs().max() < 0.03
    assert (x.var(0) / (m ** 2 * S0 ** 2 + std ** 2) - 1).abs().max() < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_ode_sampling_reproduces_the_data_and_its_likelihood_is_exact(kind):
    sde, eps = make(kind), 1e-5
    torch.manual_seed(0)
    z = torch.randn(5000, 2) * sde.prior_std()
    x, nfe = S.ode_solve(gauss_score(sde), sde, z, 1.0, 1e-3, 1e-5, 1e-5)
    # for Gaussians the ODE's map is affine: x(1e-3) = m mu + (z - m_1 mu) sqrt(v / v_1), exact from z ~ p_1; from the prior
    # N(0, prior_std^2) (VE: p_1 has mean mu, the prior 0) the mean and variance below
    (m, v), (m1, v1) = ((float(sde.m(t)), float(sde.m(t)) ** 2 * S0 ** 2 + float(sde.std(t)) ** 2) for t in (1e-3, 1.0))
    mean, var = (m - m1 * math.sqrt(v / v1)) * MU, sde.prior_std() ** 2 * v / v1
    assert 20 < nfe < 2000 and (x.double().mean(0) - mean).abs().max() < 0.03 and (x.double().var(0) / var - 1).abs().max() < 0.05
    # log p_eps(x) by the ODE = the closed form, for data N(0, S0^2) (so p_1 is the prior up to < 1e-4 nats)
    zero = torch.zeros(2, dtype=torch.float64)
    x = data(64, seed=3, mu=zero).float()
    # the model's density in closed form: the ODE's map is x(eps) = sqrt(v_eps / v_1) x(1), x(1) ~ the prior
    v_eps, v1 = (float(sde.std(t)) ** 2 + float(sde.m(t)) ** 2 * S0 ** 2 for t in (eps, 1.0))
    exact = torch.distributions.Normal(0.0, sde.prior_std() * math.sqrt(v_eps / v1)).log_prob(x.double()).sum(1)
    assert (exact - gauss_log_p(sde, x.double(), eps, zero)).abs().max() < (5e-4 if kind != "ve" else 3e-3)  # ~ log p_eps(x)
    for trace in ("exact", "hutchinson"):  # the Jacobian is c(t) I: a Rademacher probe's v^T J v is exact too
        log_p, z1, nfe = S.log_likelihood(gauss_score(sde, zero), sde, x, eps, 1e-6, 1e-6, trace, torch.Generator().manual_seed(0))
        assert (log_p - exact).abs().max() < 2e-3 and nfe > 20
    # encoding then decoding returns x within the solver's tolerance
    back, _ = S.ode_solve(gauss_score(sde, zero), sde, z1, 1.0, eps, 1e-6, 1e-6)
    assert (back - x).abs().max() < 2e-3


def test_dopri5_against_a_closed_form_linear_ode():
    torch.manual_seed(0)
    A = torch.randn(3, 3, dtype=torch.float64) * 0.7
    y0 = [torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64) * 1e3]  # two tensors, different scales
    f = lambda t, y: [y[0] @ A.T, -0.5 * y[1]]
    for t0, t1 in ((0.0, 1.5), (1.5, 0.0)):
        (y, w), nfe = S.dopri5(f, y0, t0, t1, 1e-8, 1e-8)
        exact = y0[0] @ torch.linalg.matrix_exp(A * (t1 - t0)).T
        assert (y - exact).abs().max() < 1e-6 and torch.allclose(w, y0[1] * math.exp(-0.5 * (t1 - t0)), rtol=1e-7)
        assert nfe % 6 == 1
    # a looser tolerance takes fewer steps, with an error of about that size
    (y, _), nfe_loose = S.dopri5(f, y0, 0.0, 1.5, 1e-4, 1e-4)
    assert nfe_loose < nfe and (y - y0[0] @ torch.linalg.matrix_exp(A * 1.5).T).abs().max() < 1e-2


def test_divergence_exact_and_hutchinson_unbiased():
    torch.manual_seed(0)
    W = torch.randn(5, 5)
    x = torch.randn(3, 5, requires_grad=True)
    drift = torch.tanh(x @ W.T)
    J = [torch.autograd.functional.jacobian(lambda u: torch.tanh(u @ W.T), x[k].detach()) for k in range(3)]
    tr = torch.stack([j.trace() for j in J])
    assert torch.allclose(S.divergence(drift, x, None), tr, atol=1e-5)
    n = 20000  # Rademacher probes: the mean of v^T J v -> tr J, std of one estimate <= sqrt(2) ||J||_F
    xr = x.detach().repeat(n, 1).requires_grad_(True)
    v = torch.randint(0, 2, xr.shape).float() * 2 - 1
    est = S.divergence(torch.tanh(xr @ W.T), xr, v).view(n, 3).mean(0)
    assert ((est - tr).abs() < 4 * math.sqrt(2 / n) * torch.stack([j.norm() for j in J])).all()


def test_langevin_corrector_step_has_the_signal_to_noise_ratio():
    x, s = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    torch.manual_seed(5)
    out = S.langevin_corrector(lambda u, t: s, x, 0.5, alpha=0.9, snr=0.16, M=1)
    torch.manual_seed(5)
    z = torch.randn_like(x)
    e = 2 * 0.9 * (0.16 * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
    assert torch.allclose(out, x + e * s + (2 * e).sqrt() * z, atol=1e-6)
    # ||e s|| / ||sqrt(2 e) z|| (batch-mean norms) = sqrt(alpha) r
    ratio = (e * s).flatten(1).norm(dim=1).mean() / ((2 * e).sqrt() * z).flatten(1).norm(dim=1).mean()
    assert ratio.item() == pytest.approx(math.sqrt(0.9) * 0.16, rel=1e-5)


def test_bpd_convention():
    D, shape = 784, (1, 28, 28)
    # a uniform density on [-1, 1]^D (centered) or [0, 1]^D gives every 8-bit image probability 256^-D: 8 bits/dim exactly
    assert S.to_bpd(torch.tensor([-D * math.log(2)], dtype=torch.float64), shape, True).item() == pytest.approx(8.0, abs=1e-12)
    assert S.to_bpd(torch.zeros(1, dtype=torch.float64), shape, False).item() == pytest.approx(8.0, abs=1e-12)


# ----------------------------------------------------------------------------- networks
def test_networks_shapes_parameterisation_and_zero_start(one_thread):
    cfg = S.Config(channels=8, ch_mult="1,2", res_blocks=1, attn_res="14", dropout=0.0)
    for kind in ("vp", "ve"):
        cfg.sde = kind
        net = S.UNet(cfg, (1, 28, 28))
        x, t = torch.rand(3, 1, 28, 28), torch.tensor([0.01, 0.5, 1.0])
        assert net(x, t).shape == x.shape and net(x, t).abs().max() == 0  # zero-initialised output convolution
        with torch.no_grad():
            net.out[-1].weight.normal_()
        out, sde = net(x, t), S.make_sde(cfg)
        sign = 1 if kind == "ve" else -1  # VE: s = out / sigma(t); VP: s = -out / std(t) (out predicts the noise)
        assert torch.allclose(S.score_fn(net, sde)(x, t), sign * out / sde.std(t.double()).float()[:, None, None, None], rtol=1e-5)
    assert "embed.W" in S.MLP(S.Config(sde="ve", hidden=8, layers=1)).state_dict()  # the Fourier features are saved


def test_short_toy_run_learns(tmp_path, one_thread):
    cfg = S.Config(dataset="8gaussians", steps=1500, batch_size=256, hidden=64, layers=2, warmup=0, ema=0.0, lr=2e-3, eval_n=1000,
                   eval_samples=0, eval_batch=1000, rtol=1e-4, atol=1e-4, out=str(tmp_path), ckpt=str(tmp_path / "ckpt.pt"), log_every=500, ckpt_every=0)
    model, _ = S.train(cfg)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] > lines[2]["loss"] and lines[-1]["split"] == "test"
    # the data's own NLL is 2.83 nats; this run reached 3.67; the untrained network (s = 0: the density ~ N(0, I)) gives ~6
    assert lines[-1]["nll_data"] == pytest.approx(2.83, abs=0.05) and lines[-1]["test_nll"] < 3.9, lines[-1]
    x = S.load_data(cfg).test[:1000]
    untrained = S.score_fn(S.make_model(cfg, (2,)), S.make_sde(cfg))
    assert -S.log_likelihood(untrained, S.make_sde(cfg), x, 1e-5, 1e-4, 1e-4, "exact")[0].mean() > 5.5


# ----------------------------------------------------------------------------- CLI
def call_main(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["sde.py", *argv])
    return S.main()


def test_cli_toy_train_resume_eval_sample(tmp_path, monkeypatch, capsys):
    out = tmp_path / "toy"
    flags = ["--dataset", "moons", "--out", str(out), "--hidden", "16", "--layers", "1", "--batch-size", "64", "--N", "5",
             "--eval-samples", "100", "--eval-n", "200", "--grid", "300", "--eval-batch", "200", "--log-every", "5", "--rtol", "1e-3",
             "--atol", "1e-3"]
    p = run_script(PYTHON, "sde.py", "--steps", "10", "--sde", "ve", "--corrector", "langevin", *flags)
    assert p.returncode == 0, p.stderr
    assert "step 10/10 | loss" in p.stdout and "loss_q3" in p.stdout and "VE SDE" in p.stdout and "PC reverse + langevin" in p.stdout
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["split"] == "test" and rec["unit"] == "nats" and rec["kind"] == "exact" and rec["n_test"] == 200 and rec["trace"] == "exact"
    assert rec["nfe"] == 5 + 4 and rec["mmd2"] > rec["mmd2_floor"] and math.isfinite(rec["test_nll"]) and rec["nfe_likelihood"] > 6
    assert (out / "samples_10.png").is_file()
    call_main(monkeypatch, "--steps", "12", "--resume", "--sde", "ve", "--corrector", "langevin", *flags)
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 10" in text and "step 12/12" in text
    for argv, nfe in ((["--sampler", "ode"], None), (["--predictor", "euler", "--corrector", "none"], 5),
                      (["--predictor", "none", "--M", "2"], 8)):
        call_main(monkeypatch, "--sample", "50", "--ckpt", str(out / "ckpt.pt"), *argv)
        text = capsys.readouterr().out
        assert "50 samples in" in text and (nfe is None or f" {nfe} network evaluations each" in text), text
    call_main(monkeypatch, "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-samples", "0", "--lik-n", "50")
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 12 and "mmd2" not in rec and rec["n_test"] == 50


def test_cli_images_interpolation_and_bad_flags(tmp_path, fake_fashion, fd_cache, monkeypatch, capsys):
    out = tmp_path / "img"
    flags = ["--data-dir", fake_fashion, "--cache-dir", fd_cache, "--out", str(out), "--channels", "8", "--ch-mult", "1,2",
             "--res-blocks", "1", "--attn-res", "", "--batch-size", "8", "--N", "3", "--eval-n", "8", "--lik-n", "4", "--eval-samples",
             "8", "--grid", "4", "--eval-batch", "8", "--log-every", "1", "--rtol", "1e-2", "--atol", "1e-2"]
    call_main(monkeypatch, "--steps", "2", *flags)
    assert "UNet" in capsys.readouterr().out
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["unit"] == "bpd" and rec["trace"] == "hutchinson" and rec["test_nll"] > 0 and rec["fd"] > 0 and rec["nfe"] == 3
    assert rec["n_test"] == 4 and (out / "samples_2.png").is_file()
    call_main(monkeypatch, "--sample", "4", "--interpolate", "2", "--ckpt", str(out / "ckpt.pt"), "--sampler", "ode")
    assert "interpolation of 2 pairs" in capsys.readouterr().out and (out / "interpolate.png").is_file()
    base = ["--data-dir", fake_fashion, "--out", str(tmp_path / "bad"), "--steps", "1"]
    for argv, msg in ((["--N", "0"], "--N 0 out of range; accepted: integers >= 1"),
                      (["--sde", "vpp"], "--sde 'vpp' unknown; accepted: vp, ve, subvp"),
                      (["--trace", "exact"], "--trace exact takes one backward pass per dimension"),
                      (["--predictor", "none", "--corrector", "none"], "samples nothing"),
                      (["--t-eps", "0"], "std\\(0\\) = 0"),
                      (["--ch-mult", "1,x"], "accepted comma-separated positive integers"),
                      (["--ch-mult", "1,2,2,2"], "sides must divide by 8"),
                      (["--interpolate", "2"], "--interpolate works with --sample N on image data"),
                      (["--dataset", "moving-mnist"], "sde.py models images and 2D data")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *base, *argv)
