"""KID against its formula written out with loops, and reference statistics in NVlabs' / pytorch-fid's .npz format."""

import importlib.util
import os
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from diffusers_stf.data import digits_tensor
from diffusers_stf.evaluation import (
    frechet_distance,
    kernel_inception_distance,
    kid_summary,
    load_feature_extractor,
    load_reference_stats,
    read_reference_stats,
    reference_statistics,
    save_reference_stats,
)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brute_force_mmd2(x, y):
    """Unbiased MMD² (Gretton et al. 2012 eq. 3) with k(a, b) = (aᵀb/d + 1)³, one kernel evaluation at a time."""
    m, n, d = len(x), len(y), x.shape[1]

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


# ----------------------------------------------------------------------------------------------------------------
# KID


def test_kid_with_subsets_holding_every_sample_is_the_unbiased_mmd2_of_the_full_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(12, 5)), rng.normal(0.4, 1.3, size=(12, 5))
    mean, std = kernel_inception_distance(a, b, num_subsets=4, max_subset_size=50)
    assert mean == pytest.approx(brute_force_mmd2(a, b), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)  # every subset is a permutation of the full sets


def test_kid_averages_the_unbiased_mmd2_over_seeded_random_subsets():
    # The documented draw: per subset, m rows of features_a, then m rows of features_b, without replacement, from
    # numpy.random.default_rng(seed); m = min(n_a, n_b, max_subset_size).
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 4)), rng.normal(0.5, 1.0, size=(15, 4))
    draw = np.random.default_rng(7)
    values = []
    for _ in range(5):
        ia, ib = draw.choice(20, 6, replace=False), draw.choice(15, 6, replace=False)
        values.append(brute_force_mmd2(a[ia], b[ib]))
    mean, std = kernel_inception_distance(a, b, num_subsets=5, max_subset_size=6, seed=7)
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-10)  # the std over the subsets, ddof = 0
    summary = kid_summary(a, b, num_subsets=5, max_subset_size=6, seed=7)
    assert summary["kid_se"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(5), rel=1e-10)
    assert summary["kid_subset_size"] == 6 and summary["kid"] == pytest.approx(mean, rel=1e-12)
    # deterministic for a seed, and the seed matters
    assert kernel_inception_distance(a, b, 5, 6, seed=7) == (mean, std)
    assert kernel_inception_distance(a, b, 5, 6, seed=8)[0] != pytest.approx(mean)
    # tensors give what arrays give
    assert kernel_inception_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float(), 5, 6, seed=7)[0] == \
        pytest.approx(kernel_inception_distance(a.astype(np.float32), b.astype(np.float32), 5, 6, seed=7)[0], rel=1e-6)


def test_kid_of_equal_distributions_is_zero_on_average_and_can_be_negative():
    # Unbiased: over independent draws of two sets from one distribution the estimates centre on 0 and take both
    # signs (a V-statistic, which keeps the diagonal k(x_i, x_i), would be positive every time).
    rng = np.random.default_rng(2)
    estimates = [kernel_inception_distance(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), num_subsets=1)[0]
                 for _ in range(40)]  # fmt: skip
    estimates = np.array(estimates)
    assert (estimates < 0).any() and (estimates > 0).any()
    assert abs(estimates.mean()) < 3 * estimates.std(ddof=1) / np.sqrt(len(estimates))
    far = kernel_inception_distance(rng.normal(size=(60, 8)), rng.normal(1.0, 1.0, size=(60, 8)), num_subsets=1)[0]
    assert far > 10 * estimates.std()


def test_kid_of_real_heldout_digits_does_not_grow_at_small_n_while_fd_does():
    extractor = load_feature_extractor("digits")
    held, _ = digits_tensor("heldout")
    train, _ = digits_tensor("train")
    with torch.no_grad():
        f_held, f_train = extractor(held)[0].double().numpy(), extractor(train)[0].double().numpy()
    fd_small = frechet_distance(*_stats(f_held[:100]), *_stats(f_train))
    fd_large = frechet_distance(*_stats(f_held), *_stats(f_train))
    assert fd_small > 4 * fd_large  # FD's bias at small n
    kid_small, kid_large = kid_summary(f_held[:100], f_train, 30), kid_summary(f_held, f_train, 30)
    # KID at n = 100 agrees with KID at n = 1000 within their spread (std over subsets of size 100)
    assert abs(kid_small["kid"] - kid_large["kid"]) < 3 * kid_small["kid_std"]


def _stats(features):
    return features.mean(0), np.cov(features, rowvar=False)


