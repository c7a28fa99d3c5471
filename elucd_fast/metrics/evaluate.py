"""Sample-quality metrics (FID, Inception Score, precision/recall, KID) through torch-fidelity.

Features come from a torch-fidelity feature extractor (any registered one: Inception-v3 by
default, or a project's own registered with `torch_fidelity.register_feature_extractor`). Each
input is passed through the extractor once, whatever metrics are asked; IS, KID and
precision/recall are torch-fidelity's own functions of those features. FID is computed here, in
float64 with `scipy.linalg.sqrtm` as EDM's `calculate_fid_from_inception_stats` does, so that a
reference given as stored statistics (EDM's `mu`/`sigma` npz, ADM's `VIRTUAL_*.npz`) and one given
as images yield the same number for the same data.

FD-DINOv2 (EDM2's Fréchet distance of DINOv2 ViT-L/14 features, `dinov2.py`) is computed beside
these, with the same statistics and distance. Its references are images, `fd_dinov2_mu` and
`fd_dinov2_sigma` in an npz, or EDM2's `dataset-refs` pickles (`edm2_refs.py`, read safely).

Weights are read from a local file only, never downloaded. Images enter the extractor as uint8
(B, 3, H, W): single-channel images are repeated to three channels, as torch-fidelity's folder
loader does.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .edm2_refs import DatasetRefsError, read_dataset_refs, write_dataset_refs
from .image_source import DEFAULT_MAX_IMAGE_PIXELS, EvaluationError, ImageSource, MissingWeightsError, image_files
from ..checks import check_regular_file
from ..models.checkpoint import CheckpointError, load_tensors, sha256_file
from ..npz_reader import DEFAULT_MAX_ARRAY_BYTES, NpzError, NpzMember, npz_members, read_npz_member
from ..runs.atomic import atomic_write
from ..runs.ownership import check_output_apart
from ..runs.encoding import write_npz

# Result keys: torch-fidelity's names for its metrics, plus this module's bookkeeping.
KEY_METRIC_FID = "frechet_inception_distance"
KEY_METRIC_ISC_MEAN = "inception_score_mean"
KEY_METRIC_ISC_STD = "inception_score_std"
KEY_METRIC_KID_MEAN = "kernel_inception_distance_mean"
KEY_METRIC_KID_STD = "kernel_inception_distance_std"
KEY_METRIC_PRECISION = "precision"
KEY_METRIC_RECALL = "recall"
KEY_METRIC_F_SCORE = "f_score"
KEY_METRIC_FD_DINOV2 = "fd_dinov2"  # EDM2's name for it (torch-fidelity has none)
KEY_NUM_SAMPLES = "num_samples"
KEY_NUM_REFERENCE_IMAGES = "num_reference_images"
KEY_FEATURE_EXTRACTOR = "feature_extractor"
KEY_REFERENCE_SHA256 = "reference_sha256"
KEY_DINOV2_PATH = "dinov2_path"
# FD-DINOv2 statistics in an npz, beside FID's mu and sigma.
DINOV2_MU_KEY, DINOV2_SIGMA_KEY = "fd_dinov2_mu", "fd_dinov2_sigma"

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_SOURCE = "https://github.com/toshas/torch-fidelity/releases (release v0.2.0)"
DEFAULT_FEATURE_EXTRACTOR = "inception-v3-compat"


# ---------------------------------------------------------------------------------------------
# References


class Reference(NamedTuple):
    """A reference for metrics: stored FID statistics (float64 mu (D,), sigma (D, D)) and/or images.

    images: whether `path` holds images (a folder, or an npz with `arr_0`); sha256: of the file,
    or for a folder, of its sorted list of (relative path, file sha256); dinov2_mu, dinov2_sigma:
    stored FD-DINOv2 statistics.
    """

    path: Path
    mu: np.ndarray | None
    sigma: np.ndarray | None
    images: bool
    sha256: str
    dinov2_mu: np.ndarray | None = None
    dinov2_sigma: np.ndarray | None = None


def load_reference(path: str | os.PathLike, *, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES) -> Reference:
    """Reads a reference: an EDM statistics npz (`mu`, `sigma`), an ADM `VIRTUAL_*.npz` (`arr_0`,
    `mu`, `sigma`), an npz of real images (`arr_0`), or a folder of PNG images; FD-DINOv2
    statistics from an npz's `fd_dinov2_mu`, `fd_dinov2_sigma`, or an EDM2 dataset-refs `.pkl`
    (its `fid` and `fd_dinov2` entries). Statistics shapes are checked from the npz headers before
    any of their data is read, and each array may hold at most `max_array_bytes`."""
    path = Path(path)
    if path.is_dir():
        return Reference(path, None, None, True, _folder_sha256(path))
    try:
        check_regular_file(path, "reference")
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if path.suffix == ".pkl":
        try:
            refs = read_dataset_refs(path)
        except DatasetRefsError as err:
            raise EvaluationError(f"reference: {err}") from err
        fid_stats, dinov2_stats = refs.get("fid", {}), refs.get("fd_dinov2", {})
        return Reference(path, fid_stats.get("mu"), fid_stats.get("sigma"), False, sha256_file(path),
                         dinov2_stats.get("mu"), dinov2_stats.get("sigma"))
    if path.suffix != ".npz":
        raise EvaluationError(f"reference: {path} is not an .npz file, an EDM2 dataset-refs .pkl or a folder of images")
    try:
        members = npz_members(path)
        mu, sigma = _read_statistics(path, members, "mu", "sigma", max_array_bytes)
        dinov2_mu, dinov2_sigma = _read_statistics(path, members, DINOV2_MU_KEY, DINOV2_SIGMA_KEY, max_array_bytes)
    except NpzError as err:
        raise EvaluationError(f"reference: {err}") from err
    keys = set(members)
    if mu is None and dinov2_mu is None and "arr_0" not in keys:
        raise EvaluationError(f"reference: {path} holds neither statistics (mu, sigma or {DINOV2_MU_KEY}, "
                              f"{DINOV2_SIGMA_KEY}) nor images (arr_0); it holds {sorted(keys)}")
    for m, s in ((mu, sigma), (dinov2_mu, dinov2_sigma)):
        if m is not None:
            check_statistics(m, s, f"reference: {path}")
    return Reference(path, mu, sigma, "arr_0" in keys, sha256_file(path), dinov2_mu, dinov2_sigma)


def _read_statistics(path: Path, members: dict[str, NpzMember], mu_key: str, sigma_key: str,
                     max_array_bytes: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """float64 mu (D,) and sigma (D, D) of an npz, or (None, None) when it lacks them. Their shapes
    and dtypes come from the headers, checked before a byte of data is read or converted."""
    if not {mu_key, sigma_key} <= set(members):
        return None, None
    mu, sigma = members[mu_key], members[sigma_key]
    if len(mu.shape) != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"reference: {path} has {mu_key} {mu.shape} and {sigma_key} {sigma.shape}; "
                              "expected (D,) and (D, D)")
    if mu.dtype.kind not in "iuf" or sigma.dtype.kind not in "iuf":
        raise EvaluationError(f"reference: {path}: {mu_key} and {sigma_key} must be real numbers, got {mu.dtype} "
                              f"and {sigma.dtype}")
    # Converted to float64 (8 bytes per value): the limit applies to what is held in memory then.
    needed = 8 * (mu.shape[0] + mu.shape[0] ** 2)
    if needed > max_array_bytes:
        raise EvaluationError(f"reference: {path} holds {mu.shape[0]:,}-dimensional statistics, {needed:,} bytes in "
                              f"float64, over the limit of {max_array_bytes:,} (max_array_bytes; --max-array-bytes "
                              "to raise it)")
    return (read_npz_member(path, mu_key, max_bytes=max_array_bytes, member=mu).astype(np.float64),
            read_npz_member(path, sigma_key, max_bytes=max_array_bytes, member=sigma).astype(np.float64))


def check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    """Refuses statistics that are not a Gaussian's: mu (D,) and sigma (D, D) finite, sigma
    symmetric and positive semi-definite (within float64 rounding of its scale). Checked before
    any feature is extracted: sqrtm never returns on NaN, and an indefinite sigma gives a
    meaningless (even negative) distance."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvaluationError(f"{where} has mu {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvaluationError(f"{where}: mu or sigma holds NaN or Inf; statistics must be finite")
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > 1e-6 * scale:
        raise EvaluationError(f"{where}: sigma is not symmetric (|sigma - sigma^T| up to {asymmetry:.3g}); "
                              "a covariance must be")
    smallest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2).min())
    if smallest < -1e-6 * scale:
        raise EvaluationError(f"{where}: sigma is not positive semi-definite (eigenvalue {smallest:.3g}); "
                              "a covariance must be")


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in image_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Statistics and distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise EvaluationError(f"statistics: need at least 2 feature vectors (N, D), got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, in float64, as EDM computes it:
    |mu - mu_ref|^2 + tr(sigma + sigma_ref - 2 sqrtm(sigma sigma_ref)), real part."""
    from scipy.linalg import sqrtm

    mu, sigma, mu_ref, sigma_ref = (np.asarray(a, dtype=np.float64) for a in (mu, sigma, mu_ref, sigma_ref))
    m = np.square(mu - mu_ref).sum()
    # EDM passes disp=False only to discard the error estimate; SciPy deprecates that argument.
    s = sqrtm(np.dot(sigma, sigma_ref))
    distance = float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))
    if not math.isfinite(distance):
        raise EvaluationError(f"frechet distance: came out {distance}; the samples' or the reference's statistics "
                              "are degenerate")
    return distance


# ---------------------------------------------------------------------------------------------
# Features


def _extractor_class(feature_extractor: str) -> type:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise EvaluationError(f"feature_extractor: {feature_extractor!r} is not registered with torch-fidelity; "
                              f"registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)}")
    return FEATURE_EXTRACTORS_REGISTRY[feature_extractor]


def check_weights(feature_extractor: str, feature_extractor_weights_path: str | os.PathLike | None) -> None:
    """Refuses to build one of torch-fidelity's own extractors without a local weights file, since
    torch-fidelity would download one. Inception weights are also checked to hold tensors only
    before torch-fidelity unpickles them. Extractors registered by others load what they need."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    cls = _extractor_class(feature_extractor)
    if not cls.__module__.startswith("torch_fidelity."):
        return
    inception = issubclass(cls, FeatureExtractorInceptionV3)
    if feature_extractor_weights_path is None or not Path(feature_extractor_weights_path).is_file():
        given = ("none was given" if feature_extractor_weights_path is None
                 else f"{feature_extractor_weights_path} does not exist"
                 if not os.path.exists(feature_extractor_weights_path)
                 else f"{feature_extractor_weights_path} is not a regular file")
        if inception:
            raise MissingWeightsError(
                f"feature_extractor_weights_path: {feature_extractor!r} needs the local file {INCEPTION_WEIGHTS_FILE} "
                f"({given}); get it from {INCEPTION_WEIGHTS_SOURCE} and pass its path. Weights are never downloaded.")
        raise MissingWeightsError(f"feature_extractor_weights_path: {feature_extractor!r} needs a local weights file "
                                  f"({given}). Weights are never downloaded.")
    if inception:
        try:
            load_tensors(feature_extractor_weights_path, what="Inception weights")
        except CheckpointError as err:
            raise EvaluationError(str(err)) from err


def _layers(feature_extractor: str, metrics: list[str]) -> dict[str, str]:
    """metric -> the extractor's default feature layer for it."""
    cls = _extractor_class(feature_extractor)
    return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in metrics}


