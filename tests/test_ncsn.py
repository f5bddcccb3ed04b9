"""ncsn.py: the DSM target is the perturbation kernel's score and the exact score of Gaussian data minimises DSM at its
closed-form value; annealed Langevin with that score reproduces the data's mean and variance; Algorithm 1's step sizes;
the denoising step is Tweedie's posterior mean; the exact trace is the Jacobian's and sliced score matching estimates it
without bias; the networks' shapes and NCSNv2's 1/sigma; learning (a seeded toy run must reach a score error); the CLI."""
import json
import math

import pytest
import torch
import torch.nn as nn

import ncsn as N
from conftest import PYTHON, run_script

MU, S0 = torch.tensor([1.0, -2.0]), 0.5  # Gaussian data N(MU, S0^2 I) in 2D


def small_cfg(**kw):
    return N.Config(**{**dict(sigma_1=5.0, sigma_L=0.01, L=10, hidden=32, layers=2, ngf=4), **kw})


class GaussScore(nn.Module):
    """The exact score of q_sigma = N(MU, (S0^2 + sigma^2) I), times `scale`, plus `shift`: the best s_theta there is at scale 1, shift 0."""
    def __init__(self, cfg, scale=1.0, shift=0.0):
        super().__init__()
        self.register_buffer("sigmas", N.make_sigmas(cfg).float())
        self.scale, self.shift = scale, shift
    def forward(self, x, i):
        v = S0 ** 2 + self.sigmas[i][:, None] ** 2
        return -(x - MU.to(x)) / v * self.scale + self.shift


def gaussian_data(n, seed=0):
    return MU + S0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- objectives
def test_dsm_target_is_the_score_of_the_gaussian_kernel():
    x, sigma = torch.randn(5, 3, dtype=torch.float64), 0.3
    x_tilde = (x + sigma * torch.randn(5, 3, dtype=torch.float64)).requires_grad_(True)
    log_q = torch.distributions.Normal(x, sigma).log_prob(x_tilde).sum()
    assert torch.allclose(N.dsm_target(x_tilde, x, sigma), torch.autograd.grad(log_q, x_tilde)[0], atol=1e-12)


def test_exact_gaussian_score_minimises_dsm_at_its_closed_form_value():
    cfg, n = small_cfg(), 200_000
    x, z = gaussian_data(n), torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    for lev in (0, 4, 9):
        i = torch.full((n,), lev)
        loss = lambda m: N.dsm_loss(m, m.sigmas, x, i, z).mean().item()
        best, sigma = loss(GaussScore(cfg)), float(N.make_sigmas(cfg)[lev])
        # E 1/2 ||sigma s* + z||^2 = D/2 S0^2 / (S0^2 + sigma^2) for x~ = x + sigma z
        assert best == pytest.approx(S0 ** 2 / (S0 ** 2 + sigma ** 2), rel=0.01)
        # any other s raises it by 1/2 sigma^2 E ||s - s*||^2: scale c: (c - 1)^2 sigma^2 / v (D = 2, v = S0^2 + sigma^2), shift b: sigma^2 b^2
        v, b = S0 ** 2 + sigma ** 2, 0.2 / sigma
        for worse, excess in ((GaussScore(cfg, 0.8), 0.04 * sigma ** 2 / v), (GaussScore(cfg, 1.2), 0.04 * sigma ** 2 / v),
                              (GaussScore(cfg, 1.0, b), sigma ** 2 * b ** 2)):
            assert loss(worse) - best == pytest.approx(excess, rel=0.1, abs=2e-5)


