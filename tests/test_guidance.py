"""guidance.py: classifier-free guidance (w = 0 is the conditional model, the batched pass is the formula, the label
dropout rate), classifier guidance (g = the closed-form gradient of log softmax; on Gaussian class-conditional data the
guided eps and mean shift match Bayes' rule and strong guidance pulls samples to the class mean), the caption encoder
(fixed vocabulary, deterministic, the null caption, attention context = projected tokens), learning, and the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch

import common
import guidance as G
from conftest import PYTHON, rectangles, run_script


def small_cfg(**kw):
    base = dict(channels=8, ch_mult="1,2", res_blocks=1, attn_res="4", head_channels=4, dropout=0.0, cls_channels=8, cls_res_blocks=1,
                text_ctx=6, text_width=16, text_layers=1, text_heads=2, T=50, sample_steps=10, hflip=False)
    return G.Config(**{**base, **kw})


def randomize(model, seed=0):  # zero-initialised output layers would make every eps 0: give every weight a value
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------- classifier-free guidance
def test_cfg_eps_is_the_formula_and_w0_is_the_conditional_model(one_thread):
    cfg = small_cfg()
    model = randomize(G.UNet(cfg, (1, 8, 8), 10))
    x, t, c = torch.randn(6, 1, 8, 8), torch.randint(1, 51, (6,)), torch.arange(6)
    null = torch.tensor(10)
    e_c, e_u = model(x, t, c), model(x, t, null.expand(6))
    assert not torch.allclose(e_c, e_u, atol=1e-3)  # the label matters
    for w in (0.5, 3.0):  # one batched pass == (1 + w) eps(z, c) - w eps(z) from two passes
        torch.testing.assert_close(G.cfg_eps(model, x, t, c, null, w), (1 + w) * e_c - w * e_u, rtol=1e-4, atol=1e-5)
    assert torch.equal(G.cfg_eps(model, x, t, c, null, 0.0), e_c)
    # drop_condition puts exactly the null label where drop is set; the null label is the unconditional branch
    drop = torch.tensor([True, False, True, False, False, True])
    c_drop = G.drop_condition(c, null, drop)
    assert c_drop.tolist() == [10, 1, 10, 3, 4, 10]
    torch.testing.assert_close(model(x, t, c_drop)[drop], e_u[drop])
    # samples: w = 0 never looks at the unconditional branch (another null gives the same samples); w = 1 does
    sched = G.make_schedule(cfg, 5)
    draw = lambda w, nl: (torch.manual_seed(0), G.sample(model, sched, (1, 8, 8), c, torch.tensor(nl), w))[1]
    assert torch.equal(draw(0.0, 10), draw(0.0, 3)) and not torch.equal(draw(1.0, 10), draw(1.0, 3))


def test_label_dropout_rate(one_thread):
    seen = []

    def net(x_t, t, c):  # records the conditions the loss shows the network
        seen.append(c)
        return torch.zeros_like(x_t, requires_grad=True)

    sched, x, y = G.make_schedule(small_cfg()), torch.rand(20000, 1, 1, 1), torch.randint(0, 10, (20000,))
    for p in (0.1, 0.2):
        torch.manual_seed(1)
        _, terms = G.loss_fn(net, sched, x, y, torch.tensor(10), p)
        frac = (seen[-1] == 10).double().mean().item()
        assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / 20000) and terms["null_frac"].item() == pytest.approx(frac)
        assert torch.equal(seen[-1][seen[-1] != 10], y[seen[-1] != 10])  # the rest keep their labels
    _, _ = G.loss_fn(net, sched, x[:100], y[:100], torch.tensor(10), 0.0)
    assert (seen[-1] != 10).all()


# ----------------------------------------------------------------------------- classifier guidance
def test_inception_like_score():
    K = 10  # IS-like: 1 when p(y|x) carries nothing, K for confident predictions spread evenly over the K classes
    assert G.inception_like_score(torch.zeros(50, K)) == pytest.approx(1.0)
    assert G.inception_like_score(torch.tensor([60.0]).repeat(50, 1) * torch.eye(K).repeat(5, 1)) == pytest.approx(K, rel=1e-6)
    assert G.inception_like_score(50 * torch.eye(K)[torch.zeros(50, dtype=torch.long)]) == pytest.approx(1.0)  # one class only
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)  # by hand: exp(mean_x KL(p(y|x) || p(y))), p(y) = (0.45, 0.55)
    kl = (p * (p / p.mean(0)).log()).sum(1).mean()
    assert G.inception_like_score(p.log()) == pytest.approx(math.exp(kl.item()), rel=1e-12)


def test_classifier_grad_is_the_gradient_of_log_softmax():
    W = torch.randn(5, 12)  # a linear classifier: logits = W x
    clf = lambda x, t: x.flatten(1) @ W.T
    x, y = torch.randn(7, 3, 2, 2), torch.randint(0, 5, (7,))
    p = (x.flatten(1) @ W.T).softmax(1)
    expected = (W[y] - p @ W).view(7, 3, 2, 2)  # grad_x log softmax(Wx)_y = W_y - sum_k p_k W_k
    torch.testing.assert_close(G.classifier_grad(clf, x, torch.zeros(7, dtype=torch.long), y), expected, rtol=1e-4, atol=1e-5)


class GaussianClasses:
    """x_0 | y ~ N(m_y, v I) in 2D (as (B, 2, 1, 1) images, inside [-1, 1]), p(y) uniform: x_t | y ~ N(sqrt(ab) m_y, s_t^2 I),
    s_t^2 = ab v + 1 - ab; every eps and p(y | x_t) in closed form. Label 3 is the null one (the mixture)."""

    def __init__(self, T=200):
        self.m, self.v = torch.tensor([[0.2, 0.0], [-0.16, 0.12], [0.0, -0.2]]), 0.01  # overlapping: p(y | x_0) < 1
        self.cfg = small_cfg(T=T, beta_T=0.1)
        self.ab = torch.cumprod(1 - torch.linspace(1e-4, 0.1, T, dtype=torch.float64), 0).float()  # alpha_bar at t = 1..T

    def moments(self, t):
        ab = self.ab[t - 1][:, None]
        return ab, ab * self.v + 1 - ab  # (B, 1) each

    def logits(self, x, t):  # log p(y | x_t) up to a constant: -||x - sqrt(ab) m_y||^2 / (2 s_t^2)
        ab, s2 = self.moments(t)
        return -((x.flatten(1)[:, None] - ab.sqrt()[:, None] * self.m) ** 2).sum(-1) / (2 * s2)

    def eps(self, x, t, c):  # eps = -sqrt(1 - ab) grad log p(x_t [| y]); c = 3: the mixture's
        ab, s2 = self.moments(t)
        resp = self.logits(x, t).softmax(1)  # p(y | x_t)
        mean = torch.where((c < 3)[:, None], self.m[c.clamp(max=2)], resp @ self.m)  # the class mean, or E[m | x_t]
        return ((1 - ab).sqrt() * (x.flatten(1) - ab.sqrt() * mean) / s2).view_as(x)

    def draw(self, sched, n, sampler, s, cond):
        torch.manual_seed(0)
        y = torch.full((n,), 1)
        x = G.sample(self.eps, sched, (2, 1, 1), y if cond else torch.full((n,), 3), torch.tensor(3), 0.0, self.logits, y, s,
                     sampler, clip_x0=False)
        return x.flatten(1) * 2 - 1  # sample() returns (x + 1) / 2


def test_guided_eps_and_mean_shift_match_bayes():
    gc = GaussianClasses()
    sched = G.make_schedule(gc.cfg)
    x, i, y = torch.randn(64, 2, 1, 1), torch.randint(1, 201, (64,)), torch.randint(0, 3, (64,))
    null = torch.full_like(y, 3)
    g = G.classifier_grad(gc.logits, x, i, y)
    ab, s2 = gc.moments(i)
    torch.testing.assert_close(g.flatten(1), ab.sqrt() * (gc.m[y] - gc.logits(x, i).softmax(1) @ gc.m) / s2, rtol=1e-4, atol=1e-5)
    # s = 1: the unconditional eps guided by the exact classifier is the exact conditional eps (Bayes' rule)
    torch.testing.assert_close(G.guided_eps(sched, i, gc.eps(x, i, null), g, 1.0), gc.eps(x, i, y), rtol=1e-4, atol=1e-5)
    # DDPM: the sampler's mean is Ho et al.'s mu_theta; the exact conditional mean is the unconditional one + (beta_t / sqrt(alpha_t)) g
    alpha = (sched.sqrt_alpha_bar / sched.sqrt_alpha_bar_prev)[i][:, None, None, None] ** 2
    beta = 1 - alpha
    mu = lambda e: (x - beta / G.at(sched.sqrt_one_minus_alpha_bar, i) * e) / alpha.sqrt()  # Ho et al. eq. 11
    mu_u, mu_c = mu(gc.eps(x, i, null)), mu(gc.eps(x, i, y))
    x0 = G.at(sched.sqrt_recip_alpha_bar, i) * x - G.at(sched.sqrt_recipm1_alpha_bar, i) * gc.eps(x, i, null)
    torch.testing.assert_close(G.at(sched.coef_x0, i) * x0 + G.at(sched.coef_xt, i) * x, mu_u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(G.guided_mean(mu_u, beta, g, 1 / alpha.sqrt()), mu_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(G.guided_mean(mu_u, beta, g, 2.0), mu_u + 2 * beta * g)
    torch.testing.assert_close(G.at(sched.var_beta, i)[i > 1], beta[i > 1])  # Sigma = beta_t (t > 1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_on_gaussian_classes_samples_the_class_and_strong_guidance_sharpens(sampler):
    gc, n = GaussianClasses(), 3000
    sched = G.make_schedule(gc.cfg)  # all T = 200 steps: DDIM's variance is 12% low and DDPM's 11% high (25 steps: -60%, +170%)
    x_cond, x_cls, x_strong, x_uncond = (gc.draw(sched, n, sampler, s, cond) for s, cond in ((0, True), (1, False), (4, False), (0, False)))
    for x in (x_cond, x_cls):  # the conditional model, and the unconditional one + the classifier at s = 1: p(x | y = 1)
        assert (x.mean(0) - gc.m[1]).abs().max() < 0.01 and abs(x.var(0).mean() / gc.v - 1) < 0.15, (x.mean(0), x.var(0))
    if sampler == "ddim":  # the same eps (Bayes' rule), so the same deterministic samples
        torch.testing.assert_close(x_cls, x_cond, rtol=0, atol=1e-4)
    d = lambda x: (x - gc.m[1]).norm(dim=1).mean()
    assert d(x_uncond) > 2 * d(x_cls)  # no guidance: the mixture of the 3 classes
    confidence = lambda x: gc.logits(x.view(-1, 2, 1, 1), torch.ones(n, dtype=torch.long)).softmax(1)[:, 1].mean()  # p(y = 1 | x_0)
    assert confidence(x_uncond) < 0.4 and confidence(x_cls) > 0.85 and confidence(x_strong) > confidence(x_cls) + 0.05  # fidelity up
    assert x_strong.var(0).mean() < 0.9 * x_cls.var(0).mean()  # diversity down (DDIM: -50%, DDPM: -23%)
    if sampler == "ddim":  # unconditional + s g = conditional + (s - 1) g, exactly: eps_u - sqrt(1 - ab) g = eps_c
        torch.testing.assert_close(gc.draw(sched, n, sampler, 3, True), x_strong, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- captions (GLIDE)
def test_captions_vocabulary_and_errors():
    caps = G.Captions(G.NAMES["fashion-mnist"], 8)
    assert G.caption("ankle boot", 2) == "an image of an ankle boot" and G.caption("sneaker") == "a photo of a sneaker"
    assert len(caps.vocab) == 18 and caps.vocab["<pad>"] == 0 and caps.table.shape == (10, len(G.TEMPLATES), 8)
    tokens = caps.encode("A photo of a Sneaker")  # case-insensitive, padded with 0
    assert torch.equal(tokens, caps.table[7, 0]) and tokens[5:].eq(0).all() and tokens[:5].gt(0).all()
    assert torch.equal(caps.encode(""), torch.zeros(8, dtype=torch.long))  # the empty caption: the null condition
    with pytest.raises(SystemExit, match="the word 'cat' is not in the vocabulary; accepted words: a, an, ankle, bag"):
        caps.encode("a photo of a cat")
    with pytest.raises(SystemExit, match="has 9 words; --text-ctx 8 holds at most 8"):
        caps.encode("a photo of a photo of a photo of")


def test_text_encoder_null_caption_and_attention_context(one_thread):
    cfg = small_cfg(cond="text")
    conds = G.Conditions(cfg, "fashion-mnist", 10, "cpu")
    model = randomize(G.UNet(cfg, (1, 8, 8), 10, conds.vocab))
    labels = torch.tensor([7, 0, 9, 7])
    c = conds.of(labels)  # the first template's caption of each
    proj, tokens = model.caption(c)
    assert proj.shape == (4, 4 * cfg.channels) and tokens.shape == (4, cfg.text_ctx, cfg.text_width)
    proj2, tokens2 = model.caption(c.flip(0))
    assert torch.equal(proj2, proj.flip(0)) and torch.equal(tokens2, tokens.flip(0))  # deterministic, per caption
    assert torch.equal(proj[0], proj[3]) and not torch.allclose(proj[0], proj[1])
    # the null caption is the empty one; dropping a caption gives exactly the unconditional branch
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 7)
    dropped = G.drop_condition(c, conds.null, torch.tensor([False, True, False, True]))
    assert dropped[1].eq(0).all() and torch.equal(dropped[0], c[0])
    torch.testing.assert_close(model(x, t, dropped)[1], model(x, t, conds.null.expand_as(c))[1])
    assert not torch.allclose(model(x, t, c), model(x, t, conds.null.expand_as(c)), atol=1e-3)  # the caption reaches eps
    # every attention layer gets the tokens projected to its keys and values: (B, K, 2C), concatenated to its context
    seen = []
    attns = [m for m in model.modules() if isinstance(m, G.Attention)]
    for m in attns:
        m.ctx_kv.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.shape)))
    model(x, t, c)
    assert len(seen) == len(attns) >= 3
    assert all(i == (4, cfg.text_ctx, cfg.text_width) and o[:2] == (4, cfg.text_ctx) and o[2] % 2 == 0 for i, o in seen)


def test_attention_with_context_is_softmax_over_tokens_and_pixels():
    torch.manual_seed(0)
    att = randomize(G.Attention(4, 4, ctx_dim=3))  # one head of 4 channels
    x, ctx = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3)
    q, k, v = att.qkv(att.norm(x)).flatten(2).transpose(1, 2).chunk(3, -1)  # (2, 9, 4)
    ek, ev = att.ctx_kv(ctx).chunk(2, -1)  # (2, 5, 4)
    K, V = torch.cat([ek, k], 1), torch.cat([ev, v], 1)
    h = ((q @ K.transpose(1, 2)) / 2).softmax(-1) @ V  # sqrt(4) = 2
    expected = x + att.proj(h.transpose(1, 2).reshape(2, 4, 3, 3))
    torch.testing.assert_close(att(x, ctx), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- learning, CLI
def test_short_run_lowers_both_losses(one_thread):
    torch.manual_seed(0)
    cfg = small_cfg(T=100)
    x = rectangles(512, 0).float() / 255
    y = (x.flatten(1).argmax(1) % 8 >= 4).long()  # 2 classes: where the rectangle starts, left or right
    sched, null = G.make_schedule(cfg), torch.tensor(2)
    model, clf = G.UNet(cfg, (1, 8, 8), 2), G.Classifier(cfg, (1, 8, 8), 2)
    opts = [torch.optim.Adam(model.parameters(), 3e-3), torch.optim.Adam(clf.parameters(), 3e-3)]
    hist = {"eps": [], "cls": []}
    for step in range(150):
        i = torch.randint(0, 512, (32,))
        for key, opt, (loss, _) in (("eps", opts[0], G.loss_fn(model, sched, x[i], y[i], null, 0.1)),
                                    ("cls", opts[1], G.classifier_loss(clf, sched, x[i], y[i]))):
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist[key].append(loss.item())
    first, last = (lambda h: sum(h[:15]) / 15), (lambda h: sum(h[-15:]) / 15)
    assert last(hist["eps"]) < 0.6 * first(hist["eps"]) and last(hist["cls"]) < 0.9 * math.log(2), hist["cls"][-15:]


def tiny_flags(fake, cache, out):
    return ["--data-dir", fake, "--cache-dir", cache, "--out", str(out), "--channels", "8", "--ch-mult", "1,2", "--res-blocks", "1",
            "--attn-res", "7", "--head-channels", "8", "--cls-channels", "8", "--cls-res-blocks", "1", "--T", "20", "--sample-steps", "3",
            "--batch-size", "16", "--eval-n", "32", "--sweep-n", "2", "--sweep-scales", "0,2", "--grid", "2", "--eval-batch", "50",
            "--text-width", "16", "--text-heads", "2", "--text-layers", "1", "--log-every", "1"]


def call_main(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["guidance.py", *argv])
    G.main()


def test_cli_train_sweep_resume_sample_eval(tmp_path, fake_fashion, fd_cache, monkeypatch, capsys):
    out = tmp_path / "run"
    flags = tiny_flags(fake_fashion, fd_cache, out)
    p = run_script(PYTHON, "guidance.py", "--steps", "3", "--cls-steps", "3", "--sweep-kinds", "free,classifier,classifier-uncond", *flags)
    assert p.returncode == 0, p.stderr
    assert "step 3/3 | loss" in p.stdout and "null_frac" in p.stdout and "noisy classifier" in p.stdout and "acc_q0" in p.stdout
    for name in ("ckpt.pt", "classifier.pt", "samples_3.png", "sweep.md", "sweep_free_2.png", "sweep_classifier-uncond_0.png"):
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in recs if r["split"] == "test"]
    sweep = [r for r in tests if "guidance" in r]
    assert [(r["guidance"], r["scale"]) for r in sweep] == [(k, s) for k in ("free", "classifier", "classifier-uncond") for s in (0, 2)]
    assert all(r["test_nll"] is None and r["kind"] is None and r["samples"] == 20 and 0 <= r["accuracy"] <= 1 for r in sweep)
    assert all(1 <= r["is_like"] <= 10 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fd"] > 0 for r in sweep)
    assert [r["nfe"] for r in sweep] == [3, 6, 3, 3, 3, 3] and [r["classifier_evals"] for r in sweep] == [0, 0, 0, 3, 0, 3]
    held = [r for r in tests if "mse_cond" in r][-1]
    assert held["n_test"] == 32 and 0 <= held["cls_accuracy"] <= 1 and held["mse_cond"] > 0 and "mse_uncond_q3" in held
    assert "| guidance | scale | FD | IS-like |" in (out / "sweep.md").read_text()
    call_main(monkeypatch, "--stage", "diffusion", "--steps", "5", "--resume", "--sweep-n", "0", *flags)
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 3" in text and "step 5/5" in text and "step 1/" not in text
    call_main(monkeypatch, "--sample", "6", "--class", "2", "--guidance", "classifier", "--scale", "2", "--ckpt", str(out / "ckpt.pt"))
    assert "6 samples (class 2, guidance classifier 2)" in (text := capsys.readouterr().out) and "+ 3 classifier gradients" in text
    assert (out / "sample.png").is_file()
    call_main(monkeypatch, "--eval", "--ckpt", str(out / "ckpt.pt"), "--sweep-kinds", "free", "--sweep-scales", "1")
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 5 and rec["guidance"] == "free" and rec["scale"] == 1 and rec["nfe"] == 6
    # text: a caption model, sampled with a prompt
    tout = tmp_path / "text"
    call_main(monkeypatch, "--cond", "text", "--stage", "diffusion", "--steps", "2", *tiny_flags(fake_fashion, fd_cache, tout))
    assert "condition text (17 words, 1-layer transformer)" in capsys.readouterr().out
    call_main(monkeypatch, "--sample", "4", "--prompt", "an image of a bag", "--scale", "3", "--ckpt", str(tout / "ckpt.pt"))
    assert "4 samples (prompt 'an image of a bag', guidance free 3)" in capsys.readouterr().out and (tout / "sample.png").is_file()
    for argv, msg in ((["--sample", "2", "--class", "12"], "--class 12 out of range; accepted: 0..9"),
                      (["--sample", "2", "--prompt", "a bag", "--guidance", "classifier"], "--prompt samples with --guidance free or none"),
                      (["--sample", "2", "--guidance", "classifier"], "classifier guidance needs a trained classifier; none at")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *argv, "--ckpt", str(tout / "ckpt.pt"))


def test_bad_flags_stop_with_one_clear_line(tmp_path, fake_fashion, monkeypatch):
    base = ["--data-dir", fake_fashion, "--out", str(tmp_path / "r"), "--steps", "1"]
    for argv, msg in ((["--sweep-kinds", "free,bogus"], "--sweep-kinds 'free,bogus': bogus unknown; accepted: a comma-separated list of free, classifier"),
                      (["--prompt", "a bag"], "--prompt needs a text-conditional model"),
                      (["--p-uncond", "1.5"], "--p-uncond 1.5 .* out of range"),
                      (["--sample-steps", "30", "--T", "20"], "--sample-steps 30 out of range; accepted: 1..T"),
                      (["--guidance", "cfg"], "--guidance 'cfg' unknown; accepted: free, classifier, none"),
                      (["--dataset", "moons"], "guidance.py needs labelled images"),
                      (["--text-width", "10", "--text-heads", "4"], "--text-width 10 must be a positive multiple of --text-heads 4")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *base, *argv)
