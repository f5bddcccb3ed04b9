"""vqvae.py: the straight-through estimator and which parameters each loss term moves, the EMA codebook update and
dead-code restart against their formulas, nearest-code quantization, perplexity, the gated PixelCNN prior's causality
(and no blind spot), the bottom prior's view of the top map, the bpd bounds, learning, and the command line."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import vqvae
from conftest import PYTHON, rectangles, run_script


def small_cfg(**kw):
    base = dict(hidden=16, res_hidden=8, n_res=1, codes=16, code_dim=4, prior_channels=8, prior_layers=4, prior_cond_layers=5,
                steps=10, prior_steps=10, batch_size=16, lr=2e-3, prior_lr=2e-3, eval_n=0)
    return vqvae.Config(**{**base, **kw})


def run_cpu():
    return common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)


def test_straight_through_and_what_each_term_moves(one_thread):
    torch.manual_seed(0)
    model = vqvae.VQVAE(small_cfg(), (1, 8, 8)).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    # the decoder's gradient at z_q is copied to f(x): d recon / d f(x) == d recon / d e at the chosen codes
    lv, = model.encode(x)
    recon = -model.log_px_z(x, model.decode([lv["z_st"]])).sum()
    g_e, = torch.autograd.grad(recon, lv["z_e"], retain_graph=True)
    z_q = lv["z_q"].detach().requires_grad_()
    g_q, = torch.autograd.grad(-model.log_px_z(x, model.decode([z_q])).sum(), z_q)
    assert torch.allclose(g_e, g_q) and g_e.abs().sum() > 0
    assert torch.autograd.grad(recon, model.quant[0].embed, allow_unused=True)[0] is None  # recon never reaches the codes
    # (2) moves only the codebook, (3) only the encoder
    enc = list(model.enc_b.parameters()) + list(model.pre_b.parameters())
    for term, moves, still in (("vq", [model.quant[0].embed], enc), ("commit", enc, [model.quant[0].embed])):
        model.zero_grad(set_to_none=True)
        loss, terms = vqvae.vqvae_loss(model, x)
        terms[term].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moves[:1] + moves[-1:]), term
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in still), term
        assert all(p.grad is None for p in model.dec.parameters()), term
    loss, terms = vqvae.vqvae_loss(model, x)  # the total is the slide's sum, with beta = 0.25
    assert torch.allclose(loss, terms["recon"] + terms["vq"] + 0.25 * terms["commit"])


def test_ema_update_and_laplace_smoothing_equal_their_formulas():
    q = vqvae.Quantizer(3, 2, ema=True, decay=0.9).double().train()
    e0 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    q.embed.copy_(e0), q.m.copy_(e0)
    flat = torch.tensor([[0.1, 0.0], [-0.1, 0.2], [0.9, 0.1], [1.2, -0.1], [1.0, 0.3]], dtype=torch.float64)  # codes 0, 0, 1, 1, 1
    z_q, codes, n = q(flat.T.reshape(1, 2, 1, 5))
    assert codes.flatten().tolist() == [0, 0, 1, 1, 1] and n.tolist() == [2, 3, 0]
    assert torch.equal(z_q[0, :, 0].T, e0[[0, 0, 1, 1, 1]])  # the lookup uses the codes before the update
    N = 0.9 * torch.ones(3, dtype=torch.float64) + 0.1 * torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64)
    m = 0.9 * e0 + 0.1 * torch.stack([flat[:2].sum(0), flat[2:].sum(0), torch.zeros(2, dtype=torch.float64)])
    smoothed = (N + 1e-5) / (N.sum() + 3e-5) * N.sum()
    assert torch.allclose(q.N, N) and torch.allclose(q.m, m) and torch.allclose(q.embed, m / smoothed[:, None])
    assert torch.allclose(q.embed[2], e0[2] * 0.9 / smoothed[2])  # an unused code: only the smoothing moves it
    q.eval()
    before = q.embed.clone()
    q(flat.T.reshape(1, 2, 1, 5))
    assert torch.equal(q.embed, before)  # no update outside training


def test_dead_code_restart_puts_every_restarted_code_on_an_encoder_output():
    torch.manual_seed(0)
    for ema in (False, True):
        q = vqvae.Quantizer(32, 3, ema=ema, restart=True, restart_below=1.0).train()
        z_e = torch.randn(2, 3, 4, 4) + 10  # far from every initial code
        q.usage[:4] = 100.0  # four live codes keep their place
        live = q.embed[:4].detach().clone()
        q(z_e)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
        on_output = (q.embed[:, None].detach() == flat[None]).all(-1).any(1)  # (32,): equal to some encoder output
        assert on_output[4:].all() and not on_output[:4].any()  # (ema: the live codes move by the EMA update only)
        assert torch.equal(q.embed[:4].detach(), live) or ema
        assert (q.usage[4:] == 1.0).all()
        if ema:  # the EMA statistics restart with the code: e_i = m_i / N_i stays on the output
            assert torch.equal(q.m[4:], q.embed[4:]) and (q.N[4:] == 1).all()


def test_quantization_picks_the_nearest_code_and_perplexity():
    torch.manual_seed(0)
    q = vqvae.Quantizer(50, 8).eval()
    z_e = torch.randn(3, 8, 5, 5)
    z_q, codes, n = q(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = (flat[:, None].double() - q.embed.detach()[None].double()).pow(2).sum(-1).argmin(1)  # (75,) by brute force
    assert torch.equal(codes.flatten(), brute) and n.sum() == 75
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 8), q.embed[brute])
    assert vqvae.perplexity(torch.full((50,), 7.0)).item() == pytest.approx(50, rel=1e-5)
    assert vqvae.perplexity(torch.tensor([0.0, 9.0, 0.0])).item() == pytest.approx(1.0)


def dependencies(net, H, W, top=None):
    """(H W, H W) boolean: row k = which code positions (raster order) the logits at position k depend on."""
    store = {}
    def keep(module, inputs, output):
        output.retain_grad()
        store["e"] = output
    hook = net.emb.register_forward_hook(keep)
    out = net(torch.randint(net.emb.num_embeddings, (1, H, W)), None, top)
    hook.remove()
    rows = []
    for k in range(H * W):
        store["e"].grad = None
        (out[0, :, k // W, k % W] @ torch.randn(out.shape[1], dtype=out.dtype)).backward(retain_graph=True)
        rows.append(store["e"].grad[0].abs().sum(-1).flatten() != 0)
    return torch.stack(rows)


@pytest.mark.parametrize("side,layers", [(6, 4), (7, 12)])
def test_gated_pixelcnn_prior_is_causal_with_no_blind_spot(side, layers, one_thread):
    """No logit depends on its own or a later code; every earlier code reaches it (the blind spot of masked PixelCNNs is
    gone). (7, 12): the fashion-mnist preset's prior; 12 layers also cover a 14 x 14 bottom map (checked when built)."""
    torch.manual_seed(0)
    dep = dependencies(vqvae.GatedPixelCNN(5, 8, layers).double(), side, side)
    assert not dep.triu().any(), "a logit depends on its own or a later code"
    assert dep.tril(-1).sum() == side * side * (side * side - 1) // 2, "some earlier code does not reach a later logit"