def test_trace_exact_is_the_jacobian_trace_and_sliced_is_unbiased(one_thread):
    torch.manual_seed(0)
    model = N.ScoreMLP(small_cfg(hidden=16))
    with torch.no_grad():
        for e in model.embed:
            e.weight.normal_()
    x, i = torch.randn(4, 2).requires_grad_(True), torch.tensor([0, 3, 6, 9])
    tr = N.trace_exact(model(x, i), x)
    jac = [torch.autograd.functional.jacobian(lambda u: model(u[None], i[k:k + 1])[0], x[k].detach()) for k in range(4)]
    assert torch.allclose(tr, torch.stack([j.trace() for j in jac]), atol=1e-6)
    # many projections v ~ N(0, I): the mean of v^T J v goes to tr(J); Monte-Carlo std of the mean ~ sqrt(2 / n) ||J||_F
    n = 40000
    xr, ir = x.detach().repeat(n, 1).requires_grad_(True), i.repeat(n)
    sliced = N.trace_sliced(model(xr, ir), xr, torch.randn(4 * n, 2)).view(n, 4).mean(0)
    frob = torch.stack([j.norm() for j in jac])
    assert ((sliced - tr.detach()).abs() < 4 * frob * math.sqrt(2 / n)).all()
    # the two losses at the same x~: ssm with many particles -> esm
    torch.manual_seed(3)
    esm = N.esm_loss(model, model.sigmas, x.detach(), i)
    torch.manual_seed(3)
    ssm = N.ssm_loss(model, model.sigmas, x.detach(), i, n_particles=n)
    assert torch.allclose(ssm, esm, atol=0.05 * esm.abs().max().item())


# ----------------------------------------------------------------------------- sampling
def test_step_sizes_follow_algorithm_1_and_each_level_runs_T_steps():
    sigmas = N.make_sigmas(small_cfg())
    alpha = N.step_sizes(sigmas, 2e-5)
    assert alpha.dtype == torch.float64 and torch.allclose(alpha, 2e-5 * sigmas ** 2 / 0.01 ** 2, rtol=1e-12)
    assert sigmas[0].item() == pytest.approx(5.0) and sigmas[-1].item() == pytest.approx(0.01)
    assert torch.allclose(sigmas[1:] / sigmas[:-1], sigmas[1] / sigmas[0])  # geometric
    calls = []
    zero = lambda x, i: calls.append(i) or torch.zeros_like(x)  # no drift: a level adds T alpha_i of variance
    torch.manual_seed(0)
    x0 = torch.zeros(20000, 2)
    x, snaps = N.annealed_langevin(zero, x0, sigmas[:3], 1e-3, 5, keep=20000)
    assert calls == [0] * 5 + [1] * 5 + [2] * 5
    prev = x0
    for k, snap in enumerate(snaps):
        assert (snap - prev).var().item() == pytest.approx(5 * N.step_sizes(sigmas[:3], 1e-3)[k].item(), rel=0.04)
        prev = snap


def test_annealed_langevin_with_the_exact_score_samples_the_data_and_denoising_is_tweedie():
    cfg = small_cfg(eps=1e-4, T=100)
    score = lambda x, i: GaussScore(cfg)(x, torch.full((len(x),), i))
    torch.manual_seed(0)
    x, _ = N.annealed_langevin(score, N.init_x(20000, (2,), "cpu"), N.make_sigmas(cfg), cfg.eps, cfg.T)
    # tolerance: mean within 0.03 (its std ~0.004); variance within 5% (Algorithm 1 anneals through levels it does not fully mix)
    assert torch.allclose(x.mean(0), MU, atol=0.03)
    assert torch.allclose(x.var(0), torch.full((2,), S0 ** 2), rtol=0.05)
    # the final step x + sigma_L^2 s(x, sigma_L) = E[x_0 | x~] of Bayes' rule for x_0 ~ N(MU, S0^2), x~ = x_0 + sigma_L z
    x_tilde, sigma_L = torch.randn(7, 2), 0.01
    posterior_mean = (MU / S0 ** 2 + x_tilde / sigma_L ** 2) / (1 / S0 ** 2 + 1 / sigma_L ** 2)
    assert torch.allclose(N.denoise_step(score, x_tilde, sigma_L, cfg.L), posterior_mean, atol=1e-5)


