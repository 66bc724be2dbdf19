"""`viscpm serve`: an OpenAI-compatible HTTP API for VisCPM-Chat and VisCPM-Paint.

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` parts given as data URLs; `max_tokens`,
`temperature`, `top_p`, `n`, `stream` as server-sent events), `POST /v1/images/generations` (`prompt`, `n`, `size`,
`response_format: b64_json`), `GET /v1/models`, `GET /health`.

A FastAPI app served by uvicorn (the `serve` extra): the body size is enforced while reading, idle keep-alive
connections time out, the listen queue is deep and SIGINT / SIGTERM shut down gracefully. Model calls run in worker
threads behind one lock, so concurrent requests queue for the model instead of interleaving on it. A request that
fails gets an OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`) with its status code, unknown
paths and methods included; the server goes on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import budgets

logger = logging.getLogger("viscpm.serve")
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,(?P<data>.*)$", re.DOTALL)
SIZE = re.compile(r"^(?P<width>\d+)x(?P<height>\d+)$")


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI error object with this status."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class StreamedCall:
    """`call(streamer)` in a worker thread, fed to a `TextIteratorStreamer`: iterate for the text pieces as they are
    generated (`</s>` left out), then read `result`. An exception `call` raises ends the stream and is raised by the
    iteration (before any piece, when it happens before generation starts)."""

    def __init__(self, tokenizer, call):
        from transformers import TextIteratorStreamer

        self.eos_token = tokenizer.eos_token
        self.streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=600)
        self.result = self.error = None
        self.worker = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.worker.start()

    def _run(self, call) -> None:
        try:
            self.result = call(self.streamer)
        except Exception as error:  # noqa: BLE001  (raised by the iteration, in the caller's thread)
            self.error = error
            self.streamer.end()

    def __iter__(self):
        for piece in self.streamer:
            text = piece.replace(self.eos_token, "")
            if text:
                yield text
        self.worker.join()
        if self.error is not None:
            raise self.error


class Cancelled(StoppingCriteria):
    """Stops every sequence at the next decoding step once ``event`` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


MIN_TEMPERATURE = 0.01


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no count


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Limits:
    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = budgets.DEFAULT_MAX_TOKENS  # `viscpm serve --max-tokens`
    max_images: int = 4
    max_image_side: int = 1024
    max_pixel_steps: int = budgets.DEFAULT_PAINT_PIXEL_STEPS  # `viscpm serve --max-pixel-steps`


