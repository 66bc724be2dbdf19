"""`viscpm serve`: an OpenAI-compatible HTTP API for VisCPM-Chat and VisCPM-Paint.

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` parts given as data URLs; `max_tokens`,
`temperature`, `top_p`, `n`, `stream` as server-sent events), `POST /v1/images/generations` (`prompt`, `n`, `size`,
`response_format: b64_json`), `GET /v1/models`, `GET /health`.

A FastAPI app served by uvicorn (the `serve` extra): bodies are validated by pydantic request models, their size is
enforced while reading, idle keep-alive connections time out, the listen queue is deep and SIGINT / SIGTERM shut down
gracefully. Every model call runs in one model thread (`BatchQueue`): requests that arrive within a few milliseconds
of each other and ask for the same kind of work run as one batch (chat: the same generation settings; images: the
same size and prompt length), which equals running them one at a time. A request whose client disconnects is
cancelled at the next decoding or denoising step. A request that fails gets an OpenAI-shaped error
(`{"error": {"message", "type", "param", "code"}}`) with its status code, unknown paths and methods included; the
server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import h11
import PIL.Image
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import budgets
from ..modeling.image_processing_viscpm_chat import ImageTooLargeError, InvalidImageError

logger = logging.getLogger("viscpm.serve")
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(?P<data>.*)$", re.DOTALL)
SIZE_PATTERN = r"^(?P<width>\d+)x(?P<height>\d+)$"


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error object with this status."""

    def __init__(
        self,
        message: str,
        status: HTTPStatus = HTTPStatus.BAD_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ request bodies

MIN_TEMPERATURE = 0.01  # dividing the logits by less overflows them to inf

# JSON's true is no count and no number: strict types refuse it (and numeric strings)
Count = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class Body(BaseModel):
    # OpenAI clients send fields this server has no use for (`model`, `user`, `stream_options`, ...)
    model_config = ConfigDict(extra="ignore")


class TextPart(Body):
    type: Literal["text"]
    text: StrictStr


class ImageURL(Body):
    url: StrictStr


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageURL | StrictStr


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatCompletionRequest(Body):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Count | None = Field(None, ge=1)
    max_completion_tokens: Count | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    n: Count = Field(1, ge=1, le=8)
    stream: bool = Field(False, strict=True)

    @field_validator("temperature")
    @classmethod
    def greedy_or_divisible(cls, temperature: float | None) -> float | None:
        if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or from {MIN_TEMPERATURE} to 2")
        return temperature


class ImagesRequest(Body):
    prompt: StrictStr
    n: Count = Field(1, ge=1)
    size: StrictStr | None = Field(None, pattern=SIZE_PATTERN)
    response_format: Literal["b64_json"] = "b64_json"  # this server keeps no files to link to
    negative_prompt: StrictStr | None = None
    seed: Count | None = Field(None, ge=0, lt=budgets.SEED_LIMIT)

    @field_validator("prompt")
    @classmethod
    def not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must say what to draw")
        return prompt


def validated(request_model: type[Body], body: Any) -> Body:
    """`body` as `request_model`, or a RequestError naming the field at fault (the deepest, the most specific of a
    union's complaints) and what is wrong with it."""
    try:
        return request_model.model_validate(body)
    except ValidationError as error:
        worst = max(error.errors(include_url=False), key=lambda e: len(e["loc"]))
        where = ".".join(str(part) for part in worst["loc"] if not str(part).startswith(("str", "list[")))
        message = f"{where}: {worst['msg']}" if where else worst["msg"]
        raise RequestError(message, param=str(worst["loc"][0]) if worst["loc"] else None) from None


# ------------------------------------------------------------------------------------------------- the model thread


@dataclass(eq=False)
class Job:
    """One request's work for the model thread. Jobs with the same `run` and `key` may run as one batch:
    `run(jobs)` returns one result per job."""

    run: Callable[[list[Job]], list[Any]]
    key: Hashable
    rows: int  # the batch rows the job takes (a chat's choices, an images request's images)
    inputs: Any
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)