# ----------------------------------------------------------------------------- networks
def test_networks_shapes_conditioning_and_ncsnv2_scaling(one_thread):
    torch.manual_seed(0)
    x, i = torch.rand(3, 1, 8, 8), torch.tensor([0, 5, 9])
    for arch in ("ncsn", "ncsnv2"):
        net = N.ScoreNet(small_cfg(arch=arch, sigma_1=1.0), (1, 8, 8)).eval()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, N.CondNorm):
                    m.embed.weight.normal_()  # levels differ from the start
            out = net(x, i)
            same = net(x[:1].expand(3, -1, -1, -1), i)  # one image at three noise levels
        assert out.shape == x.shape and torch.isfinite(out).all()
        scaled = same * net.sigmas[i].view(-1, 1, 1, 1)
        if arch == "ncsnv2":  # s_theta(x) / sigma: sigma s_theta(x, sigma) does not depend on sigma
            assert torch.allclose(scaled, scaled[:1].expand_as(scaled), atol=1e-5)
        else:
            assert not torch.allclose(scaled, scaled[:1].expand_as(scaled), atol=1e-3)
    net = N.ScoreNet(small_cfg(ngf=4), (3, 32, 32))
    assert net(torch.rand(2, 3, 32, 32), torch.tensor([1, 2])).shape == (2, 3, 32, 32)
    # conditional instance norm++: with alpha = 0 it is instance norm with gamma, beta
    norm = N.CondNorm(4, 2)
    with torch.no_grad():
        norm.embed.weight[:, 4:8] = 0
    h = torch.randn(2, 4, 5, 5) * 3 + 1
    gamma, beta = norm.embed.weight[1, :4], norm.embed.weight[1, 8:]
    ref = gamma[:, None, None] * (h - h.mean((2, 3), keepdim=True)) / (h.var((2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt() + beta[:, None, None]
    assert torch.allclose(norm(h, torch.tensor([1, 1])), ref, atol=1e-5)


# ----------------------------------------------------------------------------- learning
def test_seeded_toy_run_lowers_the_loss_and_reaches_a_score_error(one_thread):
    """8gaussians, 5000 steps of DSM: the score error relative to a zero score (1.0 untrained) must fall below 0.3."""
    torch.manual_seed(0)
    cfg = small_cfg(hidden=64, layers=3, T=20, eps=1e-4)
    model = N.ScoreMLP(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    held = N.common.toy_sample("8gaussians", 4000, torch.Generator().manual_seed(9))
    z, i = torch.randn(4000, 2, generator=torch.Generator().manual_seed(8)), torch.arange(4000) % cfg.L
    held_loss = lambda: N.dsm_loss(model, model.sigmas, held, i, z).mean().item()
    before = held_loss()
    for _ in range(5000):
        loss, terms = N.loss_fn(model, model.sigmas, N.common.toy_sample("8gaussians", 256, gen), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < before - 0.1 and set(terms) == {"loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"}
    run = N.common.Run(torch.device("cpu"), None, 0, 1, None, True, True)
    err = N.score_error(model, cfg, run, n=4000)
    assert err["score_error_rel"] < 0.3, err


def test_mmd_is_zero_in_expectation_for_one_distribution_and_positive_between_two():
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g), torch.randn(1500, 2, generator=g) + 0.5
    assert abs(N.mmd2(a, b)) < 0.005 < N.mmd2(a, c)


# ----------------------------------------------------------------------------- CLI
def test_presets_are_the_papers_and_arch_ncsnv2_takes_ncsnv2s():
    parse = lambda *argv: N.common.parse_config(N.Config, N.presets_for(list(argv)), "ncsn", argv=list(argv))
    c = parse("--dataset", "cifar10")
    assert (c.sigma_1, c.sigma_L, c.L, c.T, c.eps, c.ngf, c.lr, c.batch_size, c.ema, c.denoise, c.hflip) == \
        (1.0, 0.01, 10, 100, 4e-5, 128, 1e-3, 128, 0.0, False, True)
    c = parse("--dataset", "cifar10", "--arch", "ncsnv2")
    assert (c.sigma_1, c.L, c.T, c.eps, c.lr, c.ema, c.denoise, c.dequantize, c.steps) == (50.0, 232, 5, 1.24e-5, 1e-4, 0.999, True, False, 300_000)
    c = parse("--dataset", "moons", "--arch=ncsnv2", "--T", "3")
    assert (c.sigma_1, c.T, c.denoise, c.hidden) == (5.0, 3, True, 128)


def call_main(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["ncsn.py", *argv])
    return N.main()


def test_cli_toy_train_resume_eval_sample(tmp_path, monkeypatch, capsys):
    out = tmp_path / "toy"
    flags = ["--dataset", "8gaussians", "--out", str(out), "--hidden", "16", "--layers", "2", "--batch-size", "64", "--T", "2",
             "--eval-samples", "200", "--eval-n", "400", "--grid", "300", "--eval-batch", "200", "--log-every", "5"]
    p = run_script(PYTHON, "ncsn.py", "--steps", "10", "--objective", "ssm", *flags)
    assert p.returncode == 0, p.stderr
    assert "step 10/10 | loss" in p.stdout and "loss_q3" in p.stdout and "| ssm |" in p.stdout
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["split"] == "test" and rec["test_nll"] is None and rec["kind"] is None and rec["unit"] == "nats" and rec["n_test"] == 400
    assert rec["nfe"] == 20 and len(rec["dsm_levels"]) == 10 and rec["mmd2"] > rec["mmd2_floor"] and 0 < rec["score_error_rel"]
    assert (out / "samples_10.png").is_file() and (out / "anneal_10.png").is_file()
    call_main(monkeypatch, "--steps", "12", "--resume", "--objective", "esm", *flags)
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 10" in text and "step 12/12" in text and "| esm |" in text
    call_main(monkeypatch, "--sample", "100", "--denoise", "--ckpt", str(out / "ckpt.pt"))
    assert "100 samples in" in (text := capsys.readouterr().out) and "21 network evaluations each: L 10 x T 2 + 1 denoising" in text
    assert (out / "sample.png").is_file() and (out / "anneal.png").is_file()
    call_main(monkeypatch, "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-samples", "0")
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 12 and "mmd2" not in rec and rec["dsm"] > 0


def test_cli_images_ncsnv2_and_bad_flags(tmp_path, fake_fashion, fd_cache, monkeypatch, capsys):
    out = tmp_path / "img"
    flags = ["--data-dir", fake_fashion, "--cache-dir", fd_cache, "--out", str(out), "--ngf", "4", "--batch-size", "8", "--L", "3",
             "--T", "1", "--eval-n", "16", "--eval-samples", "16", "--grid", "4", "--eval-batch", "16", "--log-every", "1"]
    call_main(monkeypatch, "--steps", "2", "--arch", "ncsnv2", *flags)
    text = capsys.readouterr().out
    assert "ScoreNet (ncsnv2)" in text and "+ denoise" in text  # the ncsnv2 presets add NCSNv2's denoising step
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["unit"] == "bpd" and rec["fd"] > 0 and 1 <= rec["is_like"] <= 10 and rec["nfe"] == 4 and rec["samples"] == 16
    assert (out / "anneal_2.png").is_file() and (out / "samples_2.png").is_file()
    base = ["--data-dir", fake_fashion, "--out", str(tmp_path / "bad"), "--steps", "1"]
    for argv, msg in ((["--L", "1"], "--L 1 out of range; accepted: integers >= 2"),
                      (["--sigma-1", "0.001"], "accepted sigma_1 > sigma_L > 0"),
                      (["--objective", "esm"], "--objective esm takes one backward pass per dimension"),
                      (["--objective", "nce"], "--objective 'nce' unknown; accepted: dsm, ssm, esm"),
                      (["--eps", "-1"], "accepted eps > 0"),
                      (["--dataset", "moving-mnist"], "ncsn.py models images and 2D data")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *base, *argv)
