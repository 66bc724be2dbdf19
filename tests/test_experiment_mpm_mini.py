"""mpm-mini: the experiment's pipeline in a few steps, its glossary, and the shipped default model."""

import argparse
import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch
import transformers

from conftest import REPO_ROOT
from viscpm import defaults
from viscpm.cli import build_parser, main
from viscpm.experiments import glossary as g
from viscpm.experiments import mpm_mini

pytestmark = pytest.mark.slow  # the slowest tests, left out by -m "not slow"

easy_vqa = pytest.importorskip("easy_vqa", reason="the experiment extra (easy-vqa) is not installed")


def test_every_english_question_kind_is_parsed_and_answered():
    _, questions, _ = mpm_mini.load_world("test")
    kinds = {kind for _, kind, _, _ in questions}
    assert kinds == set(g.EN_TEMPLATES)
    texts, answers, image_ids = easy_vqa.get_test_questions()
    scenes, _, _ = mpm_mini.load_world("test")
    # the scene read off an image's questions answers every non-negated question of that image as easy-vqa does
    checked = 0
    for text, answer, image_id in zip(texts, answers, image_ids):
        parsed = g.question_kind(text)
        if parsed and image_id in scenes:
            assert g.answer_for(parsed[0], scenes[image_id], parsed[1]) == answer, text
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("system", ["native", "mpm"])
def test_evaluation_phrasings_never_appear_in_stage_data(tmp_path, system):
    """In any of the seven languages; the native system has every language's training phrasings, mpm's translated
    share (here about half of the questions, spread over the six other languages) too."""
    scenes, questions, paths = mpm_mini.load_world("train")
    config = dataclasses.replace(
        mpm_mini.QUICK,
        train_images=200,
        translated_share_per_language=0.08,
        translated_languages=g.LANGUAGES[1:],
        translated_plain_share=0.5,
    )
    counts = mpm_mini.write_stage_data(tmp_path, config, system, scenes, questions, paths)
    assert set(counts["conversations"]) == set(g.LANGUAGES)
    asked = {
        turn["value"]
        for record in json.loads((tmp_path / "vqa.json").read_text())
        for turn in record["conversations"]
        if turn["from"] == "human"
    }
    evaluation = mpm_mini.evaluation_set(dataclasses.replace(config, eval_questions=300), *mpm_mini.load_world("test"))
    for language in g.LANGUAGES[1:]:
        assert evaluation[language] and not {question for _, question, _ in evaluation[language]} & asked, language


def test_the_european_translated_share_asks_each_kind_in_all_its_training_phrasings(tmp_path):
    """With one phrasing per kind, a Qwen2 pivot tied the reply language to that sentence and answered unseen German
    phrasings in English (docs/mpm-mini.md, "Run G")."""
    config = dataclasses.replace(mpm_mini.QUICK, train_images=400, translated_share_per_language=0.08)
    mpm_mini.write_stage_data(tmp_path, config, "mpm", *mpm_mini.load_world("train"))

    def plain(question: str) -> str:  # as `g.half_surfaced` leaves it: first letter and final punctuation varied
        return question[:1].lower() + question[1:].rstrip(g.FINAL_PUNCTUATION + " ")

    asked = {
        plain(turn["value"])
        for record in json.loads((tmp_path / "vqa.json").read_text())
        for turn in record["conversations"]
        if turn["from"] == "human"
    }
    for language in g.EUROPEAN:
        for kind, templates in g.TRAIN_TEMPLATES[language].items():
            used = {
                template
                for template in templates
                for colour in g.COLOURS
                for shape in g.SHAPES
                if plain(g.fill(template, language, colour, shape)) in asked
            }
            assert len(templates) >= 3 and used == set(templates), (language, kind, set(templates) - used)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_the_chinese_translated_share_asks_the_plain_phrasings_at_its_share(share, tmp_path):
    """Chinese has plain phrasings as English has: with `translated_plain_share` its translated share draws from them
    that often, else only from its training table's one phrasing per kind. No other language has them."""
    config = dataclasses.replace(
        mpm_mini.QUICK, train_images=600, translated_share_per_language=0.1, translated_plain_share=share
    )
    mpm_mini.write_stage_data(tmp_path, config, "mpm", *mpm_mini.load_world("train"))
    tables = {"train": g.TRAIN_TEMPLATES["zh"], "plain": g.PLAIN_TEMPLATES["zh"]}
    cores = {
        name: {
            g.fill(template, "zh", colour, shape).rstrip(g.FINAL_PUNCTUATION)
            for templates in table.values()
            for template in templates
            for colour in g.COLOURS
            for shape in g.SHAPES
        }
        for name, table in tables.items()
    }
    drawn = []
    for record in json.loads((tmp_path / "vqa.json").read_text()):
        for turn in record["conversations"]:
            found = [name for name, table in cores.items() if any(core in turn["value"] for core in table)]
            if turn["from"] == "human" and found:  # a Chinese question about the world (not a refusal's)
                drawn.append(found)
    assert len(drawn) > 100 and all(len(found) == 1 for found in drawn)
    plain = sum(found == ["plain"] for found in drawn) / len(drawn)
    assert abs(plain - share) < 0.1, plain