def _device_context(device: torch.device | str) -> tuple[bool, object]:
    """torch-fidelity takes a `cuda` flag and uses the current CUDA device; map a device to both."""
    device = torch.device(device)
    if device.type == "cpu":
        return False, nullcontext()
    if device.type != "cuda":
        raise EvaluationError(f"device: torch-fidelity runs on 'cpu' or 'cuda[:N]', got {device}")
    return True, torch.cuda.device(device) if device.index is not None else nullcontext()


def _create_extractor(feature_extractor: str, layers: list[str], *, feature_extractor_weights_path,
                      cuda: bool, verbose: bool) -> torch.nn.Module:
    from torch_fidelity.utils import create_feature_extractor

    weights = None if feature_extractor_weights_path is None else str(feature_extractor_weights_path)
    return create_feature_extractor(feature_extractor, sorted(set(layers)), cuda=cuda,
                                    feature_extractor_weights_path=weights, verbose=verbose)


def extract_features(extractor: torch.nn.Module, images: ImageSource, *, batch_size: int, cuda: bool,
                     verbose: bool = False) -> dict[str, torch.Tensor]:
    """layer -> features (N, D) of every image, float32 on the CPU, in the source's order."""
    from tqdm import tqdm

    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad(), tqdm(total=len(images), unit="img", desc=f"features {images.path.name}",
                               disable=not verbose, leave=False) as bar:
        for batch in images.batches(batch_size):
            if cuda:
                batch = batch.cuda(non_blocking=True)
            for layer, value in extractor.convert_features_tuple_to_dict(extractor(batch)).items():
                chunks.setdefault(layer, []).append(value.detach().float().cpu())
            bar.update(len(batch))
    return {layer: torch.cat(values) for layer, values in chunks.items()}


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check_request(uses_extractor: bool, fd_dinov2: bool, batch_size: int, feature_extractor: str,
                   feature_extractor_weights_path, dinov2_path) -> None:
    """What both entry points check before reading any image: the batch size and the local
    weights of each model the request needs."""
    if batch_size < 1:
        raise EvaluationError(f"batch_size: must be at least 1, got {batch_size}")
    if uses_extractor:
        check_weights(feature_extractor, feature_extractor_weights_path)
    if fd_dinov2:
        from .dinov2 import check_dinov2_folder

        check_dinov2_folder(dinov2_path)