def test_bottom_prior_sees_the_whole_top_map_and_stays_causal(one_thread):
    torch.manual_seed(0)
    priors = vqvae.Priors(small_cfg(levels=2), 10).double()
    bottom = priors.nets[1]
    top = torch.randint(16, (1, 7, 7))
    store = {}
    def keep(module, inputs, output):
        output.retain_grad()
        store["t"] = output
    hook = bottom.top_emb.register_forward_hook(keep)
    out = bottom(torch.randint(16, (1, 14, 14)), None, top)
    hook.remove()
    out[0, :, 0, 0].sum().backward()  # the first bottom code: all it sees is the top map
    assert (store["t"].grad[0].abs().sum(-1) != 0).all(), "the first bottom code misses part of the top map"
    dep = dependencies(bottom, 6, 6, torch.randint(16, (1, 3, 3)))
    assert not dep.triu().any()


def test_bounds_equal_their_hand_formulas(one_thread):
    torch.manual_seed(0)
    cfg = small_cfg(eval_n=0)
    x = rectangles(24, 1)
    data = common.Data("synthetic", "image", (1, 8, 8), x, x, torch.zeros(24, dtype=torch.long), torch.zeros(24, dtype=torch.long))
    model, run = vqvae.VQVAE(cfg, data.shape), run_cpu()
    rec = vqvae.evaluate(model, None, data, cfg, run, 0)
    xf = x.float() / 255
    with torch.no_grad():
        lv, = model.eval().encode(xf)
        nll = -model.log_px_z(xf, model.decode([lv["z_q"]])).mean().item()
    assert rec["kind"] == "bound" and rec["prior"] == "uniform" and rec["n_test"] == 24 and rec["n_code_positions"] == 4
    assert rec["bpd_uniform_prior"] == pytest.approx((nll + 4 * math.log(16)) / (64 * math.log(2)), rel=1e-6)
    assert rec["test_nll"] == rec["bpd_uniform_prior"] and rec["dead"] == 16 - len(lv["codes"].unique())
    priors = vqvae.Priors(cfg, 1)
    with torch.no_grad():  # a prior whose logits are all zero is the uniform prior
        priors.nets[0].out[-1].weight.zero_(), priors.nets[0].out[-1].bias.zero_()
    rec = vqvae.evaluate(model, priors, data, cfg, run, 0)
    assert rec["prior"] == "learned" and rec["test_nll"] == pytest.approx(rec["bpd_uniform_prior"], rel=1e-6)