@pytest.mark.parametrize("share, chinese", [(None, 0.5), (0.1, 0.1)])
def test_the_translated_refusal_share_sets_how_many_refusals_are_in_chinese(share, chinese, tmp_path):
    """Unset, refusals are drawn evenly from English and the translated share's languages with refusals (Chinese)."""
    config = dataclasses.replace(
        mpm_mini.QUICK, train_images=1000, refusal_share=0.2, languages=("en", "zh"), translated_refusal_share=share
    )
    mpm_mini.write_stage_data(tmp_path, config, "mpm", *mpm_mini.load_world("train"))
    answers = [record["conversations"][1]["value"] for record in json.loads((tmp_path / "vqa.json").read_text())]
    refusals = [answer for answer in answers if answer in g.REFUSALS.values()]
    assert len(refusals) > 300
    assert abs(refusals.count(g.REFUSALS["zh"]) / len(refusals) - chinese) < 0.06


def test_the_languages_ask_the_same_items():
    """Each item is one image, kind and slots, asked in every language, with the answer in that language."""
    config = dataclasses.replace(mpm_mini.QUICK, eval_questions=60)
    evaluation = mpm_mini.evaluation_set(config, *mpm_mini.load_world("test"))
    english = evaluation["en"]
    for language in g.LANGUAGES[1:]:
        for (image, _, answer), (other_image, _, other_answer) in zip(english, evaluation[language]):
            assert other_image == image and other_answer == g.answer_in(language, answer)


def test_vocabulary_covers_every_text_without_ext_ids(tmp_path):
    from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

    _, questions, _ = mpm_mini.load_world("train")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(mpm_mini.vocabulary([q for *_, q in questions])) + "\n", encoding="utf-8")
    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab))
    prompts = mpm_mini.pivot_prompts(g.LANGUAGES, random.Random(0), 1000)
    for prompt in prompts:
        for text in prompt.values():
            ids, ext_table = tokenizer.encode_with_ext_table(text)
            assert not ext_table, text


def test_the_qwen2_pivots_tokenizer_gives_every_text_back_exactly(tmp_path):
    _, questions, _ = mpm_mini.load_world("train")
    tokenizer = mpm_mini.qwen2_tokenizer(mpm_mini.vocabulary([q for *_, q in questions]))
    texts = [text for prompt in mpm_mini.pivot_prompts(g.LANGUAGES, random.Random(0), 1000) for text in prompt.values()]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text, text


