"""iaf.py: every flow's log-det against the autograd Jacobian, the planar constraint, the IAF step's triangular
Jacobian and its context reaching every output, the change of variables through a whole amortized flow, T = 0 =
the diagonal VAE, learning, active units of E_q[z_T|x], a reproduction threshold on a 2D energy, exact resume, and
the command line end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

import common
import iaf
from conftest import PYTHON, run_script

F64 = dict(dtype=torch.float64)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small in-process models run on 1 thread


def slogdet(f, z):
    return torch.linalg.slogdet(jacobian(f, z))


def test_planar_and_radial_log_dets_equal_the_autograd_jacobian():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g, **F64)
    for K in (1, 2, 5):
        for _ in range(5):
            z, u, w, b = r(K, scale=2.0), r(K, scale=3.0), r(K), r(1)
            sign, logdet = slogdet(lambda v: iaf.planar(v, u, w, b)[0], z)
            assert sign > 0 and torch.allclose(iaf.planar(z, u, w, b)[1], logdet, atol=1e-9)
            z_ref, alpha_raw, beta_raw = r(K), r(1), r(1, scale=3.0)
            sign, logdet = slogdet(lambda v: iaf.radial(v, z_ref, alpha_raw, beta_raw)[0], z)
            assert sign > 0 and torch.allclose(iaf.radial(z, z_ref, alpha_raw, beta_raw)[1], logdet, atol=1e-9)


def test_planar_constraint_keeps_the_flow_invertible():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 4, generator=g, **F64)
    u = torch.cat([torch.randn(500, 4, generator=g, **F64) * 5, -20 * w[500:]])  # half adversarial: u = -20 w
    u_hat = iaf.planar_u_hat(u, w)
    assert ((w * u_hat).sum(-1) >= -1 - 1e-9).all()  # w^T u_hat >= -1 ...
    assert ((w * u).sum(-1)[500:] < -1).all()  # ... even where w^T u itself is far below -1
    z = 3 * torch.randn(1000, 4, generator=g, **F64)
    assert torch.isfinite(iaf.planar(z, u, w, torch.zeros(1000, 1, **F64))[1]).all()
    # in 1D a planar map is invertible iff it is strictly increasing
    t = torch.linspace(-10, 10, 20001, **F64)[:, None]
    for u1, w1, b1 in [(-5.0, 2.0, 0.3), (-0.9, 1.0, 0.0), (7.0, -0.5, 1.0)]:
        f = iaf.planar(t, torch.tensor([u1], **F64), torch.tensor([w1], **F64), torch.tensor([b1], **F64))[0]
        assert (f[1:] > f[:-1]).all()


@pytest.mark.parametrize("reverse", [False, True])
def test_iaf_step_is_autoregressive_and_its_log_det_is_sum_log_sigma(reverse):
    torch.manual_seed(0)
    K = 6
    step = iaf.IAFStep(K, n_context=3, hidden=24, sigma_bias=1.5, reverse=reverse).double()
    with torch.no_grad():
        for p in step.parameters():
            p.normal_()  # random weights everywhere, so a missing mask would show
    z, h = torch.randn(K, **F64), torch.randn(3, **F64)
    J = jacobian(lambda v: step(v, h)[0], z)  # J[i, j] = dz_out[i] / dz_in[j]
    order = step.order
    later = order[None, :] > order[:, None]  # j after i in this step's ordering
    assert (J[later] == 0).all() and (J[~later & ~torch.eye(K, dtype=torch.bool)].abs() > 0).any()
    J_ms = jacobian(lambda v: torch.cat(step.made(v, h)), z)  # (2K, K): d(m, s)_i / dz_j = 0 unless j before i
    assert (J_ms[(order[None, :] >= order[:, None]).repeat(2, 1)] == 0).all()
    m, s = step.made(z, h)
    assert torch.allclose(J.diagonal(), torch.sigmoid(s), atol=1e-12)  # dz_i / dz_i = sigma_i
    sign, logdet = torch.linalg.slogdet(J)
    assert sign > 0 and torch.allclose(step(z, h)[1], logdet, atol=1e-9)
    assert torch.allclose(step(z, h)[1], torch.log(torch.sigmoid(s)).sum(), atol=1e-12)


@pytest.mark.parametrize("K", [1, 5])
def test_the_context_reaches_every_output_of_an_iaf_step(K):
    """[m, s] = AR-NN(z, h): d(m, s)_i / dh != 0 for every i, the first variable of the ordering included (it sees no
    hidden unit; h reaches it through the unmasked context-to-output map, which a fresh step has at zero)."""
    torch.manual_seed(0)
    for reverse in (False, True):
        step = iaf.IAFStep(K, n_context=3, hidden=20, sigma_bias=1.5, reverse=reverse).double()
        assert (step.ctx_out == 0).all()  # a fresh step: the masked MADE alone
        with torch.no_grad():
            for p in step.parameters():
                p.normal_()
        z, h = torch.randn(K, **F64), torch.randn(3, **F64)
        dms_dh = lambda: jacobian(lambda c: torch.cat(step.made(z, c)), h)  # (2K, n_h)
        assert (dms_dh().abs().sum(1) > 0).all()
        first = int(step.order.argmin())
        with torch.no_grad():
            step.ctx_out.zero_()  # without the direct path: the first variable's m, s ignore h, the others do not
        depends = dms_dh().abs().sum(1) > 0
        assert depends.tolist() == [i % K != first for i in range(2 * K)]


def tiny_cfg(**kw):
    base = dict(latent=4, hidden=32, layers=1, context=8, made_hidden=16, lr=3e-3, batch_size=32, eval_k=8)
    return iaf.Config(**{**base, **kw})


@pytest.mark.parametrize("flow", ["planar", "radial", "iaf"])
def test_log_q_is_the_change_of_variables_through_the_whole_amortized_flow(flow):
    torch.manual_seed(0)
    model = iaf.FlowVAE(tiny_cfg(flow=flow, length=3), (1, 4, 4)).double()
    if flow == "iaf":
        assert [s.order.tolist() for s in model.steps] == [[1, 2, 3, 4], [4, 3, 2, 1], [1, 2, 3, 4]]  # reversed between steps
    x = torch.rand(2, 1, 4, 4, **F64)
    mu, logvar, params = model.encode(x)
    for i in range(2):
        eps = torch.randn(4, **F64)
        z_T, log_q, log_det = iaf.posterior_sample(model, mu[i:i + 1], logvar[i:i + 1], params[i:i + 1], eps[None])
        z_0 = mu[i] + torch.exp(0.5 * logvar[i]) * eps
        sign, logdet = slogdet(lambda v: model.flow(v[None], params[i:i + 1])[0][0], z_0)
        assert sign > 0 and torch.allclose(log_det[0], logdet, atol=1e-8)
        assert torch.allclose(log_q[0], iaf.log_normal(z_0, mu[i], logvar[i]) - logdet, atol=1e-8)


def test_length_zero_is_the_diagonal_gaussian_vae():
    torch.manual_seed(0)
    model = iaf.FlowVAE(tiny_cfg(length=0), (1, 6, 6))
    assert model.n_flow == 0 and len(model.steps) == 0
    x = torch.randint(0, 256, (5, 1, 6, 6)).float() / 255
    eps = torch.randn(5, 4)
    loss, terms = iaf.negative_elbo(model, x, eps=eps)
    mu, logvar, _ = model.encode(x)
    kl = (-0.5 * logvar + 0.5 * logvar.exp() + 0.5 * mu ** 2 - 0.5).sum(1)  # slide "VAE", analytic
    direct = -model.log_px_z(x, mu + torch.exp(0.5 * logvar) * eps) + kl
    assert torch.allclose(loss, direct.mean()) and terms["log_det"] == 0
    # the importance-sampled quantities use log q_0 itself: the Monte-Carlo KL matches the analytic one
    _, elbo, kl_mc = iaf.log_px_importance(model, x, 4000, chunk=1000)
    assert torch.allclose(kl_mc, kl, atol=0.1, rtol=0.02)


def synthetic_data(n_train=512, n_test=64, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n_train + n_test, 1, size, size, dtype=torch.uint8)
    for i in range(len(x)):
        r, c, h = torch.randint(0, size // 2, (3,), generator=g)
        x[i, :, r:r + h + 2, c:c + h + 2] = torch.randint(100, 256, (1,), generator=g).item()
    return common.Data("synthetic", "image", (1, size, size), x[:n_train], x[n_train:])


def test_200_steps_lower_the_loss_and_evaluate_reports_the_bounds():
    data, cfg = synthetic_data(), tiny_cfg(flow="iaf", length=2, latent=8, hidden=64)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    torch.manual_seed(0)
    model = iaf.FlowVAE(cfg, data.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    update, batches, losses = common.Update(opt, model.parameters(), run), common.Batches(data, cfg, run), []
    for _ in range(200):
        loss, _ = model(next(batches))
        opt.zero_grad()
        update(loss)
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20, (losses[:3], losses[-3:])
    rec = iaf.evaluate(model, data, tiny_cfg(eval_k=64), run, 200)
    assert rec["unit"] == "bpd" and rec["kind"] == "estimate" and rec["n_test"] == 64
    assert 0 < rec["test_nll"] <= rec["nelbo"] + 1e-6 and rec["kl_nats"] > 0  # IS (k = 64) is tighter than the ELBO


def test_active_units_count_the_mean_of_z_T_not_of_q_0():
    """Active units = Var_x(E_q[z_T|x]) > 0.01 (Burda et al.). An IAF whose q_0 is N(0, I) for every x, but whose steps
    shift z_1, z_2 by the context h(x) (and nothing else by h): q_0's mean counts 0 active units, E_q[z_T|x] counts 2,
    as a brute-force mean of 20000 samples does; the seeded 1000-sample estimate agrees with it."""
    data, cfg = synthetic_data(n_test=64), tiny_cfg(flow="iaf", length=2, eval_k=8)
    K = cfg.latent
    torch.manual_seed(0)
    model = iaf.FlowVAE(cfg, data.shape)
    with torch.no_grad():
        last = model.enc[1][-1]  # the encoder's output layer: rows mu, logvar, then h
        last.weight[:2 * K], last.bias[:2 * K] = 0, 0  # q_0(z_0|x) = N(0, I) for every x
        for step in model.steps:  # h reaches only m, s of z_1, z_2 (step 2, reversed, conditions z_3, z_4 on z_4, z_3 only)
            step.ctx.weight.zero_()
            step.ctx_out[[0, 1, K, K + 1]] = 3 * torch.randn(4, cfg.context)
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    rec = iaf.evaluate(model, data, cfg, run, 0)
    mu, logvar, h = model.encode(data.test.float() / 255)
    with torch.no_grad():  # brute force: the mean of 20 x 1000 samples z_T
        brute = torch.stack([iaf.posterior_sample(model, mu, logvar, h, torch.randn(1000, *mu.shape))[0].mean(0)
                             for _ in range(20)]).mean(0)  # (B, K)
    assert (mu.var(0) > 0.01).sum() == 0 and (brute.var(0) > 0.01).tolist() == [True, True, False, False]
    assert rec["active_units"] == 2 == iaf.evaluate(model, data, cfg, run, 0)["active_units"]
    estimate = iaf.posterior_mean(model, mu, logvar, h, n=1000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate, brute, atol=0.15)
    assert iaf.posterior_mean(iaf.FlowVAE(tiny_cfg(length=0), data.shape), mu, logvar, h) is mu  # T = 0: exact


def test_reproduction_planar_flow_fits_an_energy():
    """Planar flow, T = 8, on U2 (a sine valley): after 600 seeded Adam steps (lr 2e-2, annealing over 200) the
    KL gap KL(q || p) = E_q[log q + U] + log Z must be below 0.3 nats (measured: 0.20; seeds 1, 2: 0.19, 0.33);
    q_0 = N(0, I) itself is at 3.95 nats."""
    torch.manual_seed(0)
    model = iaf.EnergyFlow("planar", 8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    log_z = iaf.log_partition("u2")
    for step in range(600):
        loss, _ = iaf.free_energy(model, "u2", 256, min(1.0, 0.01 + step / 200))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        kl = iaf.free_energy(model, "u2", 50_000)[1]["kl_bound"].item() + log_z
        z_0 = torch.randn(50_000, 2)
        kl_q0 = (iaf.log_normal(z_0, 0 * z_0, 0 * z_0) + iaf.energy("u2", z_0)).mean().item() + log_z
    assert 0 < kl < 0.3 and 3.8 < kl_q0 < 4.1, (kl, kl_q0)


def test_log_partition_of_a_gaussian_energy():
    z = torch.zeros(1, 2)
    u1_far = iaf.energy("u1", torch.tensor([[0.0, 6.5]]))
    assert iaf.energy("u2", z).item() == 0.0 and u1_far.item() > 50  # grid edges carry no mass
    # U2 inside the box: a Gaussian of std 0.4 across z_2 for every z_1, so Z ~ 8 * 0.4 sqrt(2 pi) plus the wall
    wall = 2 * 0.2 * math.sqrt(2 * math.pi) / 2 * 0.4 * math.sqrt(2 * math.pi)
    assert abs(iaf.log_partition("u2") - math.log(8 * 0.4 * math.sqrt(2 * math.pi) + wall)) < 1e-3


def ckpt_model(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_energy_command_line_resume_is_exact_and_the_figure(tmp_path):
    args = ["--dataset", "u3", "--flow", "planar", "--length", "2", "--log-every", "5", "--eval-k", "100", "--anneal", "10"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    p = run_script(PYTHON, "iaf.py", *args, "--steps", "20", "--out", str(straight))
    assert p.returncode == 0 and "kl_bound" in p.stdout and "log_z" in p.stdout, p.stdout + p.stderr
    assert (straight / "density_20.png").is_file()
    p = run_script(PYTHON, "iaf.py", *args, "--steps", "10", "--out", str(split))
    assert p.returncode == 0, p.stderr
    p = run_script(PYTHON, "iaf.py", *args, "--steps", "20", "--out", str(split), "--resume")
    assert p.returncode == 0 and "at step 10" in p.stdout and "step 15/20" in p.stdout and "step 5/" not in p.stdout, p.stdout
    a, b = ckpt_model(straight / "ckpt.pt"), ckpt_model(split / "ckpt.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights as 20 steps straight
    p = run_script(PYTHON, "iaf.py", "--dataset", "u3", "--eval", "--sample", "1000", "--ckpt", str(straight / "ckpt.pt"), "--eval-k", "100")
    rec = json.loads((straight / "metrics.jsonl").read_text().splitlines()[-1])
    assert p.returncode == 0 and rec["kl"] > 0 and rec["kl"] == pytest.approx(rec["kl_bound"] + rec["log_z"]), p.stderr
    assert "2 flow steps each" in p.stdout and (straight / "sample.png").is_file()
    for name in iaf.ENERGIES:  # the combined figure from tiny checkpoints
        for T in (2, 8, 32):
            model = iaf.EnergyFlow("planar", T)
            torch.save({"method": "iaf", "step": 0, "model": model.state_dict()}, tmp_path / "ckpt.pt")
            (tmp_path / "runs" / f"{name}-planar{T}").mkdir(parents=True)
            (tmp_path / "ckpt.pt").rename(tmp_path / "runs" / f"{name}-planar{T}" / "ckpt.pt")
    iaf.energy_figure(tmp_path / "fig.png", root=tmp_path / "runs", n=2000)
    assert (tmp_path / "fig.png").is_file()


def test_image_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--hidden", "32", "--latent", "4", "--context", "8",
            "--made-hidden", "16", "--length", "2", "--batch-size", "16", "--eval-n", "32", "--eval-k", "8",
            "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "iaf.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "test_nll" in p.stdout and "iaf flow, T = 2" in p.stdout
    for name in ("ckpt.pt", "config.json", "samples_2.png", "recon_2.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "iaf.py", "--steps", "4", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/4" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "iaf.py", "--eval", "--sample", "16", "--ckpt", str(out / "ckpt.pt"), "--eval-k", "16", "--data-dir", fake_fashion)
    assert p.returncode == 0 and "samples/s" in p.stdout and (out / "sample.png").is_file(), p.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 4 and rec["unit"] == "bpd" and rec["k"] == 16 and rec["n_test"] == 32 and rec["length"] == 2
    assert 0 < rec["test_nll"] <= rec["nelbo"] < 9


@pytest.mark.parametrize("argv, msg", [(["--dataset", "u1", "--flow", "iaf"], "accepted: planar, radial"),
                                       (["--length", "-1"], "--length -1 out of range"),
                                       (["--dataset", "u2", "--flow", "radial", "--latent", "3"], "--latent 2"),
                                       (["--flow", "sylvester"], "--flow 'sylvester' unknown")])
def test_bad_flags_stop_with_one_line(argv, msg):
    with pytest.raises(SystemExit, match=msg):
        iaf.check(common.parse_config(iaf.Config, iaf.PRESETS, iaf.METHOD, argv=argv, own_sets=iaf.ENERGIES))