class MetricsScorer:
    """Scores sample sets against one reference: the feature extractors are built, and the
    reference's statistics (or features) computed, once, so that many sample sets (a search's
    candidates, each an array in memory) cost only their own features.

    The arguments are `compute_metrics`'s; everything is checked, and the reference read, on
    construction. Calling it with samples (a PNG folder, an npz path, an `ImageSource`, or a
    uint8 array (N, H, W, 1|3)) returns `compute_metrics`'s result dict.
    """

    def __init__(self, reference: str | os.PathLike, *, feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR,
                 feature_extractor_weights_path: str | os.PathLike | None = None,
                 fid: bool = True, isc: bool = False, prc: bool = False, kid: bool = False,
                 fd_dinov2: bool = False, dinov2_path: str | os.PathLike | None = None,
                 dinov2_resize_mode: str = "torch",
                 batch_size: int = 64, device: torch.device | str = "cpu", isc_splits: int = 10,
                 kid_subsets: int = 100, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
                 num_samples: int | None = None, verbose: bool = False):
        self.metrics = [name for name, wanted in (("fid", fid), ("isc", isc), ("prc", prc), ("kid", kid)) if wanted]
        if not self.metrics and not fd_dinov2:
            raise EvaluationError("metrics: ask for at least one of fid, fd_dinov2, isc, prc, kid")
        _check_request(bool(self.metrics), fd_dinov2, batch_size, feature_extractor, feature_extractor_weights_path,
                       dinov2_path)
        self.ref = ref = load_reference(reference, max_array_bytes=max_array_bytes)
        lacking = [name for name, lacks in (("FID", fid and ref.mu is None), ("precision/recall", prc), ("KID", kid),
                                            ("FD-DINOv2", fd_dinov2 and ref.dinov2_mu is None)) if lacks]
        if lacking and not ref.images:
            raise EvaluationError(f"reference: {ref.path} holds statistics only; these need reference images (a "
                                  f"PNG folder, an npz with arr_0, or an ADM VIRTUAL_*.npz): {', '.join(lacking)}")
        self.feature_extractor, self.fd_dinov2 = feature_extractor, fd_dinov2
        self.batch_size, self.device, self.verbose = batch_size, device, verbose
        self.limits = {"max_image_pixels": max_image_pixels, "max_array_bytes": max_array_bytes}
        self.requested = {"isc": isc, "kid": kid, "prc": prc}
        self.options = {"isc_splits": isc_splits, "kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size,
                        "prc_neighborhood": prc_neighborhood, "verbose": verbose}
        self.layers = _layers(feature_extractor, self.metrics)
        self.cuda, device_context = _device_context(device)
        self.extractor = self.reference_features = self.fid_reference = None
        self.num_reference_images: int | None = None
        self.detector = self.dinov2_reference = None
        self.dinov2_path = dinov2_path
        with device_context:
            if self.metrics:
                self.extractor = _create_extractor(feature_extractor, list(self.layers.values()),
                                                   feature_extractor_weights_path=feature_extractor_weights_path,
                                                   cuda=self.cuda, verbose=verbose)
            reference_images = None
            if prc or kid or (fid and ref.mu is None):
                reference_images = ImageSource(ref.path, **self.limits)
                self.num_reference_images = len(reference_images)
            if num_samples is not None:  # options checked before any feature is extracted
                self._check_options(num_samples)
            if reference_images is not None:
                self.reference_features = self._features(reference_images)
            if fd_dinov2:
                self._prepare_dinov2(dinov2_resize_mode)
        if fid:
            self.fid_reference = (ref.mu, ref.sigma) if ref.mu is not None else \
                feature_statistics(self.reference_features[self.layers["fid"]].numpy())

    def _features(self, images: ImageSource) -> dict[str, torch.Tensor]:
        return extract_features(self.extractor, images, batch_size=self.batch_size, cuda=self.cuda,
                                verbose=self.verbose)

    def _prepare_dinov2(self, resize_mode: str) -> None:
        """The DINOv2 detector and the reference's FD-DINOv2 statistics (stored, or of its images)."""
        from .dinov2 import dinov2_features, load_dinov2

        self.detector = load_dinov2(self.dinov2_path, device=self.device, resize_mode=resize_mode,
                                    verbose=self.verbose)
        if self.ref.dinov2_mu is not None:
            self.dinov2_reference = (self.ref.dinov2_mu, self.ref.dinov2_sigma)
        else:
            reference_images = ImageSource(self.ref.path, **self.limits)
            self.num_reference_images = len(reference_images)
            self.dinov2_reference = feature_statistics(
                dinov2_features(self.detector, reference_images, batch_size=self.batch_size, verbose=self.verbose))

    def __call__(self, samples: str | os.PathLike | np.ndarray | ImageSource) -> dict:
        """The metrics of `samples` (see `compute_metrics`)."""
        from torch_fidelity.metric_isc import isc_featuresdict_to_metric
        from torch_fidelity.metric_kid import kid_featuresdict_to_metric
        from torch_fidelity.metric_prc import prc_featuresdict_to_metric

        images = samples if isinstance(samples, ImageSource) else ImageSource(samples, **self.limits)
        self._check_options(len(images))
        result: dict = {KEY_NUM_SAMPLES: len(images), KEY_REFERENCE_SHA256: self.ref.sha256}
        if self.num_reference_images is not None:
            result[KEY_NUM_REFERENCE_IMAGES] = self.num_reference_images
        _, device_context = _device_context(self.device)
        with device_context:
            features = self._features(images) if self.metrics else {}
            if self.fd_dinov2:
                result.update(self._fd_dinov2(images))
        if self.metrics:
            result[KEY_FEATURE_EXTRACTOR] = self.feature_extractor
        if "fid" in self.metrics:
            mu, sigma = feature_statistics(features[self.layers["fid"]].numpy())
            mu_ref, sigma_ref = self.fid_reference
            if mu_ref.shape != mu.shape:
                raise EvaluationError(
                    f"reference: statistics of dimension {len(mu_ref)}, but {self.feature_extractor!r} layer "
                    f"{self.layers['fid']!r} gives {len(mu)}-dimensional features; build the reference with the "
                    "same extractor")
            result[KEY_METRIC_FID] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        if "isc" in self.metrics:
            result.update(isc_featuresdict_to_metric(features, self.layers["isc"], **self.options))
        if "kid" in self.metrics:
            result.update(kid_featuresdict_to_metric(features, self.reference_features, self.layers["kid"],
                                                     **self.options))
        if "prc" in self.metrics:
            result.update(prc_featuresdict_to_metric(features, self.reference_features, self.layers["prc"],
                                                     **self.options))
        return _finite_result(result)

    def _check_options(self, num_samples: int) -> None:
        options = {key: value for key, value in self.options.items() if key != "verbose"}
        _check_metric_options(num_samples, self.num_reference_images, **self.requested, **options)

    def _fd_dinov2(self, images: ImageSource) -> dict:
        """FD-DINOv2 of the samples against the reference's DINOv2 statistics."""
        from .dinov2 import DINOV2_MODEL_ID, dinov2_features

        mu, sigma = feature_statistics(dinov2_features(self.detector, images, batch_size=self.batch_size,
                                                       verbose=self.verbose))
        mu_ref, sigma_ref = self.dinov2_reference
        if mu_ref.shape != mu.shape:
            raise EvaluationError(
                f"reference: FD-DINOv2 statistics of dimension {len(mu_ref)}, but the DINOv2 model in "
                f"{self.dinov2_path} gives {len(mu)}-dimensional features ({DINOV2_MODEL_ID}: 1024); build the "
                "reference with the same model")
        return {KEY_DINOV2_PATH: str(self.dinov2_path), KEY_METRIC_FD_DINOV2: frechet_distance(mu, sigma, mu_ref,
                                                                                                sigma_ref)}