def test_the_qwen2_pivots_samples_keep_the_scene_apart_from_the_question(tmp_path):
    """As the image's placeholders are at inference: tokenized with the text after it, the scene's last word and the
    question's first fused into one unknown word ("triangleWhat"), and the pivot could not learn what it never saw."""
    _, questions, _ = mpm_mini.load_world("train")
    tokenizer = mpm_mini.qwen2_tokenizer(mpm_mini.vocabulary([q for *_, q in questions]))
    processor = mpm_mini.pivot_processor(mpm_mini.QUICK, tokenizer)
    prompts = mpm_mini.pivot_prompts(g.LANGUAGES, random.Random(0), 500)
    for prompt, sample in zip(prompts, mpm_mini.pivot_text_samples(prompts, processor)):
        ids = sample["input_ids"]
        scene = tokenizer(prompt["image"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, tokenizer.decode(ids)
        assert any(ids[start : start + len(scene)] == scene for start in range(len(ids))), tokenizer.decode(ids)


def _held_out_questions(language: str) -> set[str]:
    """Every held-out paraphrase with every slot value, and the held-out questions outside the world."""
    questions = set(g.HELD_OUT_OUT_OF_WORLD[language])
    for templates in g.HELD_OUT_PARAPHRASES[language].values():
        for template in templates:
            questions |= {g.fill(template, language, colour, shape) for colour in g.COLOURS for shape in g.SHAPES}
    return questions


def _training_questions(tmp_path) -> list[str]:
    """The questions of the pivot's text and of stage 2 (the mpm and native systems)."""
    prompts = mpm_mini.pivot_prompts(g.LANGUAGES, random.Random(0), 20000)
    questions = [prompt.get("question") or prompt["input"] for prompt in prompts]
    world = mpm_mini.load_world("train")
    for system in ("mpm", "native"):
        config = dataclasses.replace(
            mpm_mini.QUICK,
            train_images=400,
            translated_share_per_language=0.08,
            refusal_share=0.5,
            translated_plain_share=0.5,
        )
        mpm_mini.write_stage_data(tmp_path / system, config, system, *world)
        records = json.loads((tmp_path / system / "vqa.json").read_text())
        questions += [
            turn["value"] for record in records for turn in record["conversations"] if turn["from"] == "human"
        ]
    return questions


def test_held_out_paraphrases_are_in_no_training_text_and_use_only_its_words(tmp_path):
    """The paraphrase set measures understanding, not recall: no question the pivot or stage 2 learns from contains
    one of its questions (ignoring case and the final punctuation), and each of its words (Chinese: characters) is in
    the training questions."""
    questions = _training_questions(tmp_path)
    assert any(question != question.lower() for question in questions)  # capitals are taught
    training = [question.lower() for question in questions]
    known_words = {word for question in training for word in re.findall(r"[a-z']+", question)}
    known_characters = set("".join(training))
    for language in ("en", "zh"):
        for question in _held_out_questions(language):
            core = question.lower().rstrip(g.FINAL_PUNCTUATION)
            assert not any(core in text for text in training), question
            if language == "en":
                assert set(re.findall(r"[a-z']+", core)) <= known_words, question
            else:
                assert set(core) <= known_characters, question


def test_questions_outside_the_world_are_refused_in_training():
    prompts = mpm_mini.pivot_prompts(("en", "zh"), random.Random(0), 4000)
    refused = [prompt for prompt in prompts if prompt["<ans>"] in g.REFUSALS.values()]
    assert len(refused) > 50
    for prompt in refused:
        language = "en" if prompt["<ans>"] == g.REFUSALS["en"] else "zh"
        assert any(
            asked.lower().rstrip(g.FINAL_PUNCTUATION) in prompt["question"].lower()
            for asked in g.OUT_OF_WORLD[language]
        )


def test_stage_two_asks_second_questions_about_the_same_image_in_the_first_ones_language(tmp_path):
    """A share of the conversations has a second round, in the first round's language, answered from the same
    image's scene; the training data turns it into a sample with the first round as its context."""
    from viscpm.training.data import conversation_turns

    scenes, questions, paths = mpm_mini.load_world("train")
    scene_of = {paths[image_id]: scene for image_id, scene in scenes.items()}
    config = dataclasses.replace(
        mpm_mini.QUICK,
        train_images=300,
        translated_share_per_language=0.5,
        translated_languages=("zh",),
        languages=("en", "zh"),
    )
    counts = mpm_mini.write_stage_data(tmp_path, config, "mpm", scenes, questions, paths)
    records = json.loads((tmp_path / "vqa.json").read_text())
    two_rounds = [record for record in records if len(record["conversations"]) == 4]
    assert counts["second_rounds"] == len(two_rounds)
    assert 0.2 < len(two_rounds) / len(records) < 0.4
    chinese = 0
    for record in two_rounds:
        first, _, second, answer = (turn["value"] for turn in record["conversations"])
        in_chinese = bool(re.search(r"[\u4e00-\u9fff]", first))
        assert in_chinese == bool(re.search(r"[\u4e00-\u9fff]", second)), (first, second)
        chinese += in_chinese
        scene = scene_of[record["image"]]
        assert answer in {g.answer_in("zh" if in_chinese else "en", value) for value in (*scene.values(), "yes", "no")}
    assert chinese
    turns = conversation_turns(two_rounds[0]["conversations"])
    assert turns[1].context.startswith("User: ") and turns[1].context.count("AI: ") == 1


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, r"6 languages \(weights summing to 6\) is 120% of the conversations: lower it to at most 0\.167"),
        ({"de": 3, "fr": 0}, r"summing to 7\) is 140% of the conversations: lower it to at most 0\.143"),
    ],
)
def test_a_translated_share_over_all_conversations_is_refused_with_the_largest_that_fits(weights, message):
    """When the config is made, before any data is written."""
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mpm_mini.QUICK, translated_share_per_language=0.2, translated_share_weights=weights)


def test_the_translated_share_gives_each_language_its_weight(tmp_path):
    """Each language's share is `translated_share_per_language` times its weight (absent: 1), the other languages'
    unchanged by it; weight 0 leaves a language out of the share."""
    world = mpm_mini.load_world("train")
    config = dataclasses.replace(
        mpm_mini.QUICK,
        train_images=1500,
        translated_share_per_language=0.05,
        translated_share_weights={"de": 2, "fr": 0.5, "es": 0},
    )
    counts = mpm_mini.write_stage_data(tmp_path, config, "mpm", *world)["conversations"]
    total = sum(counts.values())
    expected = {"zh": 0.05, "de": 0.1, "fr": 0.025, "it": 0.05, "pt": 0.05}
    assert "es" not in counts
    for language, share in expected.items():
        assert abs(counts[language] / total - share) < 0.25 * share, (language, counts)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"xx": 2}, r"translated_share_weights names what is not a language \('xx'\): use 'en', 'zh'"),
        ({"de": -1}, r"translated_share_weights=\{'de': -1\} is not a weight: give each language a number, 0 or"),
        ({"de": "2"}, r"translated_share_weights=\{'de': '2'\} is not a weight"),
        (1.5, r"translated_share_weights=1\.5 is a weight by language: give a dict such as \{'de': 1\.5\}"),
    ],
)
def test_translated_share_weights_that_are_not_weights_of_languages_are_refused(weights, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mpm_mini.QUICK, translated_share_weights=weights)


def _yes_no_rounds(folder, scenes, questions, paths, yes_share) -> list[tuple[str, str, str]]:
    """`(image path, question, answer)` of every round of stage 2's conversations whose answer is yes or no, in
    English or in a Chinese translated share of 30%."""
    config = dataclasses.replace(
        mpm_mini.QUICK,
        train_images=1500,
        translated_share_per_language=0.3,
        translated_languages=("zh",),
        yes_share=yes_share,
    )
    mpm_mini.write_stage_data(folder, config, "mpm", scenes, questions, paths)
    rounds = [
        (record["image"], asked["value"], answered["value"])
        for record in json.loads((folder / "vqa.json").read_text())
        for asked, answered in zip(record["conversations"][::2], record["conversations"][1::2])
    ]
    yes_no = {g.answer_in(language, answer) for language in ("en", "zh") for answer in ("yes", "no")}
    return [(image, asked, answered) for image, asked, answered in rounds if answered in yes_no]


