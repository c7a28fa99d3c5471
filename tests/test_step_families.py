"""The analytic step families (`schedules.families`, SPEC §10) against their formulas and the
public implementations they name: k-diffusion's Karras and exponential sigmas, ADM's respacing
("N", "ddimN"), diffusers' DDIM "leading" and "trailing" spacing."""
import math

import numpy as np
import pytest
import torch

from elucd_fast.samplers import DDPMSettings, DiTSettings, EDM2Settings, EDMSettings
from elucd_fast.schedules.families import (STEP_FAMILIES, adm_even_timesteps, adm_logsnr_timesteps,
                                           adm_rho_timesteps, adm_sigmas, ddim_leading_timesteps,
                                           ddim_trailing_timesteps, edm_rho_sigmas, family_steps, logsnr_sigmas,
                                           timesteps_near_sigmas)
from elucd_fast.schedules.gaussian_diffusion import named_beta_schedule

ABAR = np.cumprod(1 - named_beta_schedule("linear", 1000))


@pytest.mark.parametrize("n,rho", [(2, 7.0), (5, 7.0), (18, 7.0), (6, 3.0), (11, 1.0)])
def test_edm_rho_is_eq5_and_k_diffusions_karras_sigmas(n, rho):
    from k_diffusion.sampling import get_sigmas_karras

    ours = edm_rho_sigmas(n, 0.002, 80.0, rho)
    formula = [(80 ** (1 / rho) + i / (n - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(n)]
    assert len(ours) == n and all(a > b for a, b in zip(ours, ours[1:]))
    assert ours == pytest.approx(formula, rel=1e-13)
    karras = get_sigmas_karras(n, 0.002, 80.0, rho, device="cpu").double()[:-1]  # float32, a final 0
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), karras, rtol=1e-5, atol=2e-6)  # k-diffusion: float32


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_logsnr_is_even_in_log_sigma_and_k_diffusions_exponential(n):
    from k_diffusion.sampling import get_sigmas_exponential

    ours = logsnr_sigmas(n, 0.002, 80.0)
    assert ours[0] == 80.0 and ours[-1] == 0.002  # the ends exactly: the network's range
    steps = np.diff(np.log(ours))
    assert np.allclose(steps, (math.log(0.002) - math.log(80)) / (n - 1), rtol=1e-12)
    exponential = get_sigmas_exponential(n, 0.002, 80.0, device="cpu").double()[:-1]
    assert torch.allclose(torch.tensor(ours, dtype=torch.float64), exponential, rtol=1e-5)
    # logSNR-uniform is the rho -> infinity limit of the rho family.
    assert edm_rho_sigmas(n, 0.002, 80.0, 1e6) == pytest.approx(ours, rel=1e-4)


def test_one_level():
    assert edm_rho_sigmas(1, 0.002, 80.0, 7.0) == (80.0,) and logsnr_sigmas(1, 0.002, 80.0) == (80.0,)


@pytest.mark.parametrize("n", [2, 4, 10, 25, 250])
def test_even_and_leading_are_adms_respacings(n):
    from elucd_fast.schedules.gaussian_diffusion import space_timesteps

    assert adm_even_timesteps(n, 1000) == tuple(sorted(space_timesteps(1000, str(n)), reverse=True))
    assert adm_even_timesteps(n, 1000)[0] == 999 and adm_even_timesteps(n, 1000)[-1] == 0
    leading = ddim_leading_timesteps(n, 1000)
    assert leading == tuple(sorted(space_timesteps(1000, f"ddim{n}"), reverse=True))
    stride = leading[-2] - leading[-1]
    assert leading == tuple(range(0, 1000, stride))[::-1] and leading[-1] == 0
    assert stride == 1000 // n  # SPEC §10: s = T // N where that stride gives exactly N steps


def test_leading_and_even_values_and_adms_refusal():
    # Values of openai/guided-diffusion's own `space_timesteps` (checked against it for T = 100,
    # 1000, 4000 and every N while writing this).
    assert ddim_leading_timesteps(4, 1000) == (750, 500, 250, 0)  # the "DDIM-4" baseline of AutoDiffusion
    assert ddim_leading_timesteps(3, 1000) == (668, 334, 0)       # ADM's stride search: 1000 // 3 gives 4 steps
    assert ddim_leading_timesteps(7, 4000) == (3432, 2860, 2288, 1716, 1144, 572, 0)
    assert adm_even_timesteps(4, 1000) == (999, 666, 333, 0)
    assert adm_even_timesteps(6, 1000) == (999, 799, 599, 400, 200, 0)
    with pytest.raises(ValueError, match="cannot take exactly 999"):
        ddim_leading_timesteps(999, 1000)


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10, 50, 1000])
def test_trailing_is_the_formula_and_diffusers(n):
    from diffusers import DDIMScheduler

    ours = ddim_trailing_timesteps(n, 1000)
    assert ours == tuple(int(round(1000 - k * 1000 / n)) - 1 for k in range(n))
    assert ours[0] == 999 and len(set(ours)) == n
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    assert ours == tuple(scheduler.timesteps.tolist())


