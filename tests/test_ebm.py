"""ebm.py: SGLD in the slide's form samples known densities (a Gaussian, a mixture) and descends the energy without noise; the
contrastive loss has the NLL's gradient (a 1D model with Z by quadrature, exact samples and SGLD samples); the replay buffer
reuses the stated fraction and stores images to within 1/256; the ResNet's blocks start as the identity, spectral normalization
bounds the weights, Adam's clipping matches custom_adam.py; a seeded 2D run reaches an exact NLL whose density integrates to 1;
the CLI (train, resume, --eval, --sample, the composition) and bad flags."""
import json
import math

import pytest
import torch
import torch.nn as nn

import ebm as E
from conftest import PYTHON, run_script

RUN = E.common.Run(torch.device("cpu"), None, 0, 1, None, True, True)


def quadratic(m, P):  # E(x) = 1/2 (x - m)^T P (x - m): N(m, P^-1)
    return lambda x: 0.5 * (((x - m) @ P) * (x - m)).sum(1)


def mixture(mus, w, s):  # E(x) = -log sum_k w_k N(x; mu_k, s^2 I) (up to a constant)
    return lambda x: -torch.logsumexp(w.log() - ((x[:, None] - mus) ** 2).sum(-1) / (2 * s * s), 1)


# ----------------------------------------------------------------------------- SGLD
def test_sgld_in_the_slides_form_samples_a_gaussian_and_a_mixture():
    torch.manual_seed(0)
    cov = torch.tensor([[0.5, 0.3], [0.3, 0.4]])
    m = torch.tensor([1.0, -0.5])
    alpha = 0.01  # x - alpha/2 grad E + N(0, alpha)
    x, snaps = E.sgld(quadratic(m, torch.linalg.inv(cov)), E.uniform_noise(10000, (2,), "cpu"), 600, alpha / 2, math.sqrt(alpha),
                      box=(-E.LIM, E.LIM, True), snapshots=(0, 600))
    assert set(snaps) == {0, 600} and torch.equal(snaps[600], x)
    # 600 steps: the slowest variance mode relaxes as exp(-alpha lambda_min(P) k) ~ e^-8 from the start's 8.3. Tolerance: the mean
    # within 0.02 (its standard error ~0.007); the covariance within 0.02 (ULA's bias is O(alpha) ~ 0.003 here)
    assert torch.allclose(x.mean(0), m, atol=0.02)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.02)
    mus, w, s, alpha = torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.3, 0.7]), 0.6, 0.02
    x, _ = E.sgld(mixture(mus, w, s), E.uniform_noise(10000, (2,), "cpu"), 1500, alpha / 2, math.sqrt(alpha), box=(-E.LIM, E.LIM, True))
    mean = w @ mus
    cov = s * s * torch.eye(2) + (w[:, None] * (mus - mean)).T @ (mus - mean)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.03)


def test_sgld_without_noise_descends_the_energy_and_clips_the_gradient():
    torch.manual_seed(0)
    energy = quadratic(torch.tensor([0.5, 0.5]), torch.tensor([[3.0, 1.0], [1.0, 2.0]]))
    x = E.uniform_noise(1000, (2,), "cpu")
    _, snaps = E.sgld(energy, x, 30, 0.05, 0.0, box=(-E.LIM, E.LIM, True), snapshots=range(31))
    e = torch.stack([energy(snaps[k]) for k in range(31)])  # (31, 1000)
    assert (e[1:] <= e[:-1] + 1e-6).all() and e[-1].mean() < 0.01 * e[0].mean()
    # clip c: no coordinate moves more than step * c per noise-free step; the box is kept
    y, _ = E.sgld(energy, x, 1, 10.0, 0.0, clip=0.01, box=(-E.LIM, E.LIM, True))
    assert (y - x).abs().max() <= 0.1 + 1e-6 and (y - x).abs().max() > 0.099
    z, _ = E.sgld(lambda v: -100 * v.sum(1), torch.rand(5, 3), 3, 1.0, 0.1)  # pushed out of [0, 1]: clamped (images)
    assert z.min() >= 0 and z.max() <= 1 and (z == 1).all()
    assert torch.allclose(E.reflect(torch.tensor([-5.5, 5.25, 0.3, 16.0, -14.5]), -5.0, 5.0), torch.tensor([-4.5, 4.75, 0.3, -4.0, 4.5]))


