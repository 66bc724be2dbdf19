# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""CPM-Bee's structured input format, and the batches built from it for generation and for training.

CPM-Bee reads a nested dict of strings, for example

    {"image": "<unk>" * 64, "context": "", "question": "What is in this image?", "<ans>": ""}

Every key and every string value is a *segment* `[<s>] + tokens + [</s>]`, laid out in pre-order after a `<root>`
segment. Tokens only attend to positions inside their own segment by distance; across segments the model sees a
bucket of the tree relation between the two segments (`segment_rel`). The values under the top-level `<ans>` key are
the answers: their segments have no `</s>` and are not context (`context` is False), i.e. they are to be predicted.
The value of the top-level `image` key holds one placeholder token per image query; `image_bound` locates them.

Special tokens outside the vocabulary (`<ans_1>`, `<option_3>`) and out-of-vocabulary text are embedded as their base
token (`<ans>`, `<option>`, `<unk>`) plus a sub-index `input_id_subs` (a rotation of the embedding) that tells apart
the different texts that share a base token within one input.
"""

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence

import torch

from .configuration_cpmbee import CROSS_SAMPLE_BUCKET
from .modeling_cpmbee import CPMBEE_PER_TOKEN_INPUTS
from .tokenization_cpmbee import CpmBeeTokenizer, is_special_token_text

ANSWER_KEY = "<ans>"
IMAGE_KEY = "image"
# Label value ignored by the loss.
IGNORE_INDEX = -100
ANSWER_PLACEHOLDER = re.compile(r"<ans_(\d+)>")


def rel_to_bucket(n_up: int, n_down: int, max_depth: int = 8) -> int:
    """
    Bucket of the tree relation between two segments whose lowest common ancestor is `n_up` levels above the first
    and `n_down` levels above the second (both already clamped to `max_depth - 1`).
    """
    bucket = n_up * max_depth + n_down
    # Bucket 0 is the segment itself; all others move up by one to keep `CROSS_SAMPLE_BUCKET` free.
    return bucket if bucket == 0 else bucket + CROSS_SAMPLE_BUCKET


@dataclasses.dataclass
class CpmBeeExtStates:
    """
    What one encoding knows about the tokens outside the vocabulary, shared by the inputs encoded together.

    Args:
        ext_table (`dict[int, str]`):
            Ext id (`vocab_size + k`, see `CpmBeeTokenizer.encode_with_ext_table`) -> text of the token.
        token_id_table (`dict[str, dict[int, int]]`):
            Base token (`<unk>`, `<ans>`, `<option>`, ...) -> {ext id -> sub-index}, in order of first appearance.
    """

    ext_table: dict[int, str] = dataclasses.field(default_factory=dict)
    token_id_table: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CpmBeeSegments:
    """
    One structured input, encoded. All tensors are `torch.long` except `context` (`torch.bool`).

    Args:
        input_ids (`torch.Tensor` of shape `(seq_len,)`):
            Token ids; tokens outside the vocabulary are replaced by their base token.
        input_id_subs (`torch.Tensor` of shape `(seq_len,)`):
            Sub-index of each token among the texts sharing its base token (0 for vocabulary tokens).
        context (`torch.Tensor` of shape `(seq_len,)`):
            True for given tokens, False for the tokens of answer segments (to be predicted).
        segment_ids (`torch.Tensor` of shape `(seq_len,)`):
            Segment of each token, in pre-order (segment 0 is `<root>`).
        segment_rel (`torch.Tensor` of shape `(num_segments * num_segments,)`):
            Flattened matrix of relation buckets: entry `i * num_segments + j` relates segment `i` to segment `j`.
        num_segments (`int`):
            Number of segments.
        ext_states ([`CpmBeeExtStates`]):
            Ext table and sub-index table after this input, to continue encoding related inputs with.
        image_bound (`torch.Tensor` of shape `(num_images, 2)`):
            `[start, end)` of the placeholder tokens of each image value (the top-level `image` key).
    """

    input_ids: torch.Tensor
    input_id_subs: torch.Tensor
    context: torch.Tensor
    segment_ids: torch.Tensor
    segment_rel: torch.Tensor
    num_segments: int
    ext_states: CpmBeeExtStates
    image_bound: torch.Tensor

    def to_sample(self) -> dict[str, torch.Tensor]:
        """This input as one sample for [`CpmBeeCollator`], laid out as the original item builder made it."""
        return {
            "input_ids": self.input_ids,
            "input_id_subs": self.input_id_subs,
            "context": self.context,
            "segment_ids": self.segment_ids,
            "segment_rel": self.segment_rel,
            # A training sample is a single input: no in-context samples, so one relation table at offset 0.
            "segment_rel_offset": torch.zeros_like(self.input_ids),
            "sample_ids": torch.zeros_like(self.input_ids),
            "num_segments": torch.full_like(self.input_ids, self.num_segments),
            "image_bound": self.image_bound,
        }


@dataclasses.dataclass
class _Segment:
    text: str
    # Segment ids from `<root>` down to this segment: the depth of a segment is `len(path) - 1`.
    path: tuple[int, ...]
    is_answer: bool = False
    is_image: bool = False


def _flatten_tree(data, shuffle_answer: random.Random | None) -> list[_Segment]:
    """Lists the segments of `data` in pre-order: each key, then its value (a string, or the keys of a dict)."""
    segments = [_Segment("<root>", path=(0,))]

    def visit(node, parent_path: tuple[int, ...], where: str, is_answer: bool, is_image: bool):
        if isinstance(node, str):
            segments.append(_Segment(node, parent_path + (len(segments),), is_answer, is_image))
            return
        if not isinstance(node, Mapping):
            raise TypeError(
                f"CPM-Bee input {where} is a {type(node).__name__} ({node!r}); every value must be a str or a dict "
                "of them. Convert it with str() or nest it as a dict."
            )
        items = list(node.items())
        if is_answer and shuffle_answer is not None:
            # Training augmentation: the order of the answer's fields carries no meaning.
            shuffle_answer.shuffle(items)
        is_top_level = len(parent_path) == 1
        for key, value in items:
            if not isinstance(key, str):
                raise TypeError(f"CPM-Bee input {where} has the key {key!r}; keys must be str.")
            key_path = parent_path + (len(segments),)
            # Keys are context even inside the answer: only the answer's string values are predicted.
            segments.append(_Segment(key, key_path))
            visit(
                value,
                key_path,
                f"{where}[{key!r}]",
                is_answer=is_answer or (is_top_level and key == ANSWER_KEY),
                is_image=is_image or (is_top_level and key == IMAGE_KEY),
            )

    visit(data, (0,), "data", is_answer=False, is_image=False)
    return segments


def _segment_relations(segments: list[_Segment], max_depth: int) -> torch.Tensor:
    """`segment_rel[i * n + j]` = bucket of (levels from segment i up to the common ancestor, same for j)."""
    relations = []
    for first in segments:
        for second in segments:
            shared = 0
            while shared < min(len(first.path), len(second.path)) and first.path[shared] == second.path[shared]:
                shared += 1
            n_up = min(len(first.path) - shared, max_depth - 1)
            n_down = min(len(second.path) - shared, max_depth - 1)
            relations.append(rel_to_bucket(n_up, n_down, max_depth=max_depth))
    return torch.tensor(relations, dtype=torch.long)


def _base_token(text: str, unk_token: str) -> str:
    """`<ans_1>` -> `<ans>`, `<option>` -> `<option>`, any out-of-vocabulary text -> `<unk>`."""
    if not is_special_token_text(text):
        return unk_token
    return "<" + text[1:-1].split("_", 1)[0] + ">"


def encode_structured(
    tokenizer: CpmBeeTokenizer,
    data: Mapping | str,
    ext_states: CpmBeeExtStates | None = None,
    max_depth: int = 8,
    shuffle_answer: random.Random | None = None,
) -> CpmBeeSegments:
    """
    Encodes a structured CPM-Bee input (the original `convert_data_to_id`).

    Args:
        tokenizer ([`CpmBeeTokenizer`]):
            The tokenizer; string values are CPM-Bee markup (escape literal text with `tokenizer.escape`).
        data (`dict` or `str`):
            Nested dict whose leaves are strings. The top-level `<ans>` key holds the answers, the top-level `image`
            key the image placeholders.
        ext_states ([`CpmBeeExtStates`], *optional*):
            States of an earlier input to continue from (the same ext ids and sub-indices for the same texts). Its
            `token_id_table` is updated in place and its `ext_table` is not (it is copied), as in the original.
        max_depth (`int`, *optional*, defaults to 8):
            Tree distances are clamped to `max_depth - 1` in `segment_rel`.
        shuffle_answer (`random.Random`, *optional*):
            If given, shuffles the fields of dicts under `<ans>` (training augmentation); `None` keeps the order.
    """
    segments = _flatten_tree(data, shuffle_answer)
    states = ext_states if ext_states is not None else CpmBeeExtStates()
    ext_table, token_id_table = states.ext_table, states.token_id_table

    input_ids, input_id_subs, context, segment_ids, image_bound = [], [], [], [], []
    for segment_id, segment in enumerate(segments):
        ids, ext_table = tokenizer.encode_with_ext_table(segment.text, ext_table)
        subs = []
        for position, token_id in enumerate(ids):
            if token_id not in ext_table:
                subs.append(0)
                continue
            base = _base_token(ext_table[token_id], str(tokenizer.unk_token))
            if base not in tokenizer.encoder:
                raise ValueError(
                    f"Invalid token {ext_table[token_id]} in {segment.text!r}: its base token {base} is not in the "
                    "vocabulary. Escape a literal `<` as `<<` (tokenizer.escape) if it is not meant as a special token."
                )
            subs_of_base = token_id_table.setdefault(base, {})
            # Sub-indices count from 0: the first text of a base token is embedded exactly like the base token.
            subs.append(subs_of_base.setdefault(token_id, len(subs_of_base)))
            ids[position] = tokenizer.encoder[base]
        start = len(input_ids)
        input_ids += [tokenizer.bos_token_id] + ids
        input_id_subs += [0] + subs
        if not segment.is_answer:
            # Answers stay open: generation continues them, and in training `</s>` is their last target.
            input_ids.append(tokenizer.eos_token_id)
            input_id_subs.append(0)
        end = len(input_ids)
        context += [not segment.is_answer] * (end - start)
        segment_ids += [segment_id] * (end - start)
        if segment.is_image:
            image_bound.append((start + 1, end - 1))

    return CpmBeeSegments(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        input_id_subs=torch.tensor(input_id_subs, dtype=torch.long),
        context=torch.tensor(context, dtype=torch.bool),
        segment_ids=torch.tensor(segment_ids, dtype=torch.long),
        segment_rel=_segment_relations(segments, max_depth),
        num_segments=len(segments),
        ext_states=CpmBeeExtStates(ext_table, token_id_table),
        image_bound=torch.tensor(image_bound, dtype=torch.long).reshape(-1, 2),
    )


def _pad_rows(rows: Sequence[torch.Tensor], length: int, left: bool, fill: int = 0) -> torch.Tensor:
    padded = torch.full((len(rows), length), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        if left:
            padded[index, length - len(row) :] = row
        else:
            padded[index, : len(row)] = row
    return padded


def _stack_image_bounds(bounds: Sequence[torch.Tensor]) -> torch.Tensor:
    """`(batch, max_images, 2)`; samples with fewer images get empty `[0, 0)` ranges."""
    max_images = max(len(bound) for bound in bounds)
    stacked = torch.zeros(len(bounds), max_images, 2, dtype=torch.long)
    for index, bound in enumerate(bounds):
        stacked[index, : len(bound)] = bound
    return stacked


@dataclasses.dataclass
class CpmBeeGenerationBatch:
    """
    A batch of prompts ready for generation.

    Args:
        model_inputs (`dict[str, torch.Tensor]`):
            The model's inputs, left padded: `input_ids`, `input_id_subs`, `attention_mask`, `context`,
            `segment_ids`, `num_segments`, `segment_rel_offset`, `segment_rel`, `sample_ids` (all `(batch, seq_len)`
            except `segment_rel`, `(batch, max_num_segments**2)`, right padded), `ext_table_ids` and
            `ext_table_sub` (`(batch, ext_size)`, the batch's ext table repeated on every row) and `image_bound`
            (`(batch, max_images, 2)`, in padded positions).
        predict_segments (`list[list[tuple[int, int]]]`):
            Per sample, `(segment id, answer number)` of each answer to generate, in prompt order.
        answer_placeholders (`list[list[list[str]]]`):
            Per sample, the key path under `<ans>` of answer number `k + 1`.
        ext_tables (`list[dict[int, str]]`):
            Per sample, the text of the ids it may generate beyond the vocabulary (batch ext ids `vocab_size + k`, and
            plain base ids such as `<unk>` standing for the sample's first text of that base): pass it as
            `ext_table=` to `CpmBeeTokenizer.decode`.
        prompts (`list[dict]`):
            The prompts as encoded: each answer value replaced by its `<ans_N>` placeholder.
    """

    model_inputs: dict[str, torch.Tensor]
    predict_segments: list[list[tuple[int, int]]]
    answer_placeholders: list[list[list[str]]]
    ext_tables: list[dict[int, str]]
    prompts: list[dict]


def _put_answer_placeholders(prompt: Mapping) -> tuple[dict, list[list[str]]]:
    """Replaces every answer value by `<ans_N>` (N counting from 1), returning the new prompt and the key paths."""
    if not isinstance(prompt, Mapping) or ANSWER_KEY not in prompt:
        raise ValueError(
            f"A CPM-Bee prompt is a dict with a top-level {ANSWER_KEY!r} key for the answer to generate, e.g. "
            f"{{..., 'question': ..., {ANSWER_KEY!r}: ''}}; got {prompt!r}."
        )
    paths = []

    def replace(node, path):
        if isinstance(node, Mapping):
            return {key: replace(value, path + [key]) for key, value in node.items()}
        paths.append(path)
        return f"<ans_{len(paths)}>"

    # The answer keeps its position among the keys, which matters for the segment order.
    return {**prompt, ANSWER_KEY: replace(prompt[ANSWER_KEY], [])}, paths


def _segments_to_predict(tokenizer: CpmBeeTokenizer, segments: CpmBeeSegments) -> list[tuple[int, int]]:
    """`(segment id, answer number)` of each answer segment, read from its `<ans_N>` placeholder."""
    ext_table = segments.ext_states.ext_table
    answer_number_of_sub = {}
    for ext_id, sub in segments.ext_states.token_id_table.get(ANSWER_KEY, {}).items():
        placeholder = ANSWER_PLACEHOLDER.fullmatch(ext_table[ext_id])
        if placeholder:
            answer_number_of_sub[sub] = int(placeholder.group(1))
    is_answer = ~segments.context & (segments.input_ids == tokenizer.ans_token_id)
    return [
        (segment_id, answer_number_of_sub[sub])
        for segment_id, sub in zip(segments.segment_ids[is_answer].tolist(), segments.input_id_subs[is_answer].tolist())
    ]


def _sample_ext_table(
    tokenizer: CpmBeeTokenizer, ext_states: CpmBeeExtStates, batch_ext_index: dict[tuple[int, int], int]
) -> dict[int, str]:
    """Maps the ids a sample may generate beyond its vocabulary to their text, adding them to the batch ext table."""
    sample_ext_table = {}
    for base, subs in ext_states.token_id_table.items():
        if base == ANSWER_KEY:
            # Placeholders only mark the segments to generate; the model never emits them.
            continue
        base_id = tokenizer.encoder[base]
        for ext_id, sub in subs.items():
            if sub == 0:
                # Sub 0 embeds exactly like the base token, so the plain base id stands for it.
                sample_ext_table[base_id] = ext_states.ext_table[ext_id]
            else:
                index = batch_ext_index.setdefault((base_id, sub), len(batch_ext_index))
                sample_ext_table[tokenizer.vocab_size + index] = ext_states.ext_table[ext_id]
    return sample_ext_table


def _drop_predicted_tokens(segments: CpmBeeSegments) -> CpmBeeSegments:
    """Keeps the context tokens only: generation starts each answer segment with its `<s>`."""
    keep = segments.context
    kept_before = torch.cumsum(keep, 0) - keep.long()
    return dataclasses.replace(
        segments,
        input_ids=segments.input_ids[keep],
        input_id_subs=segments.input_id_subs[keep],
        context=segments.context[keep],
        segment_ids=segments.segment_ids[keep],
        # The original keeps the positions from before the removal, which only differ for an image after an answer.
        image_bound=kept_before[segments.image_bound],
    )


def _start_answer(tokenizer: CpmBeeTokenizer, row: CpmBeeSegments, answer_segment: int) -> CpmBeeSegments:
    """Appends the answer's `<s>`, as an answer token of its segment: the first token a decoder feeds."""

    def append(tensor, value):
        return torch.cat([tensor, torch.tensor([value], dtype=tensor.dtype)])

    return dataclasses.replace(
        row,
        input_ids=append(row.input_ids, tokenizer.bos_token_id),
        input_id_subs=append(row.input_id_subs, 0),
        context=append(row.context, False),
        segment_ids=append(row.segment_ids, answer_segment),
    )


def _suppressed_ids(tokenizer: CpmBeeTokenizer, sample_ext_table: dict[int, str], batch_ext_size: int) -> list[int]:
    """Ids the original's beam search never lets a sample generate: `<unk>`, unless it stands for an out-of-vocabulary
    string of the sample, and the batch ext-table entries of other samples."""
    suppressed = [] if tokenizer.unk_token_id in sample_ext_table else [tokenizer.unk_token_id]
    ext_ids = range(tokenizer.vocab_size, tokenizer.vocab_size + batch_ext_size)
    return suppressed + [ext_id for ext_id in ext_ids if ext_id not in sample_ext_table]


def build_generation_batch(
    tokenizer: CpmBeeTokenizer, prompts: Sequence[Mapping], max_depth: int = 8, start_answer: bool = True
) -> CpmBeeGenerationBatch:
    """
    Encodes prompts for generation (the original `VLLMCPMBeeGeneration._process_list`).

    Each prompt is a structured input with a top-level `<ans>` key; its values (text, if any, is ignored) become
    `<ans_N>` placeholders. The tokens to predict (`context` False: the `<s>` and `<ans>` of each answer segment) are
    removed, so that generation starts each answer segment with `<s>`; the prompt itself is all context.

    With `start_answer` (for transformers' `generate()`), each prompt ends with the `<s>` of its answer segment, an
    answer token (context 0): the token the original feeds as its first decoding step. A prompt must then have one
    answer. `model_inputs["suppress_token_ids"]` lists, per row, the ids the original never lets that sample generate
    (-1 pads); `CpmBeeGenerationMixin.generate` takes it.

    Unlike the original, which takes `image_bound` from the last sample only and in unpadded positions,
    `image_bound` is per sample and in padded positions; both agree for a batch of one.
    """
    if not prompts:
        raise ValueError("build_generation_batch needs at least one prompt.")
    batch_ext_index: dict[tuple[int, int], int] = {}
    rows, predict_segments, answer_placeholders, ext_tables, filled_prompts = [], [], [], [], []
    for prompt in prompts:
        prompt, placeholders = _put_answer_placeholders(prompt)
        segments = encode_structured(tokenizer, prompt, max_depth=max_depth)
        to_predict = _segments_to_predict(tokenizer, segments)
        if not to_predict:
            raise ValueError(f"Nothing to predict in {prompt}: its {ANSWER_KEY!r} value has no string to generate.")
        row = _drop_predicted_tokens(segments)
        if start_answer:
            if len(to_predict) != 1:
                raise ValueError(
                    f"generate() writes one answer per prompt, but {prompt} asks for {len(to_predict)}: make the "
                    f"{ANSWER_KEY!r} value a single string, or pass start_answer=False and decode the answers yourself."
                )
            row = _start_answer(tokenizer, row, answer_segment=to_predict[0][0])
        rows.append(row)
        predict_segments.append(to_predict)
        answer_placeholders.append(placeholders)
        ext_tables.append(_sample_ext_table(tokenizer, segments.ext_states, batch_ext_index))
        filled_prompts.append(prompt)

    lengths = [len(row.input_ids) for row in rows]
    length = max(lengths)
    attention_mask = _pad_rows([torch.ones(n, dtype=torch.long) for n in lengths], length, left=True)
    ext_ids = torch.tensor([base_id for base_id, _ in batch_ext_index], dtype=torch.long)
    ext_subs = torch.tensor([sub for _, sub in batch_ext_index], dtype=torch.long)
    suppressed = [_suppressed_ids(tokenizer, table, len(batch_ext_index)) for table in ext_tables]
    model_inputs = {
        "input_ids": _pad_rows([row.input_ids for row in rows], length, left=True),
        "input_id_subs": _pad_rows([row.input_id_subs for row in rows], length, left=True),
        "attention_mask": attention_mask,
        # Padding is not context.
        "context": _pad_rows([row.context for row in rows], length, left=True).bool(),
        "segment_ids": _pad_rows([row.segment_ids for row in rows], length, left=True),
        "num_segments": attention_mask * torch.tensor([row.num_segments for row in rows]).unsqueeze(1),
        # One sample per row: no in-context samples, so one relation table, at offset 0.
        "segment_rel_offset": torch.zeros(len(rows), length, dtype=torch.long),
        "segment_rel": _pad_rows(
            [row.segment_rel for row in rows], max(len(row.segment_rel) for row in rows), left=False
        ),
        "sample_ids": torch.zeros(len(rows), length, dtype=torch.long),
        "ext_table_ids": ext_ids.repeat(len(rows), 1),
        "ext_table_sub": ext_subs.repeat(len(rows), 1),
        "suppress_token_ids": _pad_rows(
            [torch.tensor(ids, dtype=torch.long) for ids in suppressed], max(map(len, suppressed)), left=False, fill=-1
        ),
        "image_bound": _stack_image_bounds([row.image_bound + (length - n) for row, n in zip(rows, lengths)]),
    }
    return CpmBeeGenerationBatch(model_inputs, predict_segments, answer_placeholders, ext_tables, filled_prompts)


class CpmBeeCollator:
    """
    Batches encoded samples (the original `CPMBeeCollater`), right padded to `max_length`: training batches, and
    the prompt batches of the Paint pipeline, which reads the text states at every position of the same layout.
    With `pad_to_longest`, a batch is padded to its longest sample instead (`max_length` stays the limit): the same
    loss, since padding is masked out of attention and labels, for the compute of the tokens the batch holds
    (a chat training batch of short samples costs less than half as much as at a fixed `max_length`).

    Each sample is a mapping with `input_ids`, `input_id_subs`, `context`, `segment_ids`, `segment_rel`,
    `segment_rel_offset`, `sample_ids`, `num_segments` (arrays of shape `(seq_len,)` or `(1, seq_len)`, the original
    item builder's layout), optionally `image_bound` `(num_images, 2)` and `pixel_values`; see
    [`CpmBeeSegments.to_sample`].

    Returns the model inputs of [`CpmBeeGenerationBatch`] (right padded, `ext_table_ids`/`ext_table_sub` repeated on
    every row) plus `labels` (the original's `target`: at an answer token, the id of the next token; `</s>` where the
    answer ends; `-100` elsewhere), `length` (true lengths), `span` (zeros: one sample per row) and `pixel_values` if
    the samples have them.
    """

    # what a sample carries: every per-token input but those the collator builds itself (`attention_mask` from the
    # lengths, `span`: one sample per row)
    per_token_keys = tuple(name for name in CPMBEE_PER_TOKEN_INPUTS if name not in ("attention_mask", "span"))

    def __init__(self, tokenizer: CpmBeeTokenizer, max_length: int, pad_to_longest: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_longest = pad_to_longest

    def _as_tensors(self, index: int, sample: Mapping) -> dict[str, torch.Tensor]:
        missing = [key for key in (*self.per_token_keys, "segment_rel") if key not in sample]
        if missing:
            raise KeyError(f"Sample {index} lacks {missing}; build samples with CpmBeeSegments.to_sample.")
        tensors = {
            key: torch.as_tensor(sample[key]).reshape(-1).long() for key in (*self.per_token_keys, "segment_rel")
        }
        tensors["context"] = tensors["context"] > 0
        length = len(tensors["input_ids"])
        if length > self.max_length:
            raise ValueError(
                f"Training sample {index} has {length} tokens, more than max_length={self.max_length}: raise "
                "max_length, or drop or truncate the sample (the original item builder keeps its first max_length "
                "tokens)."
            )
        image_bound = sample.get("image_bound")
        tensors["image_bound"] = torch.as_tensor(image_bound if image_bound is not None else []).long().reshape(-1, 2)
        return tensors

    def _labels(
        self, sample: dict[str, torch.Tensor], batch_ext_index: dict[tuple[int, int], int], width: int
    ) -> torch.Tensor:
        input_ids, subs, context = sample["input_ids"], sample["input_id_subs"], sample["context"]
        target_ids = input_ids.clone()
        for position in torch.nonzero(subs).flatten().tolist():
            # Tokens with a sub-index > 0 are predicted as a column of the batch's ext table.
            key = (input_ids[position].item(), subs[position].item())
            target_ids[position] = self.tokenizer.vocab_size + batch_ext_index.setdefault(key, len(batch_ext_index))
        # A `<s>` right after an answer token starts the next answer segment: the current answer ends there.
        next_is_new_segment = input_ids[1:] == self.tokenizer.bos_token_id
        next_targets = torch.where(next_is_new_segment, self.tokenizer.eos_token_id, target_ids[1:])

        labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
        length = len(input_ids)
        labels[: length - 1] = torch.where(~context[:-1], next_targets, IGNORE_INDEX)
        # The original starts at the second token, so position 0 is never labelled (it is `<root>`'s `<s>` anyway).
        labels[0] = IGNORE_INDEX
        if not context[-1]:
            # The sample ends inside an answer: the answer's last target is `</s>`.
            labels[length - 1] = self.tokenizer.eos_token_id
        return labels

    def __call__(self, samples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("CpmBeeCollator needs at least one sample.")
        tensors = [self._as_tensors(index, sample) for index, sample in enumerate(samples)]
        lengths = torch.tensor([len(sample["input_ids"]) for sample in tensors], dtype=torch.long)
        width = int(lengths.max()) if self.pad_to_longest else self.max_length
        batch_ext_index: dict[tuple[int, int], int] = {}
        labels = torch.stack([self._labels(sample, batch_ext_index, width) for sample in tensors])
        if not batch_ext_index:
            # The ext logits need at least one column: the original keeps this dummy entry (`<pad>`, sub 1).
            batch_ext_index[(0, 1)] = 0

        batch = {key: _pad_rows([sample[key] for sample in tensors], width, left=False) for key in self.per_token_keys}
        batch["context"] = batch["context"].bool()
        batch["attention_mask"] = (torch.arange(width) < lengths.unsqueeze(1)).long()
        # Padded like the per-token keys unless a relation table is longer (original behaviour).
        rel_length = max(width, *(len(sample["segment_rel"]) for sample in tensors))
        batch["segment_rel"] = _pad_rows([sample["segment_rel"] for sample in tensors], rel_length, left=False)
        batch["ext_table_ids"] = torch.tensor([[base_id for base_id, _ in batch_ext_index]] * len(tensors))
        batch["ext_table_sub"] = torch.tensor([[sub for _, sub in batch_ext_index]] * len(tensors))
        batch["image_bound"] = _stack_image_bounds([sample["image_bound"] for sample in tensors])
        batch["labels"] = labels
        batch["length"] = lengths
        batch["span"] = torch.zeros(len(tensors), width, dtype=torch.long)
        pixel_values = [sample.get("pixel_values") for sample in samples]
        if all(values is not None for values in pixel_values):
            batch["pixel_values"] = torch.stack([torch.as_tensor(values) for values in pixel_values])
        return batch


__all__ = [
    "CpmBeeExtStates",
    "CpmBeeGenerationBatch",
    "CpmBeeSegments",
    "CpmBeeCollator",
    "build_generation_batch",
    "encode_structured",
    "rel_to_bucket",
]
