"""Calibration of the guidance classifier along the diffusion process (SPEC §7, paper Eq. 1).

For noise levels sigma_0 > ... > sigma_{N-1} of a sampler's schedule (step i = 0 is pure noise),
images with known labels are brought to each level, shown to the classifier the way a guided
sampler shows them, and scored:

    ECE_t = sum over 15 equal-width confidence bins of |accuracy - confidence| * n_bin / n
    ICE   = mean_t ECE_t

Noise levels are EDM's sigma (the VE view x_t = x + sigma * n) for every sampler: it names one
noise level the same way for EDM and DDPM, and the denoiser protocol D(x, sigma) takes it
directly. A DDPM state is the VP view of the same point, x_vp = x_t / sqrt(1 + sigma^2)
= sqrt(abar) x + sqrt(1 - abar) n with abar = 1 / (1 + sigma^2), so nothing is lost.

Two sources of labelled states:
- "forward": real images x with their labels, forward-noised to x_t = x + sigma_t * n (one noise
  draw n per image, from the image's own generator, reused at every level: differences between
  levels and settings then come from the classifier, not from fresh noise).
- "reverse": the job's own sampling trajectories (its guidance included), scored against the
  target labels; the state at the start of step i sits at sigma_i.

A setting says how the classifier is prepared and fed:
- softplus_beta: every ReLU becomes Softplus(beta) (math.inf keeps ReLU), as the guidance does.
- classifier_input: "x0", the denoiser's estimate D(x_t, sigma_t, y) (the paper's choice; clipped
  to [-1, 1] where the DDPM sampler clips it; a class-conditional denoiser gets the labels, as it
  gets the targets in guided sampling, so at high noise x0 already carries the label: that is
  the input guidance works with), or "xt", the noisy state as the sampler hands it to
  the classifier when guiding on it: EDM's normalised x_t / max(rms(x_t), 1), DDPM's VP state.
- marginal_temperature: tau in the confidence max_k softmax(tau * logits)_k, the distribution
  the calibrated objective's marginal term normalises with (tau = 0 gives confidence 1 / K).
  The predicted class is argmax of the logits whatever tau is.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checks import check_finite_number, check_int, check_softplus_beta, class_ids, from_json_number, json_number
from ..guidance.precondition import precondition_classifier
from ..job import Job
from ..models.denoiser import EpsModelDenoiser
from ..numerics import per_sample, rms
from ..rng import StackedRandomGenerator
from ..samplers import DDPMSettings, EDMSettings
from ..samplers.ddpm import GUIDANCE_INPUTS, model_is_class_conditional
from ..schedules.gaussian_diffusion import GaussianDiffusion

NUM_BINS = 15
SOURCES = ("forward", "reverse")
# The classifier's views of a noisy state: EDM's normalised state, or DDPM's VP state.
NOISY_VIEWS = ("edm", "vp")
DEFAULT_SETTING = {"softplus_beta": math.inf, "classifier_input": "x0", "marginal_temperature": 1.0}


def expected_calibration_error(confidences, correct, num_bins: int = NUM_BINS) -> float:
    """Expected calibration error (Naeini et al. 2015) over equal-width confidence bins.

    Bin b (b = 0 ... num_bins - 1) holds the confidences c with b / M < c <= (b + 1) / M,
    M = num_bins, edges computed as b / M in float64: a confidence on an edge belongs to the
    lower bin (0.5 with two bins goes to (0, 0.5]), and c = 0 joins the first bin.

        ECE = sum over bins of |accuracy_bin - mean confidence_bin| * n_bin / n

    Args:
        confidences: (n,) confidences in [0, 1] (tensor, array or sequence).
        correct: (n,) whether each prediction was right (bool or 0/1).
        num_bins: M.
    Returns:
        ECE in [0, 1].
    """
    confidences = torch.as_tensor(np.asarray(confidences), dtype=torch.float64).flatten()
    correct = torch.as_tensor(np.asarray(correct)).flatten().to(torch.float64)
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins: must be an integer >= 1, got {num_bins!r}")
    if confidences.numel() == 0 or confidences.shape != correct.shape:
        raise ValueError(f"confidences, correct: need the same non-zero length, got {confidences.numel()} "
                         f"and {correct.numel()}")
    if not bool(((confidences >= 0) & (confidences <= 1)).all()):
        raise ValueError("confidences: must lie in [0, 1]")
    inner_edges = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
    # right=False counts the edges strictly below c, so c on an edge lands in the lower bin.
    bins = torch.bucketize(confidences, inner_edges, right=False)
    confidence_sums = torch.bincount(bins, weights=confidences, minlength=num_bins)
    correct_sums = torch.bincount(bins, weights=correct, minlength=num_bins)
    # Per bin, n_bin * |acc - conf| = |sum(correct) - sum(conf)|: empty bins add exactly 0.
    return float((correct_sums - confidence_sums).abs().sum() / confidences.numel())


def integral_calibration_error(ece_per_step: Sequence[float]) -> float:
    """ICE = mean over the evaluated timesteps of ECE_t (paper Eq. 1)."""
    if not len(ece_per_step):
        raise ValueError("ece_per_step: need at least one timestep")
    return float(np.mean(np.asarray(ece_per_step, dtype=np.float64)))


# ---------------------------------------------------------------------------------------------
# Settings


def normalize_setting(setting: Mapping) -> dict:
    """A checked setting with all keys (missing ones from DEFAULT_SETTING); softplus_beta may
    be given as a number or "inf"."""
    unknown = sorted(set(setting) - set(DEFAULT_SETTING))
    if unknown:
        raise ValueError(f"setting: unknown key(s) {unknown}; expected {sorted(DEFAULT_SETTING)}")
    merged = {**DEFAULT_SETTING, **setting}
    beta = check_softplus_beta(from_json_number(merged["softplus_beta"]))
    if merged["classifier_input"] not in GUIDANCE_INPUTS:
        raise ValueError(f"classifier_input: expected one of {GUIDANCE_INPUTS}, got {merged['classifier_input']!r}")
    temperature = check_finite_number("marginal_temperature", merged["marginal_temperature"], minimum=0)
    return {"softplus_beta": float(beta), "classifier_input": merged["classifier_input"],
            "marginal_temperature": temperature}


def settings_grid(softplus_betas: Sequence[float], classifier_inputs: Sequence[str],
                  marginal_temperatures: Sequence[float]) -> list[dict]:
    """Every combination of the given values, as checked settings."""
    return [normalize_setting({"softplus_beta": beta, "classifier_input": kind, "marginal_temperature": tau})
            for beta, kind, tau in itertools.product(softplus_betas, classifier_inputs, marginal_temperatures)]


def setting_label(setting: Mapping) -> str:
    """Short text of a setting, e.g. 'beta=3 x0 tau=0.5'."""
    return f"beta={setting['softplus_beta']:g} {setting['classifier_input']} tau={setting['marginal_temperature']:g}"


def _json_setting(setting: Mapping) -> dict:
    """A setting with an infinite beta written as "inf" (JSON has no infinity)."""
    return {**setting, "softplus_beta": json_number(setting["softplus_beta"])}


# ---------------------------------------------------------------------------------------------
# The pieces calibration needs


@dataclass
class CalibrationParts:
    """What calibration needs from a guided sampler.

    Attributes:
        denoiser: EDM interface D(x, sigma, class_labels) -> x0 (B, C, H, W), with `label_dim`
            (0 or absent: unconditional; otherwise it gets one-hot labels).
        classifier: the classifier as trained (before any smoothing), (B, C, H, W) -> (B, K).
        transform: the guidance's input transform, applied before the classifier.
        noisy_view: how the sampler shows a noisy state to the classifier: "edm" (x_t / max(rms, 1))
            or "vp" (x_t / sqrt(1 + sigma^2)).
        clip_denoised: clamp x0 to [-1, 1] before classifying it (the DDPM sampler does).
        device: where the networks live.
    """

    denoiser: Callable
    classifier: nn.Module
    transform: Callable = field(default_factory=nn.Identity)
    noisy_view: str = "edm"
    clip_denoised: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self):
        if self.noisy_view not in NOISY_VIEWS:
            raise ValueError(f"noisy_view: expected one of {NOISY_VIEWS}, got {self.noisy_view!r}")
        self.device = torch.device(self.device)


def job_sigmas(job: Job) -> list[float]:
    """Noise levels (VE sigma) of the state at the start of each step of the job's sampler,
    step 0 (noisiest) first: EDM's sigma_0 ... sigma_{N-1}, or the respaced DDPM chain's
    sqrt((1 - abar_t) / abar_t) for t = T-1 ... 0."""
    settings = _calibratable(job)
    if isinstance(settings, EDMSettings):
        return [float(s) for s in settings.time_steps(job.net)[:-1]]
    return [float(s) for s in settings.diffusion.sigmas()[::-1]]


def _calibratable(job: Job) -> EDMSettings | DDPMSettings:
    if not isinstance(job.settings, (EDMSettings, DDPMSettings)):
        raise ValueError(f"job: calibration runs EDM and DDPM jobs, not {job.sampler!r} ones")
    return job.settings


def job_with_num_steps(job: Job, num_steps: int) -> Job:
    """A copy of `job` whose sampler takes `num_steps` steps (EDM's num_steps; DDPM's respacing
    to `num_steps` evenly spaced timesteps)."""
    return replace(job, settings=job.settings.with_num_steps(num_steps))


def calibration_parts(job: Job) -> CalibrationParts:
    """The calibration pieces of a guided job: its denoiser (an ADM eps-model seen through
    `EpsModelDenoiser`), its classifier as given to the guidance (before smoothing) and its
    input transform."""
    if job.guidance is None:
        raise ValueError("job: it has no classifier guidance; calibration needs a classifier")
    settings = _calibratable(job)
    classifier = job.guidance.source_classifier
    if isinstance(settings, EDMSettings):
        return CalibrationParts(job.net, classifier, job.guidance.transform, "edm", False, job.device)
    if settings.model_mean_type != "eps":
        raise ValueError("job: calibration of DDPM jobs supports eps-prediction models only")
    conditional = model_is_class_conditional(job.net, labels_given=True)
    channels, height, _ = job.image_shape
    denoiser = EpsModelDenoiser(job.net, diffusion=GaussianDiffusion.create(settings.num_timesteps,
                                                                            settings.beta_schedule, None),
                                learn_sigma=settings.learn_sigma, img_channels=channels, img_resolution=height,
                                label_dim=job.num_classes if conditional else 0)
    return CalibrationParts(denoiser, classifier, job.guidance.transform, "vp", settings.clip_denoised, job.device)


# ---------------------------------------------------------------------------------------------
# Scoring


class _Scorer:
    """Scores labelled states at every step for every setting and keeps (confidence, correct)."""

    def __init__(self, parts: CalibrationParts, settings: Sequence[Mapping], num_steps: int,
                 image_shape: Sequence[int]):
        self.parts = parts
        self.settings = [normalize_setting(s) for s in settings]
        if not self.settings:
            raise ValueError("settings: need at least one setting")
        example = parts.transform(torch.zeros((1, *image_shape), device=parts.device))
        self.classifiers = {}
        for beta in sorted({s["softplus_beta"] for s in self.settings}):
            self.classifiers[beta], _ = precondition_classifier(parts.classifier, softplus_beta=beta, example=example)
        with torch.no_grad():
            self.num_classes = int(next(iter(self.classifiers.values()))(example).shape[1])
        self.confidences = [[[] for _ in range(num_steps)] for _ in self.settings]
        self.correct = [[[] for _ in range(num_steps)] for _ in self.settings]

    def _inputs(self, x_t: torch.Tensor, sigma: float, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The classifier inputs (B, C, H, W) the settings need for VE states x_t at sigma."""
        kinds = {s["classifier_input"] for s in self.settings}
        inputs = {}
        if "xt" in kinds:
            if self.parts.noisy_view == "edm":
                r = rms(x_t)
                inputs["xt"] = x_t / per_sample(torch.where(r > 1, r, torch.ones_like(r)), x_t)
            else:
                inputs["xt"] = x_t / math.sqrt(1 + sigma ** 2)
        if "x0" in kinds:
            label_dim = getattr(self.parts.denoiser, "label_dim", 0) or 0
            net_labels = None
            if label_dim:
                net_labels = nn.functional.one_hot(labels.long(), label_dim).to(torch.float32)
            sigma_t = torch.as_tensor(sigma, dtype=torch.float64, device=x_t.device)
            x0 = self.parts.denoiser(x_t, sigma_t, net_labels).to(torch.float32)
            inputs["x0"] = x0.clamp(-1, 1) if self.parts.clip_denoised else x0
        return inputs

    @torch.no_grad()
    def score(self, step: int, x_t: torch.Tensor, sigma: float, labels: torch.Tensor) -> None:
        """Scores VE states x_t (B, C, H, W) at noise level sigma with true labels (B,)."""
        inputs = self._inputs(x_t.to(torch.float32), sigma, labels)
        logits = {}
        for index, setting in enumerate(self.settings):
            key = (setting["softplus_beta"], setting["classifier_input"])
            if key not in logits:
                classifier = self.classifiers[key[0]]
                dtype = next(classifier.parameters(), torch.empty(0)).dtype
                logits[key] = classifier(self.parts.transform(inputs[key[1]].to(dtype))).to(torch.float64)
            tau = setting["marginal_temperature"]
            confidence = torch.softmax(tau * logits[key], dim=1).amax(dim=1)
            correct = logits[key].argmax(dim=1) == labels
            self.confidences[index][step].append(confidence.cpu())
            self.correct[index][step].append(correct.cpu())

    def curves(self, num_bins: int) -> list[dict]:
        """Per setting: ece, accuracy and mean confidence per step, and ICE."""
        curves = []
        for setting, confidences, correct in zip(self.settings, self.confidences, self.correct):
            confidences = [torch.cat(c) for c in confidences]
            correct = [torch.cat(c) for c in correct]
            ece = [expected_calibration_error(c, k, num_bins) for c, k in zip(confidences, correct)]
            curves.append({"setting": _json_setting(setting), "label": setting_label(setting), "ece": ece,
                           "accuracy": [float(k.double().mean()) for k in correct],
                           "confidence": [float(c.mean()) for c in confidences],
                           "ice": integral_calibration_error(ece)})
        return curves


