"""vdvae.py: gradient skipping (exactly the steps above the threshold; optimizer and EMA untouched on them), the KL
per layer, the scaled-down initialisation, nearest-neighbour upsampling, the mixture's normalisation, learning and
the command line."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
import vdvae
from conftest import PYTHON, rectangles, run_script

SMALL = dict(width=8, zdim=2, enc_blocks="8x1,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4x2,8m4,8x1", mixtures=2, batch_size=16,
             ema=0.9, warmup=5, eval_n=0)


@pytest.mark.parametrize("fused", (False, True))
def test_gradient_skipping_skips_exactly_the_steps_above_the_threshold(fused):
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    ema = common.EMA(model, 0.5, warmup=False)
    update = vdvae.SkipUpdate(opt, model, ema, clip=200.0, threshold=400.0, device=torch.device("cpu"))
    norms = [1.0, 500.0, 2.0, float("nan"), 1000.0, 3.0]
    for i, n in enumerate(norms):
        before = (model.weight.detach().clone(), ema.model.weight.detach().clone(), {k: v.clone() for k, v in opt.state[model.weight].items()}
                  if opt.state else {})
        loss = (model.weight * torch.tensor([n, 0.0, 0.0])).sum()  # d loss / d w = (n, 0, 0): the gradient norm is n
        opt.zero_grad()
        norm = update(loss)
        skipped = not n < 400
        assert (norm.item() == n) or math.isnan(n)
        unchanged = torch.equal(model.weight, before[0]) and torch.equal(ema.model.weight, before[1])
        assert unchanged == skipped, (i, n)
        if skipped and before[2]:  # Adam's moments and step count stay as they were
            assert all(torch.equal(v, before[2][k]) for k, v in opt.state[model.weight].items()), (i, n)
    assert update.skipped.item() == 3 and opt.state[model.weight]["step"].item() == 3


def test_kl_per_layer_adds_up_and_is_zero_when_q_is_p():
    torch.manual_seed(0)
    m, v = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert vdvae.gaussian_kl(m, v, m, v).abs().max() < 1e-15  # 0 up to rounding
    q, p = torch.distributions.Normal(m, v.exp()), torch.distributions.Normal(m.flip(0), v.flip(0).exp())
    assert torch.allclose(vdvae.gaussian_kl(m, v, m.flip(0), v.flip(0)), torch.distributions.kl_divergence(q, p))
    model = vdvae.VDVAE(vdvae.Config(**SMALL), (1, 8, 8)).double()
    x = rectangles(5, 0).double() / 255
    torch.manual_seed(1)
    out, kls = model(x)
    torch.manual_seed(1)
    loss, terms = vdvae.vdvae_loss(model, model, x)
    assert len(kls) == model.n_layers == 6
    assert torch.allclose(terms["kl"], sum(k.flatten(1).sum(1) for k in kls).mean())
    assert torch.allclose(loss * 64, terms["recon"] + terms["kl"])


def test_scaled_down_initialisation_and_nearest_upsampling():
    torch.manual_seed(0)
    cfg = vdvae.Config(**{**SMALL, "width": 64})
    model = vdvae.VDVAE(cfg, (1, 8, 8))
    N_dec, N_enc, mid = len(model.dec_blocks), len(model.enc_blocks), 16
    default_std = 1 / math.sqrt(3 * mid)  # PyTorch's conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    dec = torch.cat([b.resnet.c4.weight.flatten() for b in model.dec_blocks])
    enc = torch.cat([b.c4.weight.flatten() for b in model.enc_blocks])
    assert dec.std().item() == pytest.approx(default_std * math.sqrt(1 / N_dec), rel=0.1)
    assert enc.std().item() == pytest.approx(default_std * math.sqrt(1 / N_enc), rel=0.1)
    assert all((b.prior.c4.weight == 0).all() for b in model.dec_blocks)  # the prior starts as N(0, 1) and adds nothing
    block = model.dec_blocks[1]  # "4m1"
    low = torch.randn(2, 64, 1, 1)
    h = block.state({1: low}, torch.zeros(2, 64, 4, 4))
    assert torch.equal(h, low.expand(-1, -1, 4, 4))
    block = model.dec_blocks[4]  # "8m4"
    low = torch.randn(2, 64, 4, 4)
    assert torch.equal(block.state({4: low}, torch.zeros(2, 64, 8, 8)), low.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_mixture_likelihood_sums_to_one_over_the_256_values():
    params = torch.randn(1, 9, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = torch.arange(256, dtype=torch.float64).view(256, 1, 1, 1) / 127.5 - 1
    assert abs(vdvae.disc_mix_logistic_log_prob(values, params.expand(256, -1, -1, -1), 3).exp().sum().item() - 1) < 1e-9


def test_a_short_run_lowers_the_bound(one_thread):
    torch.manual_seed(0)
    data = common.Data("synthetic", "image", (1, 8, 8), rectangles(1024, 0), rectangles(64, 1))
    cfg = vdvae.Config(**{**SMALL, "width": 16, "zdim": 4, "lr": 2e-3, "steps": 200})
    run = common.Run(torch.device("cpu"), None, 0, 1, Path("/tmp/unused"), True, True)
    model = vdvae.VDVAE(cfg, data.shape)
    ema = common.EMA(model, cfg.ema, warmup=False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.9), weight_decay=0.01)
    update, batches = vdvae.SkipUpdate(opt, model, ema, 200.0, 400.0, run.device), common.Batches(data, cfg, run)
    first = vdvae.evaluate(ema.model, data, cfg, run, 0)["test_nll"]
    for _ in range(cfg.steps):
        loss, _ = vdvae.vdvae_loss(model, model, next(batches))
        opt.zero_grad()
        update(loss)
    rec = vdvae.evaluate(ema.model, data, cfg, run, cfg.steps, int(update.skipped.item()))
    assert rec["kind"] == "bound" and rec["stochastic_layers"] == 6 and set(rec["kl_per_resolution"]) == {"1", "4", "8"}
    assert rec["test_nll"] < 0.7 * first and rec["skipped_updates"] == 0, (first, rec)  # (seeded: 3.13 -> 1.94 bpd)


def test_command_line_end_to_end(tmp_path, fake_fashion):
    out = tmp_path / "run"
    args = ["--data-dir", fake_fashion, "--out", str(out), "--width", "8", "--zdim", "2", "--mixtures", "2",
            "--enc-blocks", "28x1,28d2,14x1,14d2,7d7,1x1", "--dec-blocks", "1x1,7m1,14m7,28m14", "--batch-size", "8",
            "--eval-n", "16", "--log-every", "1", "--device", "cpu"]
    p = run_script(PYTHON, "vdvae.py", "--steps", "2", *args)
    assert p.returncode == 0, p.stderr
    assert "step 2/2 | loss" in p.stdout and "grad_norm" in p.stdout and "4 stochastic layers" in p.stdout, p.stdout
    for name in ("ckpt.pt", "config.json", "recon_2.png", "samples_2_t1.png", "samples_2_t0.8.png"):
        assert (out / name).is_file(), name
    p = run_script(PYTHON, "vdvae.py", "--steps", "3", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "vdvae.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--data-dir", fake_fashion)
    assert p.returncode == 0, p.stderr
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 3 and rec["kind"] == "bound" and rec["unit"] == "bpd" and rec["n_test"] == 16 and rec["skipped_updates"] == 0
    assert 0 < rec["test_nll"] < 20 and set(rec["kl_per_resolution"]) == {"1", "7", "14", "28"}
    p = run_script(PYTHON, "vdvae.py", "--sample", "9", "--temperature", "0.5", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and "images/s" in p.stdout and (out / "sample_t0.5.png").is_file(), p.stderr


def test_bad_flags_stop_with_one_clear_line(tmp_path, fake_fashion):
    parse = lambda *a: vdvae.train(common.parse_config(vdvae.Config, vdvae.PRESETS, vdvae.METHOD,
                                                       ["--data-dir", fake_fashion, "--out", str(tmp_path / "r"), *a]))
    with pytest.raises(SystemExit, match="--dec-blocks '1x1,7q1': cannot read '7q1'"):
        parse("--dec-blocks", "1x1,7q1")
    with pytest.raises(SystemExit, match="a block at 32x32 where the resolution is 28x28"):
        parse("--enc-blocks", "32x2,32d2")
    with pytest.raises(SystemExit, match="mixes in a resolution not decoded before it"):
        parse("--dec-blocks", "1x1,14m7,28m14")
    with pytest.raises(SystemExit, match="0 < --bottleneck <= 1"):
        parse("--bottleneck", "0")
