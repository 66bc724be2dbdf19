"""Load test of `viscpm serve`: N chat or image requests over loopback from C concurrent clients, then it stops.

    python benchmarks/serve_load.py                         # starts a server on the shipped toy models itself
    python benchmarks/serve_load.py --endpoint images       # POST /v1/images/generations instead
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 8

Prints latency percentiles, throughput, and how many answers were well-formed (status 200; chat: an OpenAI chat
completion object with one non-empty assistant message; images: one PNG as b64_json); exits with status 1 if any
was not.
"""

import argparse
import base64
import binascii
import concurrent.futures
import contextlib
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def image_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def well_formed_chat(status: int, body: dict) -> bool:
    try:
        (choice,) = body["choices"]
        return (
            status == 200
            and body["object"] == "chat.completion"
            and choice["message"]["role"] == "assistant"
            and isinstance(choice["message"]["content"], str)
            and choice["message"]["content"].strip() != ""
        )
    except (KeyError, TypeError, ValueError):
        return False


def well_formed_images(status: int, body: dict) -> bool:
    try:
        (image,) = body["data"]
        return status == 200 and base64.b64decode(image["b64_json"], validate=True).startswith(b"\x89PNG")
    except (KeyError, TypeError, ValueError, binascii.Error):
        return False


ENDPOINTS = {"chat": ("/v1/chat/completions", well_formed_chat), "images": ("/v1/images/generations",
             well_formed_images)}  # fmt: skip


def one_request(url: str, endpoint: str, payload: bytes) -> tuple[float, bool]:
    path, well_formed = ENDPOINTS[endpoint]
    request = urllib.request.Request(url + path, data=payload, headers={"Content-Type": "application/json"})
    begin = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, body = error.code, {}
    except (OSError, ValueError):
        status, body = 0, {}
    return time.perf_counter() - begin, well_formed(status, body)


def local_server(model: Path | None, paint_model: Path | None, paint_steps: int):
    """A server on the given (or the shipped toy) models in this process: a context manager yielding its URL."""
    sys.path.insert(0, str(REPO / "src"))
    from viscpm import defaults
    from viscpm.serving.server import VisCPMService, serving_in_thread

    service = VisCPMService(model or defaults.CHAT, paint_model or defaults.PAINT, paint_steps=paint_steps)
    return serving_in_thread(service)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one in this process)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    parser.add_argument("--model", type=Path, help="VisCPM-Chat folder for the local server (default: shipped toy)")
    parser.add_argument("--paint-model", type=Path, help="VisCPM-Paint folder for the local server (default: toy)")
    parser.add_argument("--paint-steps", type=int, default=25, help="denoising steps of the local server")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "circle.png")
    parser.add_argument("--question", default="图中是什么形状？")
    parser.add_argument("--prompt", default="一个红色的圆形", help="the images endpoint's prompt")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
        else:
            url = stack.enter_context(local_server(args.model, args.paint_model, args.paint_steps))
        return measure(args, url)


def measure(args: argparse.Namespace, url: str) -> int:
    if args.endpoint == "chat":
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(args.image)}},
            {"type": "text", "text": args.question},
        ]
        request = {"model": "viscpm-chat", "max_tokens": args.max_tokens, "temperature": 0,
                   "messages": [{"role": "user", "content": content}]}  # fmt: skip
    else:
        request = {"model": "viscpm-paint", "prompt": args.prompt, "n": 1, "response_format": "b64_json"}
    payload = json.dumps(request, ensure_ascii=False).encode()
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda _: one_request(url, args.endpoint, payload), range(args.requests)))
    elapsed = time.perf_counter() - began
    latencies = sorted(seconds for seconds, _ in results)
    good = sum(ok for _, ok in results)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    print(f"{args.requests} {args.endpoint} requests, {args.concurrency} concurrent, {url}")
    print("| requests | well-formed | p50 (s) | p90 (s) | p99 (s) | max (s) | requests/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.requests} | {good} | {quantiles[49]:.3f} | {quantiles[89]:.3f} | {quantiles[98]:.3f} | "
          f"{latencies[-1]:.3f} | {args.requests / elapsed:.2f} |")  # fmt: skip
    return 0 if good == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
