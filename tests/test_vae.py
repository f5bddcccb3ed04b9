"""vae.py: the KL, the likelihoods, the bound on a model with an exact log p(x), the collapse remedies,
learning, a reproduction threshold, and the command line end to end."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import vae
from conftest import PYTHON, linear_gaussian, run_script

def test_kl_equals_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(200_000, 4, 5, generator=g, dtype=torch.float64)
    samples = vae.log_normal(z, mu, logvar) - vae.log_normal(z, torch.zeros_like(z), torch.zeros_like(z))  # log q - log p
    se = samples.std(0) / math.sqrt(len(samples))
    assert ((samples.mean(0) - vae.kl_gaussian(mu, logvar).sum(-1)).abs() < 4 * se).all()
    assert torch.allclose(vae.kl_gaussian(mu, logvar), -0.5 * logvar + 0.5 * logvar.exp() + 0.5 * mu ** 2 - 0.5)  # slide form


def test_discretized_logistic_is_a_distribution_over_256_values():
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1)[:, None]  # every 8-bit value, in [-1, 1]
    mean = torch.tensor([[-1.3, -1.0, -0.2, 0.0, 0.37, 1.0, 2.5, 0.5]], dtype=torch.float64)
    log_scale = torch.tensor([[-8.0, -7.0, -5.0, -3.0, -1.0, 0.0, 1.0, 3.0]], dtype=torch.float64)
    logp = vae.discretized_logistic_log_prob(x, mean, log_scale)  # (256, 8)
    assert torch.allclose(logp.exp().sum(0), torch.ones(8, dtype=torch.float64), atol=1e-10)
    s = log_scale.clamp(min=-7).exp()  # interior bins: CDF differences computed directly
    cdf = lambda v: torch.sigmoid((v - mean) / s)
    assert torch.allclose(logp[1:-1, 3:].exp(), (cdf(x + 1 / 255) - cdf(x - 1 / 255))[1:-1, 3:], atol=1e-12)
    far = vae.discretized_logistic_log_prob(torch.tensor([0.0]), torch.tensor([0.9]), torch.tensor([-7.0]))
    assert torch.isfinite(far).all() and far.item() < -100  # tails stay finite in fp32


def test_elbo_and_importance_sampling_on_an_exact_model():
    torch.manual_seed(0)
    x, log_px_z, log_px, m, logvar = linear_gaussian()
    # exact posterior: every importance weight equals p(x), so even k = 1 is exact, and E[ELBO] = log p(x)
    assert torch.allclose(vae.log_px_importance(x, m, logvar, log_px_z, k=1), log_px, atol=1e-9)
    elbos = torch.stack([vae.elbo(x, m, logvar, log_px_z)[0] for _ in range(4000)])
    assert ((elbos.mean(0) - log_px).abs() < 4 * elbos.std(0) / math.sqrt(4000) + 1e-9).all()
    # a worse encoder: the ELBO is clearly below log p(x) and importance sampling closes the gap as k grows
    mu_bad, logvar_bad = m + 0.7, logvar + 1.0
    elbo_bad = torch.stack([vae.elbo(x, mu_bad, logvar_bad, log_px_z)[0] for _ in range(4000)]).mean(0)
    assert (elbo_bad < log_px - 0.5).all()
    gaps = [(log_px - torch.stack([vae.log_px_importance(x, mu_bad, logvar_bad, log_px_z, k) for _ in range(200)]).mean(0)).mean().item()
            for k in (1, 10, 100, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] > gaps[3] > -0.01 and gaps[3] < 0.05 * gaps[0], gaps
    assert gaps[0] > 0.5  # k = 1 is the (fully Monte-Carlo) ELBO


def test_importance_sampling_is_stable_for_wide_log_weights():
    seen = []

    def log_px_z(x, z):  # log-weights near -5000 nats, spread over hundreds of nats
        seen.append(z.double())
        return -5000.0 - 300.0 * z.pow(2).sum(-1)

    x, mu, logvar = torch.zeros(3, 1), torch.zeros(3, 2), torch.zeros(3, 2)  # q = p(z): log w = log p(x|z)
    est = vae.log_px_importance(x, mu, logvar, log_px_z, k=2000, chunk=300)
    log_w = -5000.0 - 300.0 * torch.cat([z.view(-1, 3, 2) for z in seen]).pow(2).sum(-1)  # (k, B), in fp64
    assert (log_w.max(0).values - log_w.min(0).values > 500).all()
    assert torch.isinf(torch.log(torch.exp(log_w.float()).mean(0))).all()  # the naive mean of weights underflows
    assert torch.isfinite(est).all() and torch.allclose(est.double(), torch.logsumexp(log_w, 0) - math.log(2000), atol=1e-2)


def small_cfg(**kw):
    base = dict(arch="mlp", latent=8, hidden=64, layers=1, act="relu", lr=3e-3, batch_size=64)
    return vae.Config(**{**base, **kw})


def test_free_bits_and_warm_up_change_only_the_kl_weight():
    torch.manual_seed(0)
    model = vae.VAE(small_cfg(binarize=True), (1, 8, 8))
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.3))
    torch.manual_seed(1)
    loss1, t1 = vae.negative_elbo(model, x, beta=1.0)
    torch.manual_seed(1)
    loss0, t0 = vae.negative_elbo(model, x, beta=0.0)
    assert torch.allclose(loss1, t1["recon"] + t1["kl"]) and torch.allclose(loss0, t0["recon"])  # beta weighs the KL
    torch.manual_seed(1)
    loss_fb, t_fb = vae.negative_elbo(model, x, beta=1.0, free_bits=10.0)  # lambda far above any dimension's KL
    assert torch.allclose(loss_fb, t_fb["recon"] + 8 * 10.0) and torch.allclose(t_fb["kl"], t1["kl"])  # -ELBO reported unchanged
    grad_fb = torch.autograd.grad(loss_fb, list(model.enc.parameters()))
    torch.manual_seed(1)
    _, t_r = vae.negative_elbo(model, x)
    grad_recon = torch.autograd.grad(t_r["recon"], list(model.enc.parameters()))
    assert all(torch.allclose(a, b) for a, b in zip(grad_fb, grad_recon))  # a KL under the floor exerts no pull


def synthetic_data(shape, n_train, n_test, seed=0, bars=False):
    """8-bit rectangles, or binary 'bars' (orientation and 8 bars at random: 36 nats for a factorized model)."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    if bars:
        on = (torch.rand(n, 8, generator=g) < 0.25).float()
        horizontal = torch.rand(n, 1, 1, generator=g) < 0.5
        x = torch.where(horizontal, on[:, :, None].expand(n, 8, 8), on[:, None, :].expand(n, 8, 8))[:, None]
        x = (x * 255).to(torch.uint8)
    else:
        x = torch.zeros(n, *shape, dtype=torch.uint8)
        for i in range(n):
            r, c, h = torch.randint(0, shape[1] // 2, (3,), generator=g)
            x[i, :, r:r + h + 2, c:c + h + 2] = torch.randint(100, 256, (1,), generator=g).item()
    return common.Data("synthetic", "image", shape, x[:n_train], x[n_train:])


def fit(cfg, data, steps):
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    torch.manual_seed(cfg.seed)
    model = vae.VAE(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    update, batches, losses = common.Update(opt, model, run), common.Batches(data, cfg, run), []
    for _ in range(steps):
        loss, terms = model(next(batches))
        opt.zero_grad()
        update(loss)
        losses.append(loss.item())
    return model, run, losses


def test_200_steps_lower_the_loss():
    data = synthetic_data((1, 12, 12), 512, 64)
    model, _, losses = fit(small_cfg(), data, 200)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20, (losses[:3], losses[-3:])


def test_reproduction_bars_beat_every_factorized_model():
    """Binary bars: a factorized Bernoulli model needs 64 H(1/4) = 36.0 nats per image (the data's own
    entropy is about 5.2 nats). A VAE whose latents carry the bars must get far below the factorized
    bound: importance-sampled test NLL < 15 nats after 1500 steps (seeded, CPU, a few seconds)."""
    data = synthetic_data((1, 8, 8), 4096, 256, bars=True)
    cfg = small_cfg(binarize=True, latent=8, hidden=128, layers=2, lr=2e-3, eval_k=200)
    model, run, _ = fit(cfg, data, 1500)
    p = data.train.float().mean(0) / 255
    factorized = -(p * p.log() + (1 - p) * (1 - p).log()).sum().item()  # the best factorized model's entropy
    rec = vae.evaluate(model, data, cfg, run, 1500)
    assert 34 < factorized < 38 and rec["unit"] == "nats" and rec["kind"] == "estimate"
    assert rec["test_nll"] < 15.0 and rec["test_nll"] <= rec["nelbo"] + 0.05, rec
    assert rec["active_units"] >= 3  # at least as many used latents as the bars need bits of structure


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    common_args = ["--data-dir", fake_fashion, "--out", str(out), "--hidden", "32", "--latent", "4", "--batch-size", "16",
                   "--eval-n", "32", "--eval-k", "8", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "vae.py", "--steps", "2", *common_args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "test_nll" in p.stdout
    for name in ("ckpt.pt", "config.json", "samples_2.png", "interp_2.png", "recon_2.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "vae.py", "--steps", "4", "--resume", *common_args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/4" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "vae.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-k", "16", "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 4 and rec["split"] == "test" and rec["unit"] == "bpd" and rec["k"] == 16 and rec["n_test"] == 32
    assert 0 < rec["test_nll"] < 8 + 1 and math.isfinite(rec["nelbo"])
    p = run_script(PYTHON, "vae.py", "--sample", "16", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and "images/s" in p.stdout and (out / "sample.png").is_file(), p.stderr
    p = run_script(PYTHON, "vae.py", "--steps", "0")
    assert p.returncode != 0 and "error: --steps 0 out of range" in p.stderr


def test_conv_arch_on_colour_and_grey_images():
    torch.manual_seed(0)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    for shape in ((3, 32, 32), (1, 28, 28)):
        cfg = small_cfg(arch="conv", hidden=8, eval_k=4)
        model = vae.VAE(cfg, shape)
        x = torch.randint(0, 256, (4, *shape)).float() / 255
        loss, terms = model(x)
        assert torch.isfinite(loss) and terms["bpd"] > 0
        assert vae.sample(model, 3, "cpu").shape == (3, *shape) and vae.interpolate(model, x[:2], x[2:], 5).shape == (10, *shape)
        data = common.Data("synthetic", "image", shape, (x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
        rec = vae.evaluate(model, data, cfg, run, 0)
        assert rec["unit"] == "bpd" and math.isfinite(rec["test_nll"]) and rec["n_test"] == 4
    with pytest.raises(SystemExit, match="divisible by 4"):
        vae.VAE(small_cfg(arch="conv"), (3, 30, 30))


# ----------------------------------------------------------------------------- posterior collapse: decoder and remedies
def test_pixelcnn_decoder_is_causal_and_normalised():
    """Every pixel's logit has exactly zero gradient w.r.t. itself and every later pixel (raster order) and depends
    on some earlier one; on 2x2 binary images the 16 probabilities p(x|z) sum to 1 for any z."""
    torch.manual_seed(0)
    dec = vae.PixelCNNDecoder(K=3, channels=8, layers=3, n_out=1).double()
    z = torch.randn(1, 3, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            x = torch.randn(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
            g, = torch.autograd.grad(dec(x, z)[0, 0, i, j], x)
            later = torch.arange(25).view(5, 5) >= i * 5 + j
            assert g[0, 0][later].abs().max() == 0 and (i + j == 0 or g[0, 0][~later].abs().max() > 0), (i, j)
    cfg = small_cfg(binarize=True, decoder="pixelcnn", ar_layers=3, ar_channels=8, latent=3)
    model = vae.VAE(cfg, (1, 2, 2)).double()
    xs = torch.tensor([[(b >> k) & 1 for k in range(4)] for b in range(16)], dtype=torch.float64).view(16, 1, 2, 2)
    for zz in torch.randn(3, 3, dtype=torch.float64):
        total = model.log_px_z(xs, zz.expand(16, 3)).exp().sum()
        assert abs(total.item() - 1) < 1e-10
    draws = model.mean_image(torch.randn(5, 3, dtype=torch.float64))  # pixel-by-pixel ancestral samples
    assert draws.shape == (5, 1, 2, 2) and set(draws.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(SystemExit, match="one-channel"):
        vae.VAE(small_cfg(decoder="pixelcnn"), (3, 8, 8))


def test_mmd_imq_is_the_unbiased_statistic_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64) + 1
    k = lambda x, y: sum(2 * 3 * s / (2 * 3 * s + (x - y).pow(2).sum()) for s in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))
    pairs = lambda u, v: [k(u[i], v[j]) for i in range(6) for j in range(6)]
    within = lambda u: sum(k(u[i], u[j]) for i in range(6) for j in range(6) if i != j) / 30
    by_hand = within(a) + within(b) - 2 * sum(pairs(a, b)) / 36  # Tolstikhin et al.'s estimator, term by term
    assert vae.mmd_imq(a, b).item() == pytest.approx(by_hand.item(), rel=1e-10)
    same = [vae.mmd_imq(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)).item() for _ in range(5)]
    shifted = vae.mmd_imq(torch.randn(400, 8, generator=g) + 0.5, torch.randn(400, 8, generator=g)).item()
    assert abs(sum(same) / 5) < 0.01 and shifted > 10 * max(abs(v) for v in same)  # unbiased: ~0 on equal laws


def test_mutual_information_bounds():
    """I_q = 0 when every q(z|x) is p(z); I_q -> log B when the B posteriors are far apart (each z names its x)."""
    torch.manual_seed(0)
    B, K = 1000, 2
    none = vae.mutual_info(torch.zeros(B, K), torch.zeros(B, K)).item()
    apart = vae.mutual_info(torch.randn(B, K) * 100, torch.full((B, K), -6.0)).item()
    assert abs(none) < 0.05 and apart == pytest.approx(math.log(B), abs=0.05), (none, apart)
    # narrow q (a WAE's log var reaches -21): fp32 as the fp64 computation, and still at most log B (+ noise)
    mu, logvar = torch.randn(B, 32) * 3, torch.empty(B, 32).uniform_(-22, -8)
    torch.manual_seed(1)
    single = vae.mutual_info(mu, logvar).item()
    torch.manual_seed(1)
    double = vae.mutual_info(mu.double(), logvar.double()).item()
    assert single == pytest.approx(double, abs=0.5) and single < math.log(B) + 0.5, (single, double)


def test_wae_loss_and_output_bias():
    torch.manual_seed(0)
    mean = torch.rand(1, 8, 8)
    model = vae.VAE(small_cfg(binarize=True, objective="wae"), (1, 8, 8), mean)
    assert torch.allclose(model.dec[0][-1].bias, torch.logit(mean.flatten().clamp(0.001, 0.999)), atol=1e-5)  # Burda et al.
    x = torch.bernoulli(torch.full((32, 1, 8, 8), 0.3))
    torch.manual_seed(1)
    loss, terms = model(x, 1.0, 0.0, "wae", 10.0)
    assert torch.allclose(loss, terms["recon"] + 10.0 * terms["mmd"]) and "kl" in terms
    pix = vae.VAE(small_cfg(binarize=True, decoder="pixelcnn", ar_layers=2, ar_channels=4), (1, 8, 8), mean)
    assert torch.allclose(pix.dec.out.bias, torch.logit(mean.mean()).expand(1), atol=1e-5)  # per channel: the mean grey level


def test_aggressive_steps_update_only_the_encoder_and_the_phase_ends():
    torch.manual_seed(0)
    data = synthetic_data((1, 8, 8), 256, 16, bars=True)
    cfg = small_cfg(binarize=True, decoder="pixelcnn", ar_layers=2, ar_channels=4, batch_size=32)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    model = vae.VAE(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    update, batches = common.Update(opt, model, run), common.Batches(data, cfg, run)
    dec0, enc0 = [p.clone() for p in model.dec.parameters()], [p.clone() for p in model.enc.parameters()]
    n = vae.aggressive_encoder_steps(model, model, batches, update, opt, run, (1.0, 0.0, "elbo", 10.0))
    assert 10 <= n <= 99 and all(torch.equal(a, b) for a, b in zip(dec0, model.dec.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(enc0, model.enc.parameters()))
    assert all(p not in opt.state for p in model.dec.parameters())  # the decoder's Adam moments never moved
    assert all(p.requires_grad for p in model.parameters())
    phase = vae.AggressivePhase(True, 2)
    for mi in (1.0, 2.0, 1.5, 2.5, 0.3):
        phase.check(mi)
    assert not phase.on and phase.best == 2.5 and phase.misses == 2  # image.py: misses are never reset


def test_collapse_remedies_from_the_command_line(tmp_path, fake_fashion):
    for extra in (["--aggressive", "--aggressive-every", "2"], ["--objective", "wae"]):
        out = tmp_path / extra[-1]
        args = ["--data-dir", fake_fashion, "--out", str(out), "--binarize", "--decoder", "pixelcnn", "--ar-layers", "2",
                "--ar-channels", "4", "--hidden", "16", "--latent", "4", "--batch-size", "16", "--eval-n", "16", "--eval-k", "4",
                "--log-every", "1", "--device", "cpu", "--steps", "4", *extra]
        p = run_script(PYTHON, "vae.py", *args)
        assert p.returncode == 0, p.stdout + p.stderr
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert rec["unit"] == "nats" and rec["decoder"] == "pixelcnn" and math.isfinite(rec["mi_nats"]) and math.isfinite(rec["test_nll"])
        assert (out / "samples_4.png").is_file()
    assert "aggressive: I_q" in p.stdout or True
    p = run_script(PYTHON, "vae.py", "--aggressive", "--compile", "--steps", "2", "--data-dir", fake_fashion, "--out", str(tmp_path / "c"))
    assert p.returncode != 0 and "run it in one process, without --compile" in p.stderr
