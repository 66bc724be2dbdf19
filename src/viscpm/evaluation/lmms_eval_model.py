"""VisCPM-Chat as an lmms-eval model: `lmms-eval --model viscpm_chat --model_args pretrained=DIR ...`.

lmms-eval finds it through the `lmms_eval.models` entry point (setup.cfg). Each request is one question about one
image: the task's text becomes the question (escaped when the pivot is CPM-Bee, whose prompts are markup), the
task's generation arguments override the model's chat defaults, and `loglikelihood` scores a continuation as the
answer the way training labels it.
"""

from __future__ import annotations

import json
from itertools import groupby

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from transformers import AutoModel, AutoProcessor, GenerationConfig

from .. import defaults

MODEL_NAME = "viscpm_chat"
# what lmms-eval tasks put in `generation_kwargs` that is not a transformers generation argument
HARNESS_ONLY_ARGUMENTS = ("until", "image_aspect_ratio")


def manifest():
    """The `lmms_eval.models` entry point."""
    # imported here: importing lmms_eval.models loads the entry points, this one included
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.VisCPMChatLMM")


def generation_arguments(task_arguments: dict) -> tuple[dict, list[str]]:
    """A task's `generation_kwargs` -> (transformers generation arguments, stop strings). `temperature: 0` is
    lmms-eval's way of asking for greedy decoding."""
    arguments = dict(task_arguments)
    until = arguments.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    known = GenerationConfig().to_dict()
    unknown = sorted(key for key in arguments if key not in known and key not in HARNESS_ONLY_ARGUMENTS)
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not generation arguments of transformers")
    arguments = {key: value for key, value in arguments.items() if key in known}
    if arguments.get("temperature") == 0:
        arguments.pop("temperature")
        arguments["do_sample"] = False
    if arguments.get("do_sample") is False:
        for sampling in ("temperature", "top_p", "top_k"):
            arguments.pop(sampling, None)
    return arguments, [stop for stop in until if stop]


def cut_at_stops(answer: str, stops: list[str]) -> str:
    for stop in stops:
        answer = answer.split(stop, 1)[0]
    return answer


class VisCPMChatLMM(lmms):
    """`pretrained`: a converted VisCPM-Chat folder (default: the toy model viscpm ships); `batch_size`: questions
    answered together; `device`: where the model runs (default: cuda when there is one); `dtype`: `auto` (the
    folder's), `float32`, `bfloat16` or `float16`."""

    def __init__(
        self,
        pretrained: str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"{MODEL_NAME} takes pretrained, batch_size, device and dtype in --model_args, not {sorted(unknown)}"
            )
        folder = str(pretrained or defaults.CHAT)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    # ------------------------------------------------------------------------------------------------ requests

    def _image(self, request: Instance):
        *_, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if len(visuals) != 1:
            raise ValueError(
                f"{MODEL_NAME} answers about exactly one image per question; task {task!r} gives {len(visuals)} "
                f"for document {doc_id}. Use a task with one image per question."
            )
        return visuals[0].convert("RGB")

    def _question(self, text: str) -> str:
        # CPM-Bee prompts are markup: a task's literal `<` must not open a special token
        return self.processor.tokenizer.escape(text) if self.processor.pivot_is_cpmbee else text

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        by_arguments = sorted(range(len(requests)), key=lambda i: json.dumps(requests[i].args[1], sort_keys=True))
        for _, group in groupby(by_arguments, key=lambda i: json.dumps(requests[i].args[1], sort_keys=True)):
            indices = list(group)
            arguments, stops = generation_arguments(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = [requests[i] for i in indices[start : start + self.batch_size]]
                images = [self._image(request) for request in batch]
                questions = [self._question(request.args[0]) for request in batch]
                replies, _, _ = self.model.chat(images, questions, self.processor, **arguments)
                for i, request, reply in zip(indices[start:], batch, replies):
                    answers[i] = cut_at_stops(reply, stops)
                    self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answers[i])
        return answers

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log p(continuation | image, question) over the continuation's tokens (the answer's end token is not
        counted), and whether greedy decoding would give every one of them."""
        from ..training.data import ImageTextCollator, PivotCollator, Turn, chat_samples, png_bytes

        processor = self.processor
        # the model's limit on a prompt, plus the continuation: a request over it is the task's to shorten
        samples = chat_samples(processor, max_length=processor.max_prompt_length + 512)

        def pixels(image):
            return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

        results = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            image = png_bytes(self._image(request))
            if processor.pivot_is_cpmbee:
                prompt = processor.build_prompt(self._question(context))
                sample = samples(prompt | {"<ans>": processor.tokenizer.escape(continuation)})
                collate = ImageTextCollator(processor.tokenizer, len(sample["input_ids"]), pixels)
                batch = collate([sample | {"image": image}])
                aligned = True  # CPM-Bee's labels are already the next token of each position
            else:
                sample = samples(Turn(context, continuation))
                batch = PivotCollator(processor.pad_token_id, pixels)([sample | {"image": image}])
                aligned = False
            labels = batch.pop("labels").to(self.model.device)
            batch = {
                key: value.to(self.model.device) if torch.is_tensor(value) else value for key, value in batch.items()
            }
            logits = self.model(**batch).logits.float()
            if not aligned:
                logits, labels = logits[:, :-1], labels[:, 1:]
            scored = (labels[0] != -100).nonzero().flatten()[:-1]  # the last labelled token is the end token
            logprobs = logits[0, scored].log_softmax(-1).gather(-1, labels[0, scored, None]).flatten()
            greedy = bool((logits[0, scored].argmax(-1) == labels[0, scored]).all())
            results.append((float(logprobs.sum()), greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), results[-1])
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not run lmms-eval's multi-round tasks")
