"""Evaluation: the variational bound's terms, the Fréchet distance, the digit classifier, and a short
training run that beats an untrained model on both the bound and the digit scores."""

import math
import os
import warnings

import numpy
import pytest
import torch

from ddpm_fast import NoiseSchedule, Sampler
from ddpm_fast.data import load_digits
from ddpm_fast.evaluate import digit_classifier, digit_scores, frechet_distance, variational_bound
from ddpm_fast.train import TrainConfig, Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


class Oracle(torch.nn.Module):
    """A model that knows x0: it predicts the exact noise (or v, or x0 itself), so its x0 is exact and every KL
    term of the bound is zero with fixed_small variances."""

    def __init__(self, x0, schedule, prediction_type="epsilon"):
        super().__init__()
        self.x0, self.coef, self.prediction_type = x0, schedule.q_coef, prediction_type
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives variational_bound a device

    def forward(self, x_t, t):
        a, b = self.coef[t].T.to(x_t.dtype).reshape(2, -1, 1, 1, 1)
        eps = (x_t - a * self.x0) / b
        return {"epsilon": eps, "v_prediction": a * eps - b * self.x0,
                "sample": self.x0.expand_as(eps)}[self.prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_bound_of_an_oracle_is_prior_plus_decoder(prediction_type, variance_type):
    schedule = NoiseSchedule(num_train_timesteps=50)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1).float()
    result = variational_bound(Oracle(x0.double(), schedule, prediction_type), x0, schedule,
                               prediction_type=prediction_type, variance_type=variance_type)
    assert result["timesteps"].tolist() == list(range(1, 50))
    assert torch.equal(result["weights"], torch.ones(49, dtype=torch.float64))
    ac = schedule.alphas_cumprod
    # With the exact mean, a term is the KL between the posterior variance and the model's, per dimension:
    # 0 for fixed_small; 0.5 (-1 + log(beta_i / post_i) + post_i / beta_i) for fixed_large.
    betas, post = schedule.betas[1:], schedule.betas[1:] * (1 - ac[:-1]) / (1 - ac[1:])
    terms = torch.zeros(49, dtype=torch.float64)
    if variance_type == "fixed_large":
        terms = 0.5 * (-1 + (betas / post).log() + post / betas) / math.log(2)
    torch.testing.assert_close(result["terms_bpd"], terms, rtol=1e-9, atol=1e-9)
    # L_0 with the exact mean x0 and the std of step 1's posterior (either variance type), in closed form.
    sigma = math.sqrt(schedule.betas[1].item() * (1 - ac[0].item()) / (1 - ac[1].item()))
    cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
    interior = -math.log(cdf(1 / 255 / sigma) - cdf(-1 / 255 / sigma))
    edge = -math.log(cdf(1 / 255 / sigma))  # the open end bins at -1 and +1
    expected = sum(edge if abs(v) > 0.999 else interior for v in x0.flatten().tolist()) / (x0.numel() * math.log(2))
    assert result["decoder_bpd"] == pytest.approx(expected, rel=1e-6)
    # L_T in closed form: KL(N(sqrt(ac_T) x0, 1 - ac_T) || N(0, 1)).
    aT = ac[-1].item()
    prior = sum(0.5 * (-1 - math.log(1 - aT) + (1 - aT) + aT * v * v) for v in x0.flatten().tolist())
    assert result["prior_bpd"] == pytest.approx(prior / (x0.numel() * math.log(2)), rel=1e-6)
    assert result["bpd"] == pytest.approx(result["prior_bpd"] + result["decoder_bpd"] + terms.sum().item(), rel=1e-9)


