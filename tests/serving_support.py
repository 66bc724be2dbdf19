"""Helpers and fixtures of the server tests (a pytest plugin, see conftest.py): a server on tiny models in a
thread, and requests to it.
"""

import base64
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tiny_models import tiny_chat, tiny_image, tiny_pipeline
from viscpm.serving.server import Limits, VisCPMService, serving_in_thread
from viscpm.training.data import png_bytes


def data_url(image: Image.Image | bytes) -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(data: bytes) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(data)}},
                {"type": "text", "text": "what ?"},
            ],
        }
    ]


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
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def question(text="what ?", image=None, history=()):
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image or tiny_image(3))}},
        {"type": "text", "text": text},
    ]
    return (
        [{"role": "user", "content": content}]
        if not history
        else [
            {"role": "user", "content": content[:1] + [{"type": "text", "text": history[0]}]},
            {"role": "assistant", "content": history[1]},
            {"role": "user", "content": text},
        ]
    )


def post(server, path, body: bytes | dict, content_type="application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + path, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
