import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from elucd_fast.guidance import calibrated_objective
from elucd_fast.guidance.clip import CLIPGuidance, CLIPImageInput, load_clip, resize_center_crop
from elucd_fast.rng import StackedRandomGenerator
from elucd_fast.samplers.ddpm import ddpm_sampler
from test_edm_sampler import count_syncs_after_first_step
from tiny_models import TinyEpsModel, rel_err

PROMPT, CONTRAST = "a red cat", ("a blue dog", "a green frog")
CLIP_SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (transformers layout: config, weights, processor, tokenizer) on disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=CLIP_SIZE, patch_size=8),
        projection_dim=8)
    CLIPModel(config).save_pretrained(str(folder))
    image_processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                                         crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def _images(batch=4, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_logits_equal_clip_logits_per_image(clip):
    """l_k = exp(logit_scale) * cos(image, prompt_k): CLIPModel's own logits_per_image."""
    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST)
    x = _images(size=CLIP_SIZE)
    pixels = ((x + 1) / 2 - torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)) \
        / torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    tokens = processor.tokenizer([PROMPT, *CONTRAST], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(pixel_values=pixels, **tokens).logits_per_image
        ours = guide.classifier(x)
        image = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        text = F.normalize(model.text_projection(model.text_model(**tokens).pooler_output), dim=-1)
    assert ours.shape == (4, 3)
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(ours, model.logit_scale.exp() * image @ text.T) < 1e-5


def test_objective_gradient_and_default_temperatures(clip):
    model, processor = clip
    alone = CLIPGuidance(model, processor, PROMPT)
    contrasted = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST, joint_temperature=2.0)
    assert alone.marginal_temperature == 0.0 and contrasted.marginal_temperature == 2.0
    x, labels = _images(size=16).double(), torch.zeros(4, dtype=torch.long)
    for guide in (alone, contrasted):
        guide.double()
        grad, objective = guide(x, labels)
        logits = guide.classifier(x)
        assert torch.allclose(objective, calibrated_objective(logits, labels, guide.joint_temperature,
                                                              guide.marginal_temperature), rtol=1e-12)
        h = 1e-6
        for seed in range(3):  # directional derivatives against central differences
            v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            numeric = (guide(x + h * v, labels)[1] - guide(x - h * v, labels)[1]) / (2 * h)
            assert rel_err((grad * v).flatten(1).sum(1), numeric) < 1e-6
    assert torch.allclose(alone(x, labels)[1], alone.classifier(x)[:, 0], rtol=1e-12)  # J = l_target


def test_preprocessing_resizes_and_crops():
    wide = torch.arange(2 * 3 * 8 * 16, dtype=torch.float32).view(2, 3, 8, 16)
    assert resize_center_crop(wide, 8).equal(wide[..., 4:12])
    assert resize_center_crop(wide, 4).shape == (2, 3, 4, 4)
    prep = CLIPImageInput(CLIP_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = _images(size=CLIP_SIZE)
    assert prep(x).equal(x)  # (x + 1) / 2 normalised with mean = std = 0.5 is x again


def test_cutouts_are_deterministic_per_run_and_batch_independent(clip):
    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST, cutouts=3, cutout_seed=5)
    x, labels = _images(size=24), torch.zeros(4, dtype=torch.long)

    def run(images):
        guide.check_input((3, 24, 24), labels[: len(images)], "cpu")
        return [guide(images, labels[: len(images)]) for _ in range(2)]

    first, again, single = run(x), run(x), run(x[2:3])
    for (g1, j1), (g2, j2) in zip(first, again):
        assert torch.equal(g1, g2) and torch.equal(j1, j2)
    for (g_batch, j_batch), (g_one, j_one) in zip(first, single):
        assert rel_err(g_one[0], g_batch[2]) < 1e-5 and abs(float(j_one[0] - j_batch[2])) < 1e-5
    assert not torch.equal(first[0][1], first[1][1])  # new boxes at every call
    centre = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST)
    assert not torch.allclose(centre(x, labels)[1], first[0][1])


def test_other_resolution_interpolates_position_embeddings(clip):
    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT, image_size=48)
    guide.check_input((3, 16, 16), torch.zeros(2, dtype=torch.long), "cpu")
    grad, objective = guide(_images(2), torch.zeros(2, dtype=torch.long))
    assert grad.shape == (2, 3, 16, 16) and torch.isfinite(grad).all() and objective.shape == (2,)


def test_bad_prompts_and_labels(clip):
    model, processor = clip
    with pytest.raises(ValueError, match="prompts"):
        CLIPGuidance(model, processor, "")
    with pytest.raises(ValueError, match="prompts"):
        CLIPGuidance(model, processor, [])
    with pytest.raises(ValueError, match="cutouts"):
        CLIPGuidance(model, processor, PROMPT, cutouts=-1)
    with pytest.raises(TypeError, match="clip_model"):
        CLIPGuidance(nn.Linear(2, 2), processor, PROMPT)
    guide = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST)
    with pytest.raises(ValueError, match="target prompt"):
        guide.check_input((3, 16, 16), torch.tensor([0, 1]), "cpu")


