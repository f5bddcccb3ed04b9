"""ddim.py: eta = 1 is DDPM's ancestral step (full and respaced), eta = 0 is deterministic, encode -> decode returns
x_0 with the exact Gaussian-data model, fp32 constants against fp64, the sub-sequences (quadratic: the exact integer
formula), slerp, learning, and the command line (also from a ddpm.py checkpoint)."""
import json
import math

import pytest
import torch

import common
import ddim
import ddpm
from conftest import PYTHON, run_script

F64 = torch.float64


def schedules(T=1000):
    """The same linear schedule in both files, fp64."""
    return ddim.make_schedule(ddim.Config(T=T), F64), ddpm.Schedule(ddpm.linear_betas(T, 1e-4, 0.02), dtype=F64)


class GaussianOptimum(torch.nn.Module):
    """The exact E[eps|x_t] for data N(0, s^2 I): eps* = sqrt(1 - alpha_bar) x_t / (alpha_bar s^2 + 1 - alpha_bar)."""

    def __init__(self, alpha_bar, s):
        super().__init__()
        self.alpha_bar, self.s2 = alpha_bar, s * s

    def forward(self, x, t):
        ab = self.alpha_bar[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * x / (ab * self.s2 + 1 - ab)


def test_eta_one_takes_the_ddpm_ancestral_step_with_beta_tilde():
    """sigma_t(1)^2 = beta_tilde_t, and the DDIM update equals mu_theta + sqrt(beta_tilde) z for the same eps and z;
    on a sub-sequence tau it is the DDPM step of the respaced chain (betas 1 - alpha_bar_{tau_i}/alpha_bar_{tau_{i-1}})."""
    sc, dp = schedules()
    t = torch.tensor([2, 3, 10, 300, 999, 1000])
    assert torch.allclose(ddim.ddim_sigma(sc, t, t - 1, 1.0).flatten() ** 2, dp.beta_tilde[t], rtol=1e-10)
    x_t, eps, z = (torch.randn(6, 2, 3, 3, dtype=F64) for _ in range(3))
    mean, log_var = ddpm.p_mean_variance(dp, eps, x_t, t, "beta_tilde")
    assert torch.allclose(ddim.ddim_step(sc, x_t, eps, t, t - 1, 1.0, z), mean + torch.exp(0.5 * log_var) * z, atol=1e-12)
    one = torch.tensor([1])  # t = 1: DDPM returns the mean; DDIM goes to alpha_bar_0 = 1 with sigma = 0
    assert torch.allclose(ddim.ddim_step(sc, x_t[:1], eps[:1], one, one - 1, 1.0, z[:1]),
                          ddpm.p_mean_variance(dp, eps[:1], x_t[:1], one, "beta_tilde")[0], atol=1e-12)
    tau = ddim.make_tau(1000, 10, "uniform")
    ab = sc.alpha_bar[tau]
    re = ddpm.Schedule(1 - ab / torch.cat([torch.ones(1, dtype=F64), ab[:-1]]), steps=tau, dtype=F64)
    i = torch.tensor([2, 5, 10])  # indices into the respaced chain
    mean, log_var = ddpm.p_mean_variance(re, eps[:3], x_t[:3], i, "beta_tilde")
    assert torch.allclose(ddim.ddim_step(sc, x_t[:3], eps[:3], tau[i - 1], tau[i - 2], 1.0, z[:3]),
                          mean + torch.exp(0.5 * log_var) * z[:3], atol=1e-12)


def test_eta_one_sampler_equals_ddpm_sampler_and_eta_zero_is_deterministic():
    sc, dp = ddim.make_schedule(ddim.Config(T=50)), ddpm.Schedule(ddpm.linear_betas(50, 1e-4, 0.02))  # fp32: same draws
    model, tau = GaussianOptimum(sc.alpha_bar, 0.4), ddim.make_tau(50, 50, "uniform")
    torch.manual_seed(3)
    ref = ddpm.sample(model, dp, (1, 3, 3), 5, "beta_tilde")  # draws x_T, then the noise of t = T..2, in that order
    torch.manual_seed(3)
    x_T = torch.randn(5, 1, 3, 3)
    assert torch.allclose(ddim.sample(model, sc, tau, x_T, 1.0), ref, atol=1e-5)
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outs.append([ddim.sample(model, sc, tau[::5], x_T.double(), eta) for eta in (0.0, 0.5)])
    assert torch.equal(outs[0][0], outs[1][0])  # eta = 0: x_T fixes x_0
    assert not torch.allclose(outs[0][1], outs[1][1])  # eta > 0: the noise matters


def test_eta_zero_samples_the_data_distribution_with_the_optimal_model():
    """With eps* of N(0, s^2) data, DDIM's deterministic map takes N(0, I) to N(0, s^2) as S grows (1000 steps: within
    2%; 100 steps within 10%: measured 0.9992 and 0.918 of s^2)."""
    sc, _ = schedules()
    model, s = GaussianOptimum(sc.alpha_bar, 0.3), 0.3
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for S, tol in ((1000, 0.02), (100, 0.1)):
        x = ddim.sample(model, sc, ddim.make_tau(1000, S, "uniform"), x_T, 0.0) * 2 - 1
        assert abs(x.mean()) < 0.02 and abs(x.var() / s ** 2 - 1) < tol, (S, x.var().item() / s ** 2)


def test_encode_then_decode_returns_x0():
    """x_0 -> x_T (eta = 0 run forwards) -> x_0 with the exact model: error per dimension on [0, 1] falls with S,
    below 1e-5 at S = 1000 (the DDIM paper's Table 2 property); x_T looks like N(0, I) noise."""
    sc, _ = schedules()
    model = GaussianOptimum(sc.alpha_bar, 0.3)
    x0 = (torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.3).clamp(-1, 1)
    err = {}
    for S in (20, 100, 1000):
        tau = ddim.make_tau(1000, S, "uniform")
        x_T = ddim.encode(model, sc, tau, x0)
        err[S] = (ddim.sample(model, sc, tau, x_T, 0.0) - (x0 + 1) / 2).pow(2).mean().item()
        if S == 1000:
            assert abs(x_T.var() - 1) < 0.1 and abs(x_T.mean()) < 0.05
    assert err[1000] < 1e-5 and err[1000] < err[100] < err[20], err


def test_fp32_schedule_is_fp64_rounded_once():
    """fp32 against fp64 (cosine T = 4000, linear T = 1000): q_sample's sqrt(1 - alpha_bar_t) and f_theta's
    1/sqrt(alpha_bar_t) and sqrt(1/alpha_bar_t - 1) within 1e-6 at every t (before: 1.4e-3 near t = 1); sigma_t(eta = 1)
    within 2e-6 on 50 uniform steps and 1e-4 on adjacent steps (measured 5.4e-7 and 5.5e-5, the fp32 floor of
    1 - a_t/a_s from a stored log alpha_bar; before: 1.4e-3 and 1.6e-3); a DDIM step (eta 0 and 1) within 1.5e-6 where
    1 - alpha_bar_t < 0.01 (measured 7.5e-7; before 1.3e-5)."""
    g = torch.Generator().manual_seed(0)
    for betas in (ddpm.cosine_betas(4000), ddpm.linear_betas(1000, 1e-4, 0.02)):
        T, sc, s64 = len(betas), ddim.Schedule(betas), ddim.Schedule(betas, F64)
        ab = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(1 - betas, 0)])  # alpha_bar_0..T in fp64
        t, one, zero = torch.arange(1, T + 1), torch.ones(T, 1, 1, 1), torch.zeros(T, 1, 1, 1)
        rel = lambda x, ref: ((x.flatten().double() - ref) / ref).abs().max()
        assert rel(ddim.q_sample(sc, zero, t, one), (1 - ab[1:]).sqrt()) < 1e-6
        assert rel(ddim.predict_x0(sc, one, zero, t), ab[1:].rsqrt()) < 1e-6
        assert rel(-ddim.predict_x0(sc, zero, one, t), ((1 - ab[1:]) / ab[1:]).sqrt()) < 1e-6
        sigma = lambda t, s: ((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])).sqrt()
        tau = ddim.make_tau(T, 50, "uniform")
        assert rel(ddim.ddim_sigma(sc, tau[1:], tau[:-1], 1.0), sigma(tau[1:], tau[:-1])) < 2e-6
        assert rel(ddim.ddim_sigma(sc, t[1:], t[:-1], 1.0), sigma(t[1:], t[:-1])) < 1e-4
        x, eps, z = (torch.randn(T, 1, 4, 4, generator=g) for _ in range(3))
        for eta in (0.0, 1.0):
            ref = ddim.ddim_step(s64, x.double(), eps.double(), t, t - 1, eta, z.double())
            err = ddim.ddim_step(sc, x, eps, t, t - 1, eta, z).double() - ref
            assert err[1 - ab[1:] < 0.01].abs().max() < 1.5e-6, (T, eta)