# ----------------------------------------------------------------------------- the contrastive gradient
class Energy1D(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 1))
    def forward(self, x):
        return self.net(x).squeeze(1)


def test_contrastive_gradient_equals_the_nll_gradient_on_a_1d_model(one_thread):
    """NLL = mean E(x_data) + log Z on [-4, 4], Z by the midpoint rule on 20000 points; the contrastive loss with samples of p_theta
    (exact: inverse CDF on the grid; and SGLD's) has the same gradient up to Monte-Carlo error."""
    model, lim, n = Energy1D(), 4.0, 20000
    data = (0.5 + 0.7 * torch.randn(500, 1, generator=torch.Generator().manual_seed(1))).clamp(-lim, lim)
    h = 2 * lim / n
    grid = (-lim + h * (torch.arange(n) + 0.5))[:, None]
    params = list(model.parameters())
    nll = model(data).mean() + torch.logsumexp(-model(grid), 0) + math.log(h)
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(nll, params)])
    assert exact.norm() > 0.1  # not at a stationary point: the check has something to match
    with torch.no_grad():
        p = torch.softmax(-model(grid), 0)
    gen, grads = torch.Generator().manual_seed(2), []
    for _ in range(20):  # 20 independent estimates, 5000 exact samples each
        x_neg = grid[torch.multinomial(p, 5000, replacement=True, generator=gen)] + h * (torch.rand(5000, 1, generator=gen) - 0.5)
        loss, terms = E.contrastive_loss(model(data), model(x_neg), reg=0.0)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(grads)
    se = g.std(0) / math.sqrt(len(g))
    assert ((g.mean(0) - exact).abs() <= 4 * se + 1e-4).all()
    # 20000 SGLD samples (the slide's form, alpha 0.1, 1500 reflected steps from uniform noise; p_theta's mean is -1.7, its energy
    # slope ~0.3: a mixing time of ~600 steps): the same gradient within 5 standard errors of a 20000-sample estimate per component
    torch.manual_seed(3)
    x_neg, _ = E.sgld(lambda x: model(x), (torch.rand(20000, 1) * 2 - 1) * lim, 1500, 0.05, math.sqrt(0.1), box=(-lim, lim, True))
    loss, _ = E.contrastive_loss(model(data), model(x_neg), reg=0.0)
    sgld_grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    assert ((sgld_grad - exact).abs() <= 5 * g.std(0) / 2 + 1e-4).all()
    # the regulariser: loss - gap = reg (mean E(x+)^2 + mean E(x-)^2)
    e_pos, e_neg = torch.randn(7), torch.randn(9)
    loss, terms = E.contrastive_loss(e_pos, e_neg, reg=0.3)
    assert torch.allclose(terms["gap"], e_pos.mean() - e_neg.mean())
    assert torch.allclose(loss - terms["gap"], 0.3 * (e_pos.pow(2).mean() + e_neg.pow(2).mean()))


