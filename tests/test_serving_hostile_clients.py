"""The server against hostile and careless clients: raw bytes, oversized and malformed bodies, slow and silent
connections, and client mistakes that must be a 4xx and never a 500.
"""

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving_support import post, question
from viscpm.serving import server as server_module
from viscpm.serving.server import serving_in_thread

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


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": question(), "temperature": 1e-300}, "temperature"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": ["a"]}}, {"type": "text", "text": "a"}],
                    }
                ]
            },
            "messages",
        ),
        ("/v1/chat/completions", {"messages": question(), "max_tokens": True}, "max_tokens"),
        ("/v1/images/generations", {"prompt": "a", "negative_prompt": 5}, "negative_prompt"),
        ("/v1/images/generations", {"prompt": "<foo_bar> a cat"}, "prompt"),
        ("/v1/images/generations", {"prompt": "<abc"}, "prompt"),
        ("/v1/images/generations", {"prompt": "a", "seed": 10**30}, "seed"),
        ("/v1/images/generations", {"prompt": "a", "n": True}, "n"),
    ],
)
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
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "messages",
                        "role",
                        "content",
                        "type",
                        "text",
                        "image_url",
                        "url",
                        "n",
                        "max_tokens",
                        "temperature",
                        "top_p",
                        "stream",
                        "prompt",
                        "size",
                        "seed",
                        "negative_prompt",
                    ]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=12,
    ),
    path=st.sampled_from(["/v1/chat/completions", "/v1/images/generations"]),
)
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
            answers = list(
                pool.map(lambda _: urllib.request.urlopen(server["url"] + "/health", timeout=30).status, range(60))
            )
        assert answers == [200] * 60
    finally:
        for connection in idle:
            connection.close()