@pytest.mark.parametrize("yes_share", [0.5, 0.8])
def test_stage_two_answers_yes_at_the_configured_share_in_english_and_the_translated_share(tmp_path, yes_share):
    """Each answer is the image's own: an English question in easy-vqa's phrasing is parsed and answered again."""
    scenes, questions, paths = mpm_mini.load_world("train")
    scene_of = {paths[image_id]: scene for image_id, scene in scenes.items()}
    answers, checked = {"en": [], "zh": []}, 0
    for image, asked, answered in _yes_no_rounds(tmp_path, scenes, questions, paths, yes_share):
        language = "zh" if re.search(r"[\u4e00-\u9fff]", asked) else "en"
        answers[language].append(answered == g.answer_in(language, "yes"))
        parsed = g.question_kind(asked[:1].lower() + asked[1:].rstrip(g.FINAL_PUNCTUATION) + "?")
        if language == "en" and parsed:
            assert g.answer_for(parsed[0], scene_of[image], parsed[1]) == answered, (asked, scene_of[image])
            checked += 1
    assert checked > 300
    for language, said_yes in answers.items():
        assert len(said_yes) > 300 and abs(sum(said_yes) / len(said_yes) - yes_share) < 0.06, language


def test_the_translated_share_asks_only_its_kinds_and_keeps_its_size(tmp_path):
    """Every round of a translated conversation, the second ones too, is of `translated_kinds`; the share has as many
    conversations as with every kind, and English keeps every kind."""
    scenes, questions, paths = mpm_mini.load_world("train")
    config = dataclasses.replace(
        mpm_mini.QUICK, train_images=1500, translated_share_per_language=0.2, translated_languages=("zh",)
    )
    yes_no = {g.answer_in(language, answer) for language in ("en", "zh") for answer in ("yes", "no")}
    answered_in, sizes = {}, {}
    for kinds in (config.translated_kinds, ("has_colour", "has_shape")):
        folder = tmp_path / "+".join(kinds)
        counts = mpm_mini.write_stage_data(
            folder, dataclasses.replace(config, translated_kinds=kinds), "mpm", scenes, questions, paths
        )
        sizes[kinds] = counts["conversations"]["zh"]
        rounds = [
            (asked["value"], answered["value"])
            for record in json.loads((folder / "vqa.json").read_text())
            for asked, answered in zip(record["conversations"][::2], record["conversations"][1::2])
            if answered["value"] not in g.REFUSALS.values()
        ]
        answered_in[kinds] = {
            language: [
                answered in yes_no
                for asked, answered in rounds
                if bool(re.search(r"[\u4e00-\u9fff]", asked)) == chinese
            ]
            for language, chinese in (("en", False), ("zh", True))
        }
    every_kind, yes_no_only = answered_in.values()
    assert all(yes_no_only["zh"]) and len(yes_no_only["zh"]) > 300
    assert 0.3 < sum(every_kind["zh"]) / len(every_kind["zh"]) < 0.8  # the share asked every kind before
    assert 0.3 < sum(yes_no_only["en"]) / len(yes_no_only["en"]) < 0.8
    first, second = sizes.values()
    assert abs(first - second) < 0.1 * first, sizes


def test_translated_kinds_too_few_for_the_share_are_refused_naming_the_fix(tmp_path):
    scenes, questions, paths = mpm_mini.load_world("train")
    config = dataclasses.replace(
        mpm_mini.QUICK, translated_share_per_language=0.15, translated_languages=("zh", "de", "fr", "es", "it", "pt")
    )
    with pytest.raises(ValueError, match=r"translated_kinds=\('has_shape',\) are .* too few .* add kinds or lower"):
        mpm_mini.write_stage_data(
            tmp_path, dataclasses.replace(config, translated_kinds=("has_shape",)), "mpm", scenes, questions, paths
        )


@pytest.mark.parametrize("name", ["translated_plain_share", "translated_refusal_share"])
def test_a_share_outside_zero_to_one_is_refused_when_the_config_is_made(name):
    with pytest.raises(ValueError, match=f"{name}=1.5 is a share of questions"):
        dataclasses.replace(mpm_mini.QUICK, **{name: 1.5})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"stage1_caption_distillation": 1.0},
            r"stage1_caption_distillation=1\.0 is a setting by pivot kind: give a dict",
        ),
        ({"stage2_lora": {"cpmbe": {"r": 8}}}, r"stage2_lora names what is not a pivot kind \('cpmbe'\): use 'cpmbee'"),
        ({"stage2_pivot_learning_rates": {"llama": 2e-4}}, r"stage2_pivot_learning_rates names .* \('llama'\)"),
    ],
)
def test_a_setting_not_given_by_a_known_pivot_kind_is_refused_when_the_config_is_made(setting, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mpm_mini.QUICK, **setting)


