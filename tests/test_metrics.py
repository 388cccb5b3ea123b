"""Metrics of util.py against scipy / scikit-learn and hand-computed values."""

import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, mean_squared_error

import util

RNG = np.random.default_rng(0)
PRED = RNG.random(50)
TRUE = 0.5 * PRED + 0.5 * RNG.random(50)


def one_hot(k: int, bins: int = 10) -> np.ndarray:
    v = np.zeros(bins)
    v[k] = 1.0
    return v


def count_runtime_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args, **kwargs)
    return value, [w for w in caught if issubclass(w.category, RuntimeWarning)]


# ---------------------------------------------------------------- correlations

@pytest.mark.parametrize("convert", [list, np.asarray, torch.tensor, lambda a: torch.tensor(a).reshape(-1, 1)])
def test_srcc_plcc_match_scipy_for_any_input_type(convert):
    s = util.srcc(convert(PRED), convert(TRUE))
    p = util.plcc(convert(PRED), convert(TRUE))
    assert type(s) is float and type(p) is float
    assert s == pytest.approx(scipy.stats.spearmanr(PRED, TRUE)[0], abs=1e-12)
    assert p == pytest.approx(scipy.stats.pearsonr(PRED, TRUE)[0], abs=1e-12)


def test_srcc_with_ties_matches_scipy_and_hand_value():
    pred, true = [1, 2, 2, 3], [1, 2, 3, 4]
    assert util.srcc(pred, true) == pytest.approx(scipy.stats.spearmanr(pred, true)[0])
    # ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4): Pearson of the ranks
    assert util.srcc(pred, true) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert util.srcc([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)


def test_correlations_accept_requires_grad_tensors():
    pred = torch.tensor(PRED, requires_grad=True)
    assert util.plcc(pred, TRUE) == pytest.approx(scipy.stats.pearsonr(PRED, TRUE)[0])


@pytest.mark.parametrize("fn", [util.srcc, util.plcc])
@pytest.mark.parametrize("pred,true,reason", [
    ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], "predictions are constant"),
    ([0.1, 0.2, 0.3], [7, 7, 7], "ground-truth scores are constant"),
    ([0.3], [0.4], "at least 2"),
    ([], [], "at least 2"),
    ([0.1, float("nan"), 0.3], [0.1, 0.2, 0.3], "NaN"),
])
def test_undefined_correlation_is_nan_with_exactly_one_warning(fn, pred, true, reason):
    value, caught = count_runtime_warnings(fn, pred, true)
    assert math.isnan(value)
    assert len(caught) == 1
    assert reason in str(caught[0].message)
    with pytest.warns(RuntimeWarning, match="returning NaN"):
        fn(pred, true)


def test_mismatched_lengths_and_shapes_raise():
    with pytest.raises(ValueError, match="pred has 3 scores but true has 2"):
        util.srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="one score per image"):
        util.plcc(np.ones((4, 2)), np.ones((4, 2)))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=3, max_size=30))
