"""Presets over public checkpoint files (the paper's rows in `presets.paper`, the rest of the
public zoo in `presets.zoo`): each names the files it expects, where users get them, and the FID
the paper reports where it is a paper row. Nothing is fetched: every file is a local path the
user passes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..guidance.classifier import ClassifierGuidance
from ..guidance.settings import GuidanceSettings
from ..job import Job
from ..models.checkpoint import CheckpointError
from ..samplers import DDPMSettings, DiTSettings, EDMSettings, SamplerSettings
from .registry import apply_overrides, preset_json

EDM_PICKLE_SOURCE = "the EDM repository's release (NVlabs/edm, 'Pre-trained models')"
ADM_SOURCE = "the guided-diffusion repository's release (openai/guided-diffusion, 'Download pre-trained models')"
DIT_SOURCE = "the DiT repository's release (facebookresearch/DiT, 'Sampling': download.py's file list)"
VAE_SOURCE = "the stabilityai/sd-vae-ft-ema model page (a diffusers directory or its .safetensors file)"
# The paper's classifiers are torchvision's IMAGENET1K_V2 weights (the authors' resnet101_weight_V2.pth).
TORCHVISION_SOURCE = ("torchvision's IMAGENET1K_V2 weight files (torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url, "
                      "ResNet50_Weights.IMAGENET1K_V2.url)")


@dataclass(frozen=True)
class CheckpointPreset:
    """A configuration over public checkpoint files (a row of the paper's results, or another
    public model guided the paper's way). `configure(**overrides)` takes the fields of its
    `guidance_settings` and `settings`, `guidance` and `num_steps`."""

    name: str
    description: str
    network_file: str                             # the expected checkpoint file name
    network_source: str                           # where users get it
    classifier_arch: str                          # torchvision architecture
    classifier_file: str                          # torchvision's IMAGENET1K_V2 file: name-sha256prefix.pth
    image_shape: tuple[int, int, int]             # (C, H, W) of the images
    guidance_settings: GuidanceSettings
    settings: SamplerSettings
    paper_fid: tuple[float, float] | None = None  # (unguided, guided), 50k samples, where a paper row
    num_classes: int = 1000
    vae_source: str | None = None                 # DiT only: the decoder
    settings_note: str = "the paper's settings"
    network_kwargs: dict = field(default_factory=dict)  # passed to the network loader (architecture flags)
    guidance: bool = True                         # False: the unguided baseline of the row
    quantize: str = "round"                       # uint8 conversion: EDM's "round" or ADM's "floor"

    def configure(self, **overrides) -> CheckpointPreset:
        return apply_overrides(self, overrides)

    def json(self) -> dict:
        return preset_json(self)

    @property
    def classifier_sha256_prefix(self) -> str:
        """The sha256 prefix torchvision puts in the paper's classifier file name."""
        return self.classifier_file.rsplit(".", 1)[0].rsplit("-", 1)[-1]

    def required_files(self, *, network=None, classifier=None, vae=None) -> dict[str, str]:
        """The checkpoint paths this configured preset reads, checked to exist (before anything
        is loaded); a missing one is refused naming the expected file and where to get it."""
        files = {"network": self._require("network", network, self.network_file, self.network_source)}
        if self.guidance:
            files["classifier"] = self._require("classifier", classifier, self.classifier_file, TORCHVISION_SOURCE)
        if isinstance(self.settings, DiTSettings):
            files["vae"] = self._require("vae", vae, "sd-vae-ft-ema", VAE_SOURCE)
        return files

    def _require(self, what: str, path, expected: str, source: str) -> str:
        if path is None:
            raise CheckpointError(f"preset {self.name!r} needs --{what} PATH: the file {expected} from {source}")
        if not os.path.isfile(path) and not os.path.isdir(path):
            raise CheckpointError(f"--{what}: no such file: {path} (preset {self.name!r} expects {expected} "
                                  f"from {source})")
        return str(path)

    def build(self, *, device: torch.device | str = "cpu", network: str | os.PathLike | None = None,
              classifier: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              **overrides) -> Job:
        """The job with the user's local checkpoint files; refuses missing files with a message
        naming the expected file and where to get it. A classifier file other than the paper's
        is used, with a note saying so (its sha256 is recorded in the run config)."""
        from ..models.checkpoint import sha256_file
        from ..models.classifiers import load_classifier

        preset = self.configure(**overrides)
        device = torch.device(device)
        files = preset.required_files(network=network, classifier=classifier, vae=vae)
        network = files["network"]
        notes = []
        guidance = None
        classifier_sha256 = None
        if preset.guidance:
            classifier_sha256 = sha256_file(files["classifier"])
            if not classifier_sha256.startswith(self.classifier_sha256_prefix):
                notes.append(f"classifier: {files['classifier']} is not the paper's {self.classifier_file} "
                             f"(torchvision {self.classifier_arch} IMAGENET1K_V2, sha256 {self.classifier_sha256_prefix}...): "
                             f"its sha256 is {classifier_sha256[:8]}...; guiding with it anyway")
            guidance = ClassifierGuidance.from_settings(
                load_classifier(self.classifier_arch, files["classifier"]).to(device), preset.guidance_settings,
                input_transform="identity")  # as the authors: [-1, 1] at the model's size
        latent_shape = decoder = None
        if isinstance(preset.settings, EDMSettings):
            from ..models.edm_pickle import load_edm_network

            net = load_edm_network(network, device=device, **self.network_kwargs)
        elif isinstance(preset.settings, DDPMSettings):
            from ..models.adm_unet import load_adm_model

            # guided-diffusion's fp16 torso only on CUDA (CPU fp16 convolutions are slow); the
            # precision policy decides the rest.
            flags = {"use_fp16": device.type == "cuda", **self.network_kwargs}
            net = load_adm_model(network, image_size=self.image_shape[-1], **flags).to(device).eval()
        else:
            from ..guidance.latent import VAEDecoder
            from ..models.dit import load_dit

            loaded = load_dit(network, image_size=self.image_shape[-1], vae=files["vae"], **self.network_kwargs)
            net = loaded.dit.to(device).eval()
            decoder = VAEDecoder(loaded.vae.to(device).eval())
            latent_shape = (4, self.image_shape[1] // 8, self.image_shape[2] // 8)
        config = {"preset": preset.json(),
                  "network_sha256": sha256_file(network) if os.path.isfile(network) else None,
                  "classifier_sha256": classifier_sha256}
        return Job(net=net, guidance=guidance, settings=preset.settings, image_shape=self.image_shape,
                   num_classes=self.num_classes, device=device, config=config, latent_shape=latent_shape,
                   decoder=decoder, quantize=self.quantize, notes=tuple(notes))
