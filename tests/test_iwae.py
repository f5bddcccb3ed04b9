"""iwae.py: L_1 = ELBO, the bound rises with k towards an exact log p(x), a stable logsumexp, the gradient's
importance weights, both architectures, the paper's schedule, learning, a reproduction threshold, the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import iwae
from conftest import PYTHON, linear_gaussian, run_script


def cfg_(**kw):
    return iwae.Config(**{**dict(binarize=True, layers=1, hidden="64", latent="8", act="tanh", lr=3e-3, batch_size=64), **kw})


def test_k1_bound_equals_the_elbo_on_the_same_samples():
    torch.manual_seed(0)
    model = iwae.IWAE(cfg_(), (1, 8, 8)).double()
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.4, dtype=torch.float64))
    torch.manual_seed(1)
    log_w, kls, _ = model.log_weights(x, 1)
    assert torch.equal(iwae.iwae_bound(log_w), iwae.elbo(log_w))
    # the same sample by hand: z = mu + sigma eps, ELBO = log p(x|z) + log p(z) - log q(z|x)
    torch.manual_seed(1)
    mu, logvar = model.q[0](x.flatten(1)).chunk(2, -1)  # binary x itself (official code), not 2x - 1
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    logits = model.p[0](z)
    log_px_z = (x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1)
    log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(log_w[0], log_px_z + log_pz - log_qz, atol=1e-10)
    assert torch.allclose(kls[0][0], log_qz - log_pz, atol=1e-10)
    # with k = 1 the two objectives are one: same loss, same gradients
    grads = []
    for objective in ("iwae", "vae"):
        torch.manual_seed(2)
        loss, _ = iwae.loss_fn(model, x, 1, objective)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


def test_bound_rises_with_k_towards_the_exact_log_likelihood():
    """Linear-Gaussian model (exact log p(x)) with a deliberately poor diagonal q: E[L_k] increases with k,
    stays below log p(x), and is within a small fraction of the ELBO's gap at k = 1000."""
    torch.manual_seed(0)
    x, log_px_z, log_px, m, logvar = linear_gaussian()
    mu_q, logvar_q = m + 0.7, logvar + 1.0

    def bound(k, repeats):
        z = iwae.reparameterize(mu_q.expand(repeats, k, *m.shape), logvar_q.expand(repeats, k, *m.shape))  # (R, k, B, K)
        log_w = log_px_z(x, z) + iwae.log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - iwae.log_normal(z, mu_q, logvar_q)
        est = torch.stack([iwae.iwae_bound(lw) for lw in log_w])  # (R, B)
        return est.mean(0), est.std(0) / math.sqrt(repeats)

    ks, gaps = (1, 2, 5, 20, 100, 1000), []
    for k in ks:
        mean, se = bound(k, 4000 if k < 100 else 200)
        assert (mean < log_px + 4 * se).all(), k  # a lower bound, in expectation
        gaps.append((log_px - mean).mean().item())
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps  # L_k <= L_{k+1}
    assert gaps[0] > 1.0 and gaps[-1] < 0.05 * gaps[0], gaps
    # and the exact posterior makes every weight equal to p(x): L_k = log p(x) for every k
    z = iwae.reparameterize(m.expand(7, *m.shape), logvar.expand(7, *m.shape))
    log_w = log_px_z(x, z) + iwae.log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - iwae.log_normal(z, m, logvar)
    assert torch.allclose(iwae.iwae_bound(log_w), log_px, atol=1e-9)


def test_bound_is_stable_for_log_weights_hundreds_of_nats_apart():
    log_w = torch.tensor([[-9000.0, -150.0], [-8400.0, -700.0], [-8800.0, -350.0]])  # (k=3, B=2), fp32
    assert torch.isinf(torch.log(torch.exp(log_w).mean(0))).all()  # the naive average underflows
    expected = log_w.double().max(0).values + torch.log(torch.exp(log_w.double() - log_w.double().max(0).values).sum(0)) - math.log(3)
    assert torch.allclose(iwae.iwae_bound(log_w).double(), expected, atol=1e-3)
    assert iwae.iwae_bound(log_w.bfloat16()).dtype == torch.float32  # low-precision weights are summed in fp32


