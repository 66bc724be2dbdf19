"""The server's model thread: concurrent requests of one kind run as one batch and answer as each alone, and a
cancelled request stops at the next step while the others go on.
"""

import contextlib
import threading

import numpy as np
import pytest
import torch

from serving_support import question
from tiny_models import tiny_image
from viscpm.serving.server import Cancelled, Job


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
    requests = [
        {"prompt": "a red cat", "size": "32x32", "seed": 1},
        {"prompt": "a red dog", "size": "32x32", "seed": 2, "negative_prompt": "a cat"},
    ]
    jobs = [service.images_job(request) for request in requests]
    assert len({job.key for job in jobs}) == 1, "the test needs prompts of one padded length"
    alone = [
        service.pipeline(
            request["prompt"],
            negative_prompt=request.get("negative_prompt"),
            height=32,
            width=32,
            num_inference_steps=service.paint_steps,
            generator=torch.Generator().manual_seed(request["seed"]),
        ).images[0]
        for request in requests
    ]
    unet_rows = recording(monkeypatch, service.pipeline.unet, "forward", lambda sample, *a, **k: sample.shape[0])
    with model_thread_held(service):
        futures = [service.queue.submit(job) for job in jobs]
    for future, expected in zip(futures, alone):
        (image,) = future.result()
        difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
        assert difference.max() <= 1  # PNG levels: the batched UNet may round differently
    assert unet_rows == [2 * len(requests)] * service.paint_steps  # guided: each image's two halves


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