def _check_batch_size(batch_size: int) -> None:
    check_int("batch_size", batch_size, minimum=1)


def _as_parts(job_or_parts: Job | CalibrationParts) -> CalibrationParts:
    return job_or_parts if isinstance(job_or_parts, CalibrationParts) else calibration_parts(job_or_parts)


def calibration_curve(job_or_parts: Job | CalibrationParts, images: torch.Tensor, labels: torch.Tensor, *,
                      sigmas: Sequence[float], settings: Sequence[Mapping] = (DEFAULT_SETTING,),
                      num_bins: int = NUM_BINS, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """ECE per noise level of forward-noised labelled images, for each setting.

    Args:
        job_or_parts: a guided `Job` or `CalibrationParts`.
        images: (B, C, H, W) clean images in [-1, 1].
        labels: (B,) their class ids (or one-hot rows (B, K)).
        sigmas: noise levels, noisiest first (e.g. `job_sigmas(job)`).
        settings: dicts of softplus_beta, classifier_input, marginal_temperature.
        num_bins: confidence bins of the ECE.
        batch_size: images per network call.
        seed: image j's noise comes from generator seed + j (independent of batch_size).
    Returns:
        One dict per setting: setting, label, ece / accuracy / confidence (one per sigma), ice.
    """
    parts = _as_parts(job_or_parts)
    _check_batch_size(batch_size)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images: expected float images (B, C, H, W), got {getattr(images, 'shape', type(images))}")
    sigmas = [check_finite_number("sigmas", float(s), minimum=0) for s in sigmas]
    if not sigmas:
        raise ValueError("sigmas: need at least one noise level")
    scorer = _Scorer(parts, settings, len(sigmas), images.shape[1:])
    ids = class_ids(labels, len(images), scorer.num_classes).to(parts.device)
    images = images.to(parts.device, torch.float32)
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], ids[start:start + batch_size]
        noise = StackedRandomGenerator(parts.device, range(seed + start, seed + start + len(x))).randn_like(x)
        for step, sigma in enumerate(sigmas):
            scorer.score(step, x + sigma * noise, sigma, y)
    return scorer.curves(num_bins)


