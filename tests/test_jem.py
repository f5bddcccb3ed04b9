"""jem.py: the slide's identities (shift freedom, log p(x, y) = log p(x) + log p(y | x)), SGLD on a known joint energy, the replay
buffer, ECE and AUROC against hand values, each objective learning, and the command line."""
import json
import math
import os

import numpy as np
import pytest
import torch

import jem as J
from conftest import PYTHON, run_script, synthetic_images, write_idx, write_mnist_like

RUN = J.common.Run(torch.device("cpu"), None, 0, 1, None, True, True)


# ----------------------------------------------------------------------------- the slide's identities
def test_shifting_the_logits_keeps_p_y_given_x_and_moves_log_p_x_by_the_shift():
    g = torch.Generator().manual_seed(0)
    logits, c = torch.randn(50, 10, generator=g, dtype=torch.float64) * 3, 2.75
    assert torch.allclose(J.log_p_y_given_x(logits), J.log_p_y_given_x(logits + c), rtol=0, atol=1e-13)  # float64 stays float64
    shifted = J.log_p_x_unnormalized(logits + c) - J.log_p_x_unnormalized(logits)
    assert torch.allclose(shifted, torch.full_like(shifted, c), rtol=0, atol=1e-13)
    # the same through a network: its output bias moved by c
    cfg = J.Config(depth=10, widen=1)
    net = J.WideResNet(cfg, (1, 12, 12), 10).eval()
    x = torch.randn(6, 1, 12, 12, generator=g)
    with torch.no_grad():
        before = net(x)
        net.out.bias += c
        after = net(x)
    assert torch.allclose(J.log_p_y_given_x(before), J.log_p_y_given_x(after), atol=1e-5)
    assert torch.allclose(J.log_p_x_unnormalized(after) - J.log_p_x_unnormalized(before), torch.full((6,), c), atol=1e-5)
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    assert torch.allclose(J.log_p_xy_unnormalized(after, y), before.gather(1, y[:, None]).squeeze(1) + c, atol=1e-5)


def test_on_a_finite_domain_the_logits_define_normalized_p_x_y_and_p_x_and_the_slide_factorization():
    """x ranges over 7 points, so Z = sum_x sum_y exp(f(x)[y]) is exact: log p(x) = logsumexp_y f(x)[y] - log Z, both sum to 1, and
    log p(x, y) = log p(x) + log p(y | x)."""
    f = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2  # f(x)[y] for the 7 points
    log_z = f.flatten().logsumexp(0)
    log_p_xy = J.log_p_xy_unnormalized(f, torch.tensor([2] * 7)) - log_z
    assert torch.allclose(log_p_xy, f[:, 2] - log_z)
    log_p_x = J.log_p_x_unnormalized(f) - log_z
    assert (f - log_z).exp().sum().item() == pytest.approx(1, abs=1e-12) and log_p_x.exp().sum().item() == pytest.approx(1, abs=1e-12)
    joint = f - log_z  # log p(x, y) for every pair
    assert torch.allclose(joint, log_p_x[:, None] + J.log_p_y_given_x(f), rtol=0, atol=1e-12)
    assert torch.allclose(log_p_x, joint.logsumexp(1), rtol=0, atol=1e-12)  # p(x) = sum_y p(x, y)


# ----------------------------------------------------------------------------- SGLD and the replay buffer
class GaussianClasses(torch.nn.Module):
    """Logits f(x)[y] = -||x - mu_y||^2 / (2 s^2) + b_y: p(x | y) = N(mu_y, s^2 I), p(x) a mixture with weights softmax(b) = (1/4, 3/4)."""
    def __init__(self):
        super().__init__()
        self.mu, self.s, self.b = torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 1.0, torch.tensor([0.0, math.log(3.0)])
    def forward(self, x):
        return -((x[:, None] - self.mu) ** 2).sum(-1) / (2 * self.s ** 2) + self.b


