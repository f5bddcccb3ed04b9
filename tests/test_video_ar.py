"""video_ar.py: exact causality of the Video Transformer (within a slice and across slices), the block-local mask and
its attention cost, subscale split / merge, uniform logits = 8 bits/dim, cached = uncached sampling, the EMA codebook
and straight-through gradient of the 3D VQ-VAE, learning, and the command line end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import video_ar as va
from conftest import PYTHON, run_script


def tiny(shape=(4, 2, 4, 4), zero_head=False, **kw):
    torch.manual_seed(0)
    cfg = va.Config(**{**dict(subscale="2,2,2", blocks="2x1x2,1x2x2,2x2x1", enc_layers=2, dec_layers=2, width=16, heads=2), **kw})
    model = va.VideoTransformer(cfg, shape).double().eval()
    if not zero_head:  # the head starts at zero (uniform logits); give it weights so every input can show
        torch.nn.init.normal_(model.head[-1].weight, std=0.5)
    return model


def moving_squares(n, T=4, S=8, seed=0):
    """uint8-valued videos (n, T, S, S, 1): a 3x3 square of one grey level moving one pixel per frame."""
    g, x = torch.Generator().manual_seed(seed), torch.zeros(n, T, S, S, 1, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, S - 3 - T, (2,), generator=g).tolist()
        level = torch.randint(128, 256, (1,), generator=g).item()
        for t in range(T):
            x[i, t, r + t:r + t + 3, c:c + 3] = level
    return x


def test_logits_depend_only_on_earlier_slices_pixels_and_channels(one_thread):
    for cond_frames in (0, 1):
        model = tiny(cond_frames=cond_frames)
        (T, H, W), C, s = model.video, model.C, model.s
        x = torch.randint(0, 256, (1, T, H, W, C))
        onehot = F.one_hot(x, 256).double().requires_grad_()  # (1, T, H, W, C, 256)
        order = va.subscale_split(torch.arange(T * H * W).view(1, T, H, W), s)[0].flatten(1)  # (S, n): pixel ids, generation order
        for k in range(model.S):
            logits = model(onehot, torch.tensor([k])).flatten(1, 3)  # (1, n, C, 256)
            for i in range(model.n):
                for c in range(C):
                    (g,) = torch.autograd.grad(logits[0, i, c].square().sum(), onehot, retain_graph=True)
                    g = g[0].abs().sum(-1).flatten(0, 2)  # (T*H*W, C): how much each sub-pixel matters
                    allowed = torch.zeros(T * H * W, C, dtype=torch.bool)
                    allowed[order[:k].flatten()] = True  # every pixel of the earlier slices
                    allowed[order[k, :i]] = True  # the earlier pixels of this slice
                    allowed[order[k, i], :c] = True  # the earlier channels of this pixel
                    allowed[:cond_frames * H * W] = True  # the given frames
                    assert (g[~allowed] == 0).all(), (k, i, c)
                    if k > 0:
                        assert g[order[:k].flatten()].sum() > 0  # the earlier slices do reach it
                    if i > 0:
                        assert g[order[k, i - 1]].sum() > 0
                    if c > 0:
                        assert g[order[k, i], c - 1] > 0
            if cond_frames and k == 0:  # the given frame reaches the first slice through the encoder
                assert torch.autograd.grad(logits.square().sum(), onehot)[0][0, 0].abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
def test_block_local_attention_connects_exactly_a_block(causal):
    torch.manual_seed(0)
    grid, block = (4, 4, 4), (2, 2, 4)
    layer = va.Layer(8, 2, block, causal, grid).double()
    h = torch.randn(1, *grid, 8, dtype=torch.double, requires_grad=True)
    out = layer(h)
    t, y, x = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    ids = torch.arange(64).view(grid)
    for p in range(64):
        (g,) = torch.autograd.grad(out.flatten(1, 3)[0, p].sum(), h, retain_graph=True)
        reached = g[0].abs().sum(-1) > 0  # (4, 4, 4)
        pt, py, px = (int(a.flatten()[p]) for a in (t, y, x))
        same = (t // 2 == pt // 2) & (y // 2 == py // 2) & (x // 4 == px // 4)
        assert torch.equal(reached, same & (ids <= p) if causal else same), p


def test_subscale_split_and_merge_are_inverse_permutations():
    s, x = (2, 4, 2), torch.arange(4 * 8 * 6 * 3).view(1, 4, 8, 6, 3)
    parts = va.subscale_split(x, s)  # (1, 16, 2, 2, 3, 3)
    assert parts.shape == (1, 16, 2, 2, 3, 3) and torch.equal(va.subscale_merge(parts, s), x)
    assert torch.equal(va.subscale_split(va.subscale_merge(parts, s), s), parts)
    assert torch.equal(parts.flatten().sort().values, x.flatten())  # a permutation: every entry once
    for k, (a, b, c) in enumerate((a, b, c) for a in range(2) for b in range(4) for c in range(2)):  # slice-raster order
        assert torch.equal(parts[0, k], x[0, a::2, b::4, c::2])
    assert torch.equal(va.take_slice(x.expand(2, -1, -1, -1, -1), torch.tensor([3, 9]), s), parts[0, [3, 9]])


def test_attention_cost_is_n_p_times_block_squared(monkeypatch):
    entries, sdpa = [], F.scaled_dot_product_attention
    def counting(q, k, v, **kw):
        entries.append(math.prod(q.shape[:-1]) * k.shape[-2])  # score entries this call computed
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    grid = (4, 8, 8)  # T' H' W' = 256 positions
    for block in [(2, 4, 4), (1, 8, 8), (4, 2, 8), (4, 8, 8)]:
        entries.clear()
        va.Layer(8, 1, block, True, grid)(torch.randn(1, *grid, 8))  # one head, one video
        n_p, L = math.prod(grid) // math.prod(block), math.prod(block)
        assert entries == [n_p * L ** 2], block
    assert entries == [256 ** 2]  # one block = full attention: (T' H' W')^2
    # the slide's example: a 16 x 32 x 32 x 3 video (49152 sub-pixels), s = (4, 2, 2): 16 slices of 4 x 16 x 16 x 3 = 3072
    model = va.VideoTransformer(va.Config(subscale="4,2,2", blocks="4x16x16", width=8, heads=1, enc_layers=0, dec_layers=1), (16, 3, 32, 32))
    assert model.S == 16 and model.grid == (4, 16, 16) and model.n * model.C == 3072 and va.modelled_dims(model) == 49152
    entries.clear()
    model(torch.zeros(1, 16, 32, 32, 3, dtype=torch.long), torch.tensor([3]))
    assert entries == [1024 ** 2]  # per head, one block = the slice: 1024^2 position pairs (the slide counts 3072^2 sub-pixel pairs)


def test_uniform_logits_give_exactly_8_bits_per_dim():
    model = tiny(zero_head=True)  # the head's last layer starts at zero: every sub-pixel's softmax is uniform
    x = torch.randint(0, 256, (3, *model.video, model.C))
    nll = sum(va.slice_nll(model, x, torch.full((3,), k)) for k in range(model.S))
    assert torch.allclose(common.bits_per_dim(nll, va.modelled_dims(model)), torch.full((3,), 8.0, dtype=torch.double), atol=1e-12)
    loss, terms = va.transformer_loss(model, x)  # the one-slice estimate of training is then exact too
    assert abs(terms["bpd"].item() - 8) < 1e-12


@pytest.mark.parametrize("given", [0, 1])
def test_cached_sampling_equals_uncached(given, one_thread):
    model = tiny(cond_frames=given)
    first = torch.randint(0, 256, (2, given, *model.video[1:], model.C)) if given else None
    videos = []
    for cache in (True, False):
        g = torch.Generator().manual_seed(5)
        videos.append(va.sample_transformer(model, 2, "cpu", given=first, cache=cache, generator=g))
    assert torch.equal(videos[0], videos[1]) and videos[0].shape == (2, *model.video, model.C)
    assert not given or torch.equal(videos[0][:, :given], first)
    assert len(videos[0].unique()) > 10  # drawn, not constant


def test_prior_cached_sampling_matches_its_forward():
    torch.manual_seed(0)
    prior = va.Prior(va.Config(codes=7, width=16, heads=2, prior_layers=2), (2, 2, 3)).double().eval()
    torch.nn.init.normal_(prior.head.weight)
    z = va.sample_codes(prior, 4, "cpu", generator=torch.Generator().manual_seed(1))
    logits, h = prior(z), prior.tok(torch.full((4,), 7)) + prior.pos().flatten(0, 2)[0]  # full forward vs. step by step
    kv = [layer.new_cache(4, h) for layer in prior.layers]
    for i in range(12):
        h = prior.tok(z.flatten(1)[:, i - 1] if i else torch.full((4,), 7)) + prior.pos().flatten(0, 2)[i]
        for layer, c in zip(prior.layers, kv):
            h = layer.step(h, i, c)
        assert torch.allclose(prior.head(prior.ln(h)), logits.flatten(1, 3)[:, i], atol=1e-10)
    prefix = z.flatten(1)[:, :5]
    assert torch.equal(va.sample_codes(prior, 4, "cpu", prefix=prefix).flatten(1)[:, :5], prefix)


def codebook_step(embed, N, m, z, new, g=0.9, eps=1e-7):
    """One training step of VideoGPT's codebook, written out: nearest codes, EMA of counts and sums, Laplace-smoothed
    division, then codes with N_i < 1 replaced by the rows `new` (N_i = 1)."""
    codes = ((z[:, None] - embed[None]) ** 2).sum(-1).argmin(1)
    n = torch.bincount(codes, minlength=len(embed)).to(z)
    N2, m2 = g * N + (1 - g) * n, g * m + (1 - g) * torch.zeros_like(m).index_add_(0, codes, z)
    total = N2.sum()
    e2 = m2 / ((N2 + eps) / (total + len(N) * eps) * total)[:, None]
    dead = N2 < 1
    return torch.where(dead[:, None], new, e2), torch.where(dead, 1.0, N2).to(z), torch.where(dead[:, None], new, m2), codes


def test_codebook_first_batch_init_ema_and_restart():
    cb = va.Codebook(3, 2, decay=0.9).double().train()
    z = torch.tensor([[0.0, 0], [0.1, 0], [5, 5], [5, 5], [-4, 4], [-4, 4.5]], dtype=torch.double)
    to_map = lambda v: v.T.reshape(1, 2, len(v), 1, 1)  # (1, D, t=6, 1, 1)
    torch.manual_seed(0)
    draws = [torch.randint(6, (3,)) for _ in range(4)]  # the rows the codebook will draw: init, restart, (init: unused), restart
    torch.manual_seed(0)
    cb(to_map(z))  # step 1: the codes start as encoder outputs of the first batch, then one EMA step and a restart
    init = z[draws[0]]
    embed, N, m, codes1 = codebook_step(init, torch.ones(3, dtype=torch.double), init, z, z[draws[1]])
    assert torch.allclose(cb.embed, embed) and torch.allclose(cb.N, N) and torch.allclose(cb.m, m) and cb.ready == 1
    assert cb.restarts >= 1  # counted for the log line
    z_q, codes, n = cb(to_map(z))  # step 2: no re-initialisation; the EMA update and restart
    embed2, N2, m2, expected_codes = codebook_step(embed, N, m, z, z[draws[3]])
    assert torch.allclose(cb.embed, embed2) and torch.allclose(cb.N, N2) and torch.allclose(cb.m, m2)
    assert torch.equal(codes.flatten(), expected_codes) and torch.equal(n, torch.bincount(expected_codes, minlength=3).double())
    assert torch.equal(z_q[0, :, :, 0, 0].T, embed[expected_codes])  # z_q: the nearest code before this step's update
    assert (torch.bincount(codes1, minlength=3) == 0).any()  # a restart was exercised: two codes start equal, one is never nearest
    cb.eval()
    before = cb.embed.clone()
    cb(to_map(z))
    assert torch.equal(cb.embed, before)  # evaluation leaves the codebook alone


def test_straight_through_copies_the_decoder_gradient_to_the_encoder():
    torch.manual_seed(0)
    model = va.VQVAE3d(va.Config(down="2,2,2", hidden=16, n_res=1, codes=16, code_dim=4, beta=1e-30), (4, 1, 8, 8))
    seen = {}
    encode, decode = model.encode, model.decode
    def enc(x):
        z_e, *rest = encode(x)
        z_e.retain_grad()
        seen["z_e"] = z_e
        return (z_e, *rest)
    def dec(z):
        z.retain_grad()
        seen["z"] = z
        return decode(z)
    model.encode, model.decode = enc, dec
    loss, _ = va.vqvae_loss(model, torch.rand(2, 1, 4, 8, 8))
    loss.backward()
    assert not torch.equal(seen["z"], seen["z_e"])  # the decoder reads the codes ...
    assert torch.allclose(seen["z_e"].grad, seen["z"].grad, atol=1e-12)  # ... and the encoder receives their gradient


def test_3d_vqvae_reconstructs_a_short_clip(one_thread):
    torch.manual_seed(0)
    cfg = va.Config(down="2,2,2", hidden=32, n_res=1, codes=64, code_dim=8)
    model = va.VQVAE3d(cfg, (4, 1, 8, 8))
    clips = va.as_frames(moving_squares(16)).transpose(1, 2)  # (16, 1, 4, 8, 8)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    mse = []
    for _ in range(150):
        loss, terms = va.vqvae_loss(model, clips)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mse.append(terms["mse"].item())
    model.eval()
    with torch.no_grad():
        _, z_q, _, _ = model.encode(clips)
        rec = ((model.decode(z_q)[0] + 1) / 2).clamp(0, 1)
    assert (rec - clips).pow(2).mean() < 0.25 * clips.var(), ((rec - clips).pow(2).mean(), clips.var(), mse[:2], mse[-2:])


def test_short_runs_lower_the_loss(one_thread):
    x = moving_squares(64)  # (64, 4, 8, 8, 1)
    torch.manual_seed(0)
    model = va.VideoTransformer(va.Config(subscale="2,2,2", blocks="2x2x2,1x4x4", enc_layers=1, dec_layers=2, width=32, heads=2), (4, 1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    bpd = []
    for step in range(80):
        loss, terms = va.transformer_loss(model, x[step % 4 * 16:][:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bpd.append(terms["bpd"].item())
    assert sum(bpd[-10:]) / 10 < 0.5 * sum(bpd[:10]) / 10, (bpd[:3], bpd[-3:])
    prior = va.Prior(va.Config(codes=5, width=16, heads=2, prior_layers=2), (2, 2, 2))
    z = torch.randint(0, 5, (64, 2, 2, 2)) * (torch.rand(64, 1, 1, 1) < 0.5)  # half the volumes all zero: learnable
    opt, nll = torch.optim.Adam(prior.parameters(), 1e-2), []
    for _ in range(60):
        loss = va.prior_nll(prior, z).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll.append(loss.item())
    assert nll[0] == pytest.approx(8 * math.log(5), rel=1e-5) and nll[-1] < 0.8 * nll[0], nll[::10]


def cli_args(out, data, model):
    common_args = ["--data-dir", data, "--out", str(out), "--frames", "4", "--frame-size", "32", "--downsample", "4", "--batch-size", "4",
                   "--eval-n", "6", "--n-samples", "2", "--log-every", "1", "--device", "cpu", "--model", model, "--width", "16", "--heads", "2"]
    if model == "transformer":
        return common_args + ["--subscale", "2,2,2", "--blocks", "2x2x2,1x4x4", "--enc-layers", "1", "--dec-layers", "1"]
    return common_args + ["--down", "2,2,2", "--hidden", "16", "--n-res", "1", "--codes", "16", "--code-dim", "4", "--prior-layers", "1"]


@pytest.mark.parametrize("model", ["transformer", "videogpt"])
def test_command_line_end_to_end(tmp_path, fake_fashion, model):
    out, args = tmp_path / "run", cli_args(tmp_path / "run", fake_fashion, model)
    p = run_script(PYTHON, "video_ar.py", "--steps", "2", "--prior-steps", "2", *args)
    assert p.returncode == 0, p.stderr
    for name in ["ckpt.pt", "config.json", "samples_2.png", "samples_2.gif", "continuations_2.png"] + ["prior.pt"] * (model == "videogpt"):
        assert (out / name).is_file(), name
    tests = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "test"]
    if model == "transformer":
        assert len(tests) == 1 and tests[0]["kind"] == "exact" and len(tests[0]["bpd_per_slice"]) == 8 and tests[0]["n_test"] == 6
        assert 7.5 < tests[0]["test_nll"] < 8.5  # two steps from uniform logits
    else:
        assert [r["prior"] for r in tests] == ["uniform", "learned"] and all(r["kind"] == "bound" for r in tests)
    p = run_script(PYTHON, "video_ar.py", "--steps", "3", "--prior-steps", "3", "--resume", *args)
    assert p.returncode == 0 and "at step 2" in p.stdout and "step 3/3" in p.stdout and "step 1/" not in p.stdout, p.stdout + p.stderr
    p = run_script(PYTHON, "video_ar.py", "--eval", "--ckpt", str(out / "ckpt.pt"), "--data-dir", fake_fashion)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert p.returncode == 0 and rec["step"] == 3 and rec["n_test"] == 6, p.stderr
    p = run_script(PYTHON, "video_ar.py", "--sample", "3", "--ckpt", str(out / "ckpt.pt"))
    assert p.returncode == 0 and "s/video" in p.stdout and (out / "sample.png").is_file() and (out / "sample.gif").is_file(), p.stderr


def test_bad_flags_stop_with_one_clear_line(tmp_path, fake_fashion):
    def parse(*a):
        cfg = common.parse_config(va.Config, va.PRESETS, va.METHOD, [*cli_args(tmp_path / "r", fake_fashion, "transformer"), *a])
        return va.train(cfg)
    with pytest.raises(SystemExit, match="--model 'pixelcnn' unknown; accepted: transformer, videogpt"):
        parse("--model", "pixelcnn")
    with pytest.raises(SystemExit, match="--subscale 3,2,2 does not divide the video 4x8x8"):
        parse("--subscale", "3,2,2")
    with pytest.raises(SystemExit, match="block 2x2x3 does not divide the grid 2x4x4"):
        parse("--blocks", "2x2x3")
    with pytest.raises(SystemExit, match="--subscale '2,2' is not three positive integers"):
        parse("--subscale", "2,2")
    with pytest.raises(SystemExit, match="--cond-frames 4 out of range"):
        parse("--cond-frames", "4")
    with pytest.raises(SystemExit, match="--down 3,2,2: needs powers of 2"):
        parse("--model", "videogpt", "--down", "3,2,2")
    with pytest.raises(SystemExit, match="video_ar.py models videos; --dataset fashion-mnist holds image data"):
        parse("--dataset", "fashion-mnist")
    with pytest.raises(SystemExit, match="--downsample 3 must be >= 1 and divide --frame-size 32"):
        parse("--downsample", "3")
    with pytest.raises(SystemExit, match="--binarize: video_ar.py models 8-bit videos"):
        parse("--binarize")
