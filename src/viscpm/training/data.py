"""Training data for MpM: records from `datasets`, turned into training samples for the pivot (CPM-Bee's structured
samples, or another pivot's chat-template prompts with labelled answers), mixed by ratio.

Two record kinds, each read from jsonl / json / csv / parquet files (an image path or the image's bytes in a column)
or webdataset `.tar` shards:

* **caption**: an image and its caption (stage 1, and Paint). The prompt is the original's: a caption request drawn
  from `CAPTION_PROMPTS_EN` (or `_ZH` for a Chinese caption), or from the source's own `caption_requests` (captions
  in another language), and the caption as the answer. Captions joined by `<cap_sep>` are alternatives: one is drawn
  per record.
* **conversation**: an image and a LLaVA-style conversation (`[{"from": "human", "value": ...}, {"from": "gpt", ...}]`,
  the layout of LLaVA-Instruct-150K and its translated variants). Round i becomes one sample whose `context` holds
  the earlier rounds as `User: ...\\nAI: ...\\n`, as the original item builder writes them; questions lose their
  `<image>` marker and are not escaped, answers are (the original's behaviour, kept for parity).

A record that cannot become a sample (missing or unreadable image, image under `min_image_size`, malformed
conversation, empty text, sample over `max_length`) is dropped and counted by reason; `DataReport` keeps the counts
and the first few record indices of each, for the end-of-run summary. Nothing in a malformed record can stop a run.

Preparation runs once through `datasets.Dataset.map` (cached by `datasets`); images are validated there and stored
as bytes, and decoded again into pixels only when a batch is collated.
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import PIL.Image
import torch

from ..modeling.image_processing_viscpm_chat import ImageTooLargeError, InvalidImageError, load_image
from ..modeling.structured_cpmbee import CpmBeeCollator, encode_structured
from ..modeling.tokenization_cpmbee import CpmBeeTokenizer

# The original's caption requests (VisCPM finetune/utils/prompts.py), typos included: they are the prompt format the
# released models were trained on.
CAPTION_PROMPTS_EN = (
    "Describe the image concisely",
    "Provide a brief description of the given image",
    "Offer a succinct explanation of the picture presented",
    "Summarize the visual content of the image",
    "Share a conciseinter pretation of the image provided",
    "Present a compact description of the photo’s key features",
    "Relay a brief and clear account of the picture shown",
    "Render a clear and concise summary of the photo",
    "Write a terse but informative summary of the picture",
    "Create a compact narrative representing the image presented",
)
CAPTION_PROMPTS_ZH = (
    "简明扼要地描述图像",
    "提供给定图像的简短描述",
    "对所示的图片进行简要的解释",
    "总结图像的视觉内容",
    "对所提供的图像进行简要的解释",
    "简明扼要并清楚地说明所示图片",
    "对这张照片作一个简明扼要的总结",
    "写一篇简洁但内容丰富的图片摘要",
    "创造一个紧凑的叙事来代表所呈现的图像",
)
CAPTION_SEPARATOR = "<cap_sep>"
CHINESE_CHARACTER = re.compile("[\u4e00-\u9fff]")
RECORD_KINDS = ("caption", "conversation")
# columns of a prepared sample: the per-token structure (lists of ints), the relation table, the image
SAMPLE_COLUMNS = (*CpmBeeCollator.per_token_keys, "segment_rel", "image_bound", "image")
REPORT_EXAMPLES = 5  # record indices kept per skip reason


class SkippedRecord(Exception):
    """A record that cannot become a training sample; the message is the reason it is counted under."""


@dataclass
class SourceSpec:
    """One data source of a training config (`data.sources[i]`).

    path: a file (`.jsonl`, `.json`, `.csv`, `.parquet`), a glob of them, or a glob of webdataset `.tar` shards.
    kind: `caption` or `conversation`.
    image_column / text_column: the record's image (a path, relative to `image_root` unless absolute, bytes, a
        `datasets` image or a PIL image) and its caption or conversation (a list of turns or its JSON text).
        Defaults: `image` and `caption` (`conversations` for conversations); webdataset shards: `jpg` / `png` and
        `txt` / `json`, whichever the shard has.
    weight: the source's share of the mixture (normalised over all sources).
    caption_requests: what a caption of this source is asked with, one drawn per record (captions in a language
        other than English or Chinese: requests in that language). Default: the original's English requests, or
        its Chinese ones for a caption in Chinese characters.
    """

    path: str
    kind: str = "caption"
    image_column: str | None = None
    text_column: str | None = None
    image_root: str | None = None
    weight: float = 1.0
    name: str | None = None
    caption_requests: list[str] | None = None

    def __post_init__(self):
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"data source {self.path!r}: kind must be one of {RECORD_KINDS}, got {self.kind!r}")
        if not self.weight > 0:
            raise ValueError(f"data source {self.path!r}: weight must be positive, got {self.weight}")
        requests = self.caption_requests
        if requests is not None and (
            self.kind != "caption"
            or isinstance(requests, str)
            or not requests
            or not all(isinstance(request, str) and request.strip() for request in requests)
        ):
            raise ValueError(
                f"data source {self.path!r}: caption_requests must be a non-empty list of requests (strings) in the "
                f"captions' language, on a caption source; got {requests!r} on a {self.kind} source"
            )
        _builder_and_files(self.path)  # a config's missing file or unknown type is reported before any training
        self.name = self.name or Path(self.path).stem


@dataclass
class DataReport:
    """What preparation did with each source's records: kept samples and skipped records by reason."""

    records: Counter = field(default_factory=Counter)
    samples: Counter = field(default_factory=Counter)
    skipped: dict = field(default_factory=lambda: defaultdict(Counter))
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add_skipped(self, source: str, reason: str, record_index: int) -> None:
        self.skipped[source][reason] += 1
        examples = self.examples[f"{source}: {reason}"]
        if len(examples) < REPORT_EXAMPLES:
            examples.append(record_index)

    def as_dict(self) -> dict:
        return {
            "records": dict(self.records),
            "samples": dict(self.samples),
            "skipped": {source: dict(reasons) for source, reasons in self.skipped.items()},
            "skipped_examples (record indices)": dict(self.examples),
        }

    def summary(self) -> str:
        lines = []
        for source, records in self.records.items():
            skipped = sum(self.skipped[source].values())
            lines.append(f"{source}: {records} records -> {self.samples[source]} samples, {skipped} records skipped")
            for reason, count in sorted(self.skipped[source].items()):
                lines.append(f"    {count} x {reason} (records {self.examples[f'{source}: {reason}']}...)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ loading


def _builder_and_files(path: str) -> tuple[str, list[str] | str]:
    suffix = Path(path.replace("*", "x")).suffix.lower()
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tar": "webdataset"}
    if suffix not in builders:
        raise ValueError(
            f"data source {path!r}: unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet or webdataset "
            ".tar shards"
        )
    if "*" not in path and not Path(path).exists():
        raise FileNotFoundError(f"data source {path!r} does not exist")
    if "*" in path and "://" not in path and not glob.glob(path, recursive=True):
        raise FileNotFoundError(f"data source {path!r} matches no file")
    return builders[suffix], path


def load_records(spec: SourceSpec) -> datasets.Dataset:
    """The source's records as a `datasets.Dataset`, images left undecoded."""
    builder, files = _builder_and_files(spec.path)
    try:
        records = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as error:  # noqa: BLE001  (the loader's own errors are many; name the source)
        raise ValueError(f"data source {spec.path!r} could not be read as {builder}: {error}") from error
    for column, feature in records.features.items():
        if isinstance(feature, datasets.Image):  # keep bytes; validation and decoding happen below
            records = records.cast_column(column, datasets.Image(decode=False))
    return records


def _column(spec: SourceSpec, record: Mapping, which: str) -> str:
    given = spec.image_column if which == "image" else spec.text_column
    if given:
        return given
    if which == "image":
        candidates = ("image", "jpg", "jpeg", "png", "webp")
    else:
        candidates = ("caption", "txt", "text") if spec.kind == "caption" else ("conversations", "json")
    for name in candidates:
        if name in record:
            return name
    raise ValueError(
        f"data source {spec.path!r}: no {which} column among {list(record)}; name it with "
        f"`{which}_column` in the source's config"
    )


def image_bytes(value: Any, image_root: str | None) -> bytes:
    """The encoded image a record holds, however it holds it; raises SkippedRecord when there is none."""
    if value is None or value == "":
        raise SkippedRecord("missing image")
    if isinstance(value, Mapping):  # a `datasets.Image(decode=False)` cell
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
        if not value:
            raise SkippedRecord("missing image")
    if isinstance(value, PIL.Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = Path(value)
    if image_root and not path.is_absolute():
        path = Path(image_root) / path
    try:
        return path.read_bytes()
    except OSError:
        raise SkippedRecord("missing image") from None


def open_image(data: bytes) -> PIL.Image.Image:
    """A record's image, decoded as the processor decodes images (the same pixel limit), or the record is skipped."""
    try:
        return load_image(data)
    except ImageTooLargeError:
        raise SkippedRecord("image over the pixel limit") from None
    except InvalidImageError:
        raise SkippedRecord("unreadable image") from None


def png_bytes(image: PIL.Image.Image) -> bytes:
    """An image as the training data hold images: encoded bytes, as `datasets` stores them (`open_image` reads them)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- records -> samples


def pick_caption(caption: Any, rng: random.Random) -> str:
    """One of the `<cap_sep>`-joined alternatives of a caption (the original draws one per use)."""
    if not isinstance(caption, str) or not caption.strip():
        raise SkippedRecord("empty caption")
    return rng.choice(caption.split(CAPTION_SEPARATOR))


@dataclass(frozen=True)
class Turn:
    """One training sample of another pivot than CPM-Bee: the prompt the processor builds for ``question`` after
    ``context`` at inference, and ``answer`` as the target."""

    question: str
    answer: str
    context: str = ""


def caption_request(caption: str, rng: random.Random, requests: Sequence[str] | None = None) -> str:
    """One of `requests`, or of the original's caption requests in the caption's language."""
    if requests is None:
        requests = CAPTION_PROMPTS_ZH if CHINESE_CHARACTER.search(caption) else CAPTION_PROMPTS_EN
    return rng.choice(requests)


def caption_prompts(
    caption: Any,
    rng: random.Random,
    query_num: int,
    tokenizer: CpmBeeTokenizer,
    requests: Sequence[str] | None = None,
) -> list[dict]:
    """The original item builder's caption sample: a caption request (`caption_request`), the caption as the
    answer."""
    caption = pick_caption(caption, rng)
    return [
        {
            "image": tokenizer.unk_token * query_num,
            "input": caption_request(caption, rng, requests),
            "<ans>": tokenizer.escape(caption),
        }
    ]


def conversation_turns(conversation: Any) -> list[Turn]:
    """The rounds of a LLaVA-style conversation, each with the earlier ones as `User: ...\nAI: ...\n` context."""
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError:
            raise SkippedRecord("conversation is not valid JSON") from None
    if (
        not isinstance(conversation, list)
        or not conversation
        or len(conversation) % 2
        or not all(isinstance(turn, Mapping) and isinstance(turn.get("value"), str) for turn in conversation)
        or [turn.get("from") for turn in conversation] != ["human", "gpt"] * (len(conversation) // 2)
    ):
        raise SkippedRecord("malformed conversation (expected alternating human / gpt turns)")
    turns, context = [], ""
    for index in range(0, len(conversation), 2):
        question = conversation[index]["value"].replace("<image>", "").strip()
        answer = conversation[index + 1]["value"]
        if not question or not answer.strip():
            raise SkippedRecord("empty question or answer in a conversation")
        turns.append(Turn(question, answer, context))
        context += f"User: {question}\nAI: {answer.replace('<image>', '').strip()}\n"
    return turns


def conversation_prompts(conversation: Any, processor) -> list[dict]:
    """One CPM-Bee sample per round of a LLaVA-style conversation: the prompt `processor` builds for that turn at
    inference (`VisCPMChatProcessor.build_prompt`, earlier rounds as context), the escaped answer as the target."""
    return [
        processor.build_prompt(turn.question, turn.context) | {"<ans>": processor.tokenizer.escape(turn.answer)}
        for turn in conversation_turns(conversation)
    ]


@dataclass
class ChatPrompts:
    """A record's text -> VisCPM-Chat training prompts: CPM-Bee's structured prompts, or another pivot's turns."""

    kind: str
    processor: Any  # VisCPMChatProcessor
    caption_requests: Sequence[str] | None = None  # the source's own (`SourceSpec.caption_requests`)

    def __call__(self, text: Any, rng: random.Random) -> list[dict] | list[Turn]:
        if self.processor.pivot_is_cpmbee:
            if self.kind == "caption":
                return caption_prompts(
                    text, rng, self.processor.query_num, self.processor.tokenizer, self.caption_requests
                )
            return conversation_prompts(text, self.processor)
        if self.kind == "caption":
            caption = pick_caption(text, rng)
            return [Turn(caption_request(caption, rng, self.caption_requests), caption)]
        return conversation_turns(text)


def paint_prompts(text: Any, rng: random.Random) -> list[dict]:
    """A caption -> VisCPM-Paint's structured prompt, as the pipeline encodes prompts."""
    from ..modeling.pipeline_viscpm_paint import paint_prompt

    return [paint_prompt(pick_caption(text, rng))]


def training_sample(tokenizer: CpmBeeTokenizer, prompt: dict, max_length: int) -> dict:
    """A structured prompt as a training sample (lists of ints), or SkippedRecord when it is over-long."""
    item = encode_structured(tokenizer, prompt).to_sample()
    if len(item["input_ids"]) > max_length:
        raise SkippedRecord(f"over max_length={max_length} tokens")
    return {key: item[key].tolist() for key in (*CpmBeeCollator.per_token_keys, "segment_rel")} | {
        "image_bound": item["image_bound"].tolist()
    }


@dataclass
class StructuredSamples:
    """CPM-Bee's structured prompts -> training samples (the per-token structure, the relation table)."""

    tokenizer: CpmBeeTokenizer
    max_length: int
    columns = SAMPLE_COLUMNS

    def __call__(self, prompt: dict) -> dict:
        return training_sample(self.tokenizer, prompt, self.max_length)

    def caption_written_in(self, prompt: dict) -> dict:
        """A caption prompt's sample with its caption (the answer) written in the image slot instead of the image
        placeholders: `image_bound` then spans the caption's tokens."""
        return self(prompt | {"image": prompt["<ans>"]})


@dataclass
class PivotSamples:
    """Another pivot's turns -> training samples: the prompt as the processor builds it at inference, then the
    answer and the end-of-sequence token, which alone are labelled."""

    processor: Any  # VisCPMChatProcessor
    max_length: int
    columns = ("input_ids", "labels", "image_bound", "image")

    def __call__(self, turn: Turn) -> dict:
        return self.with_image_slot(turn, [self.processor.image_placeholder_id] * self.processor.query_num)

    def caption_written_in(self, turn: Turn) -> dict:
        """A caption turn's sample with its caption (the answer) written in the image slot instead of the image
        placeholders: `image_bound` then spans the caption's tokens."""
        return self.with_scene_written(turn, turn.answer)

    def with_scene_written(self, turn: Turn, scene: str) -> dict:
        """``turn``'s sample with ``scene`` as text in the image slot. The scene is tokenized apart from the text
        around it, as the image's placeholders are: tokenized as one text, its last word and the question's first
        can fuse into one unknown word ("triangleWhat") and the scene is lost."""
        return self.with_image_slot(turn, self.processor.tokenizer(scene, add_special_tokens=False)["input_ids"])

    def with_image_slot(self, turn: Turn, slot_ids: list[int]) -> dict:
        prompt, image_start = self.processor.prompt_ids(turn.question, turn.context)
        prompt[image_start : image_start + self.processor.query_num] = slot_ids
        sample = answer_labelled(self.processor.tokenizer, prompt, turn.answer)
        if len(sample["input_ids"]) > self.max_length:
            raise SkippedRecord(f"over max_length={self.max_length} tokens")
        return sample | {"image_bound": [[image_start, image_start + len(slot_ids)]]}


TEACHER_PREFIX = "teacher_"  # the columns and batch entries of the caption-distillation targets' inputs


def split_teacher(entries: Mapping) -> tuple[dict, dict]:
    """A sample's or batch's own entries, and its teacher's (`teacher_`-prefixed ones, the prefix removed)."""
    own = {name: value for name, value in entries.items() if not name.startswith(TEACHER_PREFIX)}
    return own, {name.removeprefix(TEACHER_PREFIX): value for name, value in entries.items() if name not in own}


@dataclass
class CaptionDistillationSamples:
    """Caption samples with, beside each, its teacher: the same sample with the caption written in the image slot
    (`teacher_`-prefixed columns), which the frozen pivot reads to give the targets of stage 1's
    `caption_distillation` (`viscpm.training.chat.caption_distillation_loss`)."""

    samples: StructuredSamples | PivotSamples

    @property
    def columns(self) -> tuple[str, ...]:
        text_columns = tuple(name for name in self.samples.columns if name != "image")
        return (*self.samples.columns, *(TEACHER_PREFIX + name for name in text_columns))

    def __call__(self, prompt) -> dict:
        teacher = self.samples.caption_written_in(prompt)
        return self.samples(prompt) | {TEACHER_PREFIX + name: value for name, value in teacher.items()}


def answer_labelled(tokenizer, prompt: list[int], answer: str) -> dict:
    """``prompt`` then ``answer`` and the end token, which alone are labelled (the prompt's labels are -100)."""
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer_ids, "labels": [-100] * len(prompt) + answer_ids}


def chat_samples(processor, max_length: int) -> StructuredSamples | PivotSamples:
    """How VisCPM-Chat training turns its pivot's prompts into samples."""
    if processor.pivot_is_cpmbee:
        return StructuredSamples(processor.tokenizer, max_length)
    return PivotSamples(processor, max_length)


@dataclass
class SamplePreparer:
    """`datasets.Dataset.map(batched=True, with_indices=True)` function: records -> samples (``samples`` encodes the
    prompts ``make_prompts`` gives), plus a `skipped` row (reason, no sample) for every record that yields none."""

    spec: SourceSpec
    samples: StructuredSamples | PivotSamples
    make_prompts: Callable[[Any, random.Random], list]
    min_image_size: int = 0
    rounds: str = "all"
    seed: int = 0

    def record_samples(self, record: Mapping, index: int) -> list[dict]:
        rng = random.Random(self.seed * 1_000_003 + index)  # per record: the same samples whatever the batching
        prompts = self.make_prompts(record[_column(self.spec, record, "text")], rng)
        if self.rounds == "first":
            prompts = prompts[:1]
        data = image_bytes(record[_column(self.spec, record, "image")], self.spec.image_root)
        image = open_image(data)
        if min(image.size) < self.min_image_size:
            raise SkippedRecord(f"image smaller than min_image_size={self.min_image_size}")
        samples, over_long = [], None
        for prompt in prompts:
            try:
                samples.append(self.samples(prompt) | {"image": data})
            except SkippedRecord as reason:  # the original skips an over-long round and keeps the others
                over_long = reason
        if not samples:
            raise over_long
        return samples

    def __call__(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        columns = {name: [] for name in (*self.samples.columns, "record", "skipped")}
        for position, index in enumerate(indices):
            record = {name: values[position] for name, values in batch.items()}
            try:
                samples, reason = self.record_samples(record, index), None
            except SkippedRecord as skipped:
                samples, reason = [], str(skipped)
            for sample in samples or [None]:
                for name in self.samples.columns:
                    columns[name].append(sample[name] if sample else None)
                columns["record"].append(index)
                columns["skipped"].append(reason)
        return columns


def prepare_source(preparer: SamplePreparer, records: datasets.Dataset, report: DataReport) -> datasets.Dataset:
    name = preparer.spec.name
    prepared = records.map(
        preparer,
        batched=True,
        with_indices=True,
        remove_columns=records.column_names,
        desc=f"preparing {name}",
    )
    report.records[name] += len(records)
    for reason, index in zip(prepared["skipped"], prepared["record"]):
        if reason is not None:
            report.add_skipped(name, reason, index)
    kept = prepared.filter(lambda reason: reason is None, input_columns="skipped")
    report.samples[name] += len(kept)
    return kept.remove_columns(["skipped", "record"])


def mix_sources(sources: Sequence[datasets.Dataset], weights: Sequence[float], seed: int) -> datasets.Dataset:
    """One dataset drawing from each source with probability proportional to its weight, until every source has
    been seen whole (`datasets.interleave_datasets`, "all_exhausted")."""
    if len(sources) == 1:
        return sources[0]
    empty = [index for index, source in enumerate(sources) if len(source) == 0]
    if empty:
        raise ValueError(f"data sources {empty} have no usable sample: see the preparation summary")
    total = sum(weights)
    return datasets.interleave_datasets(
        list(sources),
        probabilities=[weight / total for weight in weights],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


def build_training_data(
    specs: Sequence[SourceSpec],
    samples: StructuredSamples | PivotSamples,
    prompts_for: Callable[[SourceSpec], Callable[[Any, random.Random], list]],
    min_image_size: int = 0,
    rounds: str = "all",
    seed: int = 0,
) -> tuple[datasets.Dataset, DataReport]:
    """Every source prepared (`prompts_for(spec)` turns its records' texts into prompts, `samples` those into
    samples) and mixed."""
    if not specs:
        raise ValueError("the config names no data source (data.sources)")
    if rounds not in ("all", "first"):
        raise ValueError(f"data.conversation_rounds must be 'all' or 'first', got {rounds!r}")
    report = DataReport()
    prepared = [
        prepare_source(
            SamplePreparer(spec, samples, prompts_for(spec), min_image_size, rounds, seed),
            load_records(spec),
            report,
        )
        for spec in specs
    ]
    if sum(len(source) for source in prepared) == 0:
        raise ValueError(f"no record of the data sources gave a training sample:\n{report.summary()}")
    return mix_sources(prepared, [spec.weight for spec in specs], seed), report


# ------------------------------------------------------------------------------------------------------ batching


@dataclass
class ImageTextCollator:
    """Prepared samples -> a model batch: the CPM-Bee training collator for the text, `image_transform` (a PIL image
    -> a `(3, H, W)` tensor) for the pixels. Padded to the batch's longest sample, as `PivotCollator` pads (the same
    loss as the original's fixed `max_length`, for less compute); `pad_to_longest=False` gives the original's batch."""

    tokenizer: CpmBeeTokenizer
    max_length: int
    image_transform: Callable[[PIL.Image.Image], Any]
    pad_to_longest: bool = True

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        batch = CpmBeeCollator(self.tokenizer, self.max_length, self.pad_to_longest)(rows)
        batch.pop("pixel_values", None)
        batch["pixel_values"] = pixel_batch(rows, self.image_transform)
        return batch


@dataclass
class CaptionDistillationCollator:
    """`CaptionDistillationSamples` -> the model batch of ``collator`` plus the teacher's text batch (``text_collator``
    over the `teacher_` columns), its entries `teacher_`-prefixed, `teacher_image_bound` the written captions'."""

    collator: Callable[[Sequence[Mapping]], dict]
    text_collator: Callable[[Sequence[Mapping]], dict]

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        student_rows, teacher_rows = zip(*map(split_teacher, rows))
        teacher = self.text_collator(teacher_rows)
        teacher["image_bound"] = torch.tensor([row["image_bound"] for row in teacher_rows]).reshape(len(rows), -1, 2)
        return self.collator(student_rows) | {TEACHER_PREFIX + name: value for name, value in teacher.items()}


def pixel_batch(rows: Sequence[Mapping], image_transform: Callable[[PIL.Image.Image], Any]) -> torch.Tensor:
    return torch.stack([image_transform(open_image(row["image"])) for row in rows])


# `data.image_augmentation`'s choices: the transposes one is drawn from (None: the image as it is), uniformly. With
# the identity, PIL's seven transposes are the eight symmetries of the square: every flip and quarter turn
IMAGE_AUGMENTATIONS = {
    "horizontal_flip": (None, PIL.Image.Transpose.FLIP_LEFT_RIGHT),
    "dihedral": (None, *PIL.Image.Transpose),
}


@dataclass
class RandomlyTransposed:
    """`image_transform` after one of `transposes` drawn at random (torch's generator, which the Trainer seeds): an
    augmentation for images whose text does not depend on their orientation (no "left of", no written words)."""

    image_transform: Callable[[PIL.Image.Image], Any]
    transposes: tuple

    def __call__(self, image: PIL.Image.Image):
        transpose = self.transposes[int(torch.randint(len(self.transposes), ()))]
        return self.image_transform(image if transpose is None else image.transpose(transpose))


@dataclass
class PivotCollator:
    """`PivotSamples` -> a model batch for another pivot: padded on the right (labels with -100; the model's
    positions follow the attention mask), the pixels through `image_transform` (None: text only, as in a pivot's
    own pretraining)."""

    pad_token_id: int
    image_transform: Callable[[PIL.Image.Image], Any] | None

    def __call__(self, rows: Sequence[Mapping]) -> dict:
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, :length] = torch.tensor(row["input_ids"])
            labels[index, :length] = torch.tensor(row["labels"])
            attention_mask[index, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.image_transform is not None:
            batch["image_bound"] = torch.tensor([row["image_bound"] for row in rows])
            batch["pixel_values"] = pixel_batch(rows, self.image_transform)
        return batch


def chat_collator(processor, max_length: int, image_transform, caption_distillation: bool = False):
    """How VisCPM-Chat training batches its samples: CPM-Bee's structured batches or another pivot's padded ones,
    with the pixels through ``image_transform``; with ``caption_distillation``, each with its teacher's text batch
    (`CaptionDistillationCollator`)."""
    if processor.pivot_is_cpmbee:
        collator = ImageTextCollator(processor.tokenizer, max_length, image_transform)
        text_collator = CpmBeeCollator(processor.tokenizer, max_length, pad_to_longest=True)
    else:
        collator = PivotCollator(processor.pad_token_id, image_transform)
        text_collator = PivotCollator(processor.pad_token_id, None)
    return CaptionDistillationCollator(collator, text_collator) if caption_distillation else collator
