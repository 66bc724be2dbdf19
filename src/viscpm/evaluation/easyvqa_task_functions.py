"""The functions of the local easy-VQA lmms-eval task; `write_task` copies this file next to the task YAMLs as
`utils.py`, where lmms-eval's `!function utils.NAME` finds them. Self-contained: lmms-eval imports it by path."""

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    # mpm-mini's metric: the whole answer, stripped, equals the expected one
    return {"exact_match": float(results[0].strip() == doc["answer"])}