def compute_metrics(samples: str | os.PathLike | np.ndarray, reference: str | os.PathLike, *,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
                    **options) -> dict:
    """Metrics of `samples` (a PNG folder, an npz with `arr_0` uint8 NHWC, or such an array in
    memory) against `reference`: one use of a `MetricsScorer`, whose keyword arguments
    (feature_extractor, feature_extractor_weights_path, fid, isc, prc, kid, fd_dinov2,
    dinov2_path, dinov2_resize_mode, batch_size, device, isc_splits, kid_subsets,
    kid_subset_size, prc_neighborhood, verbose) it takes.

    `reference` is an EDM statistics npz (FID and IS only), an ADM `VIRTUAL_*.npz` (FID from its
    statistics, precision/recall and KID from its images), an EDM2 dataset-refs `.pkl` (FID and
    FD-DINOv2 from its statistics), or real images as a PNG folder or npz.
    Returns a dict keyed by the KEY_* constants: the metrics asked for, the number of samples
    (and of reference images when read), the feature extractor (when a torch-fidelity metric is
    asked), the DINOv2 folder (for FD-DINOv2), and the reference's sha256.
    `isc_splits`, `kid_subsets`, `kid_subset_size` and `prc_neighborhood` are torch-fidelity's
    options of the same names, checked against the numbers of images before any feature is
    extracted (each would otherwise give NaN or fail inside torch-fidelity): 1 <= isc_splits <= N,
    1 <= kid_subsets <= MAX_KID_SUBSETS, 2 <= kid_subset_size <= min(N, N_ref),
    1 <= prc_neighborhood < min(N, N_ref). Every metric returned is finite.
    FD-DINOv2 (`fd_dinov2`) needs `dinov2_path`, a local transformers DINOv2 folder, and no
    Inception weights; `dinov2_resize_mode` is "torch" (EDM2's) or "pil". `max_image_pixels` and
    `max_array_bytes` bound what one image and one array read into memory may hold.
    """
    # The samples are opened first: a wrong samples path is reported before the reference is
    # read, and the metric options are checked against both counts before any extraction.
    sample_images = ImageSource(samples, max_image_pixels=max_image_pixels, max_array_bytes=max_array_bytes)
    return MetricsScorer(reference, max_image_pixels=max_image_pixels, max_array_bytes=max_array_bytes,
                         num_samples=len(sample_images), **options)(sample_images)


