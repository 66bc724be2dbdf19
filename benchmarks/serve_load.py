"""Load test of `viscpm serve`'s dynamic batching: C concurrent clients, each sending its next request as soon as
its last one is answered, against a server that batches (the default, `--max-batch 8`) and one that runs requests
one at a time (`--max-batch 1`), for C = 1, 4, 8 and 16, in one run.

    python benchmarks/serve_load.py                      # chat: the shipped toy model and chat_speed.py's "small"
    python benchmarks/serve_load.py --models toy         # chat on the toy model only (about a minute)
    python benchmarks/serve_load.py --endpoint images    # images on the shipped toy pipeline

Chat requests are greedy (`temperature: 0`) with `max_tokens` (default 32) about the same image; the "small" model
is `benchmarks/chat_speed.py`'s random CPM-Bee of width 512 and 6 layers with its full vocabulary (CPM-Bee's
`bee.txt`: `--vocab`, default the repository's golden set) and small BEiT-3 at 224 px, saved to a temporary folder.
Each server runs in this process on loopback, with `torch.set_num_threads(--threads)`.

Prints per model and clients: tokens/s (chat: the answers' `usage.completion_tokens`; images: pixels/s) of both
servers and their ratio, and p50 latency of both against that of a lone request (the batching server at C = 1).
Goal (issue 16): at 8 clients at least 4x the tokens/s of one at a time, with p50 at most 2x a lone request's.
Exits with status 1 if any answer was not well-formed (status 200 and the OpenAI shape).
"""

import argparse
import base64
import binascii
import concurrent.futures
import contextlib
import json
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
CLIENTS = (1, 4, 8, 16)


def image_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_work(status: int, body: dict) -> int | None:
    """The answer's completion tokens, or None if it is not a well-formed chat completion."""
    try:
        (choice,) = body["choices"]
        ok = status == 200 and body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
        return body["usage"]["completion_tokens"] if ok and isinstance(choice["message"]["content"], str) else None
    except (KeyError, TypeError, ValueError):
        return None


def images_work(status: int, body: dict) -> int | None:
    """1 for a well-formed answer of one PNG (the caller scales by the pixels), or None."""
    try:
        (image,) = body["data"]
        png = base64.b64decode(image["b64_json"], validate=True).startswith(b"\x89PNG")
        return 1 if status == 200 and png else None
    except (KeyError, TypeError, ValueError, binascii.Error):
        return None


ENDPOINTS = {"chat": ("/v1/chat/completions", chat_work), "images": ("/v1/images/generations", images_work)}


def one_request(url: str, endpoint: str, payload: bytes) -> tuple[float, int | None]:
    path, work = ENDPOINTS[endpoint]
    request = urllib.request.Request(url + path, data=payload, headers={"Content-Type": "application/json"})
    begin = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, body = error.code, {}
    except (OSError, ValueError):
        status, body = 0, {}
    return time.perf_counter() - begin, work(status, body)


def closed_loop(url: str, endpoint: str, payload: bytes, clients: int, rounds: int) -> dict:
    """`clients` threads sending `rounds` requests each back to back: throughput, p50 latency, failures."""
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: one_request(url, endpoint, payload), range(clients * rounds)))
    elapsed = time.perf_counter() - began
    good = [work for _, work in results if work is not None]
    return {
        "work_per_s": sum(good) / elapsed,
        "p50_s": statistics.median(seconds for seconds, _ in results),
        "failed": len(results) - len(good),
    }


def small_chat_folder(folder: Path, vocab: str | None) -> Path:
    """chat_speed.py's "small" VisCPM-Chat with random weights, saved as a model folder the server loads."""
    from chat_speed import build_chat, chat_processor, find_vocab

    model = build_chat("small", seed=0)
    model.save_pretrained(folder)
    chat_processor(find_vocab(vocab, None)).save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="chat")
    parser.add_argument("--models", default="toy,small", help="chat models: toy, small or both (toy,small)")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends (4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each chat request (32)")
    parser.add_argument("--paint-steps", type=int, default=10, help="denoising steps of the images server (10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--vocab", help="CPM-Bee's bee.txt for the small model (default: the golden set's)")
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "circle.png")
    parser.add_argument("--question", default="图中是什么形状？")
    parser.add_argument("--prompt", default="一个红色的圆形", help="the images endpoint's prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from viscpm import defaults
    from viscpm.serving.server import Batching, VisCPMService, serving_in_thread

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.endpoint == "chat":
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(args.image)}},
            {"type": "text", "text": args.question},
        ]
        request = {"max_tokens": args.max_tokens, "temperature": 0, "messages": [{"role": "user", "content": content}]}
        names = [name.strip() for name in args.models.split(",")]
        unit = "tokens/s"
    else:
        request, names, unit = {"prompt": args.prompt, "n": 1}, ["toy"], "images/s"
    payload = json.dumps(request, ensure_ascii=False).encode()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.endpoint}: {json.dumps(request)[:80]}"
        f"...; each client sends {args.rounds} requests back to back"
    )
    print(
        f"| model | clients | {unit} one at a time | {unit} batched | ratio | p50 one at a time (s) | p50 batched "
        "(s) | p50 batched / lone |"
    )
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="viscpm-serve-load-") as workdir:
        for name in names:
            if args.endpoint == "images":
                chat, paint = None, defaults.PAINT
            else:
                chat = defaults.CHAT if name == "toy" else small_chat_folder(Path(workdir) / name, args.vocab)
                paint = None
            measured = {}
            for mode, batching in (("one", Batching(max_rows=1)), ("batched", Batching())):
                service = VisCPMService(chat, paint, paint_steps=args.paint_steps, batching=batching)
                with contextlib.closing(service), serving_in_thread(service) as url:
                    one_request(url, args.endpoint, payload)  # warm-up
                    for clients in CLIENTS:
                        measured[mode, clients] = closed_loop(url, args.endpoint, payload, clients, args.rounds)
            lone = measured["batched", 1]["p50_s"]
            for clients in CLIENTS:
                one, batched = measured["one", clients], measured["batched", clients]
                failed += one["failed"] + batched["failed"]
                print(
                    f"| {name} | {clients} | {one['work_per_s']:.1f} | {batched['work_per_s']:.1f} | "
                    f"{batched['work_per_s'] / one['work_per_s']:.1f}x | {one['p50_s']:.2f} | "
                    f"{batched['p50_s']:.2f} | {batched['p50_s'] / lone:.2f}x |",
                    flush=True,
                )
    if failed:
        print(f"{failed} answers were not well-formed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
