"""`viscpm serve`: an OpenAI-compatible HTTP API for VisCPM-Chat and VisCPM-Paint.

Endpoints: `POST /v1/chat/completions` (messages with text and `image_url` parts given as data URLs; `max_tokens`,
`temperature`, `top_p`, `n`, `stream` as server-sent events), `POST /v1/images/generations` (`prompt`, `n`, `size`,
`response_format: b64_json`), `GET /v1/models`, `GET /health`.

Built on the standard library's threading HTTP server: every connection has its own thread, and the models sit
behind one lock, so concurrent requests queue for the model instead of interleaving on it. A request that fails gets
an OpenAI-shaped error (`{"error": {"message", "type", "param", "code"}}`) with its status code; the server goes on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import PIL.Image

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


@dataclass
class Limits:
    max_request_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_new_tokens: int = 512
    max_images: int = 4
    max_image_side: int = 1024
    max_pixel_steps: int = budgets.DEFAULT_PAINT_PIXEL_STEPS  # `viscpm serve --max-pixel-steps`


class VisCPMService:
    """The loaded models and what the endpoints do with them; one lock serialises every model call."""

    def __init__(self, chat_model: Path | None, paint_model: Path | None, limits: Limits | None = None,
                 paint_steps: int = 50):  # fmt: skip
        import torch
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
        match = DATA_URL.match(url or "")
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
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or not 1 <= max_tokens <= self.limits.max_new_tokens:
                raise RequestError(f"max_tokens must be an integer from 1 to {self.limits.max_new_tokens}",
                                   param="max_tokens")  # fmt: skip
            kwargs["max_new_tokens"] = max_tokens
        temperature, top_p = request.get("temperature"), request.get("top_p")
        for name, value, high in (("temperature", temperature, 2.0), ("top_p", top_p, 1.0)):
            if value is not None and (not isinstance(value, (int, float)) or not 0 <= value <= high):
                raise RequestError(f"{name} must be a number from 0 to {high}", param=name)
        if temperature is not None and temperature > 0:
            kwargs.update(do_sample=True, num_beams=1, temperature=float(temperature))
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        elif temperature == 0 or request.get("stream"):
            kwargs.update(do_sample=False, num_beams=1)  # greedy (transformers' streamers refuse beam search)
        return kwargs

    def chat(self, request: dict, streamer=None) -> tuple[list[tuple[str, str]], int]:
        """Answers (text, finish reason), one per choice, and the prompt's token count."""
        image, context, question = self.parse_conversation(request.get("messages"))
        n = request.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 8:
            raise RequestError("n must be an integer from 1 to 8", param="n")
        kwargs = self.generation_kwargs(request)
        if n > 1 and not kwargs.get("do_sample"):
            raise RequestError("n > 1 needs sampling: give a temperature above 0", param="n")
        try:
            prompt_tokens = self.processor(text=[question], context=[context])["input_ids"].shape[1]
        except ValueError as error:
            raise RequestError(str(error), param="messages") from None
        limit = kwargs.get("max_new_tokens") or self.chat_model.generation_config.max_new_tokens
        choices = []
        with self.lock:
            for _ in range(n):
                answer, _, _, token_ids = self.chat_model.chat(
                    image, question, self.processor, context=context, return_token_ids=True, streamer=streamer,
                    **kwargs,
                )  # fmt: skip
                ended = bool(token_ids) and token_ids[-1] == self.processor.tokenizer.eos_token_id
                choices.append((answer, "stop" if ended or limit is None else "length", len(token_ids)))
        return choices, prompt_tokens

    def chat_completion(self, request: dict) -> dict:
        choices, prompt_tokens = self.chat(request)
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

    def images(self, request: dict) -> dict:
        import torch

        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt must be a non-empty string", param="prompt")
        n = request.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= self.limits.max_images:
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
        seed = request.get("seed")
        generator = torch.Generator().manual_seed(seed) if isinstance(seed, int) else None
        with self.lock:
            images = self.pipeline(prompt, negative_prompt=request.get("negative_prompt"), height=height,
                                   width=width, num_inference_steps=self.paint_steps, num_images_per_prompt=n,
                                   generator=generator).images  # fmt: skip
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
        return {"created": int(time.time()), "data": data}


