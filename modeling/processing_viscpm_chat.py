# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""VisCPM-Chat processor: images through the image processor, questions into CPM-Bee's structured prompt."""

from collections.abc import Sequence

from transformers import BatchFeature, ProcessorMixin

from .structured_cpmbee import build_generation_batch


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    Builds VisCPM-Chat inputs as the original `VisCPMChat.chat` does: the structured prompt
    `{"image": "<unk>" * query_num, "context": context, "question": question, "<ans>": ""}` (key order matters),
    encoded for generation by [`build_generation_batch`] (left padding, the answer's `<s>` last), and the
    images through [`VisCPMChatImageProcessor`].

    The question is CPM-Bee markup, as in the original (which does not escape it): a literal `<` must be written
    `<<`.

    Args:
        image_processor ([`VisCPMChatImageProcessor`]): the image transform.
        tokenizer ([`CpmBeeTokenizer`]): the CPM-Bee tokenizer.
        query_num (`int`, defaults to 64): image placeholder tokens; must equal the model's `query_num`.
        max_prompt_length (`int`, defaults to 3000): longest prompt accepted (the original's `max_inp_length`); None: no limit.
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
        """Model inputs for the questions in `text` (one per image), and `ext_tables` for `decode_answers`.

        Without `images` no `pixel_values` are returned: pass the features of an earlier turn as
        `vision_hidden_states` to the model instead.
        """
        if text is None:
            raise ValueError("VisCPMChatProcessor needs `text`: the question(s) to ask about the image(s)")
        questions = [text] if isinstance(text, str) else list(text)
        contexts = [context] * len(questions) if isinstance(context, str) else list(context)
        if len(contexts) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(contexts)} contexts")
        batch = build_generation_batch(
            self.tokenizer, [self.build_prompt(question, ctx) for question, ctx in zip(questions, contexts)]
        )
        longest = int(batch.model_inputs["attention_mask"].sum(-1).max())
        if self.max_prompt_length is not None and longest > self.max_prompt_length:
            raise ValueError(
                f"the prompt has {longest} tokens, more than max_prompt_length={self.max_prompt_length}: shorten the "
                "context (earlier turns) or the question"
            )
        data = dict(batch.model_inputs)
        if images is not None:
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(images) != len(questions):
                raise ValueError(f"got {len(images)} images but {len(questions)} questions: one question per image")
            data["pixel_values"] = self.image_processor(images, return_tensors="pt", **kwargs)["pixel_values"]
        features = BatchFeature(data=data, tensor_type=return_tensors)
        # decode tables (id -> text of out-of-vocabulary strings), per row: plain data, not a tensor
        features["ext_tables"] = batch.ext_tables
        return features

    def answer_token_ids(self, generated_ids) -> list[list[int]]:
        """Each generated row up to and including its first `</s>` (what follows is padding)."""
        eos = self.tokenizer.eos_token_id
        return [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in generated_ids.tolist()]

    def decode_answers(self, generated_ids, ext_tables: Sequence[dict]) -> list[str]:
        """Texts of generated answers, as the original decodes them: without the final `</s>`, with the row's ext
        table (which gives its out-of-vocabulary strings back)."""
        eos = self.tokenizer.eos_token_id
        return [
            self.tokenizer.decode(ids[:-1] if ids and ids[-1] == eos else ids, ext_table=ext_table)
            for ids, ext_table in zip(self.answer_token_ids(generated_ids), ext_tables)
        ]


__all__ = ["VisCPMChatProcessor"]