def test_srcc_plcc_property_match_scipy(pairs):
    pred = np.array([a for a, _ in pairs], float)
    true = np.array([b for _, b in pairs], float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, p = util.srcc(pred, true), util.plcc(pred, true)
        ref_s, ref_p = scipy.stats.spearmanr(pred, true)[0], scipy.stats.pearsonr(pred, true)[0]
    if np.ptp(pred) == 0 or np.ptp(true) == 0:
        assert math.isnan(s) and math.isnan(p)
    else:
        assert s == pytest.approx(ref_s, abs=1e-9)
        assert p == pytest.approx(ref_p, abs=1e-9)


# ---------------------------------------------------------------- accuracy, mse

def test_accuracy_hand_case_and_sklearn():
    pred, true = [6, 4, 5, 7], [5.5, 3, 6, 2]
    # good = score > 5: pred (T, F, F, T), true (T, F, T, F) -> agree on 2 of 4 (5 itself is "bad")
    assert util.accuracy(pred, true, threshold=5.0) == 0.5
    assert util.accuracy(PRED, TRUE, threshold=0.5) == pytest.approx(
        accuracy_score(TRUE > 0.5, PRED > 0.5))
    assert util.accuracy([0.51, 0.5], [0.9, 0.1], threshold=0.5) == 1.0


def test_accuracy_default_threshold_is_5():
    assert util.accuracy([5.0, 5.1], [6, 6]) == 0.5


def test_mse_matches_sklearn_and_handles_n_by_1():
    assert util.mse(PRED, TRUE) == pytest.approx(mean_squared_error(TRUE, PRED))
    assert util.mse(torch.tensor([[0.1], [0.3]]), [0.2, 0.5]) == pytest.approx((0.01 + 0.04) / 2)


@pytest.mark.parametrize("fn", [util.mse, util.accuracy])
def test_accuracy_mse_nan_inputs_or_empty_give_nan_with_warning(fn):
    for pred, true in [([float("nan"), 0.2], [0.1, 0.2]), ([], [])]:
        value, caught = count_runtime_warnings(fn, pred, true)
        assert math.isnan(value) and len(caught) == 1


# ---------------------------------------------------------------- EMD

def test_emd_one_hot_one_bin_apart_is_0_1():
    assert util.emd(one_hot(3)[None], one_hot(4)[None], r=1) == pytest.approx(0.1)
    assert util.emd(one_hot(0), one_hot(2), r=1) == pytest.approx(0.2)
    assert util.emd(one_hot(3), one_hot(4), r=2) == pytest.approx(math.sqrt(0.1))
    assert util.emd(one_hot(5), one_hot(5)) == 0.0


def test_emd_r1_matches_scipy_wasserstein():
    p = RNG.dirichlet(np.ones(10), size=8)
    q = RNG.dirichlet(np.ones(10), size=8)
    scores = np.arange(1, 11)
    # unit spacing: W1 = sum_k |CDF diff|, our r=1 EMD is the mean over the 10 bins
    ref = np.mean([scipy.stats.wasserstein_distance(scores, scores, a, b) / 10 for a, b in zip(p, q)])
    assert util.emd(p, q, r=1) == pytest.approx(ref)
    assert util.emd(torch.tensor(p), torch.tensor(q)) == pytest.approx(ref)


def test_emd_rejects_bad_shapes_and_r():
    with pytest.raises(ValueError, match="distributions"):
        util.emd(np.ones((2, 10)) / 10, np.ones((3, 10)) / 10)
    with pytest.raises(ValueError, match="r must be > 0"):
        util.emd(one_hot(1), one_hot(2), r=0)


def test_emd_loss_matches_numpy_emd_per_image_and_is_differentiable():
    p = torch.tensor(RNG.dirichlet(np.ones(10), size=6), requires_grad=True)
    q = torch.tensor(RNG.dirichlet(np.ones(10), size=6))
    for r in (1, 2, 3):
        loss = util.emd_loss(p, q, r=r)
        assert loss.shape == ()
        assert loss.item() == pytest.approx(util.emd(p, q, r=r))
    util.emd_loss(p, q).backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", [util.emd_loss, util.emd_loss_reference])
def test_emd_losses_have_finite_zero_gradient_for_a_perfect_prediction(fn):
    q = torch.tensor(RNG.dirichlet(np.ones(10), size=3))
    p = q.clone().requires_grad_(True)
    loss = fn(p, q)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_emd_loss_reference_differs_from_nima_on_two_images():
    p = torch.tensor(np.stack([one_hot(3), one_hot(6)]))
    q = torch.tensor(np.stack([one_hot(4), one_hot(6)]))
    # image 1: one cdf bin differs by 1; image 2: identical.
    # NIMA: (sqrt(1/10) + 0) / 2;  reference: sqrt(1 / (2 * 10)) over the whole batch.
    assert util.emd_loss(p, q, r=2).item() == pytest.approx(math.sqrt(0.1) / 2)
    assert util.emd_loss_reference(p, q).item() == pytest.approx(math.sqrt(1 / 20))
    # with a single image the two forms agree
    assert util.emd_loss_reference(p[:1], q[:1]).item() == pytest.approx(util.emd_loss(p[:1], q[:1]).item())


def test_emd_loss_reference_is_the_reference_formula():
    def reference_emd_loss(p_target, p_estimate, r=2):  # as written in the TANet code
        cdf_target = torch.cumsum(p_target, dim=1)
        cdf_estimate = torch.cumsum(p_estimate, dim=1)
        cdf_diff = cdf_estimate - cdf_target
        samplewise_emd = torch.sqrt(torch.mean(torch.pow(torch.abs(cdf_diff), r)))
        return samplewise_emd.mean()

    p = torch.tensor(RNG.dirichlet(np.ones(10), size=5))
    q = torch.tensor(RNG.dirichlet(np.ones(10), size=5))
    assert util.emd_loss_reference(q, p).item() == pytest.approx(reference_emd_loss(p, q).item())


def test_emd_loss_rejects_bad_inputs():
    with pytest.raises(ValueError, match="tensors"):
        util.emd_loss(torch.ones(2, 10), torch.ones(3, 10))
    with pytest.raises(TypeError):
        util.emd_loss_reference(np.ones((2, 10)), np.ones((2, 10)))


# ---------------------------------------------------------------- distribution mean / std

def test_distribution_mean_std_numpy():
    p = np.stack([one_hot(0), one_hot(9), np.full(10, 0.1)])
    np.testing.assert_allclose(util.distribution_mean(p), [1.0, 10.0, 5.5])
    np.testing.assert_allclose(util.distribution_std(p), [0.0, 0.0, math.sqrt(8.25)])
    assert util.distribution_mean(np.full(10, 0.1)) == pytest.approx(5.5)  # single distribution -> scalar
    assert util.distribution_mean(p.tolist()).shape == (3,)


def test_distribution_mean_std_torch_keep_gradients():
    p = torch.full((2, 10), 0.1, requires_grad=True)
    mean, std = util.distribution_mean(p), util.distribution_std(p)
    assert isinstance(mean, torch.Tensor) and mean.shape == (2,)
    torch.testing.assert_close(mean.detach(), torch.tensor([5.5, 5.5]))
    torch.testing.assert_close(std.detach(), torch.tensor([math.sqrt(8.25)] * 2))
    (mean.sum() + std.sum()).backward()
    assert torch.isfinite(p.grad).all()


def test_distribution_mean_rejects_wrong_bin_count():
    with pytest.raises(ValueError, match="last dimension must be 10"):
        util.distribution_mean(np.ones((2, 9)))
    with pytest.raises(ValueError, match="last dimension must be 10"):
        util.distribution_std(torch.ones(2, 11))


# ---------------------------------------------------------------- ratio, per theme, summary

def test_srcc_accuracy_ratio():
    assert util.srcc_accuracy_ratio(0.758, 0.806) == pytest.approx(0.758 / 0.806)
    assert math.isnan(util.srcc_accuracy_ratio(float("nan"), 0.8))
    with pytest.warns(RuntimeWarning, match="accuracy is 0"):
        assert math.isnan(util.srcc_accuracy_ratio(0.5, 0.0))


def test_per_theme_metrics_values_counts_and_nan_themes():
    themes = ["dog"] * 5 + ["cat"] * 4 + ["lone"] + ["flat"] * 3
    pred = np.concatenate([PRED[:5], PRED[5:9], [0.3], [0.4, 0.4, 0.4]])
    true = np.concatenate([TRUE[:5], TRUE[5:9], [0.2], [0.1, 0.5, 0.9]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = util.per_theme_metrics(pred, true, themes)
    assert list(result) == ["cat", "dog", "flat", "lone"]
    assert {k: v["n"] for k, v in result.items()} == {"cat": 4, "dog": 5, "flat": 3, "lone": 1}
    assert result["dog"]["srcc"] == pytest.approx(scipy.stats.spearmanr(PRED[:5], TRUE[:5])[0])
    assert result["cat"]["plcc"] == pytest.approx(scipy.stats.pearsonr(PRED[5:9], TRUE[5:9])[0])
    for theme in ("flat", "lone"):
        assert math.isnan(result[theme]["srcc"]) and math.isnan(result[theme]["plcc"])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert any("'flat'" in m for m in messages) and any("'lone'" in m for m in messages)


def test_per_theme_metrics_length_mismatch_raises():
    with pytest.raises(ValueError, match="themes has 2 entries but there are 3 scores"):
        util.per_theme_metrics([1, 2, 3], [1, 2, 3], ["a", "b"])


def test_evaluation_metrics_scores_only():
    out = util.evaluation_metrics(PRED, TRUE, threshold=0.5)
    assert set(out) == {"srcc", "plcc", "accuracy", "mse", "n_images"}
    assert out["n_images"] == 50 and type(out["n_images"]) is int
    assert all(type(out[k]) is float for k in ("srcc", "plcc", "accuracy", "mse"))
    assert out["srcc"] == pytest.approx(util.srcc(PRED, TRUE))
    assert out["accuracy"] == pytest.approx(util.accuracy(PRED, TRUE, threshold=0.5))
    json.dumps(out)


def test_evaluation_metrics_with_distributions_and_themes():
    p = RNG.dirichlet(np.ones(10), size=6)
    q = RNG.dirichlet(np.ones(10), size=6)
    pred, true = util.distribution_mean(p), util.distribution_mean(q)
    themes = ["a", "a", "b", "b", "", "b"]
    out = util.evaluation_metrics(torch.tensor(pred), true, threshold=5.0, pred_dist=torch.tensor(p),
                                  true_dist=q, themes=themes)
    assert out["emd"] == pytest.approx(util.emd(p, q, r=1))
    assert out["srcc_accuracy_ratio"] == pytest.approx(out["srcc"] / out["accuracy"])
    assert list(out["per_theme"]) == ["a", "b"]  # blank theme left out
    assert out["per_theme"]["b"]["n"] == 3
    assert out["per_theme"]["b"]["srcc"] == pytest.approx(util.srcc(pred[[2, 3, 5]], true[[2, 3, 5]]))
    assert json.loads(json.dumps(out))["per_theme"]["a"]["n"] == 2


def test_evaluation_metrics_keeps_nan_and_is_json_serialisable():
    with pytest.warns(RuntimeWarning):
        out = util.evaluation_metrics([0.5] * 4, [0.1, 0.2, 0.7, 0.9], threshold=0.5)
    assert math.isnan(out["srcc"]) and math.isnan(out["plcc"])
    assert out["accuracy"] == 0.5
    assert math.isnan(json.loads(json.dumps(out))["srcc"])


def test_evaluation_metrics_needs_both_distributions():
    with pytest.raises(ValueError, match="both pred_dist and true_dist"):
        util.evaluation_metrics(PRED, TRUE, threshold=0.5, pred_dist=np.ones((50, 10)) / 10)
