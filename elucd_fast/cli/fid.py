"""`elucd-fast fid`: sample-quality metrics through torch-fidelity, and EDM2's FD-DINOv2.

    elucd-fast fid calc --samples OUT/ --reference imagenet-64x64.npz \
        --inception-weights weights-inception-2015-12-05-6726825d.pth [--isc] [--prc] [--kid] \
        [--json-out metrics.json]
    elucd-fast fid calc --samples OUT/ --reference img512.pkl --metrics fid,fd_dinov2 \
        --inception-weights weights-....pth --dinov2 dinov2-large/
    elucd-fast fid ref --images REAL/ --out-path ref.npz --inception-weights weights-....pth \
        [--metrics fid,fd_dinov2 --dinov2 dinov2-large/]

`calc` prints the metrics as JSON on stdout; `ref` writes EDM-format statistics (mu, sigma; with
fd_dinov2_mu, fd_dinov2_sigma for FD-DINOv2), or EDM2's dataset-refs format for a `.pkl`.
Bad input exits with status 2 and a message on stderr; nothing is written then.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..metrics.evaluate import (DEFAULT_FEATURE_EXTRACTOR, DEFAULT_MAX_IMAGE_PIXELS, MAX_KID_SUBSETS, build_reference,
                                compute_metrics)
from ..npz_reader import DEFAULT_MAX_ARRAY_BYTES
from ..runs.atomic import check_writable
from ..runs.ownership import check_output_apart
from ._options import DEVICE, json_text, usage_errors, write_json

_PATH = click.Path(dir_okay=True, file_okay=True, path_type=Path)
METRICS = ("fid", "fd_dinov2")


def _metric_list(ctx, param, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise click.BadParameter(f"{'unknown metric ' + repr(unknown[0]) if unknown else 'no metric given'}; "
                                 f"a comma-separated list of {', '.join(METRICS)}", ctx=ctx, param=param)
    return names


def _shared_options(function):
    """Options `calc` and `ref` share, named as the library's keyword arguments."""
    options = [
        click.option("--feature-extractor", default=DEFAULT_FEATURE_EXTRACTOR, show_default=True,
                     callback=_register_extractor,
                     help="A feature extractor registered with torch-fidelity, or digits-eval (the digits "
                          "benchmark's evaluation network, bundled: no weights file needed)."),
        click.option("--feature-extractor-weights-path", "--inception-weights", "feature_extractor_weights_path",
                     type=click.Path(path_type=Path), default=None,
                     help="Local weights file of the feature extractor (never downloaded)."),
        click.option("--metrics", default="fid", show_default=True, callback=_metric_list,
                     help="Fréchet distances to compute, comma-separated: fid (Inception-v3), fd_dinov2 "
                          "(EDM2's FD-DINOv2; needs --dinov2, not the Inception weights)."),
        click.option("--dinov2", "--dinov2-path", "dinov2_path", type=click.Path(path_type=Path), default=None,
                     help="Local folder of facebook/dinov2-large saved by transformers (save_pretrained), "
                          "for fd_dinov2 (never downloaded)."),
        click.option("--dinov2-resize-mode", type=click.Choice(["torch", "pil"]), default="torch", show_default=True,
                     help="FD-DINOv2 resize to 224 px: torch (EDM2's default) or pil (dgm-eval's)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS,
                     show_default=True, help="Refuse images of more pixels than this (a guard against "
                     "decompression bombs); raise it for larger real images."),
        click.option("--max-array-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_ARRAY_BYTES,
                     show_default=True, help="Refuse to read into memory an npz array (a compressed image set, "
                     "reference statistics) larger than this many bytes, checked from the file's headers before "
                     "any data is read; raise it for larger sets. Uncompressed npz images are read lazily whatever "
                     "their size."),
        click.option("--verbose/--quiet", default=False, help="Progress of feature extraction on stderr."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _inputs(options: dict) -> list:
    """The input paths among a command's options: each output is checked against all of them."""
    return [options.get(name) for name in ("samples", "reference", "images", "feature_extractor_weights_path",
                                           "dinov2_path")]


def _register_extractor(ctx, param, value: str) -> str:
    """The digits benchmark's extractor registers itself when its module is imported."""
    if value == "digits-eval":
        import elucd_fast.digits.features  # noqa: F401
    return value


@click.group(name="fid")
def command() -> None:
    """FID (and IS, precision/recall, KID) of generated samples.

    \b
    Examples:
      elucd-fast fid calc --samples out/edm64-18/samples.npz --reference imagenet-64x64.npz \\
          --inception-weights weights-inception-2015-12-05-6726825d.pth --json-out fid.json
      elucd-fast fid calc --samples out/digits/samples.npz \\
          --reference elucd_fast/digits/weights/reference.npz --feature-extractor digits-eval
      elucd-fast fid ref --images real-images/ --out-path ref.npz --inception-weights weights-....pth
    """


@command.command(name="calc")
@click.option("--samples", type=_PATH, required=True, help="PNG folder (any depth) or npz with arr_0 (N, H, W, C).")
@click.option("--reference", type=_PATH, required=True,
              help="Statistics npz (mu, sigma; fd_dinov2_mu, fd_dinov2_sigma), EDM2 dataset-refs .pkl, "
                   "ADM VIRTUAL_*.npz, or real images (PNG folder or npz).")
@click.option("--fid/--no-fid", "fid_flag", default=None, hidden=True,
              help="Add fid to, or remove it from, --metrics.")
@click.option("--isc/--no-isc", default=False, show_default=True, help="Inception Score.")
@click.option("--prc/--no-prc", default=False, show_default=True,
              help="Precision and recall (needs reference images).")
@click.option("--kid/--no-kid", default=False, show_default=True,
              help="Kernel Inception Distance (needs reference images).")
@click.option("--isc-splits", type=click.IntRange(min=1), default=10, show_default=True,
              help="Inception Score splits, at most the number of samples.")
@click.option("--kid-subsets", type=click.IntRange(min=1, max=MAX_KID_SUBSETS), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Images per KID subset, at most the number of samples and of reference images.")
@click.option("--prc-neighborhood", type=click.IntRange(min=1), default=3, show_default=True,
              help="k of precision/recall's k-NN, below the number of samples and of reference images.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the metrics to this JSON file.")
@_shared_options
def calc(json_out: Path | None, metrics: list[str], fid_flag: bool | None, **kwargs) -> None:
    """Metrics of --samples against --reference, printed as JSON (and written to --json-out;
    the metrics are printed first, so a result that took long is never lost to a failed write)."""
    if json_out is not None:
        usage_errors(lambda: check_writable(json_out, "--json-out"))
        usage_errors(lambda: check_output_apart(json_out, _inputs(kwargs), "--json-out"))
    fid = "fid" in metrics if fid_flag is None else fid_flag
    result = usage_errors(lambda: compute_metrics(fid=fid, fd_dinov2="fd_dinov2" in metrics, **kwargs))
    click.echo(json_text(result), nl=False)
    if json_out is not None:
        write_json(json_out, result)


@command.command(name="ref")
@click.option("--images", type=_PATH, required=True, help="Real images: PNG folder (any depth) or npz with arr_0.")
@click.option("--out-path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Statistics file to write: .npz (EDM format: mu, sigma; fd_dinov2_mu, fd_dinov2_sigma) "
                   "or .pkl (EDM2's dataset-refs format).")
@_shared_options
def ref(metrics: list[str], **kwargs) -> None:
    """Builds reference statistics once, for later `fid calc --reference`."""
    usage_errors(lambda: check_writable(kwargs["out_path"], "--out-path"))
    usage_errors(lambda: check_output_apart(kwargs["out_path"], _inputs(kwargs), "--out-path"))
    summary = usage_errors(lambda: build_reference(fid="fid" in metrics, fd_dinov2="fd_dinov2" in metrics,
                                                   **kwargs))
    click.echo(json.dumps(summary, indent=2, sort_keys=True))