class VisCPMService:
    """The loaded models and what the endpoints do with them; one lock serialises every model call."""

    def __init__(self, chat_model: Path | None, paint_model: Path | None, limits: Limits | None = None,
                 paint_steps: int = 50):  # fmt: skip
        from transformers import AutoModel, AutoProcessor

        import viscpm  # noqa: F401  (registers the Auto classes)

        self.limits, self.paint_steps = limits or Limits(), paint_steps
        self.lock = threading.Lock()
        self.chat_name = self.paint_name = None
        if chat_model is not None:
            self.chat_model = AutoModel.from_pretrained(chat_model, dtype=torch.float32).eval()
            self.processor = AutoProcessor.from_pretrained(chat_model)
            self.chat_name = Path(chat_model).name
        if paint_model is not None:
            from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

            self.pipeline = VisCPMPaintPipeline.from_pretrained(paint_model)
            self.pipeline.set_progress_bar_config(disable=True)
            self.paint_name = Path(paint_model).name
        if self.chat_name is None and self.paint_name is None:
            raise ValueError("nothing to serve: give a chat model, a paint model, or both")

    # ------------------------------------------------------------------------------------------------ models

    def models(self) -> dict:
        names = [name for name in (self.chat_name, self.paint_name) if name]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "viscpm"}
                                           for n in names]}  # fmt: skip

    # ---------------------------------------------------------------------------------------------------- chat

    def decode_image(self, url: str) -> PIL.Image.Image:
        match = DATA_URL.match(url) if isinstance(url, str) else None
        if match is None:
            raise RequestError("image_url must be a data URL (data:image/png;base64,...); the server downloads "
                               "nothing", param="messages", code="invalid_image_url")  # fmt: skip
        try:
            data = base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image_url holds invalid base64", param="messages", code="invalid_image") from None
        if len(data) > self.limits.max_image_bytes:
            raise RequestError(f"the image is {len(data)} bytes, more than the {self.limits.max_image_bytes} "
                               "this server accepts", HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "messages",
                               "image_too_large")  # fmt: skip
        try:
            image = PIL.Image.open(io.BytesIO(data))
            if image.width * image.height > self.limits.max_image_pixels:
                raise RequestError(f"the image is {image.width}x{image.height} pixels, more than "
                                   f"{self.limits.max_image_pixels}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   "messages", "image_too_large")  # fmt: skip
            return image.convert("RGB")
        except (OSError, PIL.Image.DecompressionBombError):
            raise RequestError("image_url is not an image PIL can read", param="messages",
                               code="invalid_image") from None  # fmt: skip

    def parse_conversation(self, messages: Any) -> tuple[PIL.Image.Image, str, str]:
        """The image, the conversation so far as VisCPM-Chat's context, and the last question."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        image, turns = None, []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise RequestError(f"messages[{index}] needs a role of system, user or assistant", param="messages")
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise RequestError(f"messages[{index}].content must be a string or a list of parts", param="messages")
            texts = []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url" and message["role"] == "user":
                    if image is not None:
                        raise RequestError("VisCPM-Chat answers about one image per conversation; this one has "
                                           "several", param="messages", code="too_many_images")  # fmt: skip
                    url = part.get("image_url")
                    image = self.decode_image(url.get("url") if isinstance(url, dict) else url)
                else:
                    raise RequestError(f"messages[{index}] has a part of type {kind!r}; text and image_url (user) "
                                       "are supported", param="messages")  # fmt: skip
            if message["role"] != "system":
                turns.append((message["role"], " ".join(texts).strip()))
        if image is None:
            raise RequestError("the conversation has no image: VisCPM-Chat answers questions about an image; add "
                               "an image_url part with a data URL", param="messages", code="missing_image")  # fmt: skip
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

    def generation_kwargs(self, request: dict) -> dict:
        kwargs = {}
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        limit = self.limits.max_new_tokens
        if max_tokens is not None:
            if not is_integer(max_tokens) or not 1 <= max_tokens <= limit:
                raise RequestError(f"max_tokens must be an integer from 1 to {limit} (the server's limit; raise it "
                                   "with viscpm serve --max-tokens)", param="max_tokens")  # fmt: skip
            kwargs["max_new_tokens"] = max_tokens
        else:  # the model's own default, within the server's limit
            kwargs["max_new_tokens"] = min(self.chat_model.generation_config.max_new_tokens or limit, limit)
        temperature, top_p = request.get("temperature"), request.get("top_p")
        for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
            if value is not None and (not is_number(value) or not 0 <= value <= high):
                raise RequestError(f"{name} must be a number from 0 to {high}", param=name)
        if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
            # dividing the logits by less overflows them to inf
            raise RequestError(f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE} to 2", param="temperature")
        if temperature is not None and temperature > 0:
            kwargs.update(do_sample=True, num_beams=1, temperature=float(temperature))
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        elif temperature == 0 or request.get("stream"):
            kwargs.update(do_sample=False, num_beams=1)  # greedy (transformers' streamers refuse beam search)
        return kwargs

    def chat(self, request: dict, streamer=None, cancelled: threading.Event | None = None):
        """Answers (text, finish reason, token count), one per choice, and the prompt's token count. Once
        ``cancelled`` is set (the client went away), generation stops at its next decoding step."""
        image, context, question = self.parse_conversation(request.get("messages"))
        n = request.get("n", 1)
        if not is_integer(n) or not 1 <= n <= 8:
            raise RequestError("n must be an integer from 1 to 8", param="n")
        kwargs = self.generation_kwargs(request)
        if n > 1 and not kwargs.get("do_sample"):
            raise RequestError("n > 1 needs sampling: give a temperature above 0", param="n")
        try:
            prompt_tokens = self.processor(text=[question], context=[context])["input_ids"].shape[1]
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        limit = kwargs.get("max_new_tokens") or self.chat_model.generation_config.max_new_tokens
        if cancelled is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([Cancelled(cancelled)])
        choices = []
        with self.lock:
            for _ in range(n):
                if cancelled is not None and cancelled.is_set():
                    break
                answer, _, _, token_ids = self.chat_model.chat(
                    image, question, self.processor, context=context, return_token_ids=True, streamer=streamer,
                    **kwargs,
                )  # fmt: skip
                ended = bool(token_ids) and token_ids[-1] == self.processor.tokenizer.eos_token_id
                choices.append((answer, "stop" if ended or limit is None else "length", len(token_ids)))
        return choices, prompt_tokens

    def chat_completion(self, request: dict, cancelled: threading.Event | None = None) -> dict:
        choices, prompt_tokens = self.chat(request, cancelled=cancelled)
        completion_tokens = sum(tokens for *_, tokens in choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.chat_name,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                for i, (text, reason, _) in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },  # fmt: skip
        }

    # --------------------------------------------------------------------------------------------------- paint

    def images(self, request: dict, cancelled: threading.Event | None = None) -> dict:
        """Once ``cancelled`` is set (the client went away), the remaining denoising steps are skipped."""
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt must be a non-empty string", param="prompt")
        n = request.get("n", 1)
        if not is_integer(n) or not 1 <= n <= self.limits.max_images:
            raise RequestError(f"n must be an integer from 1 to {self.limits.max_images}", param="n")
        if request.get("response_format", "b64_json") != "b64_json":
            raise RequestError("response_format must be b64_json: this server keeps no files to link to",
                               param="response_format")  # fmt: skip
        size = request.get("size")
        height = width = None
        if size is not None:
            match = SIZE.match(str(size))
            multiple = self.pipeline.vae_scale_factor * 4
            if (
                match is None
                or not all(multiple <= int(match[k]) <= self.limits.max_image_side for k in ("width", "height"))
                or any(int(match[k]) % multiple for k in ("width", "height"))
            ):
                raise RequestError(f"unsupported size {size!r}: WIDTHxHEIGHT, each a multiple of {multiple} from "
                                   f"{multiple} to {self.limits.max_image_side}", param="size",
                                   code="unsupported_size")  # fmt: skip
            width, height = int(match["width"]), int(match["height"])
        height, width = budgets.paint_size(self.pipeline, height, width)
        try:
            budgets.check_paint_budget(height, width, self.paint_steps, n, self.limits.max_pixel_steps,
                                       "viscpm serve --max-pixel-steps")  # fmt: skip
        except budgets.BudgetError as error:
            raise RequestError(str(error), param="size", code="over_budget") from error
        negative_prompt = request.get("negative_prompt")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise RequestError("negative_prompt must be a string", param="negative_prompt")
        seed = request.get("seed")
        if seed is not None and (not is_integer(seed) or not 0 <= seed < budgets.SEED_LIMIT):
            raise RequestError("seed must be an integer from 0 to 2**64 - 1", param="seed")
        generator = None if seed is None else torch.Generator().manual_seed(seed)

        def stop_when_cancelled(pipeline, step, timestep, tensors) -> dict:
            pipeline._interrupt = cancelled is not None and cancelled.is_set()  # diffusers' way to skip steps
            return {}

        try:
            with self.lock:
                images = self.pipeline(
                    prompt,
                    negative_prompt=negative_prompt,
                    height=height,
                    width=width,
                    generator=generator,
                    num_inference_steps=self.paint_steps,
                    num_images_per_prompt=n,
                    callback_on_step_end=stop_when_cancelled,
                ).images
        except ValueError as error:  # the pipeline's input checks, CPM-Bee markup in the prompts included
            raise RequestError(str(error), param="prompt") from None
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
        return {"created": int(time.time()), "data": data}


# a listen queue for bursts of clients (the standard library's server had 5), idle keep-alive connections closed
BACKLOG = 2048
KEEP_ALIVE_SECONDS = 5
MAX_CONNECTIONS = 1000  # beyond this uvicorn answers 503 at once instead of holding the connection
DISCONNECT_POLL_SECONDS = 0.25  # how often a request waiting for the model checks that its client is still there


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, read up to ``limit`` bytes whatever Content-Length says (uvicorn refuses a
    malformed one itself)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes, more than {limit}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="request_too_large")  # fmt: skip
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestError(f"the request body is more than {limit} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               code="request_too_large")  # fmt: skip
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_json")
    return body


def make_app(service: VisCPMService) -> FastAPI:
    """The OpenAI-compatible API as an ASGI app: model calls run in worker threads, behind the service's lock."""
    app = FastAPI(title="viscpm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # unknown paths and methods (HEAD, PUT, ...) answer in the OpenAI shape too
        message = f"no such endpoint: {request.method} {request.url.path}" if error.status_code in (404, 405) else (
            str(error.detail))  # fmt: skip
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
            raise RequestError(f"this server has no {kind} model (start it with {flag})", HTTPStatus.NOT_FOUND,
                               code="model_not_found")  # fmt: skip
        return await read_json(request, service.limits.max_request_bytes)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_for(request, service.chat_name, "chat", "--model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        if stream:
            return await stream_chat(body)
        return await while_connected(request, service.chat_completion, body)

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await body_for(request, service.paint_name, "paint", "--paint-model")
        return await while_connected(request, service.images, body)

    async def while_connected(request: Request, work, body: dict):
        """`work(body, cancelled=event)` in a worker thread; the event is set if the client disconnects first."""
        cancelled = threading.Event()
        task = asyncio.ensure_future(run_in_threadpool(work, body, cancelled=cancelled))
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                cancelled.set()
        return task.result()

    async def stream_chat(body: dict) -> StreamingResponse:
        """Server-sent events: the answer as it is generated, through the model's streamer."""
        if body.get("n", 1) != 1:
            raise RequestError("stream supports n = 1 only", param="n")
        cancelled = threading.Event()
        call = StreamedCall(
            service.processor.tokenizer, lambda streamer: service.chat(body, streamer=streamer, cancelled=cancelled)
        )
        pieces = iter(call)
        # waits for the first piece: a request error is raised here, before any header
        first = await run_in_threadpool(next, pieces, None)
        identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: dict, finish_reason=None) -> str:
            chunk = {"id": identifier, "object": "chat.completion.chunk", "created": created,
                     "model": service.chat_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        async def events():
            yield event({"role": "assistant", "content": ""})
            reason = "stop"
            try:
                if first is not None:
                    yield event({"content": first})
                async for text in iterate_in_threadpool(pieces):
                    yield event({"content": text})
                reason = call.result[0][0][1]
            except Exception:  # noqa: BLE001  (the headers are sent: the stream ends as it is)
                logger.exception("generation failed while streaming")
            finally:  # also when the client disconnects (the response is cancelled at a yield): stop generating
                cancelled.set()
            yield event({}, finish_reason=reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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
    config = uvicorn.Config(make_app(service), backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            limit_concurrency=MAX_CONNECTIONS, log_level="warning", lifespan="off")  # fmt: skip
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