# KID's subsets are drawn and scored one by one: beyond this many, a run would not end in practice.
MAX_KID_SUBSETS = 100_000


def _check_metric_options(num_samples: int, num_reference: int | None, *, isc: bool, kid: bool, prc: bool,
                          isc_splits: int, kid_subsets: int, kid_subset_size: int, prc_neighborhood: int) -> None:
    """Refuses torch-fidelity options that the numbers of images cannot satisfy, naming the option,
    its bounds and the counts (torch-fidelity would print NaN or fail after the extraction)."""
    smallest = num_samples if num_reference is None else min(num_samples, num_reference)
    counts = f"{num_samples} samples" + ("" if num_reference is None else f" and {num_reference} reference images")
    checks = []
    if isc:
        checks.append(("isc_splits", isc_splits, 1, num_samples))
    if kid:
        checks += [("kid_subsets", kid_subsets, 1, MAX_KID_SUBSETS), ("kid_subset_size", kid_subset_size, 2, smallest)]
    if prc:
        checks.append(("prc_neighborhood", prc_neighborhood, 1, smallest - 1))
    for name, value, low, high in checks:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            bound = f"in [{low}, {high}]" if high >= low else f"at least {low}, which {counts} cannot give"
            raise EvaluationError(f"{name}: must be an integer {bound} ({counts}), got {value!r}")


