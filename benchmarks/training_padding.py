"""Training step time of VisCPM-Chat at mpm-mini's sizes: CPM-Bee batches padded to `data.max_length` (the original
collater's fixed width) against padded to the batch's longest sample (what `viscpm train` does), with a Qwen2 pivot
of the same shape (its collator pads to the longest) for comparison.

Samples are built as `viscpm train` builds them (`ChatPrompts`, `chat_samples`) from mpm-mini's English question
templates and captions about random scenes; the images are random pixels (their content does not change the time).
Each row times forward, backward and an AdamW step of the whole model, batch 32, after warm-up steps. About a minute
on 2 cores:

    python benchmarks/training_padding.py
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def chat_model(kind: str, folder: Path):
    """mpm-mini's VisCPM-Chat on a random pivot of `kind`, and its processor."""
    from transformers import AutoModel, AutoProcessor

    from viscpm.experiments import mpm_mini
    from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

    config = mpm_mini.CONFIG
    vocab = mpm_mini.vocabulary([])
    if kind == "cpmbee":
        vocab_file = folder / "vocab.txt"
        vocab_file.write_text("\n".join(vocab) + "\n", "utf-8")
        tokenizer = CpmBeeTokenizer(str(vocab_file))
    else:
        tokenizer = mpm_mini.qwen2_tokenizer(vocab)
    torch.manual_seed(0)
    pivot = mpm_mini.pivot_model(config, tokenizer, kind)
    mpm_mini.chat_folder(config, pivot, tokenizer, folder / kind)
    model = AutoModel.from_pretrained(folder / kind, dtype=torch.float32, trust_remote_code=True)
    return model.train(), AutoProcessor.from_pretrained(folder / kind, trust_remote_code=True)


def training_samples(processor, count: int, kind: str, max_length: int) -> list[dict]:
    """`count` stage-1 captions or stage-2 questions about random scenes, as `viscpm train` prepares them."""
    from viscpm.experiments import glossary as g
    from viscpm.training.data import ChatPrompts, chat_samples, png_bytes

    rng = random.Random(0)
    to_sample = chat_samples(processor, max_length)
    size = processor.image_processor.size["height"]
    samples = []
    while len(samples) < count:
        scene = {"colour": rng.choice(g.COLOURS), "shape": rng.choice(g.SHAPES)}
        if kind == "caption":
            text = g.describe("en", **scene)
        else:
            question_kind, templates = rng.choice(list(g.EN_TEMPLATES.items()))
            slots = {"colour": rng.choice(g.COLOURS), "shape": rng.choice(g.SHAPES)}
            question = g.fill(rng.choice(templates), "en", **slots)
            answer = g.answer_in("en", g.answer_for(question_kind, scene, slots))
            text = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        pixels = np.random.default_rng(len(samples)).integers(0, 256, (size, size, 3), dtype=np.uint8)
        image = png_bytes(PIL.Image.fromarray(pixels))
        for prompt in ChatPrompts(kind, processor)(text, rng):
            samples.append(to_sample(prompt) | {"image": image})
    return samples[:count]


def step_time(model, batches: list[dict], warmup: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def pivot_rows(pivot: str, folder: Path, args) -> list[tuple]:
    """(pivot, samples, padding, tokens per sample, batch width, ms per step) for each padding of `pivot`."""
    from viscpm.training.data import ImageTextCollator, PivotCollator

    model, processor = chat_model(pivot, folder)

    def pixels(image):
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    if pivot == "cpmbee":
        collators = {
            f"fixed width {args.max_length}": ImageTextCollator(
                processor.tokenizer, args.max_length, pixels, pad_to_longest=False
            ),
            "longest in batch": ImageTextCollator(processor.tokenizer, args.max_length, pixels),
        }
    else:
        collators = {"longest in batch": PivotCollator(processor.pad_token_id, pixels)}
    count = args.batch_size * (args.steps + args.warmup)
    rows = []
    for stage in ("caption", "conversation"):
        samples = training_samples(processor, count, stage, args.max_length)
        chunks = [samples[i : i + args.batch_size] for i in range(0, count, args.batch_size)]
        tokens = statistics.mean(len(sample["input_ids"]) for sample in samples)
        for padding, collate in collators.items():
            batches = [collate(chunk) for chunk in chunks]
            width = statistics.mean(batch["input_ids"].shape[1] for batch in batches)
            rows.append((pivot, stage, padding, tokens, width, 1000 * step_time(model, batches, args.warmup)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96, help="data.max_length, as mpm-mini's stages set it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = [row for pivot in ("cpmbee", "qwen2") for row in pivot_rows(pivot, Path(folder), args)]

    fixed = {(pivot, stage): ms for pivot, stage, padding, *_, ms in rows if padding.startswith("fixed")}
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, median of {args.steps} steps")
    print("| pivot | samples | padding | tokens per sample | batch width | ms per step | CPM-Bee fixed width / this |")
    print("|---|---|---|---|---|---|---|")
    for pivot, stage, padding, tokens, width, milliseconds in rows:
        ratio = fixed[("cpmbee", stage)] / milliseconds
        print(f"| {pivot} | {stage} | {padding} | {tokens:.1f} | {width:.1f} | {milliseconds:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