def test_quadratic_tau_is_the_exact_integer_formula():
    """tau_i = floor(4 T i^2 / (5 (S - 1)^2)) + 1, i = 0..S-1, duplicates removed, for every S in 1..T (T = 1000)."""
    T = 1000
    for S in range(1, T + 1):
        ref = sorted({4 * T * i * i // (5 * max(S - 1, 1) ** 2) + 1 for i in range(S)})
        assert ddim.make_tau(T, S, "quadratic").tolist() == ref, S
    tau = ddim.make_tau(T, 16, "quadratic") - 1  # 0-based t as the official code: (i sqrt(800) / 15)^2 = 32 i^2 / 9
    assert 32 in tau and 128 in tau and 31 not in tau and 127 not in tau  # i = 3, 6 (a float square floors to 31, 127)


def test_sub_sequences_and_slerp():
    assert torch.equal(ddim.make_tau(1000, 10, "uniform"), torch.arange(1, 1000, 100))
    assert torch.equal(ddim.make_tau(1000, 1000, "uniform"), torch.arange(1, 1001))
    q = ddim.make_tau(1000, 50, "quadratic")
    assert q[0] == 1 and q[-1] == 801 and (q.diff() > 0).all() and q.diff()[-1] > 10 * q.diff()[0]  # widening gaps
    z1, z2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(ddim.slerp(z1, z2, 0.0), z1, atol=1e-5) and torch.allclose(ddim.slerp(z1, z2, 1.0), z2, atol=1e-5)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(ddim.slerp(a, b, 0.5), torch.tensor([[1.0, 1.0]]) / math.sqrt(2))  # on the circle, not the chord


def test_a_short_run_lowers_the_loss():
    torch.manual_seed(0)
    cfg = ddim.resolve(ddim.Config(T=100, channels=16, ch_mult="1,2", res_blocks=1, attn_res="4", dropout=0.0, lr=2e-3))
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(512, 1, 8, 8)
    x[torch.arange(512), 0, torch.randint(8, (512,), generator=g)] = 1.0  # a bright bar at a random row
    model, sched = ddim.UNet(cfg, (1, 8, 8)), ddim.make_schedule(cfg)
    opt, losses = torch.optim.Adam(model.parameters(), lr=cfg.lr), []
    for i in range(120):
        loss, terms = ddim.loss_simple(model, sched, x[torch.randint(512, (32,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:5]) / 5, losses[:5] + losses[-5:]
    assert {f"loss_q{i}" for i in range(4)} <= set(terms)


def test_command_line_end_to_end(tmp_path, fake_fashion, fd_cache):
    out, net = tmp_path / "run", ["--channels", "8", "--ch-mult", "1,2", "--res-blocks", "1", "--attn-res", "14", "--T", "20"]
    args = ["--data-dir", fake_fashion, "--out", str(out), "--cache-dir", fd_cache, *net, "--batch-size", "8", "--eval-n", "4", "--eval-samples", "4",
            "--grid", "4", "--log-every", "1", "--device", "cpu", "--steps-sample", "5"]
    p = run_script(PYTHON, "ddim.py", "--steps", "2", *args)
    assert p.returncode == 0 and "step 2/2 | loss" in p.stdout and (out / "samples_2.png").is_file(), p.stdout + p.stderr
    p = run_script(PYTHON, "ddim.py", "--steps", "3", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 3 and rec["test_nll"] is None and rec["kind"] is None and rec["nfe"] == 5 and rec["S"] == 5
    assert rec["n_test"] == 4 and 0 <= rec["recon_mse"] < 1 and rec["test_loss_simple"] > 0 and math.isfinite(rec["fd"])
    p = run_script(PYTHON, "ddim.py", "--ckpt", str(out / "ckpt.pt"), "--sample", "4", "--table", "--table-steps", "2,5",
                   "--table-etas", "0,1", "--interpolate", "2", "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    table = (out / "table.md").read_text().splitlines()
    assert table[2] == "| eta \\ S | 2 | 5 |" and table[4].startswith("| 0 | ") and table[5].startswith("| 1 | "), table
    assert (out / "table.png").is_file() and (out / "interpolate.png").is_file() and (out / "sample.png").is_file()
    # a ddpm.py checkpoint (Improved DDPM: cosine schedule, learned variance) samples here with the eps half of its output
    dp = tmp_path / "ddpm"
    p = run_script(PYTHON, "ddpm.py", "--steps", "1", "--data-dir", fake_fashion, "--out", str(dp), *net, "--improved",
                   "--eval-n", "2", "--eval-samples", "0", "--grid", "2", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    p = run_script(PYTHON, "ddim.py", "--ckpt", str(dp / "ckpt.pt"), "--steps-sample", "4", "--eta", "0", "--out", str(tmp_path / "from"))
    assert p.returncode == 0 and "64 samples, S 4 (uniform), eta 0" in p.stdout, p.stdout + p.stderr
    assert (tmp_path / "from" / "sample.png").is_file()
    for bad, msg in ((["--steps-sample", "50"], "--steps-sample 50 out of range"), (["--eta", "-1"], "--eta -1.0 out of range"),
                     (["--table"], "--table / --interpolate need --sample"), (["--tau", "cubic"], "--tau 'cubic' unknown"),
                     (["--ckpt", str(out / "ckpt.pt"), "--table", "--table-steps", "5,30"], "accepted S in 1..T")):
        with pytest.raises(SystemExit, match=msg):
            ddim.main(["--data-dir", fake_fashion, "--out", str(tmp_path / "bad"), "--T", "20", "--steps-sample", "5", *bad])
    with pytest.raises(SystemExit, match="checkpoint of 'vae'"):
        torch.save({"method": "vae", "config": {}}, tmp_path / "vae.pt")
        ddim.main(["--ckpt", str(tmp_path / "vae.pt")])
