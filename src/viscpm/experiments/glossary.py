"""The fixed glossary and question templates of the mpm-mini experiment (no machine translation anywhere).

easy-vqa's world has three shapes, eight colours and yes / no; its English questions come from 24 templates. Here:

* `WORDS`: each of the 13 answers in Chinese (and the word forms the templates need).
* `ZH_TRAIN_TEMPLATES`: one Chinese phrasing per English question kind: the translated share of stage 2, and the
  questions of the "native" baseline.
* `ZH_EVAL_TEMPLATES`: other Chinese phrasings of the same kinds, never in the stage 1 / 2 data: the Chinese
  evaluation.
* `EN_DESCRIPTION` / `ZH_DESCRIPTION`: how a scene is written as text ("a red circle" / "一个红色的圆形"), for the
  pivot's text and the stage-1 captions.

Question kinds: `shape` (what shape), `colour` (what colour), `has_colour` (is there a <colour> shape: yes / no),
`has_shape` (is there a <shape>: yes / no). easy-vqa's negated questions ("does the image not contain ...") have no
unambiguous yes / no in Chinese and are left out of every Chinese set (and of the English evaluation, so that both
languages are scored on the same kinds of question).
"""

from __future__ import annotations

import re

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")

ZH = {
    "circle": "圆形",
    "rectangle": "矩形",
    "triangle": "三角形",
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "black": "黑色",
    "gray": "灰色",
    "yellow": "黄色",
    "teal": "青色",
    "brown": "棕色",
    "yes": "是",
    "no": "否",
}

EN_DESCRIPTION = "a {colour} {shape}"
ZH_DESCRIPTION = "一个{colour}的{shape}"

# easy-vqa's English templates, by kind ({colour} / {shape} filled from the question); negated ones are excluded
EN_TEMPLATES = {
    "shape": ("what shape is in the image?", "what shape does the image contain?", "what shape is present?",
              "what is the {colour} shape?"),
    "colour": ("what color is the shape?", "what color is the {shape}?", "what is the color of the {shape}?",
               "what is the color of the shape?"),
    "has_colour": ("is there a {colour} shape?", "is a {colour} shape present?",
                   "is there a {colour} shape in the image?", "does the image contain a {colour} shape?"),
    "has_shape": ("is there a {shape}?", "is a {shape} present?", "is there a {shape} in the image?",
                  "does the image contain a {shape}?"),
}  # fmt: skip

ZH_TRAIN_TEMPLATES = {
    "shape": ("图中是什么形状？",),
    "colour": ("这个形状是什么颜色？",),
    "has_colour": ("图中有{colour}的形状吗？",),
    "has_shape": ("图中有{shape}吗？",),
}
ZH_EVAL_TEMPLATES = {
    "shape": ("图片里的图形是什么形状？", "这是什么形状？"),
    "colour": ("图片里的图形是什么颜色的？", "它是什么颜色？"),
    "has_colour": ("图片里有没有{colour}的图形？", "这张图里有{colour}的东西吗？"),
    "has_shape": ("图片里有没有{shape}？", "这张图里有{shape}吗？"),
}

_SLOT = {"{colour}": "(?P<colour>" + "|".join(COLOURS) + ")", "{shape}": "(?P<shape>" + "|".join(SHAPES) + ")"}


def _pattern(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for slot, group in _SLOT.items():
        pattern = pattern.replace(re.escape(slot), group)
    return re.compile(f"^{pattern}$")


_EN_PATTERNS = [(kind, _pattern(template)) for kind, templates in EN_TEMPLATES.items() for template in templates]


def question_kind(question: str) -> tuple[str, dict] | None:
    """The kind and slots of one of easy-vqa's English questions; None for the negated ones."""
    for kind, pattern in _EN_PATTERNS:
        match = pattern.match(question)
        if match:
            return kind, {name: value for name, value in match.groupdict().items() if value}
    return None


def fill(template: str, language: str, colour: str | None = None, shape: str | None = None) -> str:
    words = {"colour": colour, "shape": shape}
    if language == "zh":
        words = {key: ZH[value] if value else value for key, value in words.items()}
    return template.format(**{key: value for key, value in words.items() if value})


def answer_in(language: str, answer: str) -> str:
    return ZH[answer] if language == "zh" else answer


def describe(language: str, colour: str, shape: str) -> str:
    return fill(EN_DESCRIPTION if language == "en" else ZH_DESCRIPTION, language, colour, shape)


def answer_for(kind: str, scene: dict, slots: dict) -> str:
    """The English answer to a question of `kind` with `slots` about a scene `{colour, shape}`."""
    if kind == "shape":
        return scene["shape"]
    if kind == "colour":
        return scene["colour"]
    if kind == "has_colour":
        return "yes" if slots["colour"] == scene["colour"] else "no"
    return "yes" if slots["shape"] == scene["shape"] else "no"


def all_texts() -> list[str]:
    """Every string the experiment's vocabulary must cover (the templates, the glossary, the descriptions)."""
    texts = list(ZH.values()) + list(ZH) + [EN_DESCRIPTION, ZH_DESCRIPTION]
    for table in (EN_TEMPLATES, ZH_TRAIN_TEMPLATES, ZH_EVAL_TEMPLATES):
        for templates in table.values():
            texts += list(templates)
    return texts