def test_normal_kl_matches_torch_distributions():
    from ddpm_fast.evaluate import _normal_kl
    m1, lv1, m2, lv2 = torch.randn(4, 50, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (lv1 / 2).exp()),
                                                 torch.distributions.Normal(m2, (lv2 / 2).exp()))
    torch.testing.assert_close(_normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


class Recorder(torch.nn.Module):
    """A model that answers 0.3 x_t and keeps every input, so the bound's x_t and timesteps can be checked."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x_t, t):
        self.calls.append((x_t.clone(), t.clone()))
        return 0.3 * x_t


def test_bound_draws_x_t_per_image_seed_and_step_and_weights_its_strata():
    """x_t for image n at step i is q_sample's Philox(seed + n, stream i) in every batch, and the bound is the
    prior, the decoder and each stratum's term times its weight."""
    from ddpm_fast.evaluate import _strata
    from ddpm_fast.ops import q_sample
    schedule = NoiseSchedule(num_train_timesteps=30)
    x0 = (torch.randint(0, 256, (5, 1, 4, 4)) / 127.5 - 1).float()
    seed = int(torch.randint(0, 1000, ()))
    model = Recorder()
    result = variational_bound(model, x0, schedule, num_timesteps=6, batch_size=2, seed=seed)
    steps, weights = _strata(30, 6, seed)
    assert result["timesteps"].tolist() == steps and torch.equal(result["weights"], weights)
    per_batch = len(steps) + 1  # the KL steps, then the decoder's step 0
    assert len(model.calls) == 3 * per_batch
    for call, (x_t, t) in enumerate(model.calls):
        start, i = call // per_batch * 2, (steps + [0])[call % per_batch]
        expected, _ = q_sample(x0[start:start + 2], i, schedule, seeds=seed + torch.arange(start, start + len(x_t)),
                               stream=i)
        assert torch.equal(x_t, expected) and t.tolist() == [i] * len(x_t)
    total = result["prior_bpd"] + result["decoder_bpd"] + (result["terms_bpd"] * weights).sum().item()
    assert result["bpd"] == pytest.approx(total, rel=1e-12) and result["terms_bpd"].min() > 0


def test_bound_quantizes_x0_to_256_levels():
    """Values within half a level of a level, and up to 0.01 past -1 and 1, are that level (or the end)."""
    schedule = NoiseSchedule(num_train_timesteps=10)
    levels = torch.randint(0, 256, (3, 1, 4, 4)).double() / 127.5 - 1
    levels.view(-1)[:2] = torch.tensor([-1.0, 1.0])
    jitter = (torch.rand(levels.shape, dtype=torch.float64) - 0.5) * 0.9 / 127.5  # under half a level
    jitter.view(-1)[:2] = torch.tensor([-0.01, 0.01])
    model = Oracle(levels, schedule)
    exact = variational_bound(model, levels.float(), schedule)
    assert variational_bound(model, (levels + jitter).float(), schedule)["bpd"] == exact["bpd"]


def test_strata_cover_every_term_once():
    from ddpm_fast.evaluate import _strata
    for T, count in ((1000, 50), (1000, 8), (100, 99), (20, 3)):
        steps, weights = _strata(T, count)
        assert weights.sum().item() == T - 1 and weights.min() >= 1
        assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] <= T - 1
    assert _strata(1000, 50)[0][:5] == [1, 2, 3, 4, 5], "the first strata are single, exact timesteps"
    steps, weights = _strata(100, 99)  # as many strata as terms: every term, exactly
    assert steps == list(range(1, 100)) and torch.equal(weights, torch.ones(99, dtype=torch.float64))


def test_strata_estimate_the_sum_without_bias():
    """Over seeds, the stratified estimate of a convex, falling profile (the KL terms fall like 1/i) averages to
    the exact sum; each stratum's log-midpoint overstated it by 14 standard errors here."""
    from ddpm_fast.evaluate import _strata
    exact = sum(1.0 / i for i in range(1, 1000))
    estimates = []
    for seed in range(2000):
        steps, weights = _strata(1000, 8, seed)
        estimates.append(sum(w / i for i, w in zip(steps, weights.tolist())))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    assert abs(estimates.mean().item() - exact) < 4 * estimates.std().item() / math.sqrt(len(estimates))
    assert _strata(1000, 8, 3)[0] == _strata(1000, 8, 3)[0] and estimates.std() > 0  # reproducible, drawn