def test_sgld_samples_the_class_conditional_and_the_marginal_of_a_known_joint_energy(one_thread):
    torch.manual_seed(0)
    model, n = GaussianClasses(), 4000
    step = 0.004  # temperature 1: noise^2 = 2 step
    x = J.sgld(J.energy_fn(model, torch.zeros(n, dtype=torch.long), RUN), torch.randn(n, 2) * 3, 1500, step, math.sqrt(2 * step))
    assert torch.allclose(x.mean(0), model.mu[0], atol=4 / math.sqrt(n)) and torch.allclose(x.var(0), torch.ones(2), rtol=0.1)
    x = J.sgld(J.energy_fn(model, None, RUN), torch.randn(n, 2) * 3, 1500, step, math.sqrt(2 * step))  # from p(x)
    w = torch.tensor([0.25, 0.75])
    mean = w @ model.mu
    var = 1 + w @ (model.mu - mean) ** 2  # the mixture's per-coordinate variance
    assert (x.mean(0) - mean).abs().max() < 4 * (var / n).sqrt().max(), (x.mean(0), mean)
    assert torch.allclose(x.var(0), var, rtol=0.1), (x.var(0), var)
    steep = lambda x: 10 * model(x)  # the official step 1 overshoots by 10x: the free chain leaves [-1, 1] at once
    assert J.sgld(J.energy_fn(steep, None, RUN), torch.rand(500, 2) * 2 - 1, 5, 1.0, 0.01).abs().max() > 10
    x = J.sgld(J.energy_fn(steep, None, RUN), torch.rand(500, 2) * 2 - 1, 5, 1.0, 0.01, clamp=True)
    assert x.abs().max() <= 1 and (x.abs() == 1).any()  # clamped to the data's box [-1, 1]
    x0 = torch.randn(64, 2) * 3
    e = J.energy_fn(model, None, RUN)
    xs = [x0] + [J.sgld(e, x0, k, 0.01, 0.0) for k in (1, 2, 5, 20)]  # zero noise: descent on E
    energies = [e(v).mean().item() for v in xs]
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


def test_replay_buffer_reuses_95_percent_keeps_class_blocks_and_writes_back():
    torch.manual_seed(0)
    buf = J.ReplayBuffer(1000, (1, 2, 2), "cpu")
    assert buf.x.min() >= -1 and buf.x.max() <= 1 and buf.x.std() > 0.5  # the official start: uniform noise on [-1, 1]
    buf.x.fill_(5.0)
    x0, idx = buf.chains(100_000, reinit=0.05)
    reused = (x0 == 5).flatten(1).all(1).double().mean().item()
    assert abs(reused - 0.95) < 0.005 and ((x0 == 5) | (x0.abs() <= 1)).all()
    cbuf = J.ReplayBuffer(1000, (1, 2, 2), "cpu", n_classes=10)
    y = torch.randint(10, (5000,))
    _, idx = cbuf.chains(len(y), y)
    assert cbuf.per == 100 and (idx // 100 == y).all()  # each class reads only its own block
    x_new = torch.full((3, 1, 2, 2), 0.5)
    x_new[1, 0, 0, 0] = math.nan
    cbuf.update(torch.tensor([7, 250, 999]), x_new)
    assert (cbuf.x[7] == 0.5).all() and (cbuf.x[999] == 0.5).all() and torch.isfinite(cbuf.x[250]).all() and (cbuf.x[250] != 0.5).any()


# ----------------------------------------------------------------------------- ECE, reliability, AUROC
def test_expected_calibration_error_of_calibrated_and_miscalibrated_predictors():
    bins = 20
    conf = torch.tensor([0.5625] * 16 + [0.75] * 40 + [0.9375] * 16 + [1.0] * 5, dtype=torch.float64)  # exact binary fractions
    correct = torch.tensor([1] * 9 + [0] * 7 + [1] * 30 + [0] * 10 + [1] * 15 + [0] + [1] * 5).bool()
    ece, (count, acc, mean_conf) = J.expected_calibration_error(conf, correct, bins)
    assert ece == pytest.approx(0, abs=1e-12) and count.sum() == 77
    assert count[11] == 16 and count[14] == 40 and count[18] == 16 and count[19] == 5  # 0.75 in (0.70, 0.75]: right-closed bins
    conf = torch.tensor([0.9] * 100 + [0.6] * 100, dtype=torch.float64)
    correct = torch.tensor([1] * 60 + [0] * 40 + [1] * 60 + [0] * 40).bool()
    assert J.expected_calibration_error(conf, correct, bins)[0] == pytest.approx(0.5 * 0.3 + 0.5 * 0.0, abs=1e-12)
    assert J.expected_calibration_error(conf[:100], correct[:100], 1)[0] == pytest.approx(0.3, abs=1e-12)
    img = J.reliability_diagram(count, acc, mean_conf)
    assert img.shape == (3, 200, 200) and img.min() >= 0 and img.max() <= 1
    _, (count, acc, mean_conf) = J.expected_calibration_error(conf, correct, bins)  # confidence 0.9 in bin 17 (columns 171-178)
    img = J.reliability_diagram(count, acc, mean_conf)  # row r shows height 1 - r / 200
    assert torch.equal(img[:, 50, 175], torch.tensor([0.9, 0.3, 0.3]))  # red between accuracy 0.6 and confidence 0.9 (over-confident)
    assert torch.equal(img[:, 140, 175], torch.tensor([0.2, 0.4, 0.9])) and img[:, 10, 175].eq(1).all()  # blue below 0.6, white above 0.9
    img = J.reliability_diagram(count, torch.full_like(acc, 0.95), mean_conf)  # accuracy 0.95 above confidence 0.9: under-confident
    assert torch.equal(img[:, 15, 175], torch.tensor([0.2, 0.7, 0.3])) and torch.equal(img[:, 30, 175], torch.tensor([0.2, 0.4, 0.9]))


def test_auroc_is_one_half_for_identical_scores_one_for_separated_and_the_pairwise_probability():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(500, generator=g)
    assert J.auroc(s, s.clone()) == pytest.approx(0.5, abs=1e-12) and J.auroc(torch.ones(10), torch.ones(7)) == 0.5
    assert J.auroc(s + 100, s) == 1.0 and J.auroc(s, s + 100) == 0.0
    assert J.auroc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0])) == pytest.approx(0.5)  # 1/3 above, 1/3 tied
    a, b = torch.randint(0, 6, (300,), generator=g).float(), torch.randint(0, 5, (200,), generator=g).float()  # many ties
    pairwise = ((a[:, None] > b).double() + 0.5 * (a[:, None] == b).double()).mean().item()
    assert J.auroc(a, b) == pytest.approx(pairwise, abs=1e-12)