def test_gradient_weights_each_sample_by_its_normalized_weight():
    """Burda et al. eq. (8): grad L_k = sum_i w~_i grad log w_i, w~_i = w_i / sum_j w_j."""
    log_w = torch.randn(6, 3, dtype=torch.float64).mul(5).requires_grad_()
    (g,) = torch.autograd.grad(iwae.iwae_bound(log_w).sum(), log_w)
    assert torch.allclose(g, torch.softmax(log_w, 0)) and torch.allclose(g.sum(0), torch.ones(3, dtype=torch.float64))


def test_two_stochastic_layers_and_the_paper_sizes():
    assert iwae.sizes(cfg_(hidden="", latent="")) == ([200], [50])
    assert iwae.sizes(cfg_(layers=2, hidden="", latent="")) == ([200, 100], [100, 50])  # yburda/iwae experiments.py
    paper = iwae.IWAE(cfg_(layers=2, hidden="", latent=""), (1, 28, 28))
    linears = lambda net: [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]
    assert linears(paper.q[0]) == [(784, 200), (200, 200), (200, 200)] and linears(paper.q[1]) == [(100, 100), (100, 100), (100, 100)]
    assert linears(paper.p[1]) == [(50, 100), (100, 100), (100, 200)] and linears(paper.p[0]) == [(100, 200), (200, 200), (200, 784)]
    with pytest.raises(SystemExit, match="need 2 positive"):
        iwae.sizes(cfg_(layers=2))
    with pytest.raises(SystemExit, match="--layers 3 unknown"):
        iwae.sizes(cfg_(layers=3))
    torch.manual_seed(0)
    model = iwae.IWAE(cfg_(layers=2, hidden="32,16", latent="12,4"), (1, 8, 8)).double()
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5, dtype=torch.float64))
    torch.manual_seed(1)
    log_w, kls, means = model.log_weights(x, 2)
    assert log_w.shape == (2, 3) and len(kls) == 2 and [m.shape for m in means] == [(3, 12), (3, 4)]
    # log w = log p(x|h1) + log p(h1|h2) + log p(h2) - log q(h1|x) - log q(h2|h1), by hand on the same noise
    torch.manual_seed(1)
    mu1, lv1 = model.q[0](x.flatten(1)).expand(2, -1, -1).chunk(2, -1)
    h1 = mu1 + torch.exp(0.5 * lv1) * torch.randn_like(mu1)
    mu2, lv2 = model.q[1](h1).chunk(2, -1)
    h2 = mu2 + torch.exp(0.5 * lv2) * torch.randn_like(mu2)
    N = lambda v, mu, lv: torch.distributions.Normal(mu, torch.exp(0.5 * lv)).log_prob(v).sum(-1)
    pm, plv = model.p[1](h2).chunk(2, -1)
    logits = model.p[0](h1)
    by_hand = ((x.flatten(1) * logits - torch.nn.functional.softplus(logits)).sum(-1) + N(h1, pm, plv)
               + N(h2, torch.zeros_like(h2), torch.zeros_like(h2)) - N(h1, mu1, lv1) - N(h2, mu2, lv2))
    assert torch.allclose(log_w, by_hand, atol=1e-9)
    assert iwae.sample(model, 5, "cpu").shape == (5, 1, 8, 8)


def test_output_bias_starts_at_the_logit_of_the_mean_training_image():
    """yburda/iwae: the Bernoulli output bias is logit(clip(mean training image, 0.001, 0.999)); other biases 0."""
    mean = torch.linspace(0, 1, 64).view(1, 8, 8)  # includes 0 and 1: clipped
    model = iwae.IWAE(cfg_(), (1, 8, 8), mean)
    expected = torch.log(mean.flatten().clamp(0.001, 0.999) / (1 - mean.flatten().clamp(0.001, 0.999)))
    assert torch.allclose(model.p[0][-1].bias, expected, atol=1e-5) and model.p[0][-1].bias[0].item() == pytest.approx(-6.9068, abs=1e-3)
    assert all(m.bias.abs().max() == 0 for m in model.q[0] if isinstance(m, torch.nn.Linear))
    assert iwae.IWAE(cfg_(binarize=False), (1, 8, 8), mean).p[0][-1].bias.abs().max() == 0  # 8-bit: the logistic, untouched


