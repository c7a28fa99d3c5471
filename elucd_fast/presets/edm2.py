"""EDM2's published rows as presets (NVlabs/edm2 `generate_images.py`, its `config_presets`
"-fid" rows: EMA lengths, guide networks and guide weights chosen for FID), and the same rows
with calibrated classifier guidance added (`+cls`, beyond the paper):

    elucd-fast generate --preset edm2-img64-s-autog-fid --network edm2-img64-s-1073741-0.045.pkl \\
        --guide-network edm2-img64-xs-0134217-0.110.pkl --seeds 0-49999

A row names the network pickle it expects (EDM2's post-hoc EMA reconstruction: the file name
carries the training length in kimg and the EMA length), the guide network's for its guided
("guid": an unconditional XS network, classifier-free guidance) and autoguided ("autog": a
smaller, shorter-trained network) variants, the guide weight w, and EDM2's published FID. The
ImageNet-512 rows also need the SD VAE their encoder decodes with (`stabilityai/sd-vae-ft-mse`).
Nothing is fetched: every file is a local path the user passes.

The `+cls` rows add Algorithm 2's classifier term (`samplers.edm2`): ResNet-101 (torchvision
IMAGENET1K_V2, `resnet101-cd907fc2.pth`) on [-1, 1] images at the model's resolution, Softplus
beta 5, tau_j 1, tau_m 0, wmax 0.004, sine add 0.3: the paper's EDM ImageNet-64 values, which
are OUR untuned choice here (no published result exists for EDM2 with classifier guidance).
On ImageNet-512 the classifier sees the VAE's decoding of the denoised latent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..guidance.classifier import ClassifierGuidance
from ..guidance.settings import GuidanceSettings
from ..job import Job
from ..models.checkpoint import CheckpointError
from ..samplers import EDM2Settings
from .registry import apply_overrides, preset_json, register_preset

EDM2_MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
EDM2_SOURCE = f"EDM2's post-hoc EMA reconstructions ({EDM2_MODEL_ROOT}/, listed in NVlabs/edm2 generate_images.py)"
SD_VAE_MSE_SOURCE = "the stabilityai/sd-vae-ft-mse model page (a diffusers directory or its .safetensors file)"
TORCHVISION_R101_SOURCE = ("torchvision's IMAGENET1K_V2 weight file "
                           "(torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url)")

# Our classifier-guidance defaults for EDM2 (the paper's EDM ImageNet-64 values; untuned here).
CLS_GUIDANCE_SETTINGS = GuidanceSettings(softplus_beta=5.0, joint_temperature=1.0, marginal_temperature=0.0)
CLS_MAX_GUIDANCE = 0.004
CLS_ADD_FACTOR = 0.3
CLS_NOTE = ("EDM2's sampler settings, guide and EMA lengths are EDM2's own; the classifier term (ResNet-101 "
            "IMAGENET1K_V2, beta 5, tau_j 1, tau_m 0, wmax 0.004, add 0.3) is ours and untuned: the paper's "
            "EDM ImageNet-64 values, not tuned for EDM2 (tune with tools.sweep)")


@dataclass(frozen=True)
class EDM2Preset:
    """One EDM2 row, with or without classifier guidance. `configure(**overrides)` takes the
    fields of its `guidance_settings` and `settings`, `guidance` and `num_steps`; `build` loads
    the files, `job` assembles the job from networks already loaded."""

    name: str
    description: str
    network_file: str                        # EDM2's pickle name: edm2-<dataset>-<size>-<kimg>-<EMA length>.pkl
    guide_network_file: str | None           # the guide's pickle (guid / autog rows), None: no guide
    published_fid: float                     # EDM2's FID of the row without classifier guidance (50k samples)
    settings: EDM2Settings
    guidance: bool = False                   # classifier guidance on (the +cls rows) or off
    guidance_settings: GuidanceSettings = CLS_GUIDANCE_SETTINGS
    conditional: bool = True                 # the network is class-conditional (label_dim 1000)
    image_shape: tuple[int, int, int] = (3, 64, 64)
    latent_shape: tuple[int, int, int] | None = None  # (4, 64, 64) for ImageNet-512
    classifier_arch: str = "resnet101"
    classifier_file: str = "resnet101-cd907fc2.pth"
    settings_note: str = "EDM2's settings"
    fid_source: str = "NVlabs/edm2 generate_images.py config_presets"
    network_source: str = EDM2_SOURCE        # where users get the network and guide pickles

    def configure(self, **overrides) -> EDM2Preset:
        return apply_overrides(self, overrides)

    def json(self) -> dict:
        return preset_json(self)

    @property
    def num_classes(self) -> int | None:
        """Classes labels are drawn from: ImageNet's for a conditional network or for the
        classifier's targets; None for EDM2's unconditional rows (EDM2 draws no label)."""
        return 1000 if self.conditional or self.guidance else None

    @property
    def vae_source(self) -> str | None:
        """Where users get the VAE the ImageNet-512 encoder decodes with; None for pixels."""
        return SD_VAE_MSE_SOURCE if self.latent else None

    @property
    def latent(self) -> bool:
        """Whether the network works on SD-VAE latents (ImageNet-512)."""
        return self.latent_shape is not None

    @property
    def ema_length(self) -> float:
        """The network's EMA length (relative standard deviation), as its file name says."""
        return _file_fields(self.network_file)[1]

    @property
    def training_kimg(self) -> int:
        """Training length of the network in thousands of images, as its file name says."""
        return _file_fields(self.network_file)[0]

    @property
    def guide_ema_length(self) -> float | None:
        return None if self.guide_network_file is None else _file_fields(self.guide_network_file)[1]

    def required_files(self, *, network=None, guide_network=None, classifier=None, vae=None) -> dict[str, str]:
        """The files this configured preset reads, checked to exist before anything is loaded;
        a missing one is refused naming the expected file and where to get it. The guide network
        is needed only where guide_weight != 1."""
        files = {"network": _require(self.name, "network", network, self.network_file, self.network_source)}
        if self.settings.uses_guide_network:
            expected = self.guide_network_file or (
                f"a guide network for guide_weight {self.settings.guide_weight:g} (this row has none: EDM2's "
                "guid rows use edm2-img512-xs-uncond-*, its autog rows a smaller network)")
            files["guide_network"] = _require(self.name, "guide-network", guide_network, expected, self.network_source)
        if self.guidance:
            files["classifier"] = _require(self.name, "classifier", classifier, self.classifier_file,
                                           TORCHVISION_R101_SOURCE)
        if self.latent:
            files["vae"] = _require(self.name, "vae", vae, "sd-vae-ft-mse", SD_VAE_MSE_SOURCE)
        return files

    def build(self, *, device: torch.device | str = "cpu", network: str | os.PathLike | None = None,
              guide_network: str | os.PathLike | None = None, classifier: str | os.PathLike | None = None,
              vae: str | os.PathLike | None = None, **overrides) -> Job:
        """The job with the user's local files (EDM2 pickles through
        `models.edm2_pickle.load_edm2_network(path, device=...) -> (net, encoder)`); refuses
        missing files naming the expected file and where to get it."""
        from ..models.checkpoint import sha256_file
        from ..models.classifiers import load_classifier

        preset = self.configure(**overrides)
        device = torch.device(device)
        files = preset.required_files(network=network, guide_network=guide_network, classifier=classifier, vae=vae)
        from ..models.edm2_pickle import load_edm2_network

        net, encoder = load_edm2_network(files["network"], device=device)
        guide_net = None
        if "guide_network" in files:
            guide_net, _ = load_edm2_network(files["guide_network"], device=device)
        classifier_module = vae_module = None
        if preset.guidance:
            classifier_module = load_classifier(preset.classifier_arch, files["classifier"])
        if preset.latent:
            from ..models.dit import load_sd_vae

            vae_module = load_sd_vae(files["vae"])
        hashes = {f"{key}_sha256": sha256_file(path) for key, path in files.items() if os.path.isfile(path)}
        notes = [f"{key}: {os.path.basename(files[key])} is not EDM2's {expected} for this row; using it anyway"
                 for key, expected in (("network", preset.network_file), ("guide_network", preset.guide_network_file))
                 if key in files and expected is not None and os.path.basename(files[key]) != expected]
        classifier_sha256 = hashes.get("classifier_sha256")
        if classifier_sha256 is not None and not classifier_sha256.startswith(_sha_prefix(preset.classifier_file)):
            notes.append(f"classifier: {files['classifier']} is not {preset.classifier_file} (its sha256 is "
                         f"{hashes['classifier_sha256'][:8]}...); guiding with it anyway")
        return preset.job(net, encoder=encoder, guide_net=guide_net, classifier=classifier_module, vae=vae_module,
                          device=device, config=hashes, notes=notes)

    def job(self, net, *, encoder=None, guide_net=None, classifier=None, vae=None,
            device: torch.device | str = "cpu", config: dict | None = None, notes=()) -> Job:
        """The job of this configured preset from networks already loaded: `net` and `guide_net`
        EDM2 networks (`models.EDM2Precond`), `encoder` the one the network's pickle holds (the
        ImageNet-512 `StabilityVAEEncoder`, to which `vae` is attached; ignored for pixels), the
        classifier module when guided. `config` adds to the job's recorded configuration."""
        device = torch.device(device)
        if self.settings.uses_guide_network and guide_net is None:
            raise ValueError(f"guide_network: preset {self.name!r} with guide_weight {self.settings.guide_weight:g} "
                             "needs a guide network")
        if self.guidance and classifier is None:
            raise ValueError(f"classifier: preset {self.name!r} is classifier-guided; pass the classifier")
        state_shape = self.latent_shape or self.image_shape
        label_dim = 1000 if self.conditional else 0
        for what, module in (("network", net), ("guide_network", guide_net)):
            if module is None:
                continue
            shape = (getattr(module, "img_channels", None), getattr(module, "img_resolution", None))
            if shape != (state_shape[0], state_shape[-1]):
                raise ValueError(f"{what}: preset {self.name!r} expects a network of {state_shape[0]} channels at "
                                 f"{state_shape[-1]}x{state_shape[-1]}, got {shape[0]} channels at {shape[1]}")
            if what == "network" and (getattr(module, "label_dim", 0) or 0) != label_dim:
                raise ValueError(f"network: preset {self.name!r} expects label_dim {label_dim}, got "
                                 f"{getattr(module, 'label_dim', 0)}")
            module.eval().requires_grad_(False)  # EDM2's layers rewrite their weights in training mode
        decoder = None
        if self.latent:
            if encoder is None or not hasattr(encoder, "decode"):
                raise ValueError(f"encoder: preset {self.name!r} works on latents; pass the network's encoder "
                                 "(StabilityVAEEncoder)")
            if vae is not None:
                encoder.use_vae(vae.to(device).eval())
            decoder = encoder.to(device)
        guidance = None
        if self.guidance:
            # As the authors fed ResNets: [-1, 1] images at the model's resolution.
            guidance = ClassifierGuidance.from_settings(classifier.to(device), self.guidance_settings,
                                                        input_transform="identity")
        return Job(net=net, guide_net=guide_net, guidance=guidance, settings=self.settings,
                   image_shape=self.image_shape, num_classes=self.num_classes, device=device,
                   config={"preset": self.json(), **(config or {})}, latent_shape=self.latent_shape,
                   decoder=decoder, quantize="round", notes=tuple(notes))


