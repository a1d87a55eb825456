"""How good is a trained model: the variational bound in bits/dim, and sample-quality scores on the digits.

**Variational bound** (Ho et al. 2020, eq. 5; the NLL column of their Table 2). For data x0 in [-1, 1]
with 256 levels per value (8-bit images; the digits' upsampled values are read as such),

    L = L_T + sum_{t=2..T} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),      (our index t-1 = timestep index i >= 1)
    L_0     = -log p(x0 | x_1), Ho's discretized Gaussian decoder (bins of width 2/255, open end bins,
              each bin's mass from the exact normal CDF in log space),

each in nats per image, divided by (dimensions * ln 2) for bits/dim. p's mean comes from the model's
prediction turned into x0 (epsilon, x0 or v), its variance is "fixed_large" (beta_t; the first step uses
the posterior variance of step 1, as in Ho's code) or "fixed_small" (the posterior variance, log clipped
at step 1's). x_t is drawn by the fused ``q_sample`` from per-image seeds and stream ``i``, so the
bound is reproducible. With ``num_timesteps < T - 1`` the sum over i is a stratified estimate: strata
evenly spaced in log(i) (the terms fall roughly like 1/i), each represented by a timestep drawn uniformly
in it (from ``seed``) and weighted by its size, which is unbiased and what a CPU can afford (a fixed
midpoint overstated the digits' bound by 0.07 bpd at 8 strata: the terms are convex in i).

Two conventions, as in Ho et al.: the model's x0 is not clipped (improved-diffusion's ``calc_bpd_loop``
clips it by default, which gives a slightly lower bound), and the decoder takes no approximation: Ho's
tanh CDF with its 1e-12 floor caps a pixel's L_0 at 27.6 nats, so an untrained model's bound came out
far too low; for a trained model the two differ by about 0.002 bits/dim.

**Digit scores.** A small CNN (:class:`DigitClassifier`) is trained deterministically (fixed seed,
float32, a few seconds on a CPU) on the digits' training split, plus an 11th "not a digit" class of
noise, blank and pixel-shuffled images, so that garbage does not get a confident digit label. Scores
of generated 16x16 digits in [-1, 1]:

* ``confidence``: the mean over samples of the largest *digit* class probability (11-way softmax);
* ``frechet``: the Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate
  features of the samples and of the 300 held-out real digits (the FID recipe in a digit feature space).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import load_digits
from .ops import q_sample
from .sampler import _progress_bar, write_atomically
from .schedule import NoiseSchedule

__all__ = ["DigitClassifier", "digit_classifier", "digit_scores", "frechet_distance", "variational_bound"]

_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------- variational bound

def _check_images(where: str, name: str, x: Tensor) -> None:
    """Images in [-1, 1]: refuse integer storage and values far outside; warn on data that look like [0, 1]
    (a real image set holds black pixels at -1): either would score silently wrong."""
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be floating-point images in [-1, 1], got dtype {x.dtype} "
                        "(uint8 images: x / 127.5 - 1)")
    lo, hi = x.min().item(), x.max().item()  # NaN propagates: refused below too
    if not (lo >= -1.01 and hi <= 1.01):
        raise ValueError(f"{where}: {name} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if lo >= 0.0 and x.shape[0] > 1:
        warnings.warn(f"{where}: {name} holds no negative value (values in [{lo:.4g}, {hi:.4g}]): images in "
                      "[0, 1]? It expects [-1, 1] (x * 2 - 1)", RuntimeWarning,
                      stacklevel=4)  # the public function's caller: past it and its torch.no_grad wrapper


def _normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats; floats or float64 tensors."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_normal_mass(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi (float64, -inf / +inf allowed), exact far into the tails: on the
    side of 0 where the interval lies, as log Phi(near) + log(1 - Phi(far) / Phi(near)); across 0 directly."""
    right = lo > 0  # mirror the right tail onto the left: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a, b = torch.where(right, -hi, lo), torch.where(right, -lo, hi)  # a < b, both <= 0 unless across 0
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    d = (log_a - log_b).clamp(max=0.0)  # log(Phi(a) / Phi(b)) <= 0
    log1mexp = torch.where(d > -_LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
    across = (lo <= 0) & (hi > 0)
    return torch.where(across, torch.log(torch.special.ndtr(hi) - torch.special.ndtr(lo)), log_b + log1mexp)


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for 8-bit data x in [-1, 1] under a Gaussian binned at width 2/255 (Ho et al.), the
    end bins open to -inf and +inf."""
    centered = x - mean
    inv_std = torch.exp(-torch.as_tensor(log_scale, dtype=torch.float64))
    inf = torch.full_like(centered, math.inf)
    lo = torch.where(x < -0.999, -inf, inv_std * (centered - 1.0 / 255.0))
    hi = torch.where(x > 0.999, inf, inv_std * (centered + 1.0 / 255.0))
    return _log_normal_mass(lo, hi)


def _predicted_x0(output: Tensor, x_t: Tensor, i: int, schedule: NoiseSchedule, prediction_type: str) -> Tensor:
    a, b = schedule.q_coef[i].tolist()  # sqrt(ac), sqrt(1 - ac)
    if prediction_type == "epsilon":
        return (x_t - b * output) / a
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return a * x_t - b * output
    raise ValueError(f"variational_bound: prediction_type must be 'epsilon', 'sample' or 'v_prediction', "
                     f"got {prediction_type!r}")


@torch.no_grad()
def variational_bound(model, x0: Tensor, schedule: NoiseSchedule, *, prediction_type: str = "epsilon",
                      variance_type: str = "fixed_large", num_timesteps: int | None = None, batch_size: int = 256,
                      seed: int = 0, progress: bool = False) -> dict:
    """The negative ELBO of ``x0`` under the model, in bits/dim, with its per-timestep terms.

    Args:
        model: ``model(x, t) -> prediction`` of x's shape, in eval mode (dropout would make the bound random).
        x0: (N, C, H, W) floating-point data in [-1, 1]; quantized to 256 levels first.
        num_timesteps: about how many of the T - 1 KL terms to evaluate (log-spaced strata, see
            ``_strata``); None: all of them (T model calls per batch).
        seed: x_t's noise for image n is Philox(seed + n, stream i); the strata's timesteps are drawn from it.
    Returns:
        dict with ``bpd`` (the bound), ``prior_bpd`` (L_T), ``decoder_bpd`` (L_0), ``timesteps`` ((K,) the
        indices i evaluated), ``weights`` ((K,) how many terms each stands for) and ``terms_bpd`` ((K,) the
        mean L_{i-1} there), all floats / CPU tensors.
    """
    if variance_type not in ("fixed_large", "fixed_small"):
        raise ValueError(f"variational_bound: variance_type must be 'fixed_large' or 'fixed_small', "
                         f"got {variance_type!r}")
    if not isinstance(x0, Tensor) or x0.dim() != 4:
        raise ValueError(f"variational_bound: x0 must be a (N, C, H, W) tensor, got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
    _check_images("variational_bound", "x0", x0)
    T = schedule.num_train_timesteps
    if T < 2:
        raise ValueError(f"variational_bound: needs a schedule with at least 2 timesteps, got {T}")
    if prediction_type == "epsilon" and schedule.alphas_cumprod[-1].item() == 0.0:
        raise ValueError("variational_bound: prediction_type='epsilon' gives no x0 at the last timestep of a "
                         "zero-terminal-SNR schedule (its signal is 0); bound a 'v_prediction' or 'sample' model")
    device = next(model.parameters()).device if isinstance(model, nn.Module) else x0.device
    x0 = (((x0.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1).to(device)
    N, dims = x0.shape[0], x0[0].numel()
    steps, weights = _strata(T, num_timesteps, seed)

    betas, ac = schedule.betas, schedule.alphas_cumprod
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_c0 = betas * ac_prev.sqrt() / (1 - ac)         # coefficient of x0 in the posterior mean
    post_ct = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)  # coefficient of x_t
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at step 1's
    model_logvar = (torch.log(torch.cat([post_var[1:2], betas[1:]])) if variance_type == "fixed_large"
                    else post_logvar)

    seeds = seed + torch.arange(N, dtype=torch.int64, device=device)
    terms = torch.zeros(len(steps), dtype=torch.float64)
    decoder = prior = 0.0
    bar = _progress_bar(len(steps) + 1, progress, "variational bound")
    for chunk in range(0, N, batch_size):
        x = x0[chunk:chunk + batch_size]
        s = seeds[chunk:chunk + batch_size]
        n = x.shape[0]
        # L_T: q(x_T | x0) = N(sqrt(ac_T) x0, 1 - ac_T) against N(0, 1).
        mean_T = ac[-1].sqrt().item() * x.double()
        prior += _normal_kl(mean_T, math.log(1 - ac[-1].item()), 0.0, 0.0).flatten(1).sum(1).sum().item()
        for k, i in enumerate(steps + [0]):
            x_t, _ = q_sample(x, i, schedule, seeds=s, stream=i)
            x0_pred = _predicted_x0(model(x_t, torch.full((n,), i, device=device)).double(), x_t.double(), i,
                                    schedule, prediction_type)
            model_mean = post_c0[i].item() * x0_pred + post_ct[i].item() * x_t.double()
            if i == 0:  # L_0: the decoder
                nll = -_discretized_gaussian_log_likelihood(x.double(), model_mean, 0.5 * model_logvar[0].item())
                decoder += nll.flatten(1).sum(1).sum().item()
            else:
                true_mean = post_c0[i].item() * x.double() + post_ct[i].item() * x_t.double()
                kl = _normal_kl(true_mean, post_logvar[i].item(), model_mean, model_logvar[i].item())
                terms[k] += kl.flatten(1).sum(1).sum().item()
            if chunk == 0:
                bar.update(1)
    bar.close()
    to_bpd = 1.0 / (N * dims * _LN2)
    terms_bpd = terms * to_bpd
    prior_bpd, decoder_bpd = prior * to_bpd, decoder * to_bpd
    total = prior_bpd + decoder_bpd + (terms_bpd * weights).sum().item()
    return {"bpd": total, "prior_bpd": prior_bpd, "decoder_bpd": decoder_bpd,
            "timesteps": torch.tensor(steps), "weights": weights, "terms_bpd": terms_bpd}


def _strata(T: int, count: int | None, seed: int = 0) -> tuple[list[int], Tensor]:
    """The timesteps i in [1, T) whose KL terms are evaluated, and how many terms each stands for.

    None (or count >= T - 1): every i, weight 1. Otherwise [1, T) is cut into ``count`` strata evenly
    spaced in log(i) (the terms fall roughly like 1/i, so small i need fine strata; the first ones hold
    one timestep each and are exact), each represented by a timestep drawn uniformly in it from ``seed``:
    an unbiased estimate of the sum.
    """
    if count is None or count >= T - 1:
        return list(range(1, T)), torch.ones(T - 1, dtype=torch.float64)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"variational_bound: num_timesteps must be a positive int or None, got {count!r}")
    edges = sorted(set(torch.logspace(0, math.log10(T), count + 1, dtype=torch.float64).round().long().tolist()))
    edges[0], edges[-1] = 1, T
    generator = torch.Generator().manual_seed(seed)
    steps = [lo + int(torch.randint(hi - lo, (), generator=generator)) for lo, hi in zip(edges, edges[1:])]
    weights = torch.tensor([hi - lo for lo, hi in zip(edges, edges[1:])], dtype=torch.float64)
    return steps, weights


# ----------------------------------------------------------------------------------------- digit scores

class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) in [-1, 1] -> 11 logits (digits 0-9, then "not a digit"); ``features`` is 64-d."""

    NOT_A_DIGIT = 10

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 11)

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _not_digits(real: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` images that are not digits: uniform and Gaussian noise, flat grey levels, pixel-shuffled digits."""
    n = count // 4
    shape = real.shape[1:]
    uniform = torch.rand((n, *shape), generator=generator) * 2 - 1
    gauss = (torch.randn((n, *shape), generator=generator) * torch.rand((n, 1, 1, 1), generator=generator)).clamp(-1, 1)
    flat = (torch.rand((n, 1, 1, 1), generator=generator) * 2 - 1).expand(n, *shape)
    picks = real[torch.randint(0, real.shape[0], (count - 3 * n,), generator=generator)].flatten(1)
    order = torch.argsort(torch.rand(picks.shape, generator=generator), dim=1)
    shuffled = torch.gather(picks, 1, order).reshape(-1, *shape)
    return torch.cat([uniform, gauss, flat, shuffled])


def _cache_file(epochs: int, seed: int) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ddpm_fast" / f"digit_classifier-v1-e{epochs}-s{seed}.safetensors"


@functools.lru_cache(maxsize=1)
def digit_classifier(epochs: int = 10, seed: int = 0) -> DigitClassifier:
    """The classifier: trained on the digits' training split (deterministic, ~5-20 s on a CPU), then cached
    in memory and in ``$XDG_CACHE_HOME/ddpm_fast/`` (default ~/.cache); a cache that cannot be read or
    written is ignored."""
    from safetensors.torch import load_file, save
    model = DigitClassifier()
    cache = _cache_file(epochs, seed)
    try:
        model.load_state_dict(load_file(cache))
        return model.eval()
    except Exception:  # noqa: BLE001 - missing or damaged cache: train
        pass
    model = _train_classifier(epochs, seed)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    except OSError:  # an unwritable cache (a full disk) only costs the next call its training
        pass
    return model


def _train_classifier(epochs: int, seed: int) -> DigitClassifier:
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # callers may be under no_grad
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        train = load_digits("train")
        junk = _not_digits(train.images, train.images.shape[0] // 5, g)
        x = torch.cat([train.images, junk])
        y = torch.cat([train.labels, torch.full((junk.shape[0],), DigitClassifier.NOT_A_DIGIT)])
        model = DigitClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], 64):
                idx = order[i:i + 64]
                # A pixel of jitter keeps it from keying on exact positions.
                shift = torch.randint(-1, 2, (2,), generator=g).tolist()
                loss = F.cross_entropy(model(torch.roll(x[idx], shift, dims=(2, 3))), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return model.eval()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64.

    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), with symmetric eigen-square-roots.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


@torch.no_grad()
def digit_scores(samples: Tensor, reference: Tensor | None = None) -> dict:
    """Scores of generated digits: (N, 1, 16, 16) in [-1, 1] -> {"confidence", "frechet", "digit_fraction"}.

    ``reference`` defaults to the 300 held-out real digits (which score confidence ~0.94, as the training
    digits do, and Fréchet ~0 up to sampling noise: the floor to compare against). ``digit_fraction`` is the
    share of samples whose top class is a digit.
    """
    if not isinstance(samples, Tensor) or samples.dim() != 4 or tuple(samples.shape[1:]) != (1, 16, 16):
        raise ValueError(f"digit_scores: samples must be (N, 1, 16, 16), got "
                         f"{tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__}")
    if samples.shape[0] < 2:
        raise ValueError(f"digit_scores: needs at least 2 samples for a covariance, got {samples.shape[0]}")
    _check_images("digit_scores", "samples", samples)
    classifier = digit_classifier()
    real = load_digits("test").images if reference is None else reference
    x = samples.detach().float().cpu().clamp(-1, 1)
    probs = classifier(x).softmax(dim=1)
    confidence = probs[:, :DigitClassifier.NOT_A_DIGIT].max(dim=1).values.mean().item()
    digit_fraction = (probs.argmax(dim=1) != DigitClassifier.NOT_A_DIGIT).float().mean().item()
    frechet = frechet_distance(classifier.features(x), classifier.features(real.float()))
    return {"confidence": confidence, "frechet": frechet, "digit_fraction": digit_fraction}