# ----------------------------------------------------------------------------- the replay buffer
def test_replay_buffer_reuses_the_stated_fraction_and_keeps_images_to_1_in_256():
    torch.manual_seed(0)
    buf = E.ReplayBuffer(3000, (2,), "cpu")
    x0, c0, keep = E.init_chains(buf, torch.zeros(100, dtype=torch.long), (2,), 0.05)
    assert not keep.any() and (x0.abs() <= E.LIM).all()  # empty: every chain from noise
    buf.push(torch.full((3000, 2), 7.0), torch.full((3000,), 3))
    kept, n = 0, 0
    for _ in range(50):
        x0, c0, keep = E.init_chains(buf, torch.ones(2000, dtype=torch.long), (2,), 0.05)
        assert (x0[keep] == 7).all() and (c0[keep] == 3).all() and (x0[~keep].abs() <= E.LIM).all() and (c0[~keep] == 1).all()
        kept, n = kept + keep.sum().item(), n + len(keep)
    assert abs(kept / n - 0.95) < 0.005  # 100000 chains: standard error 0.0007
    # a ring: the newest `capacity` entries stay; non-finite samples are replaced
    buf.push(torch.tensor([[1.0, 2.0], [math.nan, 0.0]]), torch.tensor([5, 6]))
    assert buf.n == 3000 and buf.next == 2 and buf.x[0].tolist() == [1.0, 2.0] and buf.x[1].tolist() == [0.0, 0.0]
    # images: stored as uint8 floor(256 x), read back as (k + u) / 256, so within 1/256
    img = E.ReplayBuffer(64, (1, 4, 4), "cpu")
    x = torch.rand(64, 1, 4, 4)
    img.push(x, torch.zeros(64, dtype=torch.long))
    assert img.x.dtype == torch.uint8
    back = (img.x.float() + torch.rand(64, 1, 4, 4)) / 256
    assert (back - x).abs().max() < 1 / 256
    twin = E.ReplayBuffer(64, (1, 4, 4), "cpu")
    twin.load_state_dict(img.state_dict())
    assert torch.equal(twin.x, img.x) and (twin.n, twin.next) == (img.n, img.next)


# ----------------------------------------------------------------------------- networks, optimizer
def test_blocks_start_as_the_identity_spectral_norm_bounds_and_conditions_act(one_thread):
    torch.manual_seed(0)
    cfg = E.Config(width=4, blocks=2)
    net = E.make_model(cfg, (1, 12, 12), n_cond=3)
    h, c = torch.randn(5, 4, 12, 12), torch.tensor([0, 1, 2, 0, 1])
    for block in (net.blocks[0], net.blocks[1]):  # identity skip, with and without pooling
        ref = nn.functional.leaky_relu(nn.functional.avg_pool2d(h, 2) if block.down else h, 0.2)
        assert torch.allclose(block(h, c), ref, atol=1e-6)
    conv = net.blocks[2].conv1  # 4 -> 8 channels
    for _ in range(30):  # training forwards run the power iteration
        conv.weight
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), 2).item() == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(5)  # W / sigma(W) does not depend on the scale of W
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), 2).item() == pytest.approx(1.0, abs=1e-3)
    u = conv.parametrizations.weight[0].u.clone()
    net.eval()
    conv.weight
    assert torch.equal(u, conv.parametrizations.weight[0].u)  # no power iteration outside training
    net.train()
    E.draw(net, 2, (1, 12, 12), E.Config(K=3, eval_batch=2), RUN)  # nor inside the sampler, whatever mode the net was in
    assert torch.equal(u, conv.parametrizations.weight[0].u)
    cap = net.blocks[1].conv2  # capped at 1: its ~1e-10 weights are not scaled up
    assert cap.weight.abs().max() < 1e-8
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        for m in net.modules():  # (conv2 ~ 0 at init hides the condition: every block is the identity under every condition)
            if isinstance(m, E.Block):
                m.b1.weight.normal_()
                m.conv2.parametrizations.weight.original.normal_()
        e = net(x, torch.tensor([0, 1, 2]))
        same = net(x[:1].expand(3, -1, -1, -1), torch.tensor([0, 1, 2]))
    assert e.shape == (3,) and not torch.allclose(same, same[:1].expand(3))


def test_adam_clip_follows_custom_adam():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.0, 0.999))
    E.adam_std_clip(opt, 3.0)
    p.grad = torch.tensor([5.0, -0.05, -7.0])
    opt.step()
    assert p.grad.tolist() == pytest.approx([0.1, -0.05, -0.1])  # the first step: bound 0.1
    p.grad = torch.tensor([5.0, 0.0, -7.0])
    opt.step()
    v = 0.001 * torch.tensor([0.1, 0.05, 0.1]) ** 2  # v_1 = (1 - beta2) g_1^2
    bound = 3 * (v / (1 - 0.999 ** 2)).sqrt() + 0.1
    assert p.grad.tolist() == pytest.approx([bound[0].item(), 0.0, -bound[2].item()], rel=1e-5)


