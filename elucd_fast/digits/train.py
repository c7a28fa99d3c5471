"""Trains the digits benchmark's networks and writes the shipped weights.

    python -m elucd_fast.digits.train [--out DIR]

Trains, in order and from fixed seeds, the guiding classifier (clean images only), the
evaluation network (another architecture and seed, with augmentation), the denoiser (EDM's
loss, label dropout, an EMA of the weights), the EDM2-style denoiser and its autoguidance guide
(EDM2's loss with the learned uncertainty, forced weight normalisation, Adam with EDM2's
inverse square root learning rate, a power-function EMA; the guide at half width and a quarter
of the steps), then computes the reference statistics of the held-out digits' evaluation
features. Each stage seeds its own generators, so adding a stage changes no other stage's
weights. Writes to DIR (default: the package's `weights/` folder):

    classifier.safetensors  evaluator.safetensors  denoiser.safetensors
    edm2-denoiser.safetensors  edm2-guide.safetensors
    reference.npz           arr_0 uint8 (297, 8, 8, 1) held-out digits, arr_1 int64 labels,
                            mu float64 (64,), sigma float64 (64, 64): an ADM-style reference
    manifest.json           sha256 of each file, architectures, settings, test accuracies,
                            measured run times

Runs are deterministic for a given thread count (fixed at 2 by default): seeded generators,
deterministic algorithms, one fixed order of work.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from ..metrics.evaluate import feature_statistics, frechet_distance
from ..runs.generation import quantize_round
from ..models.checkpoint import sha256_file
from ..runs.atomic import atomic_write
from ..runs.encoding import write_npz
from .data import NUM_CLASSES, load_digits_split
from .features import images_to_input
from .load import FILES, MANIFEST_FILE, MANIFEST_FORMAT, WEIGHTS_DIR, architectures
from .networks import DigitsEvaluator, DigitsResNet, build_denoiser, build_edm2_denoiser, build_edm2_guide


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights (besides the code and thread count)."""

    threads: int = 2                      # intra-op threads; results depend on it
    # Classifier: plain supervised training on clean images, no augmentation.
    classifier_seed: int = 1
    classifier_epochs: int = 30
    classifier_batch: int = 64
    classifier_lr: float = 2e-3           # AdamW, cosine decay to 0
    classifier_weight_decay: float = 5e-4
    # Evaluator: another seed, random +-1 pixel shifts so its features ignore small offsets.
    evaluator_seed: int = 2
    evaluator_epochs: int = 40
    evaluator_batch: int = 64
    evaluator_lr: float = 2e-3
    evaluator_weight_decay: float = 5e-4
    # Denoiser: EDM's loss and preconditioning; Adam with warm-up; EMA weights are shipped.
    denoiser_seed: int = 3
    denoiser_steps: int = 3000
    denoiser_batch: int = 128
    denoiser_lr: float = 2e-3
    denoiser_warmup_steps: int = 200
    denoiser_ema_halflife_steps: float = 250.0
    denoiser_ema_rampup_ratio: float = 0.05  # EDM's: half-life <= this fraction of steps done
    P_mean: float = -1.2                  # EDM loss: ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2
    # EDM2-style denoiser: EDM2's loss (learned uncertainty), Adam with EDM2's betas, its
    # learning rate alpha_ref / sqrt(max(t / t_ref, 1)) after a linear ramp-up, forced weight
    # normalisation (the network's training mode), a power-function EMA (shipped).
    edm2_seed: int = 4
    edm2_steps: int = 3000
    edm2_batch: int = 128
    edm2_lr: float = 1e-2                 # alpha_ref (EDM2 img64-s: 1e-2)
    edm2_lr_decay_steps: int = 500        # t_ref, in steps
    edm2_lr_rampup_steps: int = 100
    edm2_ema_std: float = 0.05            # sigma_rel, EMA length relative to the training time (EDM2 autog: 0.045)
    edm2_P_mean: float = -0.8             # EDM2 img64's noise distribution
    edm2_P_std: float = 1.6
    # Its autoguidance guide: half width, the same schedule stopped after a quarter of the steps
    # (EDM2 img64: the XS guide trained 1/8 as long as the S network; ours a quarter), its own
    # seed and EMA length.
    edm2_guide_seed: int = 5
    edm2_guide_steps: int = 750
    edm2_guide_ema_std: float = 0.1       # EDM2 autog guide: 0.110


