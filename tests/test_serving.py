"""`viscpm serve`: the OpenAI-compatible API on tiny models, driven by the official openai client on loopback."""

import base64
import concurrent.futures
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO_ROOT
from tiny_models import tiny_chat, tiny_image, tiny_pipeline
from viscpm.experiments.glossary import ZH
from viscpm.serving import server as server_module
from viscpm.serving.server import Cancelled, Job, Limits, VisCPMService, serving_in_thread

openai = pytest.importorskip("openai")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image: Image.Image | bytes) -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(data: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data)}},
                                         {"type": "text", "text": "what ?"}]}]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model, processor = tiny_chat(folder)
    model.save_pretrained(folder / "chat")
    processor.save_pretrained(folder / "chat")
    tiny_pipeline(folder).save_pretrained(folder / "paint")
    # a budget of two 32 x 32 images at 2 steps
    limits = Limits(max_request_bytes=1_000_000, max_image_bytes=50_000, max_pixel_steps=2 * 32 * 32 * 2)
    service = VisCPMService(folder / "chat", folder / "paint", limits, paint_steps=2)
    with serving_in_thread(service) as url:
        yield {"url": url, "service": service, "model": model, "processor": processor}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def question(text="what ?", image=None, history=()):
    content = [{"type": "image_url", "image_url": {"url": data_url(image or tiny_image(3))}}, {"type": "text",
               "text": text}]  # fmt: skip
    return [{"role": "user", "content": content}] if not history else [
        {"role": "user", "content": content[:1] + [{"type": "text", "text": history[0]}]},
        {"role": "assistant", "content": history[1]},
        {"role": "user", "content": text},
    ]  # fmt: skip


def post(server, path, body: bytes | dict, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_chat_completion_equals_the_model_and_continues_a_conversation(server, client):
    answer = server["model"].chat(tiny_image(3), "what ?", server["processor"], num_beams=1, max_new_tokens=5)[0]
    completion = client.chat.completions.create(model="chat", messages=question(), temperature=0, max_tokens=5)
    assert completion.choices[0].message.content == answer and completion.object == "chat.completion"
    assert completion.usage.prompt_tokens > 0 and completion.choices[0].finish_reason in ("stop", "length")

    context = f"User: what ?\nAI: {answer}\n"
    expected = server["model"].chat(
        tiny_image(3), "a b ?", server["processor"], context=context, num_beams=1, max_new_tokens=5
    )[0]
    follow_up = client.chat.completions.create(
        model="chat", messages=question("a b ?", history=("what ?", answer)), temperature=0, max_tokens=5
    )
    assert follow_up.choices[0].message.content == expected


def test_streamed_chat_gives_the_same_answer(server, client):
    whole = client.chat.completions.create(model="chat", messages=question("c ?"), temperature=0, max_tokens=6)
    stream = client.chat.completions.create(model="chat", messages=question("c ?"), temperature=0, max_tokens=6,
                                            stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_gives_n_choices(client):
    completion = client.chat.completions.create(model="chat", messages=question(), temperature=1.0, top_p=0.9, n=3,
                                                max_tokens=3)  # fmt: skip
    assert [choice.index for choice in completion.choices] == [0, 1, 2]


def test_images_beyond_the_budget_are_refused_before_drawing(server):
    """One valid request could hold the model for hours (`{"size": "1024x1024", "n": 4}` on CPU): refused, 400,
    naming the limit and the flag that raises it."""
    status, body = post(server, "/v1/images/generations", {"prompt": "a red cat", "n": 3, "size": "32x32"})
    assert status == 400 and body["error"]["code"] == "over_budget"
    assert "pixel-steps" in body["error"]["message"] and "--max-pixel-steps" in body["error"]["message"]
    assert post(server, "/v1/images/generations", {"prompt": "a red cat", "n": 2, "size": "32x32"})[0] == 200


def test_images_come_back_as_png_of_the_size_asked(client):
    result = client.images.generate(model="paint", prompt="a red cat", n=2, size="32x32", response_format="b64_json")
    assert len(result.data) == 2
    for item in result.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (32, 32)


def test_models_and_health(server, client):
    assert {model.id for model in client.models.list()} == {"chat", "paint"}
    with urllib.request.urlopen(server["url"] + "/health") as response:
        assert json.loads(response.read()) == {"status": "ok", "chat": True, "paint": True}


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "what ?"}]}, 400, "no image"),
        ("/v1/chat/completions", {"messages": question(image=Image.effect_noise((300, 300), 60).convert("RGB"))},
         413, "more than the 50000"),
        # 5000 x 5000 one-bit pixels compress to a few kB: over the pixel limit, within the byte limit
        ("/v1/chat/completions", {"messages": image_message(png_bytes(Image.new("1", (5000, 5000))))}, 413,
         f"25000000 pixels, more than the {Limits.max_image_pixels}"),
        ("/v1/chat/completions", {"messages": image_message(png_bytes(tiny_image(3))[:60])}, 400, "not an image"),
        ("/v1/chat/completions", {"messages": image_message(b"GIF89a not really")}, 400, "not an image"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}, {"type": "text", "text": "a"}]}]},
         400, "data URL"),
        ("/v1/chat/completions", {"messages": question(), "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": question(), "n": 2, "temperature": 0}, 400, "n > 1 needs sampling"),
        ("/v1/images/generations", {"prompt": "a cat", "size": "33x20"}, 400, "unsupported size"),
        ("/v1/images/generations", {"prompt": "a cat", "response_format": "url"}, 400, "b64_json"),
        ("/v1/images/generations", {"prompt": " "}, 400, "prompt"),
        ("/v1/nothing", {}, 404, "no such endpoint"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, status, words):
    code, payload = post(server, path, body)
    assert code == status and words in payload["error"]["message"], payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert post(server, "/v1/images/generations", {"prompt": "a cat", "size": "32x32"})[0] == 200


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="no image"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "what ?"}])