def test_paper_learning_rate_schedule():
    """lr * 10^(-i/7) during stage i, stages of 3^i epochs: ends at epochs 1, 4, 13, 40, 121, 364, 1093, 3280."""
    cfg = cfg_(lr_schedule="paper", steps=3280 * 10, lr=1e-3)  # 10 steps per epoch
    ends = [1, 4, 13, 40, 121, 364, 1093, 3280]
    for i, end in enumerate(ends):
        assert math.isclose(iwae.lr_at(cfg, end * 10 - 1), 1e-3 * 10 ** (-i / 7)), i
        if i < 7:
            assert math.isclose(iwae.lr_at(cfg, end * 10), 1e-3 * 10 ** (-(i + 1) / 7)), i
    assert iwae.lr_at(cfg_(lr_schedule="constant", lr=0.01), 123) == 0.01


def bars(n_train, n_test, seed=0):
    """Binary 8x8 bars (orientation and each of 8 bars at random): a factorized model needs 36 nats."""
    g, n = torch.Generator().manual_seed(seed), n_train + n_test
    on = (torch.rand(n, 8, generator=g) < 0.25).float()
    horizontal = torch.rand(n, 1, 1, generator=g) < 0.5
    x = torch.where(horizontal, on[:, :, None].expand(n, 8, 8), on[:, None, :].expand(n, 8, 8))[:, None]
    x = (x * 255).to(torch.uint8)
    return common.Data("bars", "image", (1, 8, 8), x[:n_train], x[n_train:])


def fit(cfg, data, steps):
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    torch.manual_seed(cfg.seed)
    model = iwae.IWAE(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=True)
    update, batches, losses = common.Update(opt, model, run), common.Batches(data, cfg, run), []
    for _ in range(steps):
        loss, terms = model(next(batches), cfg.k, cfg.objective)
        opt.zero_grad()
        update(loss)
        losses.append(loss.item())
    return model, run, losses


def test_reproduction_iwae_beats_the_vae_on_bars():
    """Seeded, ~15 s: after 600 steps IWAE(k=10) is below 12 nats (a factorized model: 36), its loss fell, and
    its test NLL beats the VAE(k=1) trained for the same steps - the paper's claim, in miniature (measured:
    9.06 vs 10.66 nats)."""
    data = bars(4096, 256)
    rec = {}
    for k in (1, 10):
        cfg = cfg_(k=k, hidden="128", latent="8", lr=2e-3, eval_k=500)
        model, run, losses = fit(cfg, data, 600)
        rec[k] = iwae.evaluate(model, data, cfg, run, 600)
        assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50
    assert rec[10]["unit"] == "nats" and rec[10]["kind"] == "estimate" and rec[10]["n_test"] == 256
    assert rec[10]["test_nll"] < 12.0 and rec[10]["test_nll"] < rec[1]["test_nll"] - 0.5, (rec[1], rec[10])
    assert rec[10]["active_units"] >= rec[1]["active_units"]


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--layers", "2", "--hidden", "16,8", "--latent", "6,3",
            "--k", "3", "--batch-size", "16", "--eval-n", "32", "--eval-k", "8", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "iwae.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "kl2" in p.stdout and "test_nll" in p.stdout
    for name in ("ckpt.pt", "config.json", "samples_2.png", "recon_2.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "iwae.py", "--steps", "4", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/4" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "iwae.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-k", "20", "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["step"] == 4 and rec["unit"] == "bpd" and rec["k"] == 20 and rec["train_k"] == 3 and rec["latent"] == [6, 3]
    assert 0 < rec["test_nll"] <= rec["nelbo"] < 9 and len(rec["active_per_layer"]) == 2
    p = run_script(PYTHON, "iwae.py", "--sample", "9", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and (out / "sample.png").is_file(), p.stderr
    p = run_script(PYTHON, "iwae.py", *args, "--k", "0")
    assert p.returncode != 0 and "error: --k 0 out of range" in p.stderr