def test_diffusers_leading_differs_from_adms_only_by_its_offset():
    # diffusers' "leading" is ADM's ddimN (k * T // N) where that stride fits: same steps.
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
    scheduler.set_timesteps(10)
    assert tuple(scheduler.timesteps.tolist()) == ddim_leading_timesteps(10, 1000)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 20, 100, 500, 1000])
@pytest.mark.parametrize("family", ["logsnr", "rho"])
def test_adm_noise_level_families_give_distinct_descending_timesteps(family, n):
    steps = adm_logsnr_timesteps(n, ABAR) if family == "logsnr" else adm_rho_timesteps(n, ABAR, 7.0)
    assert len(steps) == n and all(a > b for a, b in zip(steps, steps[1:]))
    assert steps[0] == 999 and steps[-1] == 0
    if n == 1000:
        assert steps == tuple(range(999, -1, -1))


def test_timesteps_near_sigmas_takes_the_nearest_in_log_sigma():
    chain = adm_sigmas(ABAR)
    targets = logsnr_sigmas(6, float(chain[0]), float(chain[-1]))
    steps = timesteps_near_sigmas(targets, ABAR)
    for target, t in zip(targets, steps):
        nearest = int(np.argmin(np.abs(np.log(chain) - math.log(target))))
        assert t == nearest  # far apart levels: no collision, each the nearest
    # Levels closer together than the chain's steps still give distinct timesteps.
    crowded = timesteps_near_sigmas([chain[3] * 1.0001, chain[3], chain[3] * 0.9999], ABAR)
    assert len(set(crowded)) == 3 and list(crowded) == sorted(crowded, reverse=True)


def test_family_steps_for_every_sampler():
    edm = EDMSettings(num_steps=6)
    assert family_steps(edm, "rho", 6) == edm.step_sequence()
    assert family_steps(edm, "rho", 4, rho=3.0) == edm_rho_sigmas(4, 0.002, 80.0, 3.0)
    assert family_steps(EDM2Settings(), "logsnr", 5) == logsnr_sigmas(5, 0.002, 80.0)
    ddpm = DDPMSettings()
    assert family_steps(ddpm, "even", 25) == DDPMSettings(timestep_respacing="25").step_sequence()
    assert family_steps(ddpm, "leading", 25) == DDPMSettings(timestep_respacing="ddim25").step_sequence()
    assert family_steps(DiTSettings(), "trailing", 4) == (999, 749, 499, 249)
    cosine = DDPMSettings(beta_schedule="cosine", num_timesteps=400)
    assert family_steps(cosine, "logsnr", 5)[0] == 399
    for settings in (edm, ddpm):
        for name in STEP_FAMILIES:
            if STEP_FAMILIES[name].sigmas is None and settings is edm:
                continue
            assert settings.with_steps(family_steps(settings, name, 4)).step_sequence() == family_steps(settings, name, 4)


def test_family_steps_clamps_to_the_networks_range():
    class Net:
        sigma_min, sigma_max = 0.01, 20.0

    assert family_steps(EDMSettings(), "logsnr", 3, net=Net()) == logsnr_sigmas(3, 0.01, 20.0)


@pytest.mark.parametrize("call,match", [
    (lambda: family_steps(EDMSettings(), "cosine", 4), "step family: expected one of rho, logsnr, even"),
    (lambda: family_steps(EDMSettings(), "trailing", 4), "'trailing': only for ADM chains"),
    (lambda: family_steps(EDMSettings(), "logsnr", 4, rho=7.0), "rho: not a parameter of the 'logsnr' step family"),
    (lambda: family_steps(DDPMSettings(), "even", 1001), r"n \(steps\): must be an integer in \[2, 1000\]"),
    (lambda: edm_rho_sigmas(0, 0.002, 80.0, 7.0), r"n \(steps\): must be an integer >= 1"),
    (lambda: logsnr_sigmas(3, 80.0, 0.002), "need 0 < sigma_min < sigma_max"),
    (lambda: edm_rho_sigmas(3, 0.002, 80.0, 0.0), "rho: must be > 0"),
])
def test_bad_family_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_generate_step_family_flag(tmp_path):
    import json

    from click.testing import CliRunner

    from elucd_fast.cli import main

    outdir = tmp_path / "logsnr"
    result = CliRunner().invoke(main, ["generate", "--step-family", "logsnr", "--steps", "4", "--seeds", "0-3",
                                       "--outdir", str(outdir), "--no-progress", "--no-metrics"])
    assert result.exit_code == 0, result.output
    settings = json.loads((outdir / "run.json").read_text())["config"]["preset"]["settings"]
    assert settings["sigmas"] == list(logsnr_sigmas(4, 0.002, 80.0)) and settings["num_steps"] == 4
    for flags, message in ((["--step-family", "trailing"], "'trailing': only for ADM chains"),
                           (["--step-family", "rho", "--sigmas", "3,2"], "--step-family, --sigmas: both set the steps"),
                           (["--step-family", "even", "--preset", "digits-ddpm", "--timestep-respacing", "9"],
                            "--step-family, --timestep-respacing: both set the steps"),
                           (["--step-family", "cosine"], "Invalid value for '--step-family'")):
        bad = CliRunner().invoke(main, ["generate", "--outdir", str(tmp_path / "bad"), *flags])
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert not (tmp_path / "bad").exists()