def _finite_result(result: dict) -> dict:
    """`result` after checking every number in it is finite: JSON has no NaN, and a NaN metric
    means the request could not be answered."""
    for key, value in result.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise EvaluationError(f"{key}: came out {value}; the samples or the reference are degenerate for this "
                                  "metric (too few, or identical images)")
    return result


def build_reference(images: str | os.PathLike, out_path: str | os.PathLike, *,
                    feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR,
                    feature_extractor_weights_path: str | os.PathLike | None = None,
                    fid: bool = True, fd_dinov2: bool = False, dinov2_path: str | os.PathLike | None = None,
                    dinov2_resize_mode: str = "torch", batch_size: int = 64, device: torch.device | str = "cpu",
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_array_bytes: int = DEFAULT_MAX_ARRAY_BYTES,
                    verbose: bool = False) -> dict:
    """Writes reference statistics of `images` (PNG folder or npz `arr_0`) to `out_path`: FID's
    (the extractor's FID layer) and/or FD-DINOv2's (`dinov2_path`), float64 mu (D,), sigma (D, D).

    An `.npz` gets EDM's format, `mu` and `sigma` (FID), plus `fd_dinov2_mu` and `fd_dinov2_sigma`;
    a `.pkl` gets EDM2's dataset-refs format (`num_images`, `fid`, `fd_dinov2`), which EDM2's
    `calculate_metrics.py` reads too. The file is written atomically, and never over an input
    (`out_path` may be neither `images`, nor inside it, nor a weights file). Returns a summary: out_path,
    num_images, metrics, sha256 (of the written file), and feature_extractor, feature_layer (FID)
    or dinov2_path (FD-DINOv2).
    """
    if not (fid or fd_dinov2):
        raise EvaluationError("metrics: ask for at least one of fid, fd_dinov2")
    _check_request(fid, fd_dinov2, batch_size, feature_extractor, feature_extractor_weights_path, dinov2_path)
    check_output_apart(out_path, [images, feature_extractor_weights_path, dinov2_path], "out_path")
    source = ImageSource(images, max_image_pixels=max_image_pixels, max_array_bytes=max_array_bytes)
    statistics: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    summary: dict = {"out_path": str(out_path), "num_images": len(source),
                     "metrics": [name for name, wanted in (("fid", fid), ("fd_dinov2", fd_dinov2)) if wanted]}
    cuda, device_context = _device_context(device)
    with device_context:
        if fid:
            layer = _layers(feature_extractor, ["fid"])["fid"]
            extractor = _create_extractor(feature_extractor, [layer],
                                          feature_extractor_weights_path=feature_extractor_weights_path,
                                          cuda=cuda, verbose=verbose)
            features = extract_features(extractor, source, batch_size=batch_size, cuda=cuda, verbose=verbose)
            statistics["fid"] = feature_statistics(features[layer].numpy())
            summary.update(feature_extractor=feature_extractor, feature_layer=layer)
        if fd_dinov2:
            from .dinov2 import dinov2_features, load_dinov2

            detector = load_dinov2(dinov2_path, device=device, resize_mode=dinov2_resize_mode, verbose=verbose)
            statistics["fd_dinov2"] = feature_statistics(
                dinov2_features(detector, source, batch_size=batch_size, verbose=verbose))
            summary[KEY_DINOV2_PATH] = str(dinov2_path)
    out_path = Path(out_path)
    if out_path.suffix == ".pkl":
        write_dataset_refs(out_path, statistics, len(source))
    else:
        arrays = {}
        if fid:
            arrays.update(mu=statistics["fid"][0], sigma=statistics["fid"][1])
        if fd_dinov2:
            arrays.update({DINOV2_MU_KEY: statistics["fd_dinov2"][0],
                           DINOV2_SIGMA_KEY: statistics["fd_dinov2"][1]})
        buffer = io.BytesIO()
        write_npz(buffer, arrays)
        atomic_write(out_path, lambda f: f.write(buffer.getvalue()))
    summary["sha256"] = sha256_file(out_path)
    return summary


__all__ = [
    "DEFAULT_FEATURE_EXTRACTOR", "DINOV2_MU_KEY", "DINOV2_SIGMA_KEY", "EvaluationError", "INCEPTION_WEIGHTS_FILE",
    "ImageSource", "KEY_DINOV2_PATH", "KEY_FEATURE_EXTRACTOR", "KEY_METRIC_FD_DINOV2", "KEY_METRIC_FID",
    "KEY_METRIC_F_SCORE", "KEY_METRIC_ISC_MEAN", "KEY_METRIC_ISC_STD", "KEY_METRIC_KID_MEAN", "KEY_METRIC_KID_STD",
    "KEY_METRIC_PRECISION", "KEY_METRIC_RECALL", "KEY_NUM_REFERENCE_IMAGES", "KEY_NUM_SAMPLES",
    "KEY_REFERENCE_SHA256", "MAX_KID_SUBSETS", "MetricsScorer", "MissingWeightsError", "Reference", "build_reference", "check_weights",
    "compute_metrics", "extract_features", "feature_statistics", "frechet_distance", "load_reference",
]