def test_a_short_run_learns_codes_and_a_prior(one_thread):
    """Rectangles on 8 x 8 images: 200 autoencoder steps lower the reconstruction loss and keep many codes in use;
    200 prior steps then beat every factorized prior over the 2 x 2 code map (seeded, CPU, a few seconds)."""
    torch.manual_seed(0)
    train_x = rectangles(1024, 0)
    test_x = rectangles(128, 1)
    data = common.Data("synthetic", "image", (1, 8, 8), train_x, test_x)
    cfg = small_cfg(steps=200, prior_steps=200, codebook="ema", restart=True, log_every=1000, ckpt_every=0,
                    out="/tmp/unused", ckpt="/tmp/unused/ckpt.pt")
    run, model = run_cpu(), vqvae.VQVAE(cfg, data.shape)
    opt, batches, recon, ppl = torch.optim.Adam(model.parameters(), cfg.lr), common.Batches(data, cfg, run), [], []
    for _ in range(cfg.steps):
        loss, terms = model(next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
        recon.append(terms["recon"].item())
        ppl.append(terms["ppl"].item())
    assert sum(recon[-20:]) / 20 < 0.8 * sum(recon[:20]) / 20 and min(ppl[-20:]) > 4, (recon[:2], recon[-2:], ppl[-3:])
    model.eval().requires_grad_(False)
    priors = vqvae.Priors(cfg, 0)
    opt = torch.optim.Adam(priors.parameters(), cfg.prior_lr)
    for _ in range(cfg.prior_steps):
        loss, _ = priors([lv["codes"] for lv in model.encode(next(batches))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec = vqvae.evaluate(model, priors, data, cfg, run, 200)
    # the best factorized prior (one code distribution for every position, fit on the test codes themselves) costs
    # D_z log(perplexity) nats; the PixelCNN prior must beat it, so it learned how codes depend on each other
    marginal = common.bits_per_dim(4 * math.log(rec["perplexity"]), 64)
    assert rec["perplexity"] > 4 and rec["prior_bpd"] < 0.9 * marginal and rec["test_nll"] < rec["bpd_uniform_prior"], rec


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--hidden", "16", "--res-hidden", "8", "--codes", "16", "--code-dim", "4",
            "--prior-channels", "8", "--prior-layers", "2", "--batch-size", "16", "--eval-n", "32", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "vqvae.py", "--steps", "2", "--prior-steps", "2", "--levels", "2", "--down", "2", "--class-cond", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "ppl_top" in p.stdout and "prior: 2 gated PixelCNN(s)" in p.stdout, p.stdout
    for name in ("ckpt.pt", "prior.pt", "config.json", "recon_2.png", "samples_prior_2.png"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in recs if r["split"] == "test"]
    assert [r["prior"] for r in tests] == ["uniform", "learned"] and tests[1]["class_cond"] and "dead_bottom" in tests[1]
    p = run_script(PYTHON, "vqvae.py", "--stage", "ae", "--steps", "3", "--prior-steps", "2", "--levels", "2", "--down", "2",
                   "--class-cond", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "vqvae.py", "--stage", "prior", "--steps", "3", "--prior-steps", "4", "--levels", "2", "--down", "2",
                   "--class-cond", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 4/4" in p.stdout and "step 3/3" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "vqvae.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 3 and rec["kind"] == "bound" and rec["prior"] == "learned" and rec["n_test"] == 32
    assert 0 < rec["test_nll"] <= rec["bpd_uniform_prior"] + 1 and rec["levels"] == 2
    p = run_script(PYTHON, "vqvae.py", "--sample", "10", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and "images/s" in p.stdout and "245 prior evaluations" in p.stdout and (out / "sample.png").is_file(), p.stderr


def test_bad_flags_stop_with_one_clear_line(tmp_path, fake_fashion):
    parse = lambda *a: vqvae.train(common.parse_config(vqvae.Config, vqvae.PRESETS, vqvae.METHOD,
                                                       ["--data-dir", fake_fashion, "--out", str(tmp_path / "r"), *a]))
    with pytest.raises(SystemExit, match="--codebook 'kmeans' unknown; accepted: loss, ema"):
        parse("--codebook", "kmeans")
    with pytest.raises(SystemExit, match="--levels 2: needs a power of 2 >= 2 such that 28x28 divides by 8 .*--down 2"):
        parse("--levels", "2")
    with pytest.raises(SystemExit, match="--decay 1.0 out of range"):
        parse("--decay", "1.0")
    with pytest.raises(SystemExit, match="--levels 3 unknown; accepted: 1, 2"):
        parse("--levels", "3", "--down", "2")
    with pytest.raises(SystemExit, match="no checkpoint at"):
        parse("--stage", "prior")
    with pytest.raises(SystemExit, match="--sample needs a trained prior"):
        run = tmp_path / "ae"
        p = run_script(PYTHON, "vqvae.py", "--stage", "ae", "--steps", "1", "--hidden", "8", "--res-hidden", "4", "--codes", "8",
                       "--code-dim", "2", "--batch-size", "8", "--eval-n", "8", "--data-dir", fake_fashion, "--out", str(run))
        assert p.returncode == 0, p.stderr
        p = run_script(PYTHON, "vqvae.py", "--sample", "4", "--ckpt", str(run / "ckpt.pt"))
        raise SystemExit(p.stderr.strip().splitlines()[-1])
