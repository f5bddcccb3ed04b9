"""common.frechet_distance: the float64 Frechet distance against closed forms, FD on (synthetic) Fashion-MNIST
growing with corruption, the classifier cache (written once, reused, a corrupt file retrained, a read-only data
dir), and the --fid-inception error when torchvision's weights cannot be loaded."""
import os
import shutil
import urllib.error

import pytest
import torch
import torchvision

import common


def with_moments(n, mean, cov_root, seed):
    """n feature vectors whose sample mean is exactly `mean` and sample covariance exactly cov_root^T cov_root."""
    x = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(0)
    w, v = torch.linalg.eigh(torch.cov(x.T))
    return x @ (v * w.rsqrt()) @ v.T @ cov_root + mean  # whitened, then coloured


def test_frechet_closed_forms():
    d = 6
    m1, m2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    s1, s2 = torch.linspace(0.5, 2, d, dtype=torch.float64), torch.linspace(3, 1, d, dtype=torch.float64)
    f1, f2 = with_moments(500, m1, torch.diag(s1), 0), with_moments(400, m2, torch.diag(s2), 1)
    # N(m1, diag s1^2) vs N(m2, diag s2^2): ||m1 - m2||^2 + sum (s1 - s2)^2
    assert common.frechet_from_features(f1, f2) == pytest.approx((((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum()).item(), rel=1e-9)
    assert abs(common.frechet_from_features(f1, f1)) < 1e-9
    # full, non-commuting covariances: Tr (S1 S2)^1/2 from the (real, positive) eigenvalues of S1 S2
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    f1, f2 = with_moments(300, m1, a, 3), with_moments(300, m2, b, 4)
    S1, S2 = a.T @ a, b.T @ b
    tr_sqrt = torch.linalg.eigvals(S1 @ S2).real.clamp_min(0).sqrt().sum()
    expected = ((m1 - m2) ** 2).sum() + S1.trace() + S2.trace() - 2 * tr_sqrt
    assert common.frechet_from_features(f1, f2) == pytest.approx(expected.item(), rel=1e-8)
    assert common.frechet_from_features(f2, f1) == pytest.approx(expected.item(), rel=1e-8)  # symmetric
    assert abs(common.frechet_from_features(f1.float(), f1.float())) < 1e-4  # float32 features: still ~0, never NaN


@pytest.fixture
def fd_env(tmp_path, monkeypatch):
    """A fresh --cache-dir, and no feature net remembered from an earlier test."""
    monkeypatch.setattr(common, "_FD_NETS", {})
    return tmp_path / "cache"


def setup_fashion(data_dir, cache, **kw):
    cfg = common.TrainConfig(dataset="fashion-mnist", data_dir=data_dir, device="cpu", cache_dir=str(cache), **kw)
    return cfg, common.load_data(cfg), common.setup(cfg, "fd", train=False)


def test_fd_grows_with_corruption(fake_fashion, fd_env):
    cfg, data, run = setup_fashion(fake_fashion, fd_env)
    real_test, held_out = data.test.float() / 255, data.train[:len(data.test)].float() / 255  # same distribution
    bad = [(held_out + 0.3 * torch.randn_like(held_out)).clamp(0, 1), torch.rand_like(held_out), torch.zeros_like(held_out)]
    rng = torch.get_rng_state()
    fd = lambda x, n=None: common.frechet_distance(x, data, cfg, run, n)
    same, base, worse = fd(real_test), fd(held_out), [fd(x) for x in bad]  # noisy, uniform noise, blank
    assert torch.equal(torch.get_rng_state(), rng)  # the classifier's seeded training left the caller's random stream alone
    assert abs(same) < 1e-6 and base > 0 and min(worse) > 3 * base, (same, base, worse)  # the test set against itself ~0
    assert fd(held_out, 50) != base  # n: the first n of each
    assert common.fd_label(cfg) == "FD (classifier features)"
    with pytest.raises(SystemExit, match="FD needs images of shape"):
        fd(torch.rand(8, 3, 28, 28))
    unlabelled = common.Data("folder:x", "image", data.shape, data.train, data.test)  # trained on rotations instead
    assert common.frechet_distance(torch.rand_like(held_out), unlabelled, cfg, run) > common.frechet_distance(held_out, unlabelled, cfg, run)


def test_fd_cache_reused_and_corrupt_file_replaced(fake_fashion, fd_env, tmp_path, capsys, monkeypatch):
    ro = str(tmp_path / "ro")  # a read-only --data-dir
    shutil.copytree(fake_fashion, ro)
    for f in os.listdir(ro):
        os.chmod(os.path.join(ro, f), 0o444)
    os.chmod(ro, 0o555)
    try:
        cfg, data, run = setup_fashion(ro, fd_env)
        x = data.train[:len(data.test)].float() / 255
        first = common.frechet_distance(x, data, cfg, run)
        out = capsys.readouterr().out  # announced as what it is, with the cache path; not as an error
        assert "FD: training its feature classifier once for fashion-mnist (2 epochs of 512 images, 8 batches; cached in " in out
        assert "classifier trained" in out and "Error" not in out and sorted(os.listdir(ro)) == sorted(os.listdir(fake_fashion))
        path, = fd_env.glob("fd-v1-fashion-mnist-1x28x28-*.pt")
        saved, mtime = torch.load(path, weights_only=True), path.stat().st_mtime_ns
        assert 0 <= saved["accuracy"] <= 1 and all(torch.is_tensor(v) for v in saved["net"].values())
        common._FD_NETS.clear()  # a new process: loads the file, does not retrain
        assert common.frechet_distance(x, data, cfg, run) == pytest.approx(first, rel=1e-6)
        out = capsys.readouterr().out
        assert "trained" not in out and str(path) in out and path.stat().st_mtime_ns == mtime
        for junk in (b"not a checkpoint", None):  # corrupt bytes, then another net's tensors
            common.atomic_save({"net": {"w": torch.zeros(3)}}, path) if junk is None else path.write_bytes(junk)
            common._FD_NETS.clear()
            assert common.frechet_distance(x, data, cfg, run) == pytest.approx(first, rel=1e-6)  # retrained, seeded
            assert "classifier trained" in capsys.readouterr().out
            assert set(torch.load(path, weights_only=True)["net"]) == set(saved["net"])
        (tmp_path / "file").write_text("")  # an unwritable cache folder: FD still computed, the net not cached
        cfg.cache_dir = str(tmp_path / "file" / "cache")
        common._FD_NETS.clear()
        assert common.frechet_distance(x, data, cfg, run) == pytest.approx(first, rel=1e-6)
        assert "classifier not cached" in capsys.readouterr().out
    finally:
        os.chmod(ro, 0o755)


def test_fid_inception_flag_and_offline_error(fake_fashion, fd_env, monkeypatch):
    assert common.parse_config(common.TrainConfig, {}, "m", argv=["--fid-inception"]).fid_inception
    cfg, data, run = setup_fashion(fake_fashion, fd_env, fid_inception=True)
    assert common.fd_label(cfg) == "FD (torchvision Inception-v3; not the TF-Inception FID of papers)"
    def offline(**kw):  # what torchvision's download raises without a network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.models, "inception_v3", offline)
    with pytest.raises(SystemExit) as e:
        common.frechet_distance(data.test.float() / 255, data, cfg, run)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: --fid-inception: torchvision's Inception-v3 weights could not be loaded (URLError)")


def test_classify(fake_fashion, fd_env):
    cfg, data, run = setup_fashion(fake_fashion, fd_env)
    x = data.test.float() / 255
    f, logits = common.classify(x, data, cfg, run)
    net = common._FD_NETS[(data.name, data.shape, len(data.train))]  # the net FD trained (once) for this data set
    assert f.shape == (len(x), 128) and logits.shape == (len(x), 10) and f.dtype == logits.dtype == torch.float64
    torch.testing.assert_close(logits, net(x).double(), rtol=1e-4, atol=1e-4)  # features -> the last layer = the whole classifier
    other = data.train[:len(x)].float() / 255  # FD is computed in the same features
    assert common.frechet_distance(other, data, cfg, run) == pytest.approx(common.frechet_from_features(common.classify(other, data, cfg, run)[0], f), rel=1e-6)