def test_ood_sets_and_the_offline_lookup_never_use_the_in_distribution_files(tmp_path):
    write_mnist_like(str(tmp_path))  # Fashion-format files at the top of --data-dir: not taken for MNIST
    assert J.offline_test_images("mnist", str(tmp_path)) is None
    os.makedirs(tmp_path / "MNIST" / "raw")
    write_idx(str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"), synthetic_images(9, 5))
    assert J.offline_test_images("mnist", str(tmp_path)).shape == (9, 1, 28, 28)
    data = J.common.Data("fashion-mnist", "image", (1, 28, 28), torch.zeros(0), torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8))
    sets = J.ood_sets(data, J.Config(data_dir=str(tmp_path)), 8, torch.Generator().manual_seed(0))
    assert set(sets) == {"noise", "constant", "vflip", "inverted", "mnist"} and all(v.shape == (8, 1, 28, 28) for v in sets.values())
    test = data.test[:8].float() / 255
    assert torch.equal(sets["inverted"], 1 - test) and torch.equal(sets["vflip"][..., 0, :], test[..., -1, :])
    assert (sets["constant"].flatten(1).std(1) == 0).all() and len(sets["mnist"]) == 8


# ----------------------------------------------------------------------------- network, schedule, augmentation
def test_wide_resnet_shapes_schedule_and_random_crop():
    cfg = J.Config(depth=16, widen=2)
    net = J.WideResNet(cfg, (3, 32, 32), 10)
    assert len(net.blocks) == 6 and net(torch.randn(2, 3, 32, 32)).shape == (2, 10) and net.out.in_features == 128
    assert J.WideResNet(J.Config(depth=10, widen=1), (1, 28, 28), 7)(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    cfg = J.Config(lr=1e-4, warmup=100, steps=1000, decay_rate=0.3)
    assert [J.learning_rate(cfg, s) for s in (0, 50, 100, 799)] == pytest.approx([0, 5e-5, 1e-4, 1e-4])
    assert J.learning_rate(cfg, 800) == pytest.approx(3e-5) and J.learning_rate(cfg, 900) == pytest.approx(9e-6)
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float).view(2, 3, 6, 6)
    assert torch.equal(J.random_crop(x, pad=0), x)
    xp, out = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect"), J.random_crop(x, pad=2)
    for b in range(2):  # each crop is one 6 x 6 window of its padded image, all channels shifted alike
        assert any(torch.equal(out[b], xp[b, :, i:i + 6, j:j + 6]) for i in range(5) for j in range(5))


