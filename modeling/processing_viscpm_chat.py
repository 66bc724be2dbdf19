# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Chat processor: images through the image processor, questions into the pivot's prompt (CPM-Bee's
structured prompt, or another pivot's chat template)."""

import re
from collections.abc import Sequence

import torch
from transformers import BatchFeature, ProcessorMixin

from .structured_cpmbee import build_generation_batch
from .tokenization_cpmbee import CpmBeeTokenizer

# where a pivot's chat template places the image: split out before tokenizing, replaced by query_num placeholder ids
IMAGE_MARKER = "<viscpm-image>"
# a turn of the conversation so far, as `chat()` writes it
CONTEXT_TURN = re.compile(r"User: (?P<question>.*?)\nAI: (?P<answer>.*?)\n", re.DOTALL)


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    Builds VisCPM-Chat inputs. With CPM-Bee's tokenizer, as the original `VisCPMChat.chat` does: the structured
    prompt `{"image": "<unk>" * query_num, "context": context, "question": question, "<ans>": ""}` (key order
    matters), encoded for generation by [`build_generation_batch`] (left padding, the answer's `<s>` last). The
    question is CPM-Bee markup, as in the original (which does not escape it): a literal `<` must be written `<<`.

    With another pivot's tokenizer: the conversation (the turns of `context`, then the question) through the
    tokenizer's chat template, the image's `query_num` placeholder tokens opening the first user message (without a
    chat template, `context` and `"User: {question}\nAI:"` follow the image as plain text); padded on the left.

    Images go through [`VisCPMChatImageProcessor`].

    Args:
        image_processor ([`VisCPMChatImageProcessor`]): the image transform.
        tokenizer ([`CpmBeeTokenizer`] or the pivot's tokenizer): the pivot's tokenizer.
        query_num (`int`, defaults to 64): image placeholder tokens; must equal the model's `query_num`.
        max_prompt_length (`int`, defaults to 3000): longest prompt accepted (the original's `max_inp_length`);
            None: no limit.
    """

    def __init__(self, image_processor=None, tokenizer=None, query_num=64, max_prompt_length=3000, **kwargs):
        self.query_num = query_num
        self.max_prompt_length = max_prompt_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def build_prompt(self, question: str, context: str = "") -> dict:
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}")
        if not isinstance(context, str):
            raise ValueError(f"the context must be a string (the conversation so far), got {type(context).__name__}")
        return {
            "image": self.tokenizer.unk_token * self.query_num,
            "context": context,
            "question": question,
            "<ans>": "",
        }

    def __call__(
        self,
        images=None,
        text: str | Sequence[str] | None = None,
        context: str | Sequence[str] = "",
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Model inputs for the questions in `text` (one per image); their attribute `ext_tables` (the decode table
        of each row: ids of CPM-Bee's out-of-vocabulary strings to their text) is for `decode_answers`.

        Without `images` no `pixel_values` are returned: pass the features of an earlier turn as
        `vision_hidden_states` to the model instead.
        """
        if text is None:
            raise ValueError("VisCPMChatProcessor needs `text`: the question(s) to ask about the image(s)")
        questions = [text] if isinstance(text, str) else list(text)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
        if self.pivot_is_cpmbee:
            batch = build_generation_batch(
                self.tokenizer, [self.build_prompt(question, ctx) for question, ctx in zip(questions, contexts)]
            )
            data, ext_tables = dict(batch.model_inputs), batch.ext_tables
        else:
            data = self.left_padded([self.prompt_ids(question, ctx) for question, ctx in zip(questions, contexts)])
            ext_tables = [None] * len(questions)
        longest = int(data["attention_mask"].sum(-1).max())
        if self.max_prompt_length is not None and longest > self.max_prompt_length:
            raise ValueError(
                f"the prompt has {longest} tokens, more than max_prompt_length={self.max_prompt_length}: shorten the "
                "context (earlier turns) or the question"
            )
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(images) != len(questions):
                raise ValueError(f"got {len(images)} images but {len(questions)} questions: one question per image")
            data["pixel_values"] = self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        features = BatchFeature(data=data, tensor_type=return_tensors)
        # what decoding needs beside the model inputs, kept out of them so that `model.generate(**features)` works
        features.ext_tables = ext_tables
        return features

    # ------------------------------------------------------------------------------------------- another pivot

    @property
    def pivot_is_cpmbee(self) -> bool:
        # by name: loaded as remote code, the tokenizer's class comes from a copy of this package's modules
        return any(cls.__name__ == CpmBeeTokenizer.__name__ for cls in type(self.tokenizer).__mro__)

    def prompt_text(self, question: str, context: str = "") -> str:
        """The prompt as text, `IMAGE_MARKER` where the image goes: the pivot's chat template over the turns of
        ``context`` and ``question``, or plain text without one."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}")
        if not isinstance(context, str):
            raise ValueError(f"the context must be a string (the conversation so far), got {type(context).__name__}")
        if self.tokenizer.chat_template is None:
            return f"{IMAGE_MARKER}{context}User: {question}\nAI:"
        turns = [(turn["question"], turn["answer"]) for turn in CONTEXT_TURN.finditer(context)]
        if "".join(f"User: {q}\nAI: {a}\n" for q, a in turns) != context:
            raise ValueError('the context must be turns of "User: ...\\nAI: ...\\n", as chat() returns it')
        messages = []
        for asked, answered in turns:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
        messages.append({"role": "user", "content": question})
        messages[0]["content"] = IMAGE_MARKER + messages[0]["content"]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def image_placeholder_id(self) -> int:
        """The id written where the image goes (its embeddings are replaced by the image's features)."""
        tokenizer = self.tokenizer
        for token_id in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        raise ValueError("the pivot's tokenizer has no unk, pad or eos token to hold the image's place")

    @property
    def pad_token_id(self) -> int:
        """The id padding a batch of another pivot's prompts (masked out by the attention mask)."""
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.image_placeholder_id

    def prompt_ids(self, question: str, context: str = "") -> tuple[list[int], int]:
        """A prompt's token ids and where its image placeholders start."""
        before, after = self.prompt_text(question, context).split(IMAGE_MARKER)
        prefix = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        suffix = self.tokenizer(after, add_special_tokens=False)["input_ids"]
        return prefix + [self.image_placeholder_id] * self.query_num + suffix, len(prefix)

    def left_padded(self, prompts: Sequence[tuple[list[int], int]]) -> dict:
        """``prompt_ids`` rows as a batch padded on the left: input_ids, attention_mask and image_bound."""
        width = max(len(ids) for ids, _ in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        image_bound = torch.zeros((len(prompts), 1, 2), dtype=torch.long)
        for row, (ids, image_start) in enumerate(prompts):
            padding = width - len(ids)
            input_ids[row, padding:] = torch.tensor(ids)
            attention_mask[row, padding:] = 1
            image_bound[row, 0] = torch.tensor([padding + image_start, padding + image_start + self.query_num])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "image_bound": image_bound}

    def answer_token_ids(self, generated_ids) -> list[list[int]]:
        """Each generated row up to and including its first `</s>` (what follows is padding)."""
        eos = self.tokenizer.eos_token_id
        return [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in generated_ids.tolist()]

    def decode_answers(self, generated_ids, ext_tables: Sequence[dict | None]) -> list[str]:
        """Texts of generated answers, as the original decodes them: without the final `</s>`, with the row's ext
        table (which gives CPM-Bee's out-of-vocabulary strings back; None for another pivot)."""
        eos = self.tokenizer.eos_token_id
        answers = []
        for ids, ext_table in zip(self.answer_token_ids(generated_ids), ext_tables):
            ids = ids[:-1] if ids and ids[-1] == eos else ids
            if self.pivot_is_cpmbee:
                answers.append(self.tokenizer.decode(ids, ext_table=ext_table))
            else:
                answers.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return answers


__all__ = ["VisCPMChatProcessor"]