@contextlib.contextmanager
def model_thread_held(service):
    """Holds the model thread until the block ends: the jobs submitted meanwhile wait for it together."""
    release, started = threading.Event(), threading.Event()
    service.queue.submit(Job(lambda jobs: [started.set(), release.wait()][:1], "hold", 1, None))
    started.wait()
    try:
        yield
    finally:
        release.set()


def recording(monkeypatch, owner, name, record):
    """Wraps ``owner.name`` to append ``record(*args, **kwargs)`` to the returned list on each call."""
    calls, original = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def chat_requests(**settings):
    return [
        {"messages": question("what ?"), **settings},
        {"messages": question("is it red ?", tiny_image(5)), **settings},
        {"messages": question("and now ?", history=("what is it ?", "a cat")), **settings},
    ]


@pytest.mark.parametrize("settings", [{"temperature": 0, "max_tokens": 6}, {"max_tokens": 6}], ids=["greedy", "beams"])
def test_concurrent_chats_run_as_one_batch_and_answer_as_each_alone(server, monkeypatch, settings):
    service = server["service"]
    requests = chat_requests(**settings)
    alone = [service.chat(request) for request in requests]
    batches = recording(monkeypatch, service.chat_model, "chat", lambda images, *a, **k: len(images))
    with model_thread_held(service):
        futures = [service.queue.submit(service.chat_job(request)) for request in requests]
    assert [future.result() for future in futures] == alone
    assert batches == [len(requests)]


def test_chats_with_other_settings_run_in_batches_of_their_own(server, monkeypatch):
    service = server["service"]
    batches = recording(monkeypatch, service.chat_model, "chat", lambda images, *a, **k: len(images))
    greedy, beams = chat_requests(temperature=0, max_tokens=4), chat_requests(max_tokens=4)
    with model_thread_held(service):
        futures = [service.queue.submit(service.chat_job(request)) for pair in zip(greedy, beams) for request in pair]
    assert all(len(future.result()[0]) == 1 for future in futures)
    assert batches == [len(greedy), len(beams)]