def test_decoder_likelihood_is_exact_far_into_the_tails():
    """Each bin's mass in log space against mpmath at 50 digits: a decoder mean far off its pixel costs what it
    should (Ho's tanh CDF floored at 1e-12 capped it at 27.6 nats: 0.5 off at std 0.007 is ~2500)."""
    mpmath = pytest.importorskip("mpmath")
    from ddpm_fast.evaluate import _discretized_gaussian_log_likelihood
    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x = torch.randint(0, 256, (400,), generator=g).double() / 127.5 - 1
    x[:2] = torch.tensor([-1.0, 1.0])  # the open end bins
    mean = x + torch.randn(400, generator=g, dtype=torch.float64) * torch.tensor([0.001, 0.02, 0.5, 3.0]).repeat(100)
    log_scale = torch.tensor([math.log(0.007), math.log(0.1)], dtype=torch.float64).repeat(200)
    ours = _discretized_gaussian_log_likelihood(x, mean, log_scale)

    def truth(xi, m, ls):
        cdf = lambda z: mpmath.ncdf(z)  # noqa: E731
        s = mpmath.e ** mpmath.mpf(ls)
        lo = -mpmath.inf if xi < -0.999 else (mpmath.mpf(xi) - m - mpmath.mpf(1) / 255) / s
        hi = mpmath.inf if xi > 0.999 else (mpmath.mpf(xi) - m + mpmath.mpf(1) / 255) / s
        return float(mpmath.log(cdf(-lo) - cdf(-hi) if lo > 0 else cdf(hi) - cdf(lo)))  # 1 - 1 cancels at any dps
    expected = torch.tensor([truth(*v) for v in zip(x.tolist(), mean.tolist(), log_scale.tolist())],
                            dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    assert expected.min() < -1000  # the far tails were reached


def test_bad_images_and_zero_snr_epsilon_are_refused():
    schedule = NoiseSchedule(num_train_timesteps=20)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    oracle = Oracle(x0.double(), schedule)
    with pytest.raises(TypeError, match="x0 must be floating-point images in \\[-1, 1\\], got dtype torch.uint8"):
        variational_bound(oracle, (x0 * 127.5 + 127.5).to(torch.uint8), schedule)
    with pytest.raises(ValueError, match=r"x0 must lie in \[-1, 1\], got values in \[0, 255\]"):
        variational_bound(oracle, torch.tensor([0.0, 255.0]).repeat(16).reshape(2, 1, 4, 4), schedule)
    with pytest.raises(ValueError, match=r"x0 must lie in \[-1, 1\], got values in \[-1.02, "):  # past the 0.01 slack
        variational_bound(oracle, torch.cat([x0[:1], x0[1:].clamp(-0.5, 0.5) - 0.52]), schedule)
    for bad, message in (({"variance_type": "learned"}, "variance_type must be 'fixed_large' or 'fixed_small'"),
                         ({"x0": x0[0]}, r"x0 must be a \(N, C, H, W\) tensor, got \(1, 4, 4\)"),
                         ({"schedule": NoiseSchedule(num_train_timesteps=1)}, "at least 2 timesteps, got 1"),
                         ({"num_timesteps": 0}, "num_timesteps must be a positive int or None, got 0")):
        with pytest.raises(ValueError, match=message):
            variational_bound(oracle, **{"x0": x0, "schedule": schedule, **bad})
    with warnings.catch_warnings():  # a single image in [0, 1] can be a real one (a blank page): no warning
        warnings.simplefilter("error")
        variational_bound(oracle, (x0[:1] + 1) / 2, schedule, num_timesteps=2)
    with pytest.warns(RuntimeWarning, match=r"samples holds no negative value .* images in \[0, 1\]") as record:
        digit_scores((load_digits("test").images[:8] + 1) / 2)
    with pytest.warns(RuntimeWarning, match=r"x0 holds no negative value") as also:
        variational_bound(oracle, (x0 + 1) / 2, schedule, num_timesteps=2)
    # at the caller's line, past the torch.no_grad wrapper (which once took the warning's frame)
    assert [w.filename for w in (*record, *also)] == [__file__] * 2
    zero_snr = NoiseSchedule(num_train_timesteps=20, rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="prediction_type='epsilon' gives no x0 at the last timestep"):
        variational_bound(oracle, x0, zero_snr)
    assert math.isfinite(variational_bound(lambda x, t: x, x0, zero_snr, prediction_type="v_prediction")["bpd"])


def test_frechet_distance_matches_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(150, 6, generator=g, dtype=torch.float64) * 0.7 + 0.3
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + ca.trace() + cb.trace() \
        - 2 * scipy_linalg.sqrtm(ca @ cb).real.trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # Fewer samples than dimensions (as digit_scores with few samples): singular covariances, whose rounding-
    # negative eigenvalues count as 0.
    few = a[:3]
    cf = torch.cov(few.T).numpy()
    cross = numpy.sqrt(numpy.linalg.eigvals(cf @ cb).real.clip(min=0)).sum()
    expected = ((few.mean(0) - b.mean(0)) ** 2).sum().item() + cf.trace() + cb.trace() - 2 * cross
    assert frechet_distance(few, b) == pytest.approx(expected, rel=1e-6)


def test_digit_classifier_and_score_range():
    test = load_digits("test")
    classifier = digit_classifier()
    accuracy = (classifier(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.93
    real = digit_scores(load_digits("train").images[:256])
    noise = digit_scores(torch.rand(256, 1, 16, 16) * 2 - 1)
    assert real["confidence"] > 0.9 and real["digit_fraction"] > 0.97 and real["frechet"] < 20
    assert noise["confidence"] < 0.05 and noise["frechet"] > 500 and noise["digit_fraction"] < 0.05
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        digit_scores(torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="needs at least 2 samples for a covariance, got 1"):
        digit_scores(test.images[:1])
    # Scored against themselves as the reference, samples are at Fréchet distance ~0 (rounding only).
    assert digit_scores(test.images[:100], reference=test.images[:100])["frechet"] == pytest.approx(0, abs=1e-6)


def test_classifier_cache_is_per_epochs_and_seed_and_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failed cache write (a full disk, after the bytes went out) is not an error and leaves neither a damaged
    cache nor its temporary file; a later call reads the cache written whole."""
    import errno
    from ddpm_fast import evaluate
    names = {evaluate._cache_file(e, s).name for e, s in ((10, 0), (1, 0), (10, 1))}
    assert len(names) == 3, "a classifier trained otherwise is not read from another's cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    trained = evaluate.DigitClassifier()
    monkeypatch.setattr(evaluate, "_train_classifier", lambda epochs, seed: trained)
    fsync, failed = os.fsync, []

    def full_disk(fd):
        failed.append(os.path.getsize(os.readlink(f"/proc/self/fd/{fd}")))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full_disk)
    evaluate.digit_classifier.cache_clear()
    try:
        assert evaluate.digit_classifier() is trained
        assert failed and failed[0] > 0, "the write failed after bytes went out"
        assert list(tmp_path.rglob("*")) == [tmp_path / "ddpm_fast"], "nothing is left behind"
        monkeypatch.setattr(os, "fsync", fsync)
        evaluate.digit_classifier.cache_clear()
        evaluate.digit_classifier()
        monkeypatch.setattr(evaluate, "_train_classifier", None)  # now it must be read
        evaluate.digit_classifier.cache_clear()
        loaded = evaluate.digit_classifier()
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    finally:
        evaluate.digit_classifier.cache_clear()  # the other tests' classifier, from their cache


def test_classifier_training_leaves_the_global_rng_and_works_under_no_grad(monkeypatch):
    from ddpm_fast import evaluate
    digits = load_digits("test")
    few = type(digits)("few", digits.data[:40], digits.labels[:40], flip=False)
    monkeypatch.setattr(evaluate, "load_digits", lambda split: few)  # one fast epoch
    state = torch.get_rng_state()
    with torch.no_grad():  # digit_scores trains it under no_grad
        model = evaluate._train_classifier(1, 5)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(model.head.weight, evaluate._train_classifier(0, 5).head.weight), "it trained"


def test_short_training_beats_untrained():
    data = load_digits("train")
    config = TrainConfig(batch_size=16, steps=TRAIN_STEPS, lr=2e-3, warmup_steps=20, min_snr_gamma=5.0, seed=0)
    trainer = Trainer(config, None, dataset=data)
    untrained = trainer.ema_model()
    trainer.train()
    trained = trainer.ema_model()
    held_out = load_digits("test").images[:32]
    scores = {}
    for name, model in (("untrained", untrained), ("trained", trained)):
        bound = variational_bound(model, held_out, trainer.schedule, num_timesteps=8)["bpd"]
        samples = Sampler(model, trainer.schedule, method="ddim", num_steps=10).sample(list(range(64)), (1, 16, 16))
        scores[name] = {"bpd": bound, **digit_scores(samples)}
    u, t = scores["untrained"], scores["trained"]
    assert t["bpd"] < 0.5 * u["bpd"], scores
    assert t["frechet"] < 0.7 * u["frechet"], scores
    assert t["confidence"] > u["confidence"] + 0.1, scores


TRAIN_STEPS = 100