@dataclass
class Batching:
    window_s: float = 0.05  # the longest the model thread, under load, waits for more requests
    max_rows: int = budgets.DEFAULT_MAX_BATCH_ROWS  # `viscpm serve --max-batch`; 1 runs requests one at a time


class BatchQueue:
    """The one thread that runs the models. It takes the jobs that have come (and, while the last round held
    several, those that arrive within `window_s` of the first), up to `max_rows` rows, drops those cancelled while
    they waited, and runs the rest batch by batch: jobs with equal `run` and `key`, in the order the first of each
    arrived. Hand-written because it is small and the batch keys are ours: Ray Serve's `@serve.batch` would make
    Ray a dependency of every server, and vLLM-style continuous batching needs a paged cache that CPM-Bee's
    position bias does not have."""

    def __init__(self, batching: Batching):
        self.batching = batching
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="viscpm-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _serve(self) -> None:
        busy, last_round_s = False, 0.0  # the last round held several jobs; how long it ran
        while (first := self.jobs.get()) is not None:
            waiting, rows = [first], first.rows
            # A lone client's request runs at once. Under load the model thread waits a moment for company: the
            # clients of the batch just answered send their next requests, and without the wait they would form a
            # batch of their own behind this one, for good. The wait costs at most a tenth of a round.
            busy = busy or not self.jobs.empty()
            wait = min(self.batching.window_s, last_round_s / 10) if busy else 0
            deadline = time.monotonic() + wait
            while rows < self.batching.max_rows:
                remaining = deadline - time.monotonic()
                try:
                    job = self.jobs.get(timeout=remaining) if remaining > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:  # closing: what has come still runs
                    self.jobs.put(None)
                    break
                waiting.append(job)
                rows += job.rows
            busy, began = len(waiting) > 1, time.monotonic()
            self._run(waiting)
            last_round_s = time.monotonic() - began

    def _run(self, waiting: list[Job]) -> None:
        groups: dict[tuple, list[list[Job]]] = {}
        for job in waiting:
            if job.cancelled.is_set():
                job.future.cancel()
                continue
            batches = groups.setdefault((job.run, job.key), [[]])
            if batches[-1] and sum(j.rows for j in batches[-1]) + job.rows > self.batching.max_rows:
                batches.append([])
            batches[-1].append(job)
        for (run, _), batches in groups.items():
            for batch in batches:
                try:
                    results = run(batch)
                except Exception as error:  # noqa: BLE001  (each request's handler raises it)
                    for job in batch:
                        job.future.set_exception(error)
                else:
                    for job, result in zip(batch, results):
                        job.future.set_result(result)


class Cancelled(StoppingCriteria):
    """Stops a batch row at the next decoding step once its request's event is set (``events``: one per row; beam
    search's rows are each row's candidates, next to each other)."""

    def __init__(self, events: list[threading.Event]):
        self.events = events
        # row -> the sequence's length when it was stopped: in a batch, what follows is padding
        self.stopped_at: dict[int, int] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = [event.is_set() for event in self.events]
        for row in (row for row, flag in enumerate(flags) if flag):
            self.stopped_at.setdefault(row, input_ids.shape[1])
        return torch.tensor(flags, device=input_ids.device).repeat_interleave(input_ids.shape[0] // len(flags))


class StreamedCall:
    """A generation feeding ``streamer`` (see `make_streamer`), whose result ``future`` will hold, as text pieces:
    iterate for them as they are generated (`</s>` left out), then read `result`. The generation's exception ends
    the stream and is raised by the iteration (before any piece, when it happens before generation starts)."""

    def __init__(self, eos_token: str, streamer, future: Future):
        self.eos_token, self.streamer, self.future = eos_token, streamer, future
        future.add_done_callback(lambda done: streamer.end() if done.cancelled() or done.exception() else None)

    @staticmethod
    def make_streamer(tokenizer):
        from transformers import TextIteratorStreamer

        return TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=600)

    @classmethod
    def in_thread(cls, tokenizer, call: Callable[[Any], Any]) -> StreamedCall:
        """`call(streamer)` in a thread of its own (the demo, which has no model thread)."""
        streamer, future = cls.make_streamer(tokenizer), Future()

        def run() -> None:
            try:
                future.set_result(call(streamer))
            except Exception as error:  # noqa: BLE001  (raised by the iteration, in the caller's thread)
                future.set_exception(error)

        threading.Thread(target=run, daemon=True).start()
        return cls(tokenizer.eos_token, streamer, future)

    def __iter__(self):
        for piece in self.streamer:
            text = piece.replace(self.eos_token, "")
            if text:
                yield text
        self.result = self.future.result()


