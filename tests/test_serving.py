"""`viscpm serve`: the OpenAI-compatible API on tiny models, driven by the official openai client on loopback."""

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from PIL import Image

from conftest import REPO_ROOT
from serving_support import image_message, post, question
from tiny_models import tiny_image
from viscpm.experiments.glossary import ZH
from viscpm.serving.server import Limits
from viscpm.training.data import png_bytes

openai = pytest.importorskip("openai")


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
    stream = client.chat.completions.create(
        model="chat", messages=question("c ?"), temperature=0, max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sampling_gives_n_choices(client):
    completion = client.chat.completions.create(
        model="chat", messages=question(), temperature=1.0, top_p=0.9, n=3, max_tokens=3
    )
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
        (
            "/v1/chat/completions",
            {"messages": question(image=Image.effect_noise((300, 300), 60).convert("RGB"))},
            413,
            "more than the 50000",
        ),
        # 5000 x 5000 one-bit pixels compress to a few kB: over the pixel limit, within the byte limit
        (
            "/v1/chat/completions",
            {"messages": image_message(png_bytes(Image.new("1", (5000, 5000))))},
            413,
            f"25000000 pixels, more than the {Limits.max_image_pixels}",
        ),
        ("/v1/chat/completions", {"messages": image_message(png_bytes(tiny_image(3))[:60])}, 400, "not an image"),
        ("/v1/chat/completions", {"messages": image_message(b"GIF89a not really")}, 400, "not an image"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                            {"type": "text", "text": "a"},
                        ],
                    }
                ]
            },
            400,
            "data URL",
        ),
        ("/v1/chat/completions", {"messages": question(), "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/chat/completions", {"messages": question(), "n": 2, "temperature": 0}, 400, "n > 1 needs sampling"),
        ("/v1/images/generations", {"prompt": "a cat", "size": "33x20"}, 400, "unsupported size"),
        ("/v1/images/generations", {"prompt": "a cat", "response_format": "url"}, 400, "b64_json"),
        ("/v1/images/generations", {"prompt": " "}, 400, "prompt"),
        ("/v1/nothing", {}, 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, path, body, status, words):
    code, payload = post(server, path, body)
    assert code == status and words in payload["error"]["message"], payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert post(server, "/v1/images/generations", {"prompt": "a cat", "size": "32x32"})[0] == 200


def test_openai_client_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError, match="no image"):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "what ?"}])


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


def test_serve_on_a_port_in_use_is_one_line_before_any_model_loads(server, capsys):
    from viscpm.cli import main

    port = server["url"].rsplit(":", 1)[1]
    assert main(["serve", "--port", port]) == 2
    assert main(["serve", "--port", "99999"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("viscpm: error: cannot listen on") for line in lines)