def test_kid_rejects_bad_input():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="dimensions differ: 4 .* 5"):
        kernel_inception_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="num_samples >= 2"):
        kernel_inception_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="num_subsets"):
        kernel_inception_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 4)), num_subsets=0)
    with pytest.raises(ValueError, match="NaN"):
        kernel_inception_distance(np.full((10, 4), np.nan), rng.normal(size=(10, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics (.npz with mu and sigma)


def nvlabs_fid_from_stats(mu, sigma, mu_ref, sigma_ref):
    """NVlabs EDM fid.py calculate_fid_from_inception_stats: ‖μ − μ_r‖² + tr(Σ + Σ_r − 2 sqrtm(Σ Σ_r)), real part."""
    m = np.square(mu - mu_ref).sum()
    s, _ = linalg.sqrtm(np.dot(sigma, sigma_ref), disp=False)
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def test_reference_stats_round_trip_in_the_papers_format_gives_nvlabs_fd(tmp_path):
    rng = np.random.default_rng(4)
    f_ref, f_gen = rng.normal(size=(300, 6)), rng.normal(0.3, 1.2, size=(200, 6))
    mu_ref, sigma_ref = _stats(f_ref)
    path = save_reference_stats(str(tmp_path / "ref.npz"), mu_ref, sigma_ref, feature_network="net-x", num_images=300)
    with np.load(path, allow_pickle=False) as archive:  # what NVlabs' fid.py and pytorch-fid read
        np.testing.assert_array_equal(archive["mu"], mu_ref)
        np.testing.assert_array_equal(archive["sigma"], sigma_ref)
        assert archive["mu"].dtype == np.float64 and str(archive["feature_network"]) == "net-x"
    mu, sigma = load_reference_stats(path)
    mu_gen, sigma_gen = _stats(f_gen)
    assert frechet_distance(mu_gen, sigma_gen, mu, sigma) == pytest.approx(
        nvlabs_fid_from_stats(mu_gen, sigma_gen, mu_ref, sigma_ref), rel=1e-9)
    assert read_reference_stats(path)["num_images"] == 300
    assert not [f for f in os.listdir(tmp_path) if f != "ref.npz"]  # no temporary left behind


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of Σ with dead (always 0) features
def test_evaluate_script_saves_and_uses_reference_stats(tmp_path, capsys):
    evaluate = _load_example("evaluate")
    held, _ = digits_tensor("heldout")
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, samples=((held[:300] + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    cache = ["--cache_dir", str(tmp_path / "cache")]
    saved = evaluate.main(["--reference", "digits:train", "--save_reference", str(tmp_path / "train.npz")] + cache)
    assert saved["saved_reference"] == str(tmp_path / "train.npz")
    direct = evaluate.main([samples, "--reference", "digits:train"] + cache)
    extractor = load_feature_extractor("digits")
    with pytest.warns(UserWarning, match="come from feature network 'digits-cnn-.*', the one in use"):
        from_file = evaluate.main([samples, "--reference", str(tmp_path / "train.npz")] + cache)
    ref_name = str(tmp_path / "train.npz")
    assert from_file["fd"][ref_name] == pytest.approx(direct["fd"]["digits:train"], rel=1e-9)
    assert from_file["kid"][ref_name] == pytest.approx(direct["kid"]["digits:train"], rel=1e-6)
    assert from_file["num_reference_images"][ref_name] == 797
    # an NVlabs file: mu and sigma only; FD as NVlabs computes it, KID and precision/recall unavailable
    train_stats = reference_statistics(extractor, "digits:train", cache_dir=str(tmp_path / "cache"))
    nvlabs = str(tmp_path / "nvlabs.npz")
    np.savez(nvlabs, mu=train_stats["mu"], sigma=train_stats["sigma"])
    result = evaluate.main([samples, "--reference", nvlabs] + cache)
    gen = _stats(extractor(held[:300])[0].double().numpy())
    assert result["fd"][nvlabs] == pytest.approx(nvlabs_fid_from_stats(*gen, train_stats["mu"], train_stats["sigma"]),
                                                 rel=1e-6)  # fmt: skip
    assert result["kid"][nvlabs] is None and result["precision"][nvlabs] is None
    out = capsys.readouterr().out
    assert "(statistics)" in out and "KID n/a" in out and "hold no features" in out


def test_reference_stats_bad_input(tmp_path):
    extractor = load_feature_extractor("digits")
    no_stats = str(tmp_path / "no_stats.npz")
    np.savez(no_stats, mean=np.zeros(64))
    with pytest.raises(ValueError, match=r"no 'mu' and no 'sigma' array.*\['mean'\]"):
        load_reference_stats(no_stats)
    with pytest.raises(ValueError, match=r"must hold statistics \('mu' and 'sigma'.*or images"):
        reference_statistics(extractor, no_stats, cache_dir=str(tmp_path))
    only_mu = str(tmp_path / "only_mu.npz")
    np.savez(only_mu, mu=np.zeros(64))
    with pytest.raises(ValueError, match="no 'sigma' array"):
        reference_statistics(extractor, only_mu, cache_dir=str(tmp_path))
    small = save_reference_stats(str(tmp_path / "d32.npz"), np.zeros(32), np.eye(32))
    with pytest.raises(ValueError, match=r"dimension 32.*gives 64-d features"):
        reference_statistics(extractor, small, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"shape \(d,\) and sigma \(d, d\)"):
        save_reference_stats(str(tmp_path / "bad.npz"), np.zeros(3), np.eye(4))
    pickled = str(tmp_path / "pickled.npz")
    np.savez(pickled, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_reference_stats(pickled)
    other = save_reference_stats(str(tmp_path / "other.npz"), np.zeros(64), np.eye(64), feature_network="inception-x")
    with pytest.warns(UserWarning, match="'inception-x', NOT the one in use"):
        reference_statistics(extractor, other, cache_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as seen:  # warned once per file and network
        warnings.simplefilter("always")
        reference_statistics(extractor, other, cache_dir=str(tmp_path))
    assert seen == []