def make_handler(service: VisCPMService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002  (the base class's name)
            logger.info("%s %s", self.address_string(), format % args)

        def send_json(self, status: HTTPStatus, body: dict) -> None:
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def read_json(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > service.limits.max_request_bytes:
                raise RequestError(f"the request body is {length} bytes, more than {service.limits.max_request_bytes}",
                                   HTTPStatus.REQUEST_ENTITY_TOO_LARGE, code="request_too_large")  # fmt: skip
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(f"the request body is not valid JSON: {error}", code="invalid_json") from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object", code="invalid_json")
            return body

        def respond(self, work) -> None:
            try:
                work()
            except RequestError as error:
                self.send_json(error.status, error.body())
            except BrokenPipeError:
                pass
            except Exception as error:  # noqa: BLE001  (one failed request must not take the server down)
                logger.exception("request failed")
                failure = RequestError(f"{type(error).__name__}: {error}", HTTPStatus.INTERNAL_SERVER_ERROR)
                self.send_json(failure.status, failure.body())

        def do_GET(self):  # noqa: N802  (http.server's naming)
            def work():
                if self.path == "/health":
                    self.send_json(HTTPStatus.OK, {"status": "ok", "chat": service.chat_name is not None,
                                                   "paint": service.paint_name is not None})  # fmt: skip
                elif self.path == "/v1/models":
                    self.send_json(HTTPStatus.OK, service.models())
                else:
                    raise RequestError(f"no such endpoint: GET {self.path}", HTTPStatus.NOT_FOUND)

            self.respond(work)

        def do_POST(self):  # noqa: N802
            def work():
                if self.path == "/v1/chat/completions":
                    if service.chat_name is None:
                        raise RequestError("this server has no chat model (start it with --model)",
                                           HTTPStatus.NOT_FOUND, code="model_not_found")  # fmt: skip
                    request = self.read_json()
                    if request.get("stream"):
                        self.stream_chat(request)
                    else:
                        self.send_json(HTTPStatus.OK, service.chat_completion(request))
                elif self.path == "/v1/images/generations":
                    if service.paint_name is None:
                        raise RequestError("this server has no paint model (start it with --paint-model)",
                                           HTTPStatus.NOT_FOUND, code="model_not_found")  # fmt: skip
                    self.send_json(HTTPStatus.OK, service.images(self.read_json()))
                else:
                    raise RequestError(f"no such endpoint: POST {self.path}", HTTPStatus.NOT_FOUND)

            self.respond(work)

        def stream_chat(self, request: dict) -> None:
            """Server-sent events: the answer as it is generated, through the model's streamer."""
            if request.get("n", 1) != 1:
                raise RequestError("stream supports n = 1 only", param="n")
            call = StreamedCall(service.processor.tokenizer, lambda streamer: service.chat(request, streamer=streamer))
            pieces = iter(call)
            first = next(pieces, None)  # waits for the first piece; a request error is raised here, before any header
            identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish_reason=None) -> None:
                chunk = {"id": identifier, "object": "chat.completion.chunk", "created": created,
                         "model": service.chat_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}  # fmt: skip
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""})
            reason = "stop"
            try:
                for text in [] if first is None else [first]:
                    event({"content": text})
                for text in pieces:
                    event({"content": text})
                reason = call.result[0][0][1]
            except Exception:  # noqa: BLE001  (the headers are sent: the stream ends as it is)
                logger.exception("generation failed while streaming")
            event({}, finish_reason=reason)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(service: VisCPMService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service))
    server.daemon_threads = True
    return server