# ----------------------------------------------------------------------------- learning
def two_class_images(n, seed):
    """16 x 16 images in [0, 1]: class 0 a bright square on the left half, class 1 on the right half."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.randint(2, (n,), generator=g), torch.zeros(n, 1, 16, 16)
    r, c = torch.randint(0, 12, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        col = c[i] + (8 if y[i] else 0)
        x[i, 0, r[i]:r[i] + 5, col:col + 5] = 0.6 + 0.4 * torch.rand((), generator=g)
    return x, y


@pytest.mark.parametrize("objective", ["classifier", "jem", "pxy"])
def test_a_short_run_of_each_objective_lowers_its_loss(objective, one_thread):
    """The objective with fixed negatives (uniform noise in place of SGLD samples) on held-out images: CE for the classifier, CE - (mean
    log p(x) - mean log p(noise)) for JEM, -(mean f(x)[y] - mean f(noise)[y]) for pxy, falls during 80 steps of the real update."""
    torch.manual_seed(0)
    cfg = J.Config(objective=objective, depth=10, widen=1, K=5, buffer_size=200, lr=1e-3, warmup=0, steps=80)
    model = J.WideResNet(cfg, (1, 16, 16), 2)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    buf = J.ReplayBuffer(cfg.buffer_size, (1, 16, 16), "cpu", 2 if objective == "pxy" else 1)
    x_train, y_train = two_class_images(640, 0)
    x_test, y_test = two_class_images(200, 1)
    x_test, noise = J.encode(x_test, cfg, torch.Generator().manual_seed(2)), J.uniform_noise(200, (1, 16, 16), "cpu")

    def fixed_loss():
        with torch.no_grad():
            return J.jem_loss(objective, model(x_test), y_test, model(noise))[0].item()
    before = fixed_loss()
    for step in range(cfg.steps):
        x, y = J.encode(x_train[step * 8 % 640:][:32], cfg), y_train[step * 8 % 640:][:32]
        logits_q = None
        if objective != "classifier":
            y_q = y if objective == "pxy" else None
            x0, idx = buf.chains(len(x), y_q, cfg.reinit)
            x_q = J.sgld(J.energy_fn(model, y_q, RUN), x0, cfg.K, cfg.step_size, cfg.noise)
            buf.update(idx, x_q)
            logits, logits_q = model(torch.cat([x, x_q])).chunk(2)
        else:
            logits = model(x)
        loss, terms = J.jem_loss(objective, logits, y, logits_q)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < before - 0.3, (before, after)
    with torch.no_grad():
        if objective != "pxy":  # the classifier learned the two classes (chance: 0.5, s.e. 0.035); JEM's p(x) term slows it early
            assert (model(x_test).argmax(1) == y_test).double().mean() > (0.9 if objective == "classifier" else 0.7)
        if objective != "classifier":  # the data is more probable than noise to the EBM
            assert J.log_p_x_unnormalized(model(x_test)).mean() > J.log_p_x_unnormalized(model(noise)).mean() + 0.5


# ----------------------------------------------------------------------------- CLI
def test_presets_are_the_official_codes():
    c = J.common.parse_config(J.Config, J.PRESETS, "jem", argv=["--dataset", "cifar10"])
    assert (c.depth, c.widen, c.lr, c.batch_size, c.K, c.step_size, c.noise, c.buffer_size, c.reinit, c.sigma, c.warmup, c.augment,
            c.dropout, c.objective) == (28, 10, 1e-4, 64, 20, 1.0, 0.01, 10000, 0.05, 0.03, 1000, True, 0.0, "jem")
    assert sum(p.numel() for p in J.WideResNet(c, (3, 32, 32), 10).parameters()) == pytest.approx(36.5e6, rel=0.01)


def call_main(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["jem.py", *argv])
    return J.main()


def test_cli_train_resume_sample_eval_and_bad_flags(tmp_path, fake_fashion, fd_cache, monkeypatch, capsys):
    data_dir = tmp_path / "data"
    write_mnist_like(str(data_dir), n_train=64, n_test=40)  # Fashion-format files, and an MNIST test set for the OOD AUROC
    os.makedirs(data_dir / "MNIST" / "raw")
    write_idx(str(data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"), synthetic_images(40, 7))
    out = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), "--cache-dir", fd_cache, "--out", str(out), "--depth", "10", "--widen", "1", "--batch-size", "8",
             "--K", "2", "--eval-K", "3", "--buffer-size", "40", "--objective", "pxy", "--eval-n", "32", "--ood-n", "16",
             "--eval-samples", "20", "--grid", "10", "--log-every", "2", "--warmup", "2"]
    p = run_script(PYTHON, "jem.py", "--steps", "4", *flags)
    assert p.returncode == 0, p.stderr
    assert "WideResNet-10-1" in p.stdout and "(10 class blocks)" in p.stdout and "step 4/4 | loss" in p.stdout and "| gap" in p.stdout
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["test_nll"] is None and rec["kind"] is None and rec["n_test"] == 32 and rec["ece_bins"] == 20 and rec["objective"] == "pxy"
    assert 0 <= rec["accuracy"] <= 1 and 0 <= rec["ece"] <= 1 and rec["ood_n"] == 16 and rec["samples"] == 20 and rec["sgld_steps"] == 3
    assert all(0 <= rec[f"ood_{s}_{k}"] <= 1 for s in ("noise", "constant", "vflip", "inverted", "mnist") for k in ("log_px", "max_py"))
    assert rec["fd"] > 0 and 1 <= rec["is_like"] <= 10 and 0 <= rec["sample_class_accuracy"] <= 1 and rec["sample_init"] == "buffer"
    assert all((out / f).is_file() for f in ("samples_4.png", "buffer_4.png", "reliability_4.png"))
    call_main(monkeypatch, "--steps", "6", "--resume", *flags)
    text = capsys.readouterr().out
    assert "resumed from" in text and "at step 4" in text and "step 6/6" in text
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["buffer"]["x"].shape == (40, 1, 28, 28) and ck["step"] == 6 and ck["n_classes"] == 10
    call_main(monkeypatch, "--sample", "20", "--ckpt", str(out / "ckpt.pt"), "--eval-init", "noise")
    assert "20 class-conditional samples in" in (text := capsys.readouterr().out) and "SGLD K 3 from noise" in text
    assert (out / "samples.png").is_file() and (out / "buffer.png").is_file()
    call_main(monkeypatch, "--eval", "--ckpt", str(out / "ckpt.pt"), "--eval-samples", "0", "--ood-n", "0")
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 6 and "fd" not in rec and "ood_n" not in rec and (out / "reliability.png").is_file()
    real_loss = J.jem_loss
    monkeypatch.setattr(J, "jem_loss", lambda *a: (lambda loss, terms: (loss * 1e12 + 1e9, terms))(*real_loss(*a)))  # a diverging EBM
    with pytest.raises(SystemExit, match="step 2: \\|loss\\| passed 1e8, the EBM diverged"):
        call_main(monkeypatch, *flags[:-4], "--steps", "3", "--log-every", "2", "--out", str(tmp_path / "blown"))
    monkeypatch.setattr(J, "jem_loss", real_loss)
    base = ["--data-dir", fake_fashion, "--out", str(tmp_path / "bad"), "--steps", "1"]
    for argv, msg in ((["--depth", "12"], "--depth 12: a Wide-ResNet has depth 6n \\+ 4"),
                      (["--objective", "gan"], "--objective 'gan' unknown; accepted: jem, classifier, pxy"),
                      (["--K", "0"], "--K 0 out of range; accepted: integers >= 1"),
                      (["--reinit", "1.5"], "accepted 0 <= reinit <= 1"),
                      (["--eval-init", "zeros"], "--eval-init 'zeros' unknown; accepted: buffer, noise"),
                      (["--objective", "pxy", "--buffer-size", "15"], "pxy splits the buffer into 10 classes; accepted: a multiple of 10"),
                      (["--dataset", "moons"], "jem.py models labelled images")):
        with pytest.raises(SystemExit, match=msg):
            call_main(monkeypatch, *base, *argv)


def test_cli_cifar10_preset_colour_path_with_augmentation(tmp_path, fd_cache, monkeypatch, capsys):
    """The cifar10 preset (crops, flips, 3 channels) on a synthetic archive in the official layout, its network made tiny."""
    import pickle
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}))
    out = tmp_path / "run"
    call_main(monkeypatch, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--cache-dir", fd_cache, "--out", str(out), "--steps", "2",
              "--depth", "10", "--widen", "1", "--batch-size", "8", "--K", "2", "--buffer-size", "16", "--eval-samples", "10", "--ood-n", "10",
              "--grid", "10", "--log-every", "1")
    text = capsys.readouterr().out
    assert "step 2/2" in text and "data noise 0.03" in text and "clamped" not in text  # the official free chains
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["n_test"] == 10 and "ood_vflip_log_px" in rec and "ood_mnist_log_px" not in rec and rec["sgld_steps"] == 2  # eval_K 0: K
    assert J.common.load_checkpoint(str(out / "ckpt.pt"), ("jem",))["config"]["augment"] is True