def _require(preset: str, flag: str, path, expected: str, source: str) -> str:
    if path is None:
        raise CheckpointError(f"preset {preset!r} needs --{flag} PATH: {expected} from {source}")
    if not os.path.isfile(path) and not os.path.isdir(path):
        raise CheckpointError(f"--{flag}: no such file: {path} (preset {preset!r} expects {expected} from {source})")
    return str(path)


def _file_fields(file: str) -> tuple[int, float]:
    """(training kimg, EMA length) of an EDM2 pickle name edm2-<...>-<kimg>-<EMA length>.pkl."""
    kimg, ema = file.removesuffix(".pkl").rsplit("-", 2)[1:]
    return int(kimg), float(ema)


def _sha_prefix(file: str) -> str:
    return file.rsplit(".", 1)[0].rsplit("-", 1)[-1]


# EDM2's "-fid" rows (generate_images.py `config_presets`): row, network file, guide file, guide
# weight w, FID (its comment there; SPEC §9 repeats those of img64-s/m/l/xl, img64-s-autog,
# img512-xxl, -xxl-guid, -xxl-autog).
EDM2_ROWS = (
    ("img512-xs-fid", "edm2-img512-xs-2147483-0.135.pkl", None, 1.0, 3.53),
    ("img512-s-fid", "edm2-img512-s-2147483-0.130.pkl", None, 1.0, 2.56),
    ("img512-m-fid", "edm2-img512-m-2147483-0.100.pkl", None, 1.0, 2.25),
    ("img512-l-fid", "edm2-img512-l-1879048-0.085.pkl", None, 1.0, 2.06),
    ("img512-xl-fid", "edm2-img512-xl-1342177-0.085.pkl", None, 1.0, 1.96),
    ("img512-xxl-fid", "edm2-img512-xxl-0939524-0.070.pkl", None, 1.0, 1.91),
    ("img64-s-fid", "edm2-img64-s-1073741-0.075.pkl", None, 1.0, 1.58),
    ("img64-m-fid", "edm2-img64-m-2147483-0.060.pkl", None, 1.0, 1.43),
    ("img64-l-fid", "edm2-img64-l-1073741-0.040.pkl", None, 1.0, 1.33),
    ("img64-xl-fid", "edm2-img64-xl-0671088-0.040.pkl", None, 1.0, 1.33),
    ("img512-xs-guid-fid", "edm2-img512-xs-2147483-0.045.pkl", "edm2-img512-xs-uncond-2147483-0.045.pkl", 1.4, 2.91),
    ("img512-s-guid-fid", "edm2-img512-s-2147483-0.025.pkl", "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.4, 2.23),
    ("img512-m-guid-fid", "edm2-img512-m-2147483-0.030.pkl", "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.2, 2.01),
    ("img512-l-guid-fid", "edm2-img512-l-1879048-0.015.pkl", "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.2, 1.88),
    ("img512-xl-guid-fid", "edm2-img512-xl-1342177-0.020.pkl", "edm2-img512-xs-uncond-2147483-0.020.pkl", 1.2, 1.85),
    ("img512-xxl-guid-fid", "edm2-img512-xxl-0939524-0.015.pkl", "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.2, 1.81),
    ("img512-s-autog-fid", "edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl", 2.1, 1.34),
    ("img512-xxl-autog-fid", "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", 2.05, 1.25),
    ("img512-s-uncond-autog-fid", "edm2-img512-s-uncond-2147483-0.070.pkl", "edm2-img512-xs-uncond-0134217-0.110.pkl",
     2.85, 3.86),
    ("img64-s-autog-fid", "edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.7, 1.01),
)


def _row(row: str, network_file: str, guide_file: str | None, guide_weight: float, fid: float,
         *, classifier: bool) -> EDM2Preset:
    img512 = row.startswith("img512")
    size = row.split("-")[1]
    conditional = "-uncond-" not in row
    kind = ("autoguidance by a smaller network" if "autog" in row else "classifier-free guidance" if "guid" in row
            else "no guide")
    description = (f"EDM2 ImageNet-{'512' if img512 else '64'} {size.upper()}"
                   f"{'' if conditional else ' unconditional'}, "
                   f"32 Heun steps, {kind}{f' (w {guide_weight:g})' if guide_file else ''}"
                   f"{', guided by ResNet-101' + (' through the VAE decoder' if img512 else '') if classifier else ''}")
    settings = EDM2Settings(guide_weight=guide_weight)
    if classifier:
        settings = settings.with_changes(max_guidance=CLS_MAX_GUIDANCE, add_factor=CLS_ADD_FACTOR)
    return EDM2Preset(
        f"edm2-{row}{'+cls' if classifier else ''}", description, network_file=network_file,
        guide_network_file=guide_file, published_fid=fid, settings=settings, guidance=classifier,
        conditional=conditional, image_shape=(3, 512, 512) if img512 else (3, 64, 64),
        latent_shape=(4, 64, 64) if img512 else None, settings_note=CLS_NOTE if classifier else "EDM2's settings")


EDM2_PRESETS = tuple(_row(*row, classifier=classifier) for row in EDM2_ROWS for classifier in (False, True))

for _preset in EDM2_PRESETS:
    register_preset(_preset)


__all__ = ["CLS_ADD_FACTOR", "CLS_GUIDANCE_SETTINGS", "CLS_MAX_GUIDANCE", "EDM2Preset", "EDM2_PRESETS", "EDM2_ROWS",
           "EDM2_SOURCE"]