def test_open_clip_style_model():
    """Duck-typed open_clip models: `visual`, `encode_text`, `logit_scale`, a callable tokenizer."""

    class FakeOpenCLIP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.visual = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 6))
            self.visual.image_size = (16, 16)
            self.token_embedding = nn.EmbeddingBag(64, 6)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))

        def encode_text(self, tokens):
            return self.token_embedding(tokens)

    def tokenize(prompts):
        return torch.tensor([[ord(c) % 64 for c in p[:6].ljust(6)] for p in prompts])

    model = FakeOpenCLIP()
    guide = CLIPGuidance(model, tokenize, PROMPT, contrast_prompts=CONTRAST[:1], softplus_beta=3.0)
    x = _images(size=16)
    with torch.no_grad():
        image = F.normalize(guide.classifier.image_encoder(guide.classifier.preprocess(x)), dim=-1)
        text = F.normalize(model.encode_text(tokenize([PROMPT, CONTRAST[0]])), dim=-1)
        assert rel_err(guide.classifier(x), 100.0 * image @ text.T) < 1e-5
    assert guide.report["relu_modules_replaced"] == 1


def test_load_clip_errors(clip_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_clip(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a CLIP model"):
        load_clip(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        load_clip(clip_dir)


def test_drops_into_ddpm_sampler_and_raises_the_clip_objective(clip):
    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST, marginal_temperature=0.5)
    eps_model = TinyEpsModel(num_classes=None)
    seeds = list(range(6))
    noise = StackedRandomGenerator("cpu", seeds).randn([len(seeds), 3, 16, 16])
    targets = torch.zeros(len(seeds), dtype=torch.long)

    def final_objective(**kwargs):
        out = ddpm_sampler(eps_model, noise, targets, num_timesteps=100, timestep_respacing="10",
                           randn_like=StackedRandomGenerator("cpu", seeds).randn_like, **kwargs)
        return guide(out.clamp(-1, 1), targets)[1]

    plain = final_objective(model_class_conditional=False)
    guided = final_objective(guidance=guide, classifier_scale=300.0, gamma_factor=0.3)
    gain = guided - plain
    print(f"CLIP J gain per seed {gain.tolist()}")
    assert bool((gain > 0).all())


def test_no_host_sync_with_cutouts(clip):
    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT, contrast_prompts=CONTRAST, cutouts=2)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    syncs = count_syncs_after_first_step(lambda cb: ddpm_sampler(
        TinyEpsModel(num_classes=None), noise, torch.zeros(2, dtype=torch.long), num_timesteps=100,
        timestep_respacing="4", guidance=guide, classifier_scale=10.0, callback=cb))
    assert syncs == []


def test_drops_into_dit_sampler_with_prompt_targets(clip):
    from elucd_fast.models.dit import DiT
    from elucd_fast.samplers.dit import dit_sampler

    model, processor = clip
    guide = CLIPGuidance(model, processor, PROMPT)
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10).eval()
    decoder = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    calls = []
    out = dit_sampler(dit, torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), decoder=decoder, guidance=guide,
                      guidance_labels=torch.zeros(2, dtype=torch.long), timestep_respacing="3",
                      callback=lambda s: calls.append(s["J"]))
    assert out.shape == (2, 4, 8, 8) and all(j is not None and j.shape == (2,) for j in calls)


# The `sample` command, with the ADM loader replaced by a tiny eps-model.

def _cli(monkeypatch, clip_dir, tmp_path, *extra, conditional=False):
    from elucd_fast.cli import main
    import elucd_fast.cli.sample as sample_cli

    network = tmp_path / "256x256_diffusion.pt"
    network.write_bytes(b"stand-in")
    loaded = []

    def fake_load(path, **flags):
        loaded.append((path, flags))
        model = TinyEpsModel(num_classes=1000 if conditional else None)
        model.image_size = 16
        return model

    monkeypatch.setattr(sample_cli, "load_adm_model", fake_load)
    args = ["sample", "--prompt", PROMPT, "--network", str(network), "--clip", str(clip_dir), "--seeds", "0-2",
            "--outdir", str(tmp_path / "out"), "--steps", "4", "--num-timesteps", "100", "--batch-size", "2",
            "--no-progress", *extra]
    return CliRunner().invoke(main, args), loaded


def test_cli_sample_writes_images(monkeypatch, clip_dir, tmp_path):
    result, loaded = _cli(monkeypatch, clip_dir, tmp_path, "--contrast", CONTRAST[0], "--scale", "50",
                          "--cutouts", "2")
    assert result.exit_code == 0, result.output
    assert loaded and loaded[0][1]["use_fp16"] is False
    pngs = sorted(p.name for p in (tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 3
    config = json.loads((tmp_path / "out" / "run.json").read_text())
    assert PROMPT in json.dumps(config) and CONTRAST[0] in json.dumps(config)


def test_cli_sample_conditional_model_gets_imagenet_labels(monkeypatch, clip_dir, tmp_path):
    result, _ = _cli(monkeypatch, clip_dir, tmp_path, "--class", "207", conditional=True)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("extra,message", [
    (("--prompt", " "), "prompt"),
    (("--seeds", "3-1"), "seeds"),
    (("--scale", "nan"), "classifier_scale"),
    (("--class", "5"), "class"),
    (("--clip", "/nonexistent/clip"), "not a directory"),
])
def test_cli_sample_bad_input_exits_2(monkeypatch, clip_dir, tmp_path, extra, message):
    result, _ = _cli(monkeypatch, clip_dir, tmp_path, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