@dataclass
class Limits:
    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int | None = None  # `viscpm serve --max-prompt-tokens`; None: the folder's max_prompt_length
    max_new_tokens: int = budgets.DEFAULT_MAX_TOKENS  # `viscpm serve --max-tokens`
    max_images: int = 4
    max_image_side: int = 1024
    max_pixel_steps: int = budgets.DEFAULT_PAINT_PIXEL_STEPS  # `viscpm serve --max-pixel-steps`


GUIDANCE_SCALE = 7.5  # the pipeline's default


@dataclass
class ChatInputs:
    image: PIL.Image.Image
    context: str
    question: str
    prompt_tokens: int
    streamer: Any = None


@dataclass
class PaintInputs:
    prompt: str
    negative_prompt: str | None
    seed: int | None


class VisCPMService:
    """The loaded models and what the endpoints do with them. `chat_job` / `images_job` check a request and turn it
    into a job for the model thread; `chat` / `images` run one and wait for its result."""

    def __init__(
        self,
        chat_model: Path | None,
        paint_model: Path | None,
        limits: Limits | None = None,
        paint_steps: int = 50,
        batching: Batching | None = None,
    ):
        from transformers import AutoModel, AutoProcessor

        import viscpm  # noqa: F401  (registers the Auto classes)

        self.limits, self.paint_steps = limits or Limits(), paint_steps
        self.chat_name = self.paint_name = None
        if chat_model is not None:
            self.chat_model = AutoModel.from_pretrained(chat_model, dtype=torch.float32).eval()
            self.processor = AutoProcessor.from_pretrained(chat_model)
            limit = budgets.take_prompt_limit(self.processor, self.limits.max_prompt_tokens)
            self.limits = replace(self.limits, max_prompt_tokens=limit)
            self.chat_name = Path(chat_model).name
        if paint_model is not None:
            from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

            self.pipeline = VisCPMPaintPipeline.from_pretrained(paint_model)
            self.pipeline.set_progress_bar_config(disable=True)
            self.paint_name = Path(paint_model).name
        if self.chat_name is None and self.paint_name is None:
            raise ValueError("nothing to serve: give a chat model, a paint model, or both")
        self.queue = BatchQueue(batching or Batching())

    def close(self) -> None:
        self.queue.close()

    def models(self) -> dict:
        names = [name for name in (self.chat_name, self.paint_name) if name]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "viscpm"} for n in names],
        }

    def wait(self, job: Job) -> Any:
        """Runs ``job`` in the model thread and returns its result (a cancelled job that never ran: None)."""
        future = self.queue.submit(job)
        try:
            return future.result()
        except Exception as error:  # noqa: BLE001
            if future.cancelled():
                return None
            raise error

    # ---------------------------------------------------------------------------------------------------- chat

    def decode_image(self, url: str) -> PIL.Image.Image:
        """The image of a data URL, decoded by the image processor's `load_image` under this server's pixel limit."""
        match = DATA_URL.match(url)
        if match is None:
            raise RequestError(
                "image_url must be a data URL (data:image/png;base64,...); the server downloads nothing",
                param="messages",
                code="invalid_image_url",
            )
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image_url holds invalid base64", param="messages", code="invalid_image") from None
        too_large = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        if len(data) > self.limits.max_image_bytes:
            message = f"the image is {len(data)} bytes, more than the {self.limits.max_image_bytes} this server accepts"
            raise RequestError(message, too_large, "messages", "image_too_large")
        try:
            return self.processor.image_processor.load_image(data, max_image_pixels=self.limits.max_image_pixels)
        except ImageTooLargeError as error:
            size = f"{error.pixels} pixels" if error.pixels is not None else "more pixels than PIL decodes"
            message = f"the image has {size}, more than the {error.limit} this server accepts"
            raise RequestError(message, too_large, "messages", "image_too_large") from None
        except InvalidImageError:
            message = "image_url is not an image PIL can read (or is truncated or corrupt)"
            raise RequestError(message, param="messages", code="invalid_image") from None

    def parse_conversation(self, messages: list[Message]) -> tuple[PIL.Image.Image, str, str]:
        """The image, the conversation so far as VisCPM-Chat's context, and the last question."""
        image, turns = None, []
        for index, message in enumerate(messages):
            parts = (
                [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
            )
            texts = []
            for part in parts:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif message.role != "user":
                    raise RequestError(f"messages[{index}]: only user messages may hold an image_url", param="messages")
                elif image is not None:
                    raise RequestError(
                        "VisCPM-Chat answers about one image per conversation; this one has several",
                        param="messages",
                        code="too_many_images",
                    )
                else:
                    image = self.decode_image(
                        part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                    )
            if message.role != "system":
                turns.append((message.role, " ".join(texts).strip()))
        if image is None:
            raise RequestError(
                "the conversation has no image: VisCPM-Chat answers questions about an image; add "
                "an image_url part with a data URL",
                param="messages",
                code="missing_image",
            )
        if not turns or turns[-1][0] != "user" or not turns[-1][1]:
            raise RequestError("the last message must be a user question with text", param="messages")
        context, pending = "", None
        for role, text in turns[:-1]:
            if role == "user":
                pending = text
            elif pending is not None:
                context += f"User: {pending}\nAI: {text}\n"
                pending = None
        return image, context, turns[-1][1]

    def generation_kwargs(self, request: ChatCompletionRequest) -> dict:
        max_tokens = request.max_tokens if request.max_tokens is not None else request.max_completion_tokens
        limit = self.limits.max_new_tokens
        try:
            budgets.check_new_tokens("max_tokens", max_tokens or 0, limit, "viscpm serve --max-tokens")
        except budgets.BudgetError as error:
            raise RequestError(str(error), param="max_tokens", code="over_budget") from None
        # without max_tokens: the model's own default, within the server's limit
        kwargs = {"max_new_tokens": max_tokens or min(self.chat_model.generation_config.max_new_tokens or limit, limit)}
        if request.temperature:
            kwargs.update(do_sample=True, num_beams=1, temperature=request.temperature)
            if request.top_p is not None:
                kwargs["top_p"] = request.top_p
        elif request.temperature == 0 or request.stream:
            kwargs.update(do_sample=False, num_beams=1)  # greedy (transformers' streamers refuse beam search)
        return kwargs

    def chat_job(self, body: Any, cancelled: threading.Event | None = None, streamer=None) -> Job:
        """The checked request as a job whose result is `(choices, prompt_tokens)`: an answer `(text, finish
        reason, token count)` per choice. Requests with equal generation settings share batches (streamed ones
        run alone: transformers' streamers take one row)."""
        request = validated(ChatCompletionRequest, body)
        image, context, question = self.parse_conversation(request.messages)
        kwargs = self.generation_kwargs(request)
        if request.n > 1 and not kwargs.get("do_sample"):
            raise RequestError("n > 1 needs sampling: give a temperature above 0", param="n")
        try:
            inputs = self.processor(text=[question], context=[context])
        except ValueError as error:  # markup
            raise RequestError(str(error), param="messages") from None
        prompt_tokens = inputs["input_ids"].shape[1]
        try:
            budgets.check_prompt_tokens(
                prompt_tokens, self.limits.max_prompt_tokens, "viscpm serve --max-prompt-tokens"
            )
        except budgets.BudgetError as error:
            raise RequestError(str(error), param="messages", code="over_budget") from None
        # a streamed request's key is its own
        key = (tuple(sorted(kwargs.items())), None if streamer is None else object())
        return Job(
            self._chat_batch,
            key,
            request.n,
            ChatInputs(image, context, question, prompt_tokens, streamer),
            cancelled or threading.Event(),
        )

    def _chat_batch(self, jobs: list[Job]) -> list[tuple[list, int]]:
        rows = [job for job in jobs for _ in range(job.rows)]
        questions, contexts = [job.inputs.question for job in rows], [job.inputs.context for job in rows]
        kwargs = dict(jobs[0].key[0])
        if jobs[0].inputs.streamer is not None:
            kwargs["streamer"] = jobs[0].inputs.streamer
        cancelled = Cancelled([job.cancelled for job in rows])
        answers, _, _, token_ids = self.chat_model.chat(
            [job.inputs.image for job in rows],
            questions,
            self.processor,
            context=contexts,
            return_token_ids=True,
            stopping_criteria=StoppingCriteriaList([cancelled]),
            **kwargs,
        )
        if cancelled.stopped_at:  # a stopped row goes on as padding while the others generate: cut it off
            inputs = self.processor(text=questions, context=contexts)
            for row, length in cancelled.stopped_at.items():
                token_ids[row] = token_ids[row][: length - inputs["input_ids"].shape[1]]
                answer_ids = torch.tensor([token_ids[row]])
                (answers[row],) = self.processor.decode_answers(answer_ids, [inputs.ext_tables[row]])
        eos = self.processor.tokenizer.eos_token_id
        choices = [
            (answer, "stop" if ids and ids[-1] == eos else "length", len(ids))
            for answer, ids in zip(answers, token_ids)
        ]
        results, start = [], 0
        for job in jobs:
            results.append((choices[start : start + job.rows], job.inputs.prompt_tokens))
            start += job.rows
        return results

    def chat(self, body: Any, streamer=None, cancelled: threading.Event | None = None) -> tuple[list, int]:
        """`(choices, prompt_tokens)` for a request body; once ``cancelled`` is set, generation stops at its next
        decoding step (no choices if it never started)."""
        return self.wait(self.chat_job(body, cancelled, streamer)) or ([], 0)

    # --------------------------------------------------------------------------------------------------- paint

    def images_job(self, body: Any, cancelled: threading.Event | None = None) -> Job:
        """The checked request as a job whose result is its images. Requests of equal size and prompt length share
        batches (the UNet attends to the prompt's padding, so a batch pads no prompt further than alone)."""
        request = validated(ImagesRequest, body)
        if request.n > self.limits.max_images:
            raise RequestError(f"n must be an integer from 1 to {self.limits.max_images}", param="n")
        height = width = None
        if request.size is not None:
            width, height = (int(side) for side in request.size.split("x"))
            multiple = self.pipeline.vae_scale_factor * 4
            fits = [multiple <= side <= self.limits.max_image_side and side % multiple == 0 for side in (width, height)]
            if not all(fits):
                raise RequestError(
                    f"unsupported size {request.size!r}: WIDTHxHEIGHT, each a multiple of {multiple} "
                    f"from {multiple} to {self.limits.max_image_side}",
                    param="size",
                    code="unsupported_size",
                )
        height, width = budgets.paint_size(self.pipeline, height, width)
        try:
            budgets.check_paint_budget(
                height,
                width,
                self.paint_steps,
                request.n,
                self.limits.max_pixel_steps,
                "viscpm serve --max-pixel-steps",
            )
        except budgets.BudgetError as error:
            raise RequestError(str(error), param="size", code="over_budget") from error
        try:  # markup and length, as the pipeline reads them; the padded length joins the batch key
            text = self.pipeline.prepare_text_inputs([request.prompt], padding_captions=[request.negative_prompt or ""])
        except ValueError as error:
            raise RequestError(str(error), param="prompt") from None
        key = (height, width, text["input_ids"].shape[1])
        return Job(
            self._images_batch,
            key,
            request.n,
            PaintInputs(request.prompt, request.negative_prompt, request.seed),
            cancelled or threading.Event(),
        )

    def _images_batch(self, jobs: list[Job]) -> list[list[PIL.Image.Image]]:
        pipeline, (height, width, _) = self.pipeline, jobs[0].key
        guided = GUIDANCE_SCALE > 1  # the pipeline's test
        states, negative_states, latents, generators = [], [], [], []
        for job in jobs:
            # each request's prompt states and initial noise as it would get them alone (its seed draws its latents)
            state, negative_state = pipeline.encode_prompt(
                job.inputs.prompt, pipeline._execution_device, job.rows, guided, job.inputs.negative_prompt
            )
            states.append(state)
            negative_states.append(negative_state)
            generator = torch.Generator()
            generator.manual_seed(job.inputs.seed) if job.inputs.seed is not None else generator.seed()
            shape = (
                job.rows,
                pipeline.unet.config.in_channels,
                height // pipeline.vae_scale_factor,
                width // pipeline.vae_scale_factor,
            )
            latents.append(torch.randn(shape, generator=generator, dtype=state.dtype))
            generators += [generator] * job.rows

        def stop_when_all_cancelled(pipeline, step, timestep, tensors) -> dict:
            pipeline._interrupt = all(job.cancelled.is_set() for job in jobs)  # diffusers' way to skip steps
            return {}

        images = pipeline(
            prompt_embeds=torch.cat(states),
            negative_prompt_embeds=torch.cat(negative_states) if guided else None,
            latents=torch.cat(latents),
            generator=generators,
            height=height,
            width=width,
            num_inference_steps=self.paint_steps,
            guidance_scale=GUIDANCE_SCALE,
            callback_on_step_end=stop_when_all_cancelled,
        ).images
        results, start = [], 0
        for job in jobs:
            results.append(images[start : start + job.rows])
            start += job.rows
        return results

    def images(self, body: Any, cancelled: threading.Event | None = None) -> list[PIL.Image.Image]:
        """The images for a request body; once ``cancelled`` is set, the remaining denoising steps are skipped."""
        return self.wait(self.images_job(body, cancelled)) or []


def completion_body(model: str, choices: list, prompt_tokens: int) -> dict:
    completion_tokens = sum(tokens for *_, tokens in choices)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            for i, (text, reason, _) in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def images_body(images: list[PIL.Image.Image]) -> dict:
    data = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
    return {"created": int(time.time()), "data": data}


# a listen queue for bursts of clients (the standard library's server had 5), idle keep-alive connections closed
BACKLOG = 2048
KEEP_ALIVE_SECONDS = 5
HEADERS_SECONDS = 10  # from a connection's first byte (or its opening) to the end of a request's headers
BODY_SECONDS = 60  # to read a request's body: 20 MB at a third of a megabyte per second
MAX_CONNECTIONS = 1000  # beyond this uvicorn answers 503 at once instead of holding the connection
DISCONNECT_POLL_SECONDS = 0.25  # how often a request waiting for the model checks that its client is still there


class HeadersDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (Go's ReadHeaderTimeout): uvicorn alone keeps
    a connection that sends nothing, or its headers a byte at a time (slowloris), open for ever."""

    headers_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm_headers_deadline()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the next request begins (uvicorn drops its keep-alive timer)
            self._arm_headers_deadline()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.headers_deadline is not None:  # the headers are in
            self.headers_deadline.cancel()
            self.headers_deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.headers_deadline is not None:
            self.headers_deadline.cancel()
        super().connection_lost(exc)

    def _arm_headers_deadline(self) -> None:
        if self.headers_deadline is None:
            self.headers_deadline = self.loop.call_later(HEADERS_SECONDS, self.timeout_keep_alive_handler)


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read up to ``limit`` bytes whatever Content-Length says (uvicorn refuses a
    malformed one itself) and within `BODY_SECONDS`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            f"the request body is {declared} bytes, more than {limit}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            code="request_too_large",
        )
    raw = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            raw.extend(chunk)
            if len(raw) > limit:
                raise RequestError(
                    f"the request body is more than {limit} bytes",
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    code="request_too_large",
                )

    try:
        await asyncio.wait_for(read(), BODY_SECONDS)
    except asyncio.TimeoutError:  # a client that sends its body slowly holds a connection and a buffer
        raise RequestError(
            f"the request body took more than {BODY_SECONDS} s to arrive",
            HTTPStatus.REQUEST_TIMEOUT,
            code="request_timeout",
        ) from None
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


async def while_connected(service: VisCPMService, request: Request, job: Job):
    """The job's result, from the model thread; its event is set if the client disconnects first."""
    future = asyncio.wrap_future(service.queue.submit(job))
    while not future.done():
        await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
        if not future.done() and await request.is_disconnected():
            job.cancelled.set()
    if future.cancelled():  # dropped before it ran: no one is there to read this
        raise RequestError("the client disconnected before the model took the request", code="cancelled")
    return future.result()


async def stream_chat(service: VisCPMService, body: dict) -> StreamingResponse:
    """Server-sent events: the answer as it is generated, through the model's streamer."""
    tokenizer = service.processor.tokenizer
    streamer = StreamedCall.make_streamer(tokenizer)
    job = await run_in_threadpool(service.chat_job, body, None, streamer)
    if job.rows != 1:
        raise RequestError("stream supports n = 1 only", param="n")
    pieces = iter(StreamedCall(tokenizer.eos_token, streamer, service.queue.submit(job)))
    # waits for the first piece: an error before generation is raised here, before any header
    first = await run_in_threadpool(next, pieces, None)
    identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(delta: dict, finish_reason=None) -> str:
        chunk = {
            "id": identifier,
            "object": "chat.completion.chunk",
            "created": created,
            "model": service.chat_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events():
        yield event({"role": "assistant", "content": ""})
        reason = "stop"
        try:
            if first is not None:
                yield event({"content": first})
            async for text in iterate_in_threadpool(pieces):
                yield event({"content": text})
            (choice,), _ = job.future.result()
            reason = choice[1]
        except Exception:  # noqa: BLE001  (the headers are sent: the stream ends as it is)
            logger.exception("generation failed while streaming")
        finally:  # also when the client disconnects (the response is cancelled at a yield): stop generating
            job.cancelled.set()
        yield event({}, finish_reason=reason)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def make_app(service: VisCPMService) -> FastAPI:
    """The OpenAI-compatible API as an ASGI app: requests are checked in worker threads and run by the service's
    model thread."""
    app = FastAPI(title="viscpm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # unknown paths and methods (HEAD, PUT, ...) answer in the OpenAI shape too
        message = (
            f"no such endpoint: {request.method} {request.url.path}"
            if error.status_code in (404, 405)
            else str(error.detail)
        )
        return error_response(RequestError(message, HTTPStatus(error.status_code)))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return error_response(RequestError(f"{type(error).__name__}: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "chat": service.chat_name is not None, "paint": service.paint_name is not None}

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    async def body_for(request: Request, model_name: str | None, kind: str, flag: str) -> dict:
        """The request's JSON body, once the model it asks for is there."""
        if model_name is None:
            raise RequestError(
                f"this server has no {kind} model (start it with {flag})", HTTPStatus.NOT_FOUND, code="model_not_found"
            )
        return await read_json(request, service.limits.max_request_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_for(request, service.chat_name, "chat", "--model")
        if isinstance(body.get("stream"), bool) and body["stream"]:
            return await stream_chat(service, body)
        job = await run_in_threadpool(service.chat_job, body)
        choices, prompt_tokens = await while_connected(service, request, job)
        return completion_body(service.chat_name, choices, prompt_tokens)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await body_for(request, service.paint_name, "paint", "--paint-model")
        job = await run_in_threadpool(service.images_job, body)
        return images_body(await while_connected(service, request, job))

    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model loads: a port in use or out of range fails at once."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is out of range: give 0 to 65535 (0 picks a free one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(BACKLOG)
    return sock


def make_server(service: VisCPMService, sock: socket.socket) -> uvicorn.Server:
    """uvicorn serving `make_app(service)` on ``sock``: `run(sockets=[sock])` blocks until SIGINT / SIGTERM (or
    `should_exit`), then shuts down gracefully."""
    config = uvicorn.Config(
        make_app(service),
        http=HeadersDeadlineProtocol,
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=MAX_CONNECTIONS,
        log_level="warning",
        lifespan="off",
    )
    return uvicorn.Server(config)


@contextmanager
def serving_in_thread(service: VisCPMService, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve in a background thread (tests, benchmarks): yields the base URL, stops the server on the way out."""
    sock = bind(host, port)
    server = make_server(service, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    bound_host, bound_port = sock.getsockname()[:2]
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