# ----------------------------------------------------------------------------- learning, the exact NLL
def test_seeded_2d_run_reaches_an_exact_nll_whose_density_integrates_to_one(one_thread):
    """8gaussians, 600 steps of the toy preset (hidden 64): the grid NLL falls from log 100 = 4.61 (uniform on the box) below 3.6 nats."""
    torch.manual_seed(0)
    cfg = E.Config(**{**E.PRESETS["toy"], "hidden": 64})
    model = E.make_model(cfg, (2,))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    buf, gen = E.ReplayBuffer(cfg.buffer_size, (2,), "cpu"), torch.Generator().manual_seed(0)
    test = E.common.toy_sample("8gaussians", 5000, torch.Generator().manual_seed(9))
    nll = lambda: model(test).mean().item() + E.log_partition(model, RUN, 300)
    before = nll()
    step, noise, gaps = *E.langevin_params(cfg), []
    for _ in range(600):
        x_pos = E.common.toy_sample("8gaussians", cfg.batch_size, gen)
        x0, c0, _ = E.init_chains(buf, torch.zeros(len(x_pos), dtype=torch.long), (2,), cfg.reinit)
        x_neg, _ = E.sgld(lambda x: model(x), x0, cfg.K, step, noise, box=(-E.LIM, E.LIM, True))
        buf.push(x_neg, c0)
        loss, terms = E.contrastive_loss(model(x_pos), model(x_neg), cfg.reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gaps.append(terms["gap"].item())
    after = nll()
    # the energy gap E(x+) - E(x-) falls from ~0 (an untrained net cannot tell data from chains) as the data's energy is lowered
    assert sum(gaps[-100:]) / 100 < sum(gaps[:10]) / 10 - 0.3
    assert abs(before - math.log(100)) < 0.2 and after < 3.6, (before, after)
    with torch.no_grad():
        assert model(test).mean() < model(E.uniform_noise(5000, (2,), "cpu")).mean() - 1.0  # data below noise in energy
        log_z = E.log_partition(model, RUN, 300)
        assert E.log_partition(model, RUN, 900) == pytest.approx(log_z, abs=2e-3)  # the grid has converged
        u = E.uniform_noise(200000, (2,), "cpu", torch.Generator().manual_seed(4))
        w = (-model(u) - log_z).exp() * (2 * E.LIM) ** 2  # Monte-Carlo integral of p over the box: 1
        assert abs(w.mean().item() - 1) < 4 * w.std().item() / math.sqrt(len(w)) + 2e-3


# ----------------------------------------------------------------------------- CLI
def test_presets_are_the_official_codes():
    parse = lambda *argv: E.common.parse_config(E.Config, E.PRESETS, "ebm", argv=list(argv))
    c = parse("--dataset", "cifar10")
    assert (c.width, c.blocks, c.K, c.step_size, c.noise, c.langevin_clip, c.batch_size, c.lr, c.beta1, c.adam_clip, c.reg,
            c.spectral_norm, c.buffer_size, c.reinit, c.sgld) == (128, 3, 60, 10.0, 0.005, 0.01, 128, 3e-4, 0.0, 3.0, 1.0, True, 50000, 0.05, "decoupled")
    c = parse("--dataset", "moons", "--alpha", "0.01")
    assert (c.sgld, c.alpha, c.langevin_clip) == ("slide", 0.01, 0.0) and E.langevin_params(c) == (0.005, 0.1)


def call_main(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["ebm.py", *argv])
    return E.main()


def test_cli_toy_train_resume_eval_sample(tmp_path, monkeypatch, capsys):
    out = tmp_path / "toy"
    flags = ["--dataset", "8gaussians", "--out", str(out), "--hidden", "16", "--layers", "2", "--batch-size", "64", "--K", "3",
             "--buffer-size", "256", "--eval-K", "5", "--eval-samples", "200", "--eval-n", "400", "--grid", "300", "--z-grid", "100",
             "--log-every", "5"]
    p = run_script(PYTHON, "ebm.py", "--steps", "10", *flags)
    assert p.returncode == 0, p.stderr
    assert "step 10/10 | loss" in p.stdout and "| gap" in p.stdout and "SGLD slide: x - 0.01 grad E + 0.141421 z" in p.stdout
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["split"] == "test" and rec["kind"] == "exact" and rec["unit"] == "nats" and rec["n_test"] == 400 and rec["z_grid"] == 100
    assert 3.5 < rec["test_nll"] < 5.5 and rec["outside_box"] == 0 and rec["grad_evals"] == 5 and "mmd2_buffer" in rec
    assert all((out / f).is_file() for f in ("samples_10.png", "sgld_steps_10.png", "density_10.png"))
    call_main(monkeypatch, "--steps", "12", "--resume", *flags)
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 10" in text and "step 12/12" in text
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["buffer"]["x"].shape == (256, 2) and ck["step"] == 12
    call_main(monkeypatch, "--sample", "100", "--ckpt", str(out / "ckpt.pt"), "--eval-K", "4")
    assert "100 samples in" in (text := capsys.readouterr().out) and "4 energy gradients each: SGLD K 4" in text
    assert (out / "sample.png").is_file() and (out / "density.png").is_file() and (out / "sgld_steps.png").is_file()
    call_main(monkeypatch, "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-samples", "0")
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 12 and "mmd2" not in rec and math.isfinite(rec["test_nll"])


def test_cli_images_composition_and_bad_flags(tmp_path, fake_fashion, fd_cache, monkeypatch, capsys):
    out = tmp_path / "img"
    flags = ["--data-dir", fake_fashion, "--cache-dir", fd_cache, "--out", str(out), "--width", "4", "--blocks", "1", "--batch-size", "8",
             "--K", "2", "--eval-K", "2", "--eval-n", "16", "--eval-samples", "16", "--eval-batch", "16", "--grid", "4",
             "--compose-n", "2", "--buffer-size", "64", "--log-every", "1", "--condition", "both"]
    call_main(monkeypatch, "--steps", "2", *flags)
    text = capsys.readouterr().out
    assert "EnergyResNet" in text and "condition both (12)" in text and "grad clip 0.01" in text
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["unit"] == "bpd" and rec["test_nll"] is None and rec["kind"] is None and rec["fd"] > 0 and 1 <= rec["is_like"] <= 10
    assert rec["buffer_samples"] == 16 and rec["fd_buffer"] > 0 and 0 <= rec["compose_c-light_accuracy"] <= 1 and 0 <= rec["compose_c+dark_light"] <= 1
    assert rec["grad_evals"] == 2 and "energy_gap" in rec and 0 <= rec["class_accuracy"] <= 1
    assert all((out / f).is_file() for f in ("samples_2.png", "sgld_steps_2.png", "compose_2.png", "buffer_2.png"))
    base = ["--data-dir", fake_fashion, "--out", str(tmp_path / "bad"), "--steps", "1"]
    for argv, msg in ((["--K", "0"], "--K 0 out of range; accepted: integers >= 1"),
                      (["--alpha", "0"], "--alpha 0.0 out of range; accepted: > 0"),
                      (["--reinit", "1.5"], "accepted 0 <= reinit <= 1"),
                      (["--sgld", "mala"], "--sgld 'mala' unknown; accepted: decoupled, slide"),
                      (["--buffer-size", "10", "--batch-size", "64"], "--buffer-size 10 is smaller than --batch-size 64"),
                      (["--dataset", "moons", "--condition", "class"], "2D data has no attributes"),
                      (["--dataset", "moving-mnist"], "ebm.py models images and 2D data")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *base, *argv)