def test_a_batch_holds_at_most_max_rows(server, monkeypatch):
    service = server["service"]
    batches = recording(monkeypatch, service.chat_model, "chat", lambda images, *a, **k: len(images))
    monkeypatch.setattr(service.queue.batching, "max_rows", 2)
    with model_thread_held(service):
        futures = [service.queue.submit(service.chat_job(r)) for r in chat_requests(temperature=0, max_tokens=2)]
    [future.result() for future in futures]
    assert batches == [2, 1]


def test_a_request_cancelled_in_a_batch_stops_and_the_others_go_on(server, monkeypatch):
    service = server["service"]
    first, second = chat_requests(temperature=0, max_tokens=64)[:2]
    (whole,), _ = service.chat(first)
    assert whole[2] > 3, "the test needs an answer longer than three tokens"
    second_alone = service.chat(second)
    jobs = [service.chat_job(first), service.chat_job(second)]
    # the first client goes away once the batch has made its second decoding step
    steps, check = [], Cancelled.__call__

    def second_step_cancels(self, input_ids, scores, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            jobs[0].cancelled.set()
        return check(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(Cancelled, "__call__", second_step_cancels)
    with model_thread_held(service):
        futures = [service.queue.submit(job) for job in jobs]
    (cut,), _ = futures[0].result()
    assert cut[2] <= 3 and cut[1] == "length"
    assert futures[1].result() == second_alone


def test_cancelled_stops_every_candidate_of_its_row():
    """Beam search hands the criterion each row's candidates next to each other."""
    events = [threading.Event(), threading.Event()]
    events[1].set()
    flags = Cancelled(events)(torch.zeros(6, 3, dtype=torch.long), None)
    assert flags.tolist() == [False, False, False, True, True, True]


def test_concurrent_image_requests_of_one_size_run_as_one_batch_and_draw_as_each_alone(server, monkeypatch):
    service = server["service"]
    requests = [{"prompt": "a red cat", "size": "32x32", "seed": 1},
                {"prompt": "a red dog", "size": "32x32", "seed": 2, "negative_prompt": "a cat"}]  # fmt: skip
    jobs = [service.images_job(request) for request in requests]
    assert len({job.key for job in jobs}) == 1, "the test needs prompts of one padded length"
    alone = [
        service.pipeline(request["prompt"], negative_prompt=request.get("negative_prompt"), height=32, width=32,
                         num_inference_steps=service.paint_steps,
                         generator=torch.Generator().manual_seed(request["seed"])).images[0]
        for request in requests
    ]  # fmt: skip
    unet_rows = recording(monkeypatch, service.pipeline.unet, "forward", lambda sample, *a, **k: sample.shape[0])
    with model_thread_held(service):
        futures = [service.queue.submit(job) for job in jobs]
    for future, expected in zip(futures, alone):
        (image,) = future.result()
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
        assert difference.max() <= 1  # PNG levels: the batched UNet may round differently
    assert unet_rows == [2 * len(requests)] * service.paint_steps  # guided: each image's two halves


@pytest.mark.slow
def test_serve_command_answers_chat_and_images_on_the_shipped_defaults():
    """`viscpm serve` with no model given: the toy Chat and Paint models, for the openai client."""
    command = [sys.executable, "-m", "viscpm", "serve", "--port", "0", "--paint-steps", "10"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        banner = process.stdout.readline()  # "serving NAME, NAME on http://HOST:PORT/v1"
        assert banner.startswith("serving "), f"the server did not start: {banner!r}"
        client = openai.OpenAI(base_url=banner.split()[-1], api_key="unused", max_retries=0)
        assert {model.id for model in client.models.list()} == {"viscpm-chat-mini", "viscpm-paint-mini"}
        messages = question("图中是什么形状？", Image.open(REPO_ROOT / "examples" / "circle.png"))
        answer = client.chat.completions.create(model="viscpm-chat-mini", messages=messages)
        assert answer.choices[0].message.content == ZH["circle"]
        stream = client.chat.completions.create(model="viscpm-chat-mini", messages=messages, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == ZH["circle"]
        drawn = client.images.generate(model="viscpm-paint-mini", prompt="一个红色的圆形", response_format="b64_json")
        assert Image.open(io.BytesIO(base64.b64decode(drawn.data[0].b64_json))).size == (32, 32)
    finally:
        process.terminate()
        process.wait(timeout=60)


# ------------------------------------------------------------------------------------ hostile clients (issue 16)


def raw_exchange(server, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes on one connection and read everything the server answers until it closes (or goes quiet)."""
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_a_body_over_the_limit_is_refused_and_what_follows_it_is_never_run_as_a_request(server):
    """After a 413 the unread body was parsed as the next request on the connection (request smuggling)."""
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = raw_exchange(server, head + b"Content-Length: 2000000\r\n\r\n" + hidden)
    assert answer.startswith(b"HTTP/1.1 413") and answer.count(b"HTTP/1.1 ") == 1 and b'"object":"list"' not in answer


@pytest.mark.parametrize("length", [b"-1", b"abc"])
def test_a_malformed_content_length_is_a_client_error(server, length):
    """`Content-Length: -1` used to skip the size limit; `abc` gave a 500."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n"
    answer = raw_exchange(server, head + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 4"), answer[:100]


def test_a_chunked_body_over_the_limit_is_cut_off(server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (100_000, b"x" * 100_000)
    answer = raw_exchange(server, head + chunk * 12 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]


@pytest.mark.parametrize("method", ["HEAD", "PUT", "DELETE"])
def test_other_methods_get_an_openai_shaped_error(server, method):
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", method=method)
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 405
    if method != "HEAD":
        assert json.loads(error.value.read())["error"]["type"] == "invalid_request_error"


def test_stream_must_be_a_boolean(server):
    """`"stream": "false"` used to stream."""
    status, body = post(server, "/v1/chat/completions", {"messages": question(), "stream": "false"})
    assert status == 400 and body["error"]["param"] == "stream"


def test_serve_on_a_port_in_use_is_one_line_before_any_model_loads(server, capsys):
    from viscpm.cli import main

    port = server["url"].rsplit(":", 1)[1]
    assert main(["serve", "--port", port]) == 2
    assert main(["serve", "--port", "99999"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("viscpm: error: cannot listen on") for line in lines)


class CancelAfterFirstToken:
    """A streamer that plays the client leaving while the first generated token comes out."""

    def __init__(self, cancelled: threading.Event):
        self.cancelled, self.calls = cancelled, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call is the prompt, the second the first new token
            self.cancelled.set()

    def end(self) -> None:
        pass


def test_a_cancelled_chat_stops_at_the_next_decoding_step(server):
    """A client that disconnects mid-answer sets the request's event: its generation ends at the next step and frees
    the model (it used to run to the end holding the lock)."""
    request = {"messages": question(), "max_tokens": 64, "temperature": 0}
    (whole,), _ = server["service"].chat(request)
    assert whole[2] > 2, "the test needs an answer longer than two tokens"
    cancelled = threading.Event()
    (cut,), _ = server["service"].chat(request, streamer=CancelAfterFirstToken(cancelled), cancelled=cancelled)
    assert cut[2] <= 2 and cut[1] == "length"
    # cancelled before it starts: no generation at all
    assert server["service"].chat(request, cancelled=cancelled)[0] == []


def test_a_cancelled_image_request_skips_the_remaining_steps(server, monkeypatch):
    service, calls = server["service"], []
    unet_forward = service.pipeline.unet.forward
    monkeypatch.setattr(service.pipeline.unet, "forward", lambda *a, **k: (calls.append(1), unet_forward(*a, **k))[1])
    cancelled = threading.Event()
    cancelled.set()
    service.images({"prompt": "a red cat", "size": "32x32"}, cancelled=cancelled)
    assert len(calls) <= 1, "denoising went on after the client left"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": question(), "temperature": 1e-300}, "temperature"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": ["a"]}}, {"type": "text", "text": "a"}]}]}, "messages"),
        ("/v1/chat/completions", {"messages": question(), "max_tokens": True}, "max_tokens"),
        ("/v1/images/generations", {"prompt": "a", "negative_prompt": 5}, "negative_prompt"),
        ("/v1/images/generations", {"prompt": "<foo_bar> a cat"}, "prompt"),
        ("/v1/images/generations", {"prompt": "<abc"}, "prompt"),
        ("/v1/images/generations", {"prompt": "a", "seed": 10**30}, "seed"),
        ("/v1/images/generations", {"prompt": "a", "n": True}, "n"),
    ],
)  # fmt: skip
def test_client_mistakes_that_gave_500_are_400(server, path, body, param):
    status, payload = post(server, path, body)
    assert status == 400 and payload["error"]["param"] == param, payload


