"""`elucd-fast sample`: CLIP text-guided sampling with a guided-diffusion (ADM) model (paper 5.4).

    elucd-fast sample --prompt "a Van Gogh style cat" [--contrast "a photo of a dog"]... \
        --network 256x256_diffusion.pt --clip clip-vit-large-patch14-336/ \
        --seeds 0-15 --outdir out/cat [--class 281] [--scale 10] [--gamma 0.3] [--cutouts 8]

The ADM model samples as in SPEC §3 (ancestral, 250 respaced steps, learned variance, sine-added
variance gamma) while `CLIPGuidance` supplies grad_{x0} J over the prompt set. A class-conditional
network also gets an ImageNet class per image (`--class`, else drawn per seed); the CLIP target
is always the prompt. Images are written and resumed as by `generate` (PNG tree and/or npz).
Bad input exits with status 2 and a message; nothing is written then.
"""
from __future__ import annotations

from pathlib import Path

import click
import torch

from ..guidance.clip import CLIPGuidance, load_clip
from ..models.adm_unet import load_adm_model
from ..runs import parse_seeds, run_generation
from ..samplers.ddpm import DDPMSettings, ddpm_sampler
from ..checks import check_regular_file
from ..runs.ownership import check_output_apart, check_run_folder
from ._options import DEVICE, default_device


@click.command("sample")
@click.option("--prompt", required=True, help="The text the images should match (CLIP's target).")
@click.option("--contrast", "contrast_prompts", multiple=True,
              help="A prompt the images should not match (repeatable); enters J's logsumexp.")
@click.option("--network", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="guided-diffusion checkpoint, e.g. 256x256_diffusion.pt (local file).")
@click.option("--class-cond/--uncond", "class_cond", default=None,
              help="Whether the network is class-conditional; default: as the public model of its size "
                   "(pass --uncond for 256x256_diffusion_uncond.pt).")
@click.option("--clip", "clip_dir", type=click.Path(path_type=Path), required=True,
              help="Local transformers CLIP directory, e.g. clip-vit-large-patch14-336/.")
@click.option("--seeds", default="0-7", show_default=True, help="Seeds: comma-separated integers and ranges.")
@click.option("--outdir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--class", "class_label", type=int, default=None,
              help="ImageNet class of a class-conditional network; default: drawn per seed.")
@click.option("--steps", "timestep_respacing", default="250", show_default=True,
              help="Respaced steps: '250', 'ddim25', '10,15,20'.")
@click.option("--num-timesteps", type=int, default=1000, show_default=True)
@click.option("--beta-schedule", type=click.Choice(["linear", "cosine"]), default="linear", show_default=True,
              help="linear for the 128/256/512 models, cosine for 64.")
@click.option("--ddim/--ancestral", "use_ddim", default=False, show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM stochasticity.")
@click.option("--scale", "classifier_scale", type=float, default=10.0, show_default=True,
              help="Guidance scale s (ours: the paper gives none for CLIP).")
@click.option("--gamma", "gamma_factor", type=float, default=None,
              help="Sine-added variance gamma (ancestral only) [default: 0.3, 0 with --ddim].")
@click.option("--joint-temperature", type=float, default=1.0, show_default=True)
@click.option("--marginal-temperature", type=float, default=None,
              help="tau_m [default: 0 without --contrast, else the joint temperature].")
@click.option("--cutouts", type=int, default=0, show_default=True, help="Random crops CLIP sees (0: the centre view).")
@click.option("--cutout-seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=DEVICE, default=default_device, show_default="cuda if available, else cpu")
@click.option("--fp16/--fp32", "use_fp16", default=None, help="The network's torso in float16 [default: on CUDA].")
@click.option("--format", "formats", multiple=True, default=("png",), show_default=True,
              type=click.Choice(["png", "npz"]))
@click.option("--quantize", type=click.Choice(["floor", "round"]), default="floor", show_default=True,
              help="floor: ADM's uint8 conversion; round: EDM's.")
@click.option("--progress/--no-progress", default=True)
def command(prompt: str, contrast_prompts: tuple[str, ...], network: Path, class_cond: bool | None, clip_dir: Path,
            seeds: str, outdir: Path, class_label: int | None, timestep_respacing: str, num_timesteps: int,
            beta_schedule: str, use_ddim: bool, eta: float, classifier_scale: float, gamma_factor: float | None,
            joint_temperature: float, marginal_temperature: float | None, cutouts: int, cutout_seed: int,
            batch_size: int, device: str, use_fp16: bool | None, formats: tuple[str, ...], quantize: str,
            progress: bool) -> None:
    """CLIP-guided images of a text prompt from an ADM diffusion model.

    \b
    Examples:
      elucd-fast sample --prompt "a Van Gogh style cat" --network 256x256_diffusion.pt \\
          --clip clip-vit-large-patch14-336/ --class 281 --seeds 0-15 --outdir out/cat
    """
    try:
        seed_list = parse_seeds(seeds)
        check_regular_file(network, "--network")
        # Checked before anything is loaded: the run folder may hold only a run, and never the inputs.
        check_run_folder(outdir)
        check_output_apart(outdir, [network, clip_dir], "--outdir", folder=True)
        if gamma_factor is None:
            gamma_factor = 0.0 if use_ddim else 0.3
        # Checked before anything is loaded or written (learn_sigma is read from the file later).
        settings = DDPMSettings(num_timesteps=num_timesteps, beta_schedule=beta_schedule,
                                timestep_respacing=timestep_respacing, classifier_scale=classifier_scale,
                                gamma_factor=gamma_factor, use_ddim=use_ddim, eta=eta)
        flags = {"use_fp16": device.startswith("cuda") if use_fp16 is None else use_fp16}
        if class_cond is not None:
            flags["class_cond"] = class_cond
        clip_model, processor = load_clip(clip_dir)
        guidance = CLIPGuidance(clip_model.to(device), processor, prompt, contrast_prompts=contrast_prompts,
                                joint_temperature=joint_temperature, marginal_temperature=marginal_temperature,
                                cutouts=cutouts, cutout_seed=cutout_seed)
        del clip_model  # only the copied image tower is needed from here on
        model = load_adm_model(network, **flags).to(device)
        channels = getattr(model, "in_channels", 3)
        image_shape = (channels, model.image_size, model.image_size)
        num_classes = getattr(model, "num_classes", None)
        settings = settings.with_changes(learn_sigma=getattr(model, "out_channels", 2 * channels) == 2 * channels)

        def sample_fn(latents, labels, randn_like):
            # The network gets its ImageNet classes; the guidance's target is prompt 0 for every image.
            def network_fn(x, t, _):
                return model(x, t, labels)

            targets = torch.zeros(len(latents), dtype=torch.long, device=latents.device)
            return ddpm_sampler(network_fn, latents, targets, guidance=guidance, randn_like=randn_like,
                                model_class_conditional=False, settings=settings)

        config = {"command": "sample", "network": str(network.resolve()), "class_cond": num_classes is not None,
                  "clip": str(clip_dir.resolve()),
                  "guidance": {"prompts": list(guidance.prompts), "contrast_prompts": list(guidance.contrast_prompts),
                               "joint_temperature": guidance.joint_temperature,
                               "marginal_temperature": guidance.marginal_temperature, "cutouts": cutouts,
                               "cutout_seed": cutout_seed},
                  "settings": settings.json()}
        run_generation(sample_fn, seed_list, outdir, config=config, image_shape=image_shape,
                       num_classes=num_classes, class_label=class_label, batch_size=batch_size, formats=formats,
                       quantize=quantize, device=device, progress=progress)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise click.UsageError(str(err)) from err