class EDMLoss:
    """EDM's training loss (Karras et al. 2022): sigma log-normal, weight
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, per-element squared error."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def noised(self, images: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma (B, 1, 1, 1), lambda(sigma) (B, 1, 1, 1), noisy images (B, C, H, W)) for clean
        images (B, C, H, W): sigma drawn first, then the noise."""
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], generator=generator)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn(images.shape, generator=generator) * sigma
        return sigma, weight, images + noise

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """Loss (B, C, H, W) for clean images (B, C, H, W) and one-hot labels (B, K)."""
        sigma, weight, noisy = self.noised(images, generator)
        denoised = net(noisy, sigma, labels)
        return weight * (denoised - images) ** 2


class EDM2Loss(EDMLoss):
    """EDM2's training loss (Karras et al. 2024, Eqs. 14-16, 21): EDM's weighted error divided by
    the network's learned uncertainty exp(u(sigma)), plus u(sigma),

        L = lambda(sigma) / exp(u(sigma)) * (D(y + n; sigma) - y)^2 + u(sigma),

    so that the loss weighting across noise levels is learned (u is `EDM2Precond`'s logvar)."""

    def __call__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        """Loss (B, C, H, W) for clean images (B, C, H, W) and one-hot labels (B, K)."""
        sigma, weight, noisy = self.noised(images, generator)
        denoised, logvar = net(noisy, sigma, labels, return_logvar=True)  # logvar (B, 1, 1, 1)
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar


def inverse_sqrt_learning_rate(step: int, ref_lr: float, decay_steps: float, rampup_steps: float) -> float:
    """EDM2's learning rate schedule (paper Eq. 67) at optimizer step `step` (0-based; t = step + 1
    steps done with this one): alpha_ref / sqrt(max(t / t_ref, 1)), times a linear ramp-up
    min(t / rampup_steps, 1)."""
    t = step + 1
    lr = ref_lr / math.sqrt(max(t / decay_steps, 1.0)) if decay_steps > 0 else ref_lr
    return lr * min(t / rampup_steps, 1.0) if rampup_steps > 0 else lr


def power_ema_exponent(std: float) -> float:
    """The exponent gamma of EDM2's power-function EMA whose averaging profile has relative
    standard deviation `std` (paper Eq. 3): std^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
    solved by bisection (the right side falls monotonically from 1/2 at gamma = -1 to 0)."""
    if not 0 < std < 0.5 ** 0.5:
        raise ValueError(f"std: a power-function EMA's relative std lies in (0, sqrt(1/2)), got {std}")
    low, high = -1.0, 1.0
    while (high + 1) / ((high + 2) ** 2 * (high + 3)) > std ** 2:
        high *= 2
    for _ in range(200):
        middle = 0.5 * (low + high)
        if (middle + 1) / ((middle + 2) ** 2 * (middle + 3)) > std ** 2:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def power_ema_beta(step: int, exponent: float) -> float:
    """EDM2's power-function EMA (paper Eq. 2) after optimizer step `step` (0-based, t = step + 1):
    theta_ema <- beta theta_ema + (1 - beta) theta with beta = (1 - 1/t)^(gamma + 1), which makes
    theta_ema the average of theta over training weighted by tau^gamma."""
    return (1 - 1 / (step + 1)) ** (exponent + 1)


