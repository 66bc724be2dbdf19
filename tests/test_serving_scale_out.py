"""`viscpm serve --replicas N`: the server as a Ray Serve application, on a local Ray cluster on CPU."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys

import openai
import pytest
from PIL import Image

from conftest import REPO_ROOT
from viscpm.experiments.glossary import ZH

REPLICAS = 2
REPLICA_STATES = """
import ray
from ray import serve
ray.init(address="auto", log_to_driver=False)
application = serve.status().applications["viscpm"]
print(dict(application.deployments["viscpm"].replica_states))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """`viscpm serve --replicas 2` in a child process (half a CPU each, to fit any machine): its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "viscpm",
        "serve",
        "--replicas",
        str(REPLICAS),
        "--replica-cpus",
        "0.5",
        "--port",
        str(port),
        "--paint-steps",
        "4",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path_factory.mktemp("ray"),
        env=environment,
    )
    try:
        banner = process.stdout.readline()  # once every replica is up
        assert banner.startswith("serving ") and f"{REPLICAS} replicas" in banner, banner
        yield {"url": f"http://127.0.0.1:{port}", "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)


@pytest.mark.slow
def test_two_replicas_serve_the_openai_client(ray_server):
    states = subprocess.run([sys.executable, "-c", REPLICA_STATES], capture_output=True, text=True, timeout=120)
    assert states.stdout.strip() == f"{{'RUNNING': {REPLICAS}}}", states.stderr[-2000:]

    client = openai.OpenAI(base_url=ray_server["url"] + "/v1", api_key="unused", max_retries=0)
    assert {model.id for model in client.models.list()} == {"viscpm-chat-mini", "viscpm-paint-mini"}
    image = base64.b64encode((REPO_ROOT / "examples" / "circle.png").read_bytes()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": "图中是什么形状？"},
    ]
    for _ in range(2 * REPLICAS):  # every replica answers alike
        answer = client.chat.completions.create(
            model="viscpm-chat-mini", messages=[{"role": "user", "content": content}]
        )
        assert answer.choices[0].message.content == ZH["circle"]
    drawn = client.images.generate(model="viscpm-paint-mini", prompt="一个红色的圆形", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(drawn.data[0].b64_json))).format == "PNG"
    with pytest.raises(openai.BadRequestError, match="no image"):
        client.chat.completions.create(model="viscpm-chat-mini", messages=[{"role": "user", "content": "what ?"}])


@pytest.mark.slow
def test_sigterm_shuts_the_application_down(ray_server):
    process = ray_server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(ray_server["url"].rsplit(":", 1)[1])), timeout=5).close()