def test_a_lone_surrogate_in_the_text_gets_an_answer(server):
    """It used to get no response at all."""
    status, payload = post(server, "/v1/chat/completions", {"messages": question("\ud800 ?"), "max_tokens": 2})
    assert status == 200 and payload["choices"][0]["message"]["role"] == "assistant"


def test_json_nested_deeper_than_python_parses_is_a_400(server):
    assert post(server, "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000)[0] == 400


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["messages", "role", "content", "type", "text", "image_url", "url", "n", "max_tokens",
                         "temperature", "top_p", "stream", "prompt", "size", "seed", "negative_prompt"]),
        children, max_size=5),
    max_leaves=12,
), path=st.sampled_from(["/v1/chat/completions", "/v1/images/generations"]))  # fmt: skip
def test_no_request_body_gets_a_server_error(server, body, path):
    """Whatever JSON a client sends, the answer is a success or an OpenAI-shaped 4xx, never a 5xx."""
    if path.endswith("completions") and isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = 2  # keep each generation short
    status, payload = post(server, path, json.dumps(body).encode())
    assert status < 500, payload
    if status >= 400:
        assert set(payload["error"]) == {"message", "type", "param", "code"}


def test_max_tokens_beyond_the_servers_limit_names_the_flag(server):
    limit = server["service"].limits.max_new_tokens
    status, body = post(server, "/v1/chat/completions", {"messages": question(), "max_tokens": limit + 1})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert f"from 1 to {limit}" in body["error"]["message"] and "viscpm serve --max-tokens" in body["error"]["message"]