@pytest.mark.parametrize(
    ("kinds", "message"),
    [
        (("colours", "has_shape"), r"names what is not a question kind \('colours'\): give a tuple of 'shape', "),
        ("colour", r"translated_kinds='colour' is one string: give a tuple of "),
    ],
)
def test_translated_kinds_that_are_not_question_kinds_are_refused_when_the_config_is_made(kinds, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(mpm_mini.QUICK, translated_kinds=kinds)


def test_without_a_yes_share_stage_two_asks_easy_vqas_own_questions(tmp_path):
    """Mostly answered no: 13% of its colour and 35% of its shape yes / no questions are answered yes."""
    scenes, questions, paths = mpm_mini.load_world("train")
    own = {(paths[image_id], question) for image_id, _, _, question in questions}
    rounds = _yes_no_rounds(tmp_path, scenes, questions, paths, None)
    english = [answered for image, asked, answered in rounds if (image, asked) in own]
    assert len(english) > 300 and english.count("yes") / len(english) < 0.3


def test_only_default_retrains_the_shipped_defaults_vocabulary_and_stages(tmp_path):
    """A new word or character in any language's tables would renumber the shipped default's tokens; the default's
    stage 1 is distilled and longer than the table's, its translated share half plain, and its pivot tuned whole at
    the experiment's rate in stage 2; `QUICK`'s few steps stay few."""
    vocabulary = mpm_mini.write_vocabulary(tmp_path / "vocab.txt").read_text("utf-8").splitlines()
    assert vocabulary == (defaults.CHAT / "vocab.txt").read_text("utf-8").splitlines()
    shipped = mpm_mini.shipped(mpm_mini.CONFIG)
    assert shipped.stage1_steps == mpm_mini.SHIPPED_STAGE1_SCALE * mpm_mini.CONFIG.stage1_steps > 2000
    assert shipped.stage1_caption_distillation == {"cpmbee": 1.0}
    assert shipped.translated_plain_share == 0.5 and shipped.stage2_steps == mpm_mini.CONFIG.stage2_steps
    assert shipped.stage2_pivot_learning_rates.get("cpmbee") is None  # the default's pivot tuned at learning_rate
    assert not shipped.stage2_lora and "cpmbee" in mpm_mini.CONFIG.stage2_lora  # ... and tuned whole
    quick = mpm_mini.shipped(mpm_mini.QUICK)
    assert quick.stage1_steps <= 4 and quick.stage2_steps == mpm_mini.QUICK.stage2_steps


def test_only_default_is_an_option_of_mpm_mini(capsys):
    assert main(["experiment", "paint-mini", "--only-default", "--quick"]) == 2
    assert "--only-default" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, named",
    [
        (["paint-mini", "--pivots", "qwen2"], "--pivots is an option of mpm-mini only"),
        (["paint-mini", "--systems", "mpm"], "--systems is an option of mpm-mini only"),
        (["paint-mini", "--resume"], "--resume is an option of mpm-mini only"),
        (["mpm-mini", "--only-default", "--pivots", "qwen2"], "leave out --pivots and --systems"),
        (["mpm-mini", "--install-default", "--pivots", "qwen2"], "include mpm and cpmbee"),
        (["mpm-mini", "--install-default", "--systems", "native"], "include mpm and cpmbee"),
        (["mpm-mini", "--systems", "mpm", "bilingual"], "invalid choice: 'bilingual'"),
    ],
)
def test_a_part_of_mpm_mini_is_refused_before_anything_trains(arguments, named, tmp_path, capsys):
    """--install-default would otherwise find no CPM-Bee mpm model to install after hours of training."""
    assert main(["experiment", *arguments, "--quick", "--output", str(tmp_path / "run")]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_command_line_offers_every_pivot_and_system():
    parser = build_parser()
    subcommands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    options = {action.dest: action.choices for action in subcommands.choices["experiment"]._actions}
    assert tuple(options["pivots"]) == mpm_mini.PIVOTS and tuple(options["systems"]) == mpm_mini.SYSTEMS


def test_quick_runs_of_parts_make_one_table(tmp_path, capsys):
    """Each part in the order asked; a later part of the same recipe adds its rows to the earlier parts', and a
    part of another recipe (here another seed) is refused before it trains, the table left as it was."""

    def part(*arguments):
        assert main(["experiment", "mpm-mini", "--quick", *arguments, "--output", str(tmp_path)]) == 0
        return json.loads((tmp_path / "results.json").read_text())

    results = part("--pivots", "qwen2", "--systems", "native", "mpm", "native")
    assert list(results["systems"]) == ["native (qwen2)", "mpm (qwen2)"] and results["config"]["pivots"] == ["qwen2"]
    first = results["systems"]["native (qwen2)"]
    results = part("--pivots", "cpmbee", "--systems", "mpm")
    assert list(results["systems"]) == ["native (qwen2)", "mpm (qwen2)", "mpm"]
    assert results["config"]["pivots"] == ["qwen2", "cpmbee"] and results["config"]["systems"] == ["native", "mpm"]
    assert results["systems"]["native (qwen2)"] == first
    assert "| native (qwen2) |" in (tmp_path / "table.md").read_text() and "| mpm |" in capsys.readouterr().out
    table = (tmp_path / "results.json").read_bytes()
    models = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    assert main(["experiment", "mpm-mini", "--quick", "--seed", "1", "--output", str(tmp_path)]) == 2
    assert "holds the table of another recipe (seed: 0 there, 1 here)" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_bytes() == table
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == models


@pytest.mark.parametrize("name", ["mpm-mini", "paint-mini"])
def test_an_output_that_is_a_file_is_refused(name, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["experiment", name, "--quick", "--output", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file, and the experiment writes a folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_results_file_of_something_else_is_not_replaced(tmp_path, capsys):
    (tmp_path / "results.json").write_text('{"accuracy": 0.9}')
    assert main(["experiment", "mpm-mini", "--quick", "--output", str(tmp_path)]) == 2
    assert "is not an mpm-mini results file (KeyError" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == '{"accuracy": 0.9}' and len(list(tmp_path.iterdir())) == 1


def test_a_run_cut_short_keeps_the_systems_it_finished(tmp_path, monkeypatch):
    """results.json is written as each system is evaluated, so an interrupted run loses only the system it was in."""
    finished = []
    evaluate = mpm_mini.accuracy

    def accuracy_until_the_second_system(model_dir, examples, **kwargs):
        finished.append(model_dir)
        if len({path.parents[1] for path in finished}) > 1:  # `work / "stage2" / "final"` of a second system
            raise KeyboardInterrupt
        return evaluate(model_dir, examples, **kwargs)

    monkeypatch.setattr(mpm_mini, "accuracy", accuracy_until_the_second_system)
    config = dataclasses.replace(mpm_mini.QUICK, pivots=("qwen2",), systems=("mpm", "native"))
    with pytest.raises(KeyboardInterrupt):
        mpm_mini.run(tmp_path, config, log=lambda *_: None)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["systems"]) == ["mpm (qwen2)"] and not list(tmp_path.glob("*.partial"))
    assert set(results["systems"]["mpm (qwen2)"]["accuracy"]) == set(config.languages)


@pytest.mark.parametrize("kind", mpm_mini.PIVOTS)
def test_a_trained_pivot_is_saved_with_its_losses_and_loads_as_it_was(kind, tmp_path):
    from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer

    vocab = mpm_mini.write_vocabulary(tmp_path / "vocab.txt")
    tokenizer = {
        "cpmbee": lambda: CpmBeeTokenizer(vocab_file=str(vocab)),
        "qwen2": lambda: mpm_mini.qwen2_tokenizer(vocab.read_text("utf-8").splitlines()),
    }[kind]()
    assert mpm_mini.saved_pivot(tmp_path / "pivot") is None
    model, losses = mpm_mini.train_pivot(mpm_mini.QUICK, tokenizer, ("en", "zh"), tmp_path / "pivot", kind)
    loaded, saved_losses = mpm_mini.saved_pivot(tmp_path / "pivot")
    assert type(loaded) is type(model) and saved_losses == losses and len(losses) == mpm_mini.QUICK.pivot_steps
    weights = model.state_dict()
    assert loaded.state_dict().keys() == weights.keys()
    assert all(torch.equal(tensor, weights[name]) for name, tensor in loaded.state_dict().items())


def test_a_run_cut_short_and_resumed_trains_only_the_rest_and_makes_the_same_table(tmp_path, monkeypatch, capsys):
    """--resume keeps the finished systems' rows and loads the pivot they trained: it is not trained again, and every
    row is the row the run would have written without the cut (the models' folders aside)."""

    def rows(results):
        return {name: {**entry, "model": None} for name, entry in results["systems"].items()}

    def command(output, *options, exit_code=0):
        arguments = ["experiment", "mpm-mini", "--quick", "--pivots", "qwen2", *options, "--output", str(output)]
        assert main(arguments) == exit_code
        return json.loads((output / "results.json").read_text())

    whole = command(tmp_path / "whole")
    evaluate, finished = mpm_mini.accuracy, []

    def accuracy_until_the_third_system(model_dir, examples, **kwargs):
        finished.append(model_dir)
        if len({path.parents[1] for path in finished}) > 2:  # mpm and english_pivot done, native cut
            raise KeyboardInterrupt
        return evaluate(model_dir, examples, **kwargs)

    monkeypatch.setattr(mpm_mini, "accuracy", accuracy_until_the_third_system)
    cut = command(tmp_path / "cut", exit_code=130)  # interrupted
    assert list(cut["systems"]) == ["mpm (qwen2)", "english_pivot (qwen2)"]
    monkeypatch.setattr(mpm_mini, "accuracy", evaluate)
    monkeypatch.setattr(mpm_mini, "train_pivot", lambda *args: pytest.fail(f"a pivot trained again: {args[2]}"))
    capsys.readouterr()
    resumed = command(tmp_path / "cut", "--resume")
    assert "mpm (qwen2): kept" in capsys.readouterr().out
    assert resumed["systems"]["mpm (qwen2)"] == cut["systems"]["mpm (qwen2)"]  # its model too: not trained again
    assert list(resumed["systems"]) == list(whole["systems"]) and rows(resumed) == rows(whole)


def test_a_run_cut_before_its_first_row_keeps_its_pivot_from_another_recipes_resume(tmp_path, monkeypatch, capsys):
    """The folder names its recipe before anything trains: a pivot saved by a run cut before its first evaluation is
    not loaded by a --resume of another seed, which is refused."""
    monkeypatch.setattr(mpm_mini, "accuracy", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    arguments = [
        "experiment",
        "mpm-mini",
        "--quick",
        "--pivots",
        "qwen2",
        "--systems",
        "mpm",
        "--output",
        str(tmp_path),
    ]
    assert main(arguments) == 130
    pivot = tmp_path / "pivot-qwen2-en-zh-de-fr-es-it-pt" / mpm_mini.PIVOT_FOLDER / "model.safetensors"
    saved = pivot.read_bytes()
    assert json.loads((tmp_path / "results.json").read_text())["systems"] == {}
    assert main([*arguments, "--resume", "--seed", "1"]) == 2
    assert "holds the table of another recipe (seed: 0 there, 1 here)" in capsys.readouterr().err
    assert pivot.read_bytes() == saved


def test_stage_two_under_lora_keeps_the_pivot_and_evaluates_the_merged_model(tmp_path):
    """`stage2_lora` for a pivot kind: stage 2 trains adapters on the frozen pivot and the vision side whole, and the
    model evaluated is the adapter merged into stage 1's."""
    from safetensors.torch import load_file

    lora = {"r": 4, "alpha": 8, "modules_to_save": ["vpm", "mapping"]}
    config = dataclasses.replace(mpm_mini.QUICK, pivots=("cpmbee",), systems=("mpm",), stage2_lora={"cpmbee": lora})
    results = mpm_mini.run(tmp_path, config, log=lambda *_: None)
    merged = Path(results["systems"]["mpm"]["model"])
    assert merged == tmp_path / "mpm" / "stage2" / "merged" and (tmp_path / "mpm" / "stage2" / "adapter").is_dir()
    stage1 = load_file(tmp_path / "mpm" / "stage1" / "final" / "model.safetensors")
    stage2 = load_file(merged / "model.safetensors")
    assert stage1.keys() == stage2.keys()  # a plain VisCPM-Chat folder: no adapter or wrapper names left
    changed = {name.split(".")[0] for name in stage1 if not torch.equal(stage1[name], stage2[name])}
    assert changed == {"llm", "vpm", "mapping"}, changed  # the adapters merged into the pivot; the rest trained
    embeddings = [name for name in stage1 if name.startswith("llm.") and "embedding" in name]
    assert embeddings and all(torch.equal(stage1[name], stage2[name]) for name in embeddings)  # no adapter there


def test_quick_run_of_the_whole_pipeline(tmp_path, capsys):
    """Every stage of every system for a few steps on tiny sizes, through the command line."""
    assert main(["experiment", "mpm-mini", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["systems"]) == {*mpm_mini.SYSTEMS, *(f"{system} (qwen2)" for system in mpm_mini.SYSTEMS)}
    for entry in results["systems"].values():
        assert set(entry["accuracy"]) == set(g.LANGUAGES) and all(0 <= v <= 1 for v in entry["accuracy"].values())
        assert entry["losses"]["stage2"]
        # where the row was trained: its scores compare bit for bit only with rows of the same machine and versions
        assert entry["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert entry["machine"]["transformers"] == transformers.__version__ and entry["machine"]["cpu"]
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and "| mpm |" in capsys.readouterr().out
    # a logged loss per step at QUICK's few steps: the native system's stage 1, on captions in every language, is longer
    stage1 = {name: len(entry["losses"]["stage1"]) for name, entry in results["systems"].items()}
    assert stage1["native"] == mpm_mini.QUICK.native_stage1_scale * stage1["mpm"] > stage1["mpm"], stage1
    # stage 1 distilled on the pivot kinds `stage1_caption_distillation` names (CPM-Bee), on captions alone elsewhere
    distilled = {
        name: bool(
            json.loads((Path(entry["model"]).parents[1] / "stage1" / "run_summary.json").read_text())[
                "caption_distillation_losses"
            ]
        )
        for name, entry in results["systems"].items()
    }
    assert distilled == {
        name: entry["pivot"] in mpm_mini.QUICK.stage1_caption_distillation for name, entry in results["systems"].items()
    } and any(distilled.values()), distilled


def test_installed_default_decodes_greedily_holds_no_code_and_replaces_the_earlier_one(tmp_path):
    from transformers import AutoModel, GenerationConfig

    from tiny_models import tiny_chat

    model, processor = tiny_chat(tmp_path)
    model.save_pretrained(tmp_path / "trained")
    processor.save_pretrained(tmp_path / "trained")
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "stale.json").write_text("{}")  # the earlier default's: not to survive the install
    results = {"systems": {"mpm": {"model": str(tmp_path / "trained")}}}
    installed = mpm_mini.install_default(results, "mpm", tmp_path / "default")
    assert installed == tmp_path / "default" and sorted(path.name for path in tmp_path.iterdir()) == [
        "default",
        "trained",
        "vocab.txt",
    ]
    assert not (installed / "stale.json").exists() and not list(installed.glob("*.py"))
    assert not [path for path in installed.glob("*.json") if "auto_map" in path.read_text()]
    generation = GenerationConfig.from_pretrained(installed)
    assert generation.num_beams == 1 and generation.max_new_tokens == mpm_mini.EVAL_NEW_TOKENS
    loaded = AutoModel.from_pretrained(installed).state_dict()
    assert all(torch.equal(tensor, loaded[name]) for name, tensor in model.state_dict().items())


def test_shipped_default_answers_held_out_questions_in_both_languages():
    """The default `viscpm chat` model on 120 balanced held-out questions per language (English, and Chinese in
    phrasings its training never saw). It scores 97.5% / 93.3% there (on 600 items: 97.3% / 95.5%; issue 17's goal
    is 95% / 90%): the floors guard the measured model (docs/mpm-mini.md, "Plain questions")."""
    config = dataclasses.replace(mpm_mini.MiniConfig(), eval_questions=120, seed=7, languages=("en", "zh"))
    evaluation = mpm_mini.evaluation_set(config, *mpm_mini.load_world("test"))
    with torch.no_grad():
        scores = {language: mpm_mini.accuracy(defaults.CHAT, examples) for language, examples in evaluation.items()}
    assert scores["en"] >= 0.96 and scores["zh"] >= 0.92, scores


def test_shipped_default_understands_held_out_paraphrases_and_refuses_the_rest():
    """Phrasings, capitals and punctuation no training text contains, and questions outside its world (a fifth),
    120 per language. It scores 94.2% / 97.5% there (on 600 items: 97.7% / 96.0%; goal: 85% in both)."""
    config = dataclasses.replace(mpm_mini.MiniConfig(), eval_questions=120, seed=7, languages=("en", "zh"))
    paraphrases = mpm_mini.paraphrase_set(config, *mpm_mini.load_world("test"))
    with torch.no_grad():
        scores = {language: mpm_mini.accuracy(defaults.CHAT, examples) for language, examples in paraphrases.items()}
    assert scores["en"] >= 0.92 and scores["zh"] >= 0.95, scores


# examples/README.md: the example images are easy-VQA's test images 4, 0 and 23
EXAMPLE_IMAGES = {"circle.png": 4, "triangle.png": 0, "rectangle.png": 23}
PLAIN_QUESTIONS = {
    "en": [
        ("shape", "What shape is in the image?"),
        ("colour", "What colour is it?"),
        ("has_shape", "Is there a circle in the image?"),
    ],
    "zh": [("shape", "图中是什么形状？"), ("colour", "它是什么颜色？"), ("has_shape", "图片里有没有圆形？")],
}


@pytest.mark.parametrize(
    "name",
    [
        "circle.png",
        "rectangle.png",
        "triangle.png",
    ],
)
def test_the_example_images_are_answered_plainly_in_both_languages(name):
    """The example images, asked as a new user would (capitals, plain phrasings), answered as easy-VQA's own labels
    of those images say."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    scenes, _, paths = mpm_mini.load_world("test")
    image_id = EXAMPLE_IMAGES[name]
    image = Image.open(REPO_ROOT / "examples" / name).convert("RGB")
    assert image.tobytes() == Image.open(paths[image_id]).convert("RGB").tobytes()
    model = AutoModel.from_pretrained(defaults.CHAT).eval()
    processor = AutoProcessor.from_pretrained(defaults.CHAT)
    questions = [(language, kind, question) for language, asked in PLAIN_QUESTIONS.items() for kind, question in asked]
    expected = [
        g.answer_in(language, g.answer_for(kind, scenes[image_id], {"shape": "circle"}))
        for language, kind, _ in questions
    ]
    with torch.no_grad():
        answers, _, _ = model.chat([image] * len(questions), [question for *_, question in questions], processor)
    assert [answer.strip() for answer in answers] == expected


def test_the_readme_second_turn_answers_the_colour_of_the_example():
    """The README's Python block: a second question in the first one's context (its features reused)."""
    from transformers import AutoModel, AutoProcessor

    scenes, _, _ = mpm_mini.load_world("test")
    model = AutoModel.from_pretrained(defaults.CHAT).eval()
    processor = AutoProcessor.from_pretrained(defaults.CHAT)
    image = str(REPO_ROOT / "examples" / "circle.png")
    with torch.no_grad():
        _, context, features = model.chat(image, "图中是什么形状？", processor)
        answer, _, _ = model.chat(image, "它是什么颜色？", processor, context=context, vision_hidden_states=features)
    assert answer.strip() == g.answer_in("zh", scenes[EXAMPLE_IMAGES["circle.png"]]["colour"])


def test_readme_main_command_answers_in_chinese_with_the_shipped_default(capsys):
    image = REPO_ROOT / "examples" / "circle.png"
    assert main(["chat", "--image", str(image), "--question", "图中是什么形状？"]) == 0
    assert capsys.readouterr().out.strip() == g.ZH["circle"]


def test_the_shipped_defaults_carry_no_copy_of_the_model_code():
    """They load through the installed package; the remote-code copies every save writes are left out."""
    for folder in (defaults.CHAT, defaults.CPMBEE, defaults.PAINT):
        assert not list(folder.rglob("*.py")), folder
        assert not any("auto_map" in file.read_text("utf-8") for file in folder.rglob("*.json")), folder
