"""VisCPM-Chat in lmms-eval (the `eval` extra): found through the `lmms_eval.models` entry point, run by lmms-eval's
own CLI on the local easy-VQA task with no network, scoring what `viscpm experiment mpm-mini` scores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
pytest.importorskip("easy_vqa", reason="the experiment extra (easy-vqa) is not installed")

from lmms_eval.api.instance import Instance  # noqa: E402

from viscpm import defaults  # noqa: E402
from viscpm.evaluation.easyvqa_task import evaluation_items, write_task  # noqa: E402
from viscpm.evaluation.lmms_eval_model import VisCPMChatLMM, generation_arguments  # noqa: E402
from viscpm.experiments.mpm_mini import accuracy  # noqa: E402

ITEMS = 24


@pytest.fixture(scope="module")
def model():
    return VisCPMChatLMM()  # the shipped default


def requests(model, kind, rows, visuals=None):
    """lmms-eval `Instance`s over the documents `rows` of a task named "t" (as the harness builds them)."""
    model.task_dict = {"t": {"test": [{"image": image, "question": question} for image, question, _ in rows]}}

    def doc_to_visual(doc):
        return visuals if visuals is not None else [Image.open(doc["image"])]

    made = []
    for index, (_, question, target) in enumerate(rows):
        second = {"max_new_tokens": 32, "do_sample": False, "until": ["\n\n"]} if kind == "generate_until" else target
        arguments = (question, second, doc_to_visual, index, "t", "test")
        made.append(Instance(kind, arguments, index, {"task": "t", "doc_id": index, "repeats": 1}))
    return made


def test_lmms_eval_finds_viscpm_chat_through_its_entry_point():
    from lmms_eval.models import get_model

    assert get_model("viscpm_chat") is VisCPMChatLMM


def test_task_generation_arguments_override_the_chat_defaults():
    assert generation_arguments({"max_new_tokens": 8, "temperature": 0, "top_p": 1.0, "until": "\n"}) == (
        {"max_new_tokens": 8, "do_sample": False},
        ["\n"],
    )
    assert generation_arguments({"temperature": 0.7, "do_sample": True}) == (
        {"temperature": 0.7, "do_sample": True},
        [],
    )
    with pytest.raises(ValueError, match="not generation arguments"):
        generation_arguments({"max_new_tokn": 8})


def test_generate_until_answers_in_batches_as_chat_does(model):
    rows = evaluation_items(("en",), 6)["en"]
    model.batch_size = 4
    answers = model.generate_until(requests(model, "generate_until", rows))
    images = [Image.open(path).convert("RGB") for path, _, _ in rows]
    expected, _, _ = model.model.chat(images, [q for _, q, _ in rows], model.processor, num_beams=1, max_new_tokens=32)
    assert answers == expected


def test_loglikelihood_prefers_the_right_answer_and_knows_the_greedy_one(model):
    rows = [row for row in evaluation_items(("en",), 12)["en"] if row[2] in ("yes", "no")][:3]
    assert rows, "the first items hold yes/no questions"
    right = model.loglikelihood(requests(model, "loglikelihood", rows))
    wrong = [(path, question, {"yes": "no", "no": "yes"}[answer]) for path, question, answer in rows]
    flipped = model.loglikelihood(requests(model, "loglikelihood", wrong))
    greedy = model.generate_until(requests(model, "generate_until", rows))
    assert any(is_greedy for _, is_greedy in right), "the model answers at least one of them right"
    for (_, _, answer), (logprob, is_greedy), (wrong_logprob, _) in zip(rows, right, flipped):
        assert logprob < 0 and is_greedy == (answer in greedy)
        if is_greedy:
            assert logprob > wrong_logprob


def test_markup_in_a_question_is_text_and_several_images_are_refused(model):
    path = evaluation_items(("en",), 1)["en"][0][0]
    (answer,) = model.generate_until(requests(model, "generate_until", [(path, "is <b>this</b> a <unk>?", "")]))
    assert isinstance(answer, str)
    two = [Image.open(path), Image.open(path)]
    with pytest.raises(ValueError, match="exactly one image per question; task 't' gives 2"):
        model.generate_until(requests(model, "generate_until", [(path, "what?", "")], visuals=two))


def lmms_eval_scores(folder: Path, *model_arguments: str) -> dict[str, float]:
    """lmms-eval's own CLI on the local tasks (no network); the exact-match score of each language."""
    tasks = write_task(folder / "tasks", limit=ITEMS)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        *model_arguments,
        "--tasks",
        ",".join(tasks),
        "--batch_size",
        "16",
        "--include_path",
        str(folder / "tasks"),
        "--output_path",
        str(folder / "out"),
    ]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results_file,) = (folder / "out").rglob("*_results.json")
    scores = json.loads(results_file.read_text())["results"]
    return {language: scores[f"viscpm_easyvqa_{language}"]["exact_match,none"] for language in ("en", "zh")}


def mpm_mini_scores() -> dict[str, float]:
    return {
        language: accuracy(defaults.CHAT, items) for language, items in evaluation_items(("en", "zh"), ITEMS).items()
    }


@pytest.mark.slow
def test_lmms_eval_cli_scores_the_local_task_as_mpm_mini_does(tmp_path):
    assert lmms_eval_scores(tmp_path, "--model", "viscpm_chat") == pytest.approx(mpm_mini_scores())


@pytest.mark.slow
def test_lmms_eval_openai_compatible_model_scores_viscpm_serve_as_mpm_mini_does(tmp_path):
    """lmms-eval's own `openai_compatible` model against `viscpm serve` (the shipped default, greedy)."""
    command = [sys.executable, "-m", "viscpm", "serve", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        banner = server.stdout.readline()  # "serving NAME, NAME on http://HOST:PORT/v1"
        assert banner.startswith("serving "), f"the server did not start: {banner!r}"
        # max_retries is lmms-eval's number of attempts (0 sends nothing)
        arguments = f"model_version=viscpm-chat-mini,base_url={banner.split()[-1]},api_key=unused,max_retries=1"
        scores = lmms_eval_scores(tmp_path, "--model", "openai_compatible", "--model_args", arguments)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert scores == pytest.approx(mpm_mini_scores())