def quantized(x: torch.Tensor) -> torch.Tensor:
    """Images (B, 1, 8, 8) in [-1, 1] as the evaluator sees samples: rounded to uint8 and back."""
    return images_to_input(quantize_round(x))


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, C, H, W) shifted by -1, 0 or +1 pixel per axis, background (-1) filling in."""
    batch, _, height, width = x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, batch), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None].expand(-1, x.shape[1], -1, width + 2)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :].expand(-1, x.shape[1], height, -1)
    return shifted.gather(3, cols)


def _batches(n: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches (the last may be smaller)."""
    return list(torch.randperm(n, generator=generator).split(batch))


def _full_batches(n: int, batch: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of `batch` images, epoch after epoch, each epoch's permutation drawn when the
    previous epoch runs out; the short remainder batch of an epoch is dropped (it would weight
    its images more)."""
    while True:
        order = _batches(n, batch, generator)
        if len(order) > 1 and len(order[-1]) < batch:
            order.pop()
        yield from order


def train_classifier_net(model: nn.Module, logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                         train_x: torch.Tensor, train_y: torch.Tensor, *, seed: int, epochs: int, batch: int,
                         lr: float, weight_decay: float,
                         augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> nn.Module:
    """Cross-entropy training with AdamW and a cosine learning rate; returns `model` in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(train_x) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in range(epochs):
        for index in _batches(len(train_x), batch, generator):
            x = train_x[index]
            if augment is not None:
                x = augment(x, generator)
            loss = nn.functional.cross_entropy(logits_of(model, x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], model: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> float:
    """Fraction of images (N, 1, 8, 8) whose argmax logit is the label (N,)."""
    return float((logits_of(model, x).argmax(dim=1) == y).double().mean())


def train_denoiser(train_x: torch.Tensor, train_y: torch.Tensor, settings: TrainSettings,
                   log: Callable[[str], None]) -> tuple[nn.Module, float]:
    """Trains the EDM denoiser; returns its EMA copy (eval mode) and the final mean loss."""
    torch.manual_seed(settings.denoiser_seed)  # EDM's weight init draws from the global generator
    net = build_denoiser().train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss(P_mean=settings.P_mean, P_std=settings.P_std, sigma_data=net.sigma_data)
    generator = torch.Generator().manual_seed(settings.denoiser_seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.denoiser_lr, betas=(0.9, 0.999), eps=1e-8)
    one_hot = nn.functional.one_hot(train_y, NUM_CLASSES).to(torch.float32)
    batches = _full_batches(len(train_x), settings.denoiser_batch, generator)
    recent: list[float] = []
    for step in range(settings.denoiser_steps):
        index = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = settings.denoiser_lr * min(1.0, (step + 1) / settings.denoiser_warmup_steps)
        loss = loss_fn(net, train_x[index], one_hot[index], generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        halflife = min(settings.denoiser_ema_halflife_steps, (step + 1) * settings.denoiser_ema_rampup_ratio)
        beta = 0.5 ** (1 / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        recent = (recent + [float(loss.detach())])[-100:]
        if (step + 1) % 500 == 0 or step + 1 == settings.denoiser_steps:
            log(f"  denoiser step {step + 1}/{settings.denoiser_steps}: loss {np.mean(recent):.4f}")
    return ema, float(np.mean(recent))


def train_edm2_denoiser(build: Callable[[], nn.Module], train_x: torch.Tensor, train_y: torch.Tensor, *,
                        seed: int, steps: int, ema_std: float, settings: TrainSettings, what: str,
                        log: Callable[[str], None]) -> tuple[nn.Module, float]:
    """Trains an EDM2 network (`build()`: an `EDM2Precond`) for `steps` optimizer steps of
    `settings.edm2_batch` images with EDM2's loss, Adam (betas 0.9, 0.99) and the inverse square
    root learning rate; returns its power-function EMA (relative std `ema_std`, eval mode) and
    the final mean loss. The network trains in training mode, where its layers rewrite their
    weights to unit norm before each use (EDM2's forced weight normalisation)."""
    torch.manual_seed(seed)  # the weight init, Fourier features and dropout draw from the global generator
    net = build().train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    exponent = power_ema_exponent(ema_std)
    loss_fn = EDM2Loss(P_mean=settings.edm2_P_mean, P_std=settings.edm2_P_std, sigma_data=net.sigma_data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.edm2_lr, betas=(0.9, 0.99), eps=1e-8)
    one_hot = nn.functional.one_hot(train_y, NUM_CLASSES).to(torch.float32)
    batches = _full_batches(len(train_x), settings.edm2_batch, generator)
    recent: list[float] = []
    for step in range(steps):
        index = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = inverse_sqrt_learning_rate(step, settings.edm2_lr, settings.edm2_lr_decay_steps,
                                                     settings.edm2_lr_rampup_steps)
        loss = loss_fn(net, train_x[index], one_hot[index], generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for param in net.parameters():  # as EDM2: a non-finite gradient element is dropped, not followed
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0, out=param.grad)
        optimizer.step()
        beta = power_ema_beta(step, exponent)
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        recent = (recent + [float(loss.detach())])[-100:]
        if (step + 1) % 500 == 0 or step + 1 == steps:
            log(f"  {what} step {step + 1}/{steps}: loss {np.mean(recent):.4f}")
    return ema, float(np.mean(recent))


def _classifier_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _evaluator_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)[1]


def _safetensors_bytes(module: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()})


def _atomic_bytes(path: Path, data: bytes) -> None:
    def write(f) -> None:
        os.fchmod(f.fileno(), 0o644)  # shipped files: readable by all, unlike a temporary file's default
        f.write(data)

    atomic_write(path, write)


def train_all(out: Path, settings: TrainSettings = TrainSettings(), log: Callable[[str], None] = print) -> dict:
    """Trains the five networks, writes them, the reference and the manifest into `out`;
    returns the manifest. The thread count and deterministic-algorithms switch are restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train_all(out, settings, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train_all(out: Path, settings: TrainSettings, log: Callable[[str], None]) -> dict:
    train_x, train_y, test_x, test_y = load_digits_split()
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    log("training the classifier (clean images, no augmentation)")
    torch.manual_seed(settings.classifier_seed)
    classifier = train_classifier_net(
        DigitsResNet(), _classifier_logits, train_x, train_y, seed=settings.classifier_seed,
        epochs=settings.classifier_epochs, batch=settings.classifier_batch, lr=settings.classifier_lr,
        weight_decay=settings.classifier_weight_decay)
    seconds["classifier"] = time.perf_counter() - start

    log("training the evaluation network (shifted, quantized images)")
    mark = time.perf_counter()
    torch.manual_seed(settings.evaluator_seed)
    evaluator = train_classifier_net(
        DigitsEvaluator(), _evaluator_logits, quantized(train_x), train_y, seed=settings.evaluator_seed,
        epochs=settings.evaluator_epochs, batch=settings.evaluator_batch, lr=settings.evaluator_lr,
        weight_decay=settings.evaluator_weight_decay, augment=random_shift)
    seconds["evaluator"] = time.perf_counter() - mark

    log(f"training the denoiser ({settings.denoiser_steps} steps of {settings.denoiser_batch})")
    mark = time.perf_counter()
    denoiser, final_loss = train_denoiser(train_x, train_y, settings, log)
    seconds["denoiser"] = time.perf_counter() - mark

    edm2_nets, edm2_losses = {}, {}
    for key, build, seed, steps, ema_std in (
            ("edm2_denoiser", build_edm2_denoiser, settings.edm2_seed, settings.edm2_steps, settings.edm2_ema_std),
            ("edm2_guide", build_edm2_guide, settings.edm2_guide_seed, settings.edm2_guide_steps,
             settings.edm2_guide_ema_std)):
        what = key.replace("_", " ")
        log(f"training the {what} ({steps} steps of {settings.edm2_batch})")
        mark = time.perf_counter()
        edm2_nets[key], edm2_losses[key] = train_edm2_denoiser(
            build, train_x, train_y, seed=seed, steps=steps, ema_std=ema_std, settings=settings, what=what, log=log)
        seconds[key] = time.perf_counter() - mark

    mark = time.perf_counter()
    test_images = quantize_round(test_x)             # uint8 (297, 1, 8, 8)
    with torch.no_grad():
        test_features = evaluator(images_to_input(test_images))[0].double().numpy()
        train_features = evaluator(quantized(train_x))[0].double().numpy()
    mu, sigma = feature_statistics(test_features)
    floor = frechet_distance(*feature_statistics(train_features), mu, sigma)
    seconds["reference"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - start

    test_accuracy = {"classifier": accuracy(_classifier_logits, classifier, test_x, test_y),
                     "classifier_on_quantized": accuracy(_classifier_logits, classifier, quantized(test_x), test_y),
                     "evaluator": accuracy(_evaluator_logits, evaluator, images_to_input(test_images), test_y)}
    reference = io.BytesIO()
    write_npz(reference, {"arr_0": test_images.permute(0, 2, 3, 1).numpy(), "arr_1": test_y.numpy(),
                          "mu": mu, "sigma": sigma})
    out.mkdir(parents=True, exist_ok=True)
    _atomic_bytes(out / FILES["classifier"], _safetensors_bytes(classifier))
    _atomic_bytes(out / FILES["evaluator"], _safetensors_bytes(evaluator))
    _atomic_bytes(out / FILES["denoiser"], _safetensors_bytes(denoiser))
    for key, net in edm2_nets.items():
        _atomic_bytes(out / FILES[key], _safetensors_bytes(net))
    _atomic_bytes(out / FILES["reference"], reference.getvalue())
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {key: {"name": name, "sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
                  for key, name in FILES.items()},
        "architectures": architectures(),
        "settings": asdict(settings),
        "data": {"source": "sklearn.datasets.load_digits", "train_images": len(train_x), "test_images": len(test_x)},
        "test_accuracy": test_accuracy,
        "denoiser_final_loss": final_loss,
        "edm2_final_loss": edm2_losses,   # EDM2's loss, with the learned u(sigma): may be negative
        "reference": {"images": len(test_x), "feature_dim": int(mu.shape[0]),
                      "fd_train_vs_test": floor},
        "train_seconds": seconds,
        "machine": {"threads": settings.threads, "torch": torch.__version__, "python": platform.python_version(),
                    "processor": platform.machine()},
    }
    # The manifest goes last: a directory with a manifest holds the files it describes.
    _atomic_bytes(out / MANIFEST_FILE, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=WEIGHTS_DIR, show_default=True,
              help="Folder for the weights, reference and manifest.")
@click.option("--denoiser-steps", type=click.IntRange(min=1), default=TrainSettings.denoiser_steps,
              show_default=True, help="Optimizer steps of the denoiser.")
@click.option("--edm2-steps", type=click.IntRange(min=1), default=TrainSettings.edm2_steps, show_default=True,
              help="Optimizer steps of the EDM2-style denoiser.")
@click.option("--edm2-guide-steps", type=click.IntRange(min=1), default=TrainSettings.edm2_guide_steps,
              show_default=True, help="Optimizer steps of its autoguidance guide.")
@click.option("--classifier-epochs", type=click.IntRange(min=1), default=TrainSettings.classifier_epochs,
              show_default=True)
@click.option("--evaluator-epochs", type=click.IntRange(min=1), default=TrainSettings.evaluator_epochs,
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=TrainSettings.threads, show_default=True,
              help="Intra-op threads (the weights depend on it).")
def main(out: Path, **settings) -> None:
    """Train the digits benchmark's classifier, evaluation network, denoiser, and the EDM2-style
    denoiser with its autoguidance guide."""
    manifest = train_all(out, TrainSettings(**settings), log=lambda message: click.echo(message, err=True))
    summary = {"out": str(out), "test_accuracy": manifest["test_accuracy"],
               "fd_train_vs_test": manifest["reference"]["fd_train_vs_test"],
               "train_seconds": manifest["train_seconds"]}
    click.echo(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
