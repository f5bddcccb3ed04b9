"""nvae.py: the residual-normal KL against the generic Gaussian KL and Monte Carlo, the per-group KLs (zero when q = p),
power iteration against the exact spectral norm, the logistic mixture's normalisation, the importance-sampled
estimate against the -ELBO, temperature-0 sampling, batch-norm readjustment on a copy, learning and the command line."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import nvae
from conftest import PYTHON, rectangles, run_script


def small_cfg(**kw):
    base = dict(channels=4, latent_scales=2, groups_per_scale=2, latent_per_group=3, pre_blocks=1, pre_cells=1, post_blocks=1,
                post_cells=1, cells_enc=1, cells_dec=1, mixtures=2, steps=100, batch_size=16, warmup=10, eval_n=0, eval_k=4)
    return nvae.Config(**{**base, **kw})


def test_residual_normal_kl_equals_the_gaussian_kl_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    d_mu, log_d_sig, mu_p, log_sig_p = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(4))
    kl = nvae.residual_normal_kl(d_mu, log_d_sig, log_sig_p)
    q = torch.distributions.Normal(mu_p + d_mu, (log_sig_p + log_d_sig).exp())
    p = torch.distributions.Normal(mu_p, log_sig_p.exp())
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p), atol=1e-12)
    z = q.sample((20000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    se = (q.log_prob(z) - p.log_prob(z)).std(0) / math.sqrt(20000)
    assert ((mc - kl).abs() < 5 * se + 1e-9).float().mean() > 0.99


def test_group_kls_add_up_and_vanish_when_q_equals_p(one_thread):
    torch.manual_seed(0)
    cfg = small_cfg()
    model = nvae.NVAE(cfg, (1, 8, 8)).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    alpha = nvae.balance_alpha(model.groups).double()
    torch.manual_seed(1)
    out, kls, log_qs, log_ps, ch = model.infer(x)
    torch.manual_seed(1)
    loss, terms = model(x, torch.tensor(1.0, dtype=torch.float64), alpha, False, cfg)
    assert len(kls) == 4 and torch.allclose(terms["kl"], torch.stack(kls, 1).sum(1).mean())
    assert torch.allclose(terms["nelbo"], terms["recon"] + terms["kl"])
    assert all(torch.allclose(c.sum(), k.mean()) for c, k in zip(ch, kls))  # per-channel KLs add up to the group's
    with torch.no_grad():  # the encoder outputs dmu = 0, log dsigma = 0: q = p in every group
        for conv in model.q_samplers:
            conv.weight.zero_(), conv.bias.zero_()
    _, kls, log_qs, log_ps, _ = model.infer(x)
    assert all((k == 0).all() for k in kls) and all(torch.allclose(a, b) for a, b in zip(log_qs, log_ps))


def test_power_iteration_finds_the_largest_singular_value_of_every_conv(one_thread):
    torch.manual_seed(0)
    model = nvae.NVAE(small_cfg(), (1, 8, 8)).double()
    total = nvae.spectral_norm_sum(model, 50)  # 500 iterations the first time
    exact = [torch.linalg.matrix_norm(m.normalized_weight().flatten(1), ord=2) for m in model.modules() if isinstance(m, nvae.Conv)]
    est = [m.sr_u @ m.normalized_weight().flatten(1) @ m.sr_v for m in model.modules() if isinstance(m, nvae.Conv)]
    assert len(exact) > 30 and all(torch.isclose(e, s, rtol=1e-4) for e, s in zip(exact, est))
    assert torch.isclose(total, sum(exact), rtol=1e-4)
    total.backward()  # s = u^T W v is differentiable in W (u, v fixed)
    assert model.stem.log_weight_norm.grad.abs().sum() > 0


@pytest.mark.parametrize("C", (1, 3))
def test_mixture_likelihood_sums_to_one_over_the_256_values(C):
    M = 3
    g = torch.Generator().manual_seed(C)
    params = torch.randn(1, (3 if C == 1 else 10) * M, 1, 1, generator=g, dtype=torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    if C == 1:
        total = nvae.disc_mix_logistic_log_prob(values.view(256, 1, 1, 1), params.expand(256, -1, -1, -1), M).exp().sum()
    else:  # all 256^3 colours, one red value at a time
        gb = torch.cartesian_prod(values, values)  # (65536, 2)
        total = 0
        for r in values:
            x = torch.cat([r.expand(len(gb), 1), gb], 1)[:, :, None, None]
            total = total + nvae.disc_mix_logistic_log_prob(x, params.expand(len(gb), -1, -1, -1), M).exp().sum()
    assert abs(total.item() - 1) < 1e-9


def test_importance_sampling_is_below_the_elbo_and_k1_is_the_sampled_elbo(one_thread):
    torch.manual_seed(0)
    model = nvae.NVAE(small_cfg(), (1, 8, 8)).double().eval()
    x = rectangles(6, 0).double() / 255
    with torch.no_grad():
        draws = [model.infer(x) for _ in range(400)]
    nelbo = torch.stack([-model.log_px_z(x, o) + sum(k) for o, k, _, _, _ in draws])  # (400, B), analytic KLs
    log_w = torch.stack([model.log_px_z(x, o) - sum(q) + sum(p) for o, _, q, p, _ in draws])  # k = 1 estimates
    se = log_w.std(0) / math.sqrt(400)
    assert ((-log_w.mean(0) - nelbo.mean(0)).abs() < 4 * se + 4 * nelbo.std(0) / math.sqrt(400)).all()  # E[-log w] = -ELBO
    is_400 = -(torch.logsumexp(log_w, 0) - math.log(400))
    assert (is_400 <= nelbo.mean(0)).all()


def test_temperature_zero_is_deterministic_and_readjustment_uses_a_copy(one_thread):
    torch.manual_seed(0)
    model = nvae.NVAE(small_cfg(), (1, 8, 8)).eval()
    torch.manual_seed(1)
    a = nvae.sample(model, 3, torch.device("cpu"), t=0.0)
    torch.manual_seed(2)
    b = nvae.sample(model, 3, torch.device("cpu"), t=0.0)
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    c = nvae.sample(model, 3, torch.device("cpu"), t=1.0)
    assert not torch.equal(a, c) and a.shape == (3, 1, 8, 8) and 0 <= c.min() and c.max() <= 1
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    copy = nvae.readjusted(model, 5, 1.0)
    after = {k: v for k, v in copy.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert any(not torch.equal(v, after[k]) for k, v in before.items()) and not copy.training


def test_a_short_run_lowers_the_bound(one_thread):
    """Rectangles on 8x8 images: 150 seeded steps take the test -ELBO a quarter below the first batch's (3.2 -> 2.07 bpd)."""
    torch.manual_seed(0)
    data = common.Data("synthetic", "image", (1, 8, 8), rectangles(1024, 0), rectangles(64, 1))
    cfg = small_cfg(steps=150, lr=1e-2, eval_k=2, out="/tmp/unused")
    run, model = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True), nvae.NVAE(cfg, data.shape)
    opt = torch.optim.Adamax(model.parameters(), lr=cfg.lr, eps=1e-3, weight_decay=cfg.weight_decay)
    batches, alpha, first = common.Batches(data, cfg, run), nvae.balance_alpha(model.groups), None
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = nvae.lr_at(step, cfg, cfg.warmup)
        beta = nvae.kl_weight(step, cfg)
        loss, terms = model(next(batches), torch.tensor(beta), alpha, beta < 1, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or terms["bpd"].item()
    rec = nvae.evaluate(model, data, cfg, run, cfg.steps)
    assert rec["kind"] == "estimate" and rec["nelbo_kind"] == "bound" and len(rec["kl_per_group"]) == 4
    assert rec["nelbo"] < 0.75 * first and rec["test_nll"] <= rec["nelbo"] + 0.01, (first, rec)


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--channels", "4", "--latent-per-group", "2", "--mixtures", "2",
            "--pre-cells", "1", "--post-cells", "1", "--batch-size", "8", "--eval-n", "16", "--eval-k", "2", "--log-every", "1",
            "--readjust-bn", "2", "--device", "cpu"]
    p = run_script(PYTHON, "nvae.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "kl_per_group" in p.stdout, p.stdout
    for name in ("ckpt.pt", "config.json", "recon_2.png", "samples_2_t1.png", "samples_2_t0.7.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "nvae.py", "--steps", "3", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "nvae.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-k", "3", "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 3 and rec["kind"] == "estimate" and rec["k"] == 3 and rec["unit"] == "bpd" and rec["n_test"] == 16
    assert 0 < rec["test_nll"] and math.isfinite(rec["nelbo"]) and rec["groups"] == [2, 2]
    p = run_script(PYTHON, "nvae.py", "--sample", "9", "--temperature", "0.6", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and "images/s" in p.stdout and (out / "sample_t0.6.png").is_file(), p.stderr


def test_bad_flags_stop_with_one_clear_line(tmp_path, fake_fashion):
    parse = lambda *a: nvae.train(common.parse_config(nvae.Config, nvae.PRESETS, nvae.METHOD,
                                                      ["--data-dir", fake_fashion, "--out", str(tmp_path / "r"), *a]))
    with pytest.raises(SystemExit, match="--latent-per-group 0 out of range; accepted: integers >= 1"):
        parse("--latent-per-group", "0")
    with pytest.raises(SystemExit, match="--pre-blocks 2 and --post-blocks 1 must match"):
        parse("--pre-blocks", "2")
    with pytest.raises(SystemExit, match="an even padding brings to a multiple of .* = 4; got 9x9"):
        nvae.NVAE(small_cfg(), (1, 9, 9))
    with pytest.raises(SystemExit, match="--kl-min in"):
        parse("--kl-min", "0")
    with pytest.raises(SystemExit, match="nvae.py models images; --dataset moons holds toy data"):
        parse("--dataset", "moons")
