"""`viscpm experiment paint-mini`: VisCPM-Paint's MpM claim at toy scale: trained on English captions (and a small
translated share), it draws from Chinese prompts, because its text encoder is a bilingual pivot.

The pivot is mpm-mini's (`mpm_mini.train_pivot`, same vocabulary, config and seed). Around it a VisCPM-Paint
pipeline is built with this repository's classes: the pivot as the frozen text encoder, the bridge, a small
diffusers UNet working in the latent space of a small `AutoencoderKL` that is first trained here on easy-vqa's
training images (Stable Diffusion's VAE does not fit 32 px toy images). The bridge and the UNet are trained by
`viscpm train paint` on one caption per training image: English ("a red circle"), or for `translated_share` of
them Chinese ("一个红色的圆形"), as VisCPM-Paint-zhplus adds translated pairs to VisCPM-Paint-balance's English ones;
no Chinese caption shows one of HELD_OUT_SCENES. The evaluation draws every one of the world's 24 scenes from its
English caption and from its Chinese one, and a small classifier of colour and shape, trained on the dataset's own
labels, scores the images; the Chinese prompts of the held-out scenes are scored apart too.

Systems: `mpm` (the bilingual pivot) and `english_pivot` (baseline: the pivot pretrained on English text only).
The design and results: docs/paint-mini.md.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..conversion.export import staged_output
from ..training.paint import vae_pixels
from . import glossary as g
from . import mpm_mini

SYSTEMS = ("mpm", "english_pivot")
PIVOT_LANGUAGES = {"mpm": ("en", "zh"), "english_pivot": ("en",)}
PROMPT_LANGUAGES = ("en", "zh")  # of the evaluation prompts
SCENES = tuple((colour, shape) for colour in g.COLOURS for shape in g.SHAPES)
# scenes that no Chinese training caption shows, whatever `translated_share` is: one per colour, spread over the
# shapes, so every colour and every shape still has Chinese captions with other partners, and the evaluation can
# tell a model that composes the Chinese words from one that memorised 24 Chinese prompts
HELD_OUT_SCENES = tuple(
    (colour, shape)
    for colour_index, colour in enumerate(g.COLOURS)
    for shape_index, shape in enumerate(g.SHAPES)
    if (colour_index + shape_index) % len(g.SHAPES) == 0
)


@dataclass
class PaintMiniConfig:
    seed: int = 0
    pivot: mpm_mini.MiniConfig = field(default_factory=mpm_mini.MiniConfig)  # its pivot_* and text fields
    resolution: int = 32
    train_images: int | None = None  # None: every training image whose colour and shape are known
    batch_size: int = 64
    vae_steps: int = 1000
    vae_learning_rate: float = 1e-3
    # Stable Diffusion's 1e-6 weighs the KL against a reconstruction loss summed over pixels; this one is a mean
    vae_kl_weight: float = 1e-8
    vae: dict = field(
        default_factory=lambda: dict(
            block_out_channels=[32, 64, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
        )
    )
    paint_steps: int = 2500
    learning_rate: float = 1e-3
    token_dropout: float = 0.0  # `paint.token_dropout` of Paint training (docs/paint-mini.md)
    # of the training captions, written in Chinese instead of English: VisCPM-Paint-zhplus's translated pairs
    # (VisCPM-Paint-balance, and this experiment's zero-shot setting, is 0: English only); never of HELD_OUT_SCENES
    translated_share: float = 0.05
    unet: dict = field(
        default_factory=lambda: dict(
            block_out_channels=[64, 128],
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            layers_per_block=1,
            attention_head_dim=[4, 4],
            cross_attention_dim=64,
            use_linear_projection=True,
        )
    )
    classifier_steps: int = 1000
    inference_steps: int = 25
    guidance_scale: float = 4.0
    images_per_prompt: int = 8
    systems: tuple = SYSTEMS

    def __post_init__(self):
        if not 0 <= self.translated_share <= 0.5:
            raise ValueError(
                f"translated_share={self.translated_share} is not a share of the captions between 0 and 0.5: the "
                f"images of the held-out scenes (a third of them) keep their English captions"
            )


CONFIG = PaintMiniConfig()
QUICK = PaintMiniConfig(
    pivot=mpm_mini.QUICK,
    train_images=24,
    batch_size=4,
    vae_steps=2,
    paint_steps=2,
    classifier_steps=2,
    vae=dict(
        block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ),
    unet=dict(
        block_out_channels=[32, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        attention_head_dim=[2, 2],
        cross_attention_dim=16,
        use_linear_projection=True,
    ),
    inference_steps=2,
    images_per_prompt=1,
)


# ------------------------------------------------------------------------------------------------------- images


def labelled_images(split: str, resolution: int, limit: int | None = None, seed: int = 0):
    """easy-vqa's images of `split` whose scene is known: `(image ids, pixels, scene labels, scenes, paths)`; a
    scene's label is its index in `SCENES`. Pixels are prepared as Paint training prepares them (`vae_pixels`), as
    are the drawn images the classifier judges."""
    from PIL import Image

    scenes, _, paths = mpm_mini.load_world(split)
    image_ids = sorted(scenes)
    if limit is not None:
        image_ids = random.Random(seed).sample(image_ids, min(limit, len(image_ids)))
    images = [Image.open(paths[image_id]).convert("RGB") for image_id in image_ids]
    labels = torch.tensor([SCENES.index((scenes[i]["colour"], scenes[i]["shape"])) for i in image_ids])
    return image_ids, vae_pixels(images, resolution), labels, scenes, paths


def batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` random index batches over `count` items (each epoch a fresh permutation)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


# -------------------------------------------------------------------------------------------------- the VAE


def train_vae(config: PaintMiniConfig, pixels: torch.Tensor, log=mpm_mini.PROGRESS):
    """diffusers' `AutoencoderKL` trained on `pixels`: reconstruction MSE plus a small KL term, as Stable
    Diffusion's VAE (without its perceptual and adversarial losses, which flat toy shapes do not need). Its
    `scaling_factor` is set, as Stable Diffusion's was, to bring the latents to unit standard deviation."""
    from diffusers import AutoencoderKL

    torch.manual_seed(config.seed)
    vae = AutoencoderKL(sample_size=config.resolution, **config.vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    losses = []
    for step, index in enumerate(batches(len(pixels), config.batch_size, config.vae_steps, generator)):
        posterior = vae.encode(pixels[index]).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, pixels[index]) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, config.vae_steps // 10) == 0:
            log(f"  vae step {step + 1}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    vae.eval()
    with torch.no_grad():
        posteriors = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
    latents = torch.cat([posterior.mean for posterior in posteriors])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    # how much of a sampled latent (what Paint training encodes) is the image and how much the posterior's noise
    noise = torch.cat([posterior.std for posterior in posteriors]).mean().item()
    return vae, {"losses": losses, "latent_std": latents.std().item(), "posterior_std": noise}


# ------------------------------------------------------------------------------------------------ the classifier


def train_classifier(config: PaintMiniConfig, pixels: torch.Tensor, labels: torch.Tensor):
    """A small ResNet (transformers' `ResNetForImageClassification`) over the 24 scenes, trained on the dataset's
    own labels: the judge of the drawn images."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(config.seed)
    classifier = ResNetForImageClassification(
        ResNetConfig(
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            num_labels=len(SCENES),
            downsample_in_first_stage=False,
        )
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(config.seed)
    classifier.train()
    for index in batches(len(pixels), config.batch_size, config.classifier_steps, generator):
        loss = classifier(pixel_values=pixels[index], labels=labels[index]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()


@torch.no_grad()
def classify(classifier, pixels: torch.Tensor) -> torch.Tensor:
    chunks = [pixels[start : start + 256] for start in range(0, len(pixels), 256)]
    return torch.cat([classifier(pixel_values=chunk).logits.argmax(-1) for chunk in chunks])


def scores(predicted: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    """Accuracy of colour, of shape, and of both, for scene labels."""
    shapes = len(g.SHAPES)
    return {
        "colour": (predicted // shapes == expected // shapes).float().mean().item(),
        "shape": (predicted % shapes == expected % shapes).float().mean().item(),
        "both": (predicted == expected).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------------- the pipeline


def paint_folder(config: PaintMiniConfig, pivot, tokenizer, vae, output: Path) -> Path:
    """A VisCPM-Paint pipeline around the pivot (its weights copied), the trained VAE and a fresh UNet, saved: the
    input of `viscpm train paint`."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from ..modeling.configuration_viscpm_paint import VisCPMPaintConfig
    from ..modeling.modeling_viscpm_paint import VisCPMPaintTextEncoder
    from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    torch.manual_seed(config.seed)
    latent_size = config.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet_config = {
        "sample_size": latent_size,
        "in_channels": vae.config.latent_channels,
        "out_channels": vae.config.latent_channels,
        **config.unet,
    }
    paint_config = VisCPMPaintConfig(text_config=pivot.config, unet_config=unet_config, max_prompt_length=64)
    text_encoder = VisCPMPaintTextEncoder(paint_config)
    text_encoder.llm.load_state_dict(pivot.model.state_dict())
    unet = UNet2DConditionModel.from_config(unet_config)
    # Stable Diffusion's noise schedule; DDIM draws (training uses DDPM over the same schedule)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipeline = VisCPMPaintPipeline(text_encoder.eval(), tokenizer, unet, scheduler, vae=vae)
    pipeline.save_pretrained(output)
    return output


def write_captions(folder: Path, scenes: dict, paths: dict, image_ids, config: PaintMiniConfig) -> dict[str, int]:
    """One caption per training image, as `viscpm train paint` reads them: English, or Chinese for a random
    `translated_share` of the images outside HELD_OUT_SCENES. Returns the number of captions per language."""
    eligible = [i for i in image_ids if (scenes[i]["colour"], scenes[i]["shape"]) not in HELD_OUT_SCENES]
    translated = set(random.Random(config.seed).sample(eligible, round(config.translated_share * len(image_ids))))
    languages = ["zh" if i in translated else "en" for i in image_ids]
    records = [{"image": paths[i], "caption": g.describe(lang, **scenes[i])} for i, lang in zip(image_ids, languages)]
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    (folder / "captions.jsonl").write_text(text, "utf-8")
    return {language: languages.count(language) for language in ("en", "zh")}


def train_paint(config: PaintMiniConfig, model: Path, captions: Path, output: Path) -> dict:
    """`viscpm train paint`: the bridge and the whole UNet from step 0 (the real Paint stages its unfreezing
    because its UNet starts trained; this one starts from scratch)."""
    paint = {
        "resolution": config.resolution,
        "caption_dropout": 0.1,
        "token_dropout": config.token_dropout,
        "unfreeze": [{"step": 0, "train": ["bridge", "unet"]}],
    }
    return mpm_mini.run_stage(
        "paint",
        model,
        [{"path": str(captions), "kind": "caption"}],
        config.paint_steps,
        config,
        output,
        paint=paint,
        max_length=32,
    )


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def draw(pipeline, language: str, config: PaintMiniConfig) -> tuple[list, torch.Tensor]:
    """`images_per_prompt` images of every scene from its caption in `language`, with fixed seeds: the images
    (scene-major) and their expected scene labels."""
    prompts = [g.describe(language, colour, shape) for colour, shape in SCENES]
    generators = [
        torch.Generator().manual_seed(config.seed + sample)
        for _ in prompts
        for sample in range(config.images_per_prompt)
    ]
    images = pipeline(
        prompts,
        num_images_per_prompt=config.images_per_prompt,
        num_inference_steps=config.inference_steps,
        guidance_scale=config.guidance_scale,
        generator=generators,
    ).images
    expected = torch.arange(len(SCENES)).repeat_interleave(config.images_per_prompt)
    return images, expected


def evaluate(model_dir: Path, classifier, config: PaintMiniConfig) -> tuple[dict, dict]:
    """Accuracy (colour, shape, both) of the drawn images per prompt language, plus `zh_held_out`: the Chinese
    prompts of HELD_OUT_SCENES alone; and the images."""
    from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    pipeline = VisCPMPaintPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    accuracy, drawn = {}, {}
    for language in PROMPT_LANGUAGES:
        images, expected = draw(pipeline, language, config)
        predicted = classify(classifier, vae_pixels(images, config.resolution))
        accuracy[language] = scores(predicted, expected)
        drawn[language] = images
        if language == "zh":
            held_out = torch.tensor([SCENES[label] in HELD_OUT_SCENES for label in expected])
            accuracy["zh_held_out"] = scores(predicted[held_out], expected[held_out])
    return accuracy, drawn


def save_grid(drawn: dict[str, list], config: PaintMiniConfig, path: Path) -> None:
    """The first drawn image of every scene: a row per prompt language, a column per scene."""
    from PIL import Image

    size = config.resolution
    grid = Image.new("RGB", (size * len(SCENES), size * len(drawn)), "white")
    for row, images in enumerate(drawn.values()):
        for column in range(len(SCENES)):
            grid.paste(images[column * config.images_per_prompt], (column * size, row * size))
    grid.save(path)


# ----------------------------------------------------------------------------------------------------- the run


def run(output: Path, config: PaintMiniConfig, log=mpm_mini.PROGRESS) -> dict:
    """VAE, classifier, and for every system: pivot, Paint training, evaluation. Writes `results.json`, the trained
    pipelines and a grid of drawn images per system to `output`; returns the results."""
    from ..modeling.tokenization_cpmbee import CpmBeeTokenizer

    started = time.perf_counter()

    def progress(message: str) -> None:
        log(f"[{time.perf_counter() - started:5.0f} s] {message}")

    train_ids, train_pixels, train_labels, scenes, paths = labelled_images(  # without easy-vqa: an error, no folder
        "train", config.resolution, config.train_images, config.seed
    )
    _, test_pixels, test_labels, _, _ = labelled_images("test", config.resolution)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = CpmBeeTokenizer(vocab_file=str(mpm_mini.write_vocabulary(output / "vocab.txt")))
    progress(f"VAE on {len(train_ids)} training images at {config.resolution} px")
    vae, vae_report = train_vae(config, train_pixels, log)
    vae_losses = vae_report.pop("losses")
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(test_pixels[:256]).latent_dist.mean).sample
    progress("scene classifier")
    classifier = train_classifier(config, train_pixels, train_labels)
    results = {
        "config": asdict(config),
        "split": {"train_images": len(train_ids), "test_images": len(test_labels)},
        "vae": {
            "final_loss": sum(vae_losses[-50:]) / len(vae_losses[-50:]),
            **vae_report,
            "test_reconstruction_mse": F.mse_loss(reconstruction, test_pixels[:256]).item(),
        },
        "classifier": {
            "test": scores(classify(classifier, test_pixels), test_labels),
            "test_reconstructed": scores(classify(classifier, reconstruction), test_labels[:256]),
        },
        "systems": {},
    }
    progress(f"classifier on held-out images: {results['classifier']}")
    captions = write_captions(output / "data", scenes, paths, train_ids, config)
    results["captions"] = captions
    for system in config.systems:
        languages = PIVOT_LANGUAGES[system]
        progress(f"{system}: pivot on {'+'.join(languages)} text")
        pivot, _ = mpm_mini.train_pivot(config.pivot, tokenizer, languages, output / system / "pivot")
        base = paint_folder(config, pivot, tokenizer, vae, output / system / "base")
        progress(f"{system}: Paint on {captions['en']} English and {captions['zh']} Chinese captions")
        trained = train_paint(config, base, output / "data" / "captions.jsonl", output / system / "paint")
        accuracy, drawn = evaluate(Path(trained["saved"]), classifier, config)
        save_grid(drawn, config, output / f"{system}.png")
        progress(f"{system}: accuracy {accuracy}")
        results["systems"][system] = {"accuracy": accuracy, "model": trained["saved"], "losses": trained["losses"]}
    results["seconds"] = round(time.perf_counter() - started)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n", "utf-8")
    return results