def reverse_calibration_curve(job: Job, labels: torch.Tensor, *, settings: Sequence[Mapping] = (DEFAULT_SETTING,),
                              num_bins: int = NUM_BINS, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """ECE per sampler step of the job's own trajectories against their target labels.

    The job samples as configured (its guidance included), image j from seed + j; the state at
    the start of step i (at sigma_i of `job_sigmas(job)`) is scored for each setting.

    Args:
        job: a guided `Job`.
        labels: (B,) target class ids (or one-hot rows (B, K)).
        settings, num_bins, batch_size, seed: as `calibration_curve`.
    Returns:
        As `calibration_curve`, one value per sampler step.
    """
    if not isinstance(job, Job):
        raise TypeError("job: the reverse source samples with a Job; CalibrationParts cannot sample")
    parts = calibration_parts(job)
    _check_batch_size(batch_size)
    sigmas = job_sigmas(job)
    scorer = _Scorer(parts, settings, len(sigmas), job.image_shape)
    ids = class_ids(labels, len(labels), scorer.num_classes).to(parts.device)
    for start in range(0, len(ids), batch_size):
        y = ids[start:start + batch_size]
        rnd = StackedRandomGenerator(parts.device, range(seed + start, seed + start + len(y)))
        latents = rnd.randn([len(y), *job.image_shape], device=parts.device)
        # EDM starts from latents * sigma_0 (VE); DDPM from the latents themselves (VP).
        x_start = latents * sigmas[0] if isinstance(job.settings, EDMSettings) else latents * math.sqrt(1 + sigmas[0] ** 2)
        scorer.score(0, x_start, sigmas[0], y)

        def score_next_state(info: dict) -> None:
            step = info["i"] + 1
            if step < len(sigmas):
                x = info["x"] if isinstance(job.settings, EDMSettings) else info["x"] * math.sqrt(1 + sigmas[step] ** 2)
                scorer.score(step, x, sigmas[step], y)

        job.sample(latents, y, rnd.randn_like, callback=score_next_state)
    return scorer.curves(num_bins)


def calibrate(job_or_parts: Job | CalibrationParts, images: torch.Tensor | None, labels: torch.Tensor, *,
              settings: Sequence[Mapping], sigmas: Sequence[float] | None = None, num_timesteps: int | None = None,
              source: str = "forward", num_bins: int = NUM_BINS, batch_size: int = 64, seed: int = 0) -> dict:
    """Calibration curves and ICE of each setting, and the setting with the lowest ICE.

    Args:
        job_or_parts: a guided `Job`, or `CalibrationParts` (forward source, explicit sigmas).
        images: (B, C, H, W) clean images in [-1, 1] for source "forward"; None for "reverse".
        labels: (B,) true labels ("forward") or target labels ("reverse").
        settings: dicts of softplus_beta, classifier_input, marginal_temperature.
        sigmas: noise levels, noisiest first (forward only); default: the job's schedule.
        num_timesteps: evaluate the job's schedule with this many steps instead of its own.
        source: "forward" or "reverse".
        num_bins, batch_size, seed: as `calibration_curve`.
    Returns:
        JSON-able dict: source, num_images, num_bins, steps (0 = noisiest), timesteps (N-1-step,
        0 = cleanest, as the paper's figures), sigmas, curves (per setting: setting, label, ece,
        accuracy, confidence, ice), best (index into curves) and recommendation (one line).
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {SOURCES}, got {source!r}")
    if sigmas is not None and num_timesteps is not None:
        raise ValueError("sigmas, num_timesteps: give one of them, not both")
    job = job_or_parts if isinstance(job_or_parts, Job) else None
    if job is not None and num_timesteps is not None:
        job = job_with_num_steps(job, num_timesteps)
    if source == "reverse":
        if images is not None or sigmas is not None:
            raise ValueError("source 'reverse': pass images=None and no sigmas (the sampler makes both)")
        if job is None:
            raise TypeError("source 'reverse': needs a Job to sample with")
        sigmas = job_sigmas(job)
        curves = reverse_calibration_curve(job, labels, settings=settings, num_bins=num_bins,
                                           batch_size=batch_size, seed=seed)
        num_images = len(labels)
    else:
        if images is None:
            raise ValueError("source 'forward': needs labelled images")
        if sigmas is None:
            if job is None:
                raise ValueError("sigmas: required with CalibrationParts (no sampler schedule to take them from)")
            sigmas = job_sigmas(job)
        sigmas = [float(s) for s in sigmas]
        curves = calibration_curve(job if job is not None else job_or_parts, images, labels, sigmas=sigmas,
                                   settings=settings, num_bins=num_bins, batch_size=batch_size, seed=seed)
        num_images = len(images)
    best = min(range(len(curves)), key=lambda k: curves[k]["ice"])
    setting = curves[best]["setting"]
    beta = setting["softplus_beta"]
    beta_text = beta if isinstance(beta, str) else f"{beta:g}"
    recommendation = (f"lowest ICE {curves[best]['ice']:.4f}: softplus_beta={beta_text}, "
                      f"classifier_input={setting['classifier_input']}, "
                      f"marginal_temperature={setting['marginal_temperature']:g}")
    num_steps = len(sigmas)
    return {"source": source, "num_images": num_images, "num_bins": num_bins, "steps": list(range(num_steps)),
            "timesteps": [num_steps - 1 - i for i in range(num_steps)], "sigmas": sigmas, "curves": curves,
            "best": best, "recommendation": recommendation}


# ---------------------------------------------------------------------------------------------
# Labelled images


def load_labelled_npz(path: str | Path, num_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) float32 in [-1, 1] and labels (N,) int64 from an ADM-style npz
    (`arr_0` uint8 (N, H, W, C), `arr_1` integer labels); the first `num_images` if given."""
    with np.load(path) as data:
        if "arr_0" not in data or "arr_1" not in data:
            raise ValueError(f"{path}: expected arr_0 (uint8 images N, H, W, C) and arr_1 (labels N)")
        images, labels = data["arr_0"], data["arr_1"]
    if images.dtype != np.uint8 or images.ndim != 4 or labels.ndim != 1 or len(labels) != len(images) \
            or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected arr_0 uint8 (N, H, W, C) and arr_1 integer labels (N,), got "
                         f"{images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1
    return _first(images, torch.from_numpy(labels).to(torch.int64), num_images, str(path))


def _first(images: torch.Tensor, labels: torch.Tensor, num_images: int | None,
           where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if num_images is None:
        return images, labels
    if num_images < 1 or num_images > len(images):
        raise ValueError(f"num_images: {where} holds {len(images)} labelled images, asked for {num_images}")
    return images[:num_images], labels[:num_images]


def calibration_images(preset: str, num_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out labelled images (N, C, H, W) in [-1, 1] and labels (N,) bundled with a preset.

    Only the "digits" preset bundles them (its test split, which its classifier never saw);
    for other presets pass your own through `load_labelled_npz`."""
    if preset != "digits":
        raise ValueError(f"preset {preset!r} bundles no labelled images; pass an npz of them "
                         "(arr_0 uint8 N, H, W, C; arr_1 labels)")
    from ..digits.data import load_digits_split

    *_, images, labels = load_digits_split()  # train x, train y, test x, test y
    return _first(images.to(torch.float32), labels.to(torch.int64), num_images, "the digits test split")