def test_a_prompt_beyond_the_servers_limit_names_the_flag(server):
    limit = server["service"].limits.max_prompt_tokens
    status, body = post(server, "/v1/chat/completions", {"messages": question("a b " * limit), "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["code"] == "over_budget"
    assert f"more than the limit of {limit}" in body["error"]["message"]
    assert "viscpm serve --max-prompt-tokens" in body["error"]["message"]


@pytest.fixture
def quick_deadlines_server(server, monkeypatch):
    """A second server on the same service whose header and body deadlines are one second."""
    monkeypatch.setattr(server_module, "HEADERS_SECONDS", 1)
    monkeypatch.setattr(server_module, "BODY_SECONDS", 1)
    with serving_in_thread(server["service"]) as url:
        yield {**server, "url": url}


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``connection`` (after whatever it answers) within ``seconds``."""
    connection.settimeout(seconds)
    try:
        while connection.recv(65536):
            pass
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("sent", [b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "slow-headers"])
def test_a_client_that_sends_no_request_is_disconnected(quick_deadlines_server, sent):
    """uvicorn alone kept a silent connection, or one sending its headers slowly, open for ever."""
    host, port = quick_deadlines_server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(sent)
        assert closed_within(connection, 5)


def test_a_body_that_arrives_too_slowly_is_a_408(quick_deadlines_server):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
    answer = raw_exchange(quick_deadlines_server, head + b'\r\n{"messages": ')
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_idle_connections_hold_nothing_and_a_burst_of_clients_is_answered(server):
    """1000 idle connections used to hold 1000 threads; with a listen queue of 5, 2 of 60 requests from 20 clients got
    ECONNRESET."""
    host, port = server["url"].removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(200)]
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: urllib.request.urlopen(server["url"] + "/health", timeout=30).status,
                                    range(60)))  # fmt: skip
        assert answers == [200] * 60
    finally:
        for connection in idle:
            connection.close()