def report_table(results: dict) -> str:
    """Colour / shape / both per system and prompt language, and for the Chinese prompts of the scenes that no
    training caption showed in Chinese."""
    lines = [
        "| system | English prompt: colour / shape / both | Chinese prompt: colour / shape / both | Chinese, held-out "
        "scenes: colour / shape / both |",
        "|---|---|---|---|",
    ]
    for system, entry in results["systems"].items():
        cells = [
            " / ".join(f"{100 * entry['accuracy'][column][key]:.1f}" for key in ("colour", "shape", "both"))
            for column in (*PROMPT_LANGUAGES, "zh_held_out")
        ]
        lines.append(f"| {system} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    columns = {"en": "en", "zh": "zh", "zh_held_out": "zh, held-out scenes"}
    both = {
        system: {label: entry["accuracy"][column]["both"] for column, label in columns.items()}
        for system, entry in results["systems"].items()
    }
    mpm_mini.bar_plot(both, "paint-mini: drawn scenes with colour and shape right", "prompt", path)


def install_default(results: dict, system: str, destination: Path) -> Path:
    """Save a trained system's pipeline to `destination` (the package's shipped default) without the remote-code
    copies of the model files (the package has them)."""
    from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    pipeline = VisCPMPaintPipeline.from_pretrained(results["systems"][system]["model"])
    with staged_output(destination, overwrite=True) as staging:
        pipeline.save_pretrained(staging, remote_code=False)
    return destination


__all__ = ["CONFIG", "QUICK", "PaintMiniConfig", "run", "report_table", "plot", "install_default"]
