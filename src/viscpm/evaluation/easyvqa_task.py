"""mpm-mini's evaluation items as local lmms-eval tasks (`viscpm_easyvqa_en`, `viscpm_easyvqa_zh`, ...): the same
easy-VQA test images, questions and expected answers that `viscpm experiment mpm-mini` scores, in a folder that
`lmms-eval --include_path FOLDER` reads with no network (a JSON-lines file per language, a task YAML per language,
and the task's functions as `utils.py`). The metric is the experiment's: exact match of the stripped answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..experiments import mpm_mini
from . import easyvqa_task_functions

TASK_PREFIX = "viscpm_easyvqa_"
NEW_TOKENS = mpm_mini.EVAL_NEW_TOKENS

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {new_tokens}
  do_sample: false
  num_beams: 1
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def evaluation_items(languages=("en", "zh"), limit: int | None = None) -> dict[str, list[tuple[str, str, str]]]:
    """`(image path, question, expected answer)` per language: the first `limit` items of mpm-mini's evaluation
    set for the shipped default's configuration."""
    config = mpm_mini.shipped(mpm_mini.CONFIG)
    missing = sorted(set(languages) - set(config.languages))
    if missing:
        raise ValueError(f"mpm-mini evaluates {list(config.languages)}, not {missing}")
    sets = mpm_mini.evaluation_set(config, *mpm_mini.load_world("test"))
    return {language: sets[language][:limit] for language in languages}


def write_task(folder: str | Path, languages=("en", "zh"), limit: int | None = None) -> list[str]:
    """Write the tasks into `folder`; returns their names."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(easyvqa_task_functions.__file__, folder / "utils.py")
    names = []
    for language, items in evaluation_items(languages, limit).items():
        data = folder / f"{language}.jsonl"
        lines = [
            json.dumps({"image": path, "question": question, "answer": answer}, ensure_ascii=False)
            for path, question, answer in items
        ]
        data.write_text("\n".join(lines) + "\n", "utf-8")
        names.append(TASK_PREFIX + language)
        text = TASK_YAML.format(task=names[-1], data=json.dumps(str(data)), new_tokens=NEW_TOKENS)
        (folder / f"{names[-1]}.yaml").write_text(text, "utf-8")
    return names
