"""The fixed glossary and question templates of the mpm-mini experiment, in seven languages (no machine translation
anywhere).

easy-vqa's world has three shapes, eight colours and yes / no; its English questions come from 24 templates. Here:

* `WORDS`: each of the 13 answers in Chinese (and the word forms the templates need).
* `ZH_TRAIN_TEMPLATES`: one Chinese phrasing per English question kind: the translated share of stage 2, and the
  questions of the "native" baseline.
* `ZH_EVAL_TEMPLATES`: other Chinese phrasings of the same kinds, never in the stage 1 / 2 data: the Chinese
  evaluation.
* `EN_DESCRIPTION` / `ZH_DESCRIPTION`: how a scene is written as text ("a red circle" / "一个红色的圆形"), for the
  pivot's text and the stage-1 captions.
* German, French, Spanish, Italian and Portuguese (the paper's six-language claim, with English): `WORDS`,
  `DESCRIPTIONS`, `TRAIN_TEMPLATES` (three phrasings per kind), `EVAL_TEMPLATES` and `CAPTION_REQUESTS` per
  language, the same roles as the Chinese tables.

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
    "shape": (
        "what shape is in the image?",
        "what shape does the image contain?",
        "what shape is present?",
        "what is the {colour} shape?",
    ),
    "colour": (
        "what color is the shape?",
        "what color is the {shape}?",
        "what is the color of the {shape}?",
        "what is the color of the shape?",
    ),
    "has_colour": (
        "is there a {colour} shape?",
        "is a {colour} shape present?",
        "is there a {colour} shape in the image?",
        "does the image contain a {colour} shape?",
    ),
    "has_shape": (
        "is there a {shape}?",
        "is a {shape} present?",
        "is there a {shape} in the image?",
        "does the image contain a {shape}?",
    ),
}

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

# Five more languages of the paper's six-language claim (English, German, French, Spanish, Italian, Portuguese),
# written by hand like the Chinese tables. The phrasings keep every slot uninflected: a colour is predicative after
# a masculine or neuter subject ("ist das Objekt rot?", "l'objet est-il rouge ?"), a shape follows "ein" / "un" /
# "um" (every shape noun here is masculine, or neuter in German), so an answer word fills every slot as it is.
EUROPEAN = ("de", "fr", "es", "it", "pt")
LANGUAGES = ("en", "zh", *EUROPEAN)

# one English word per row, its translation in each column
EUROPEAN_GLOSSARY = """
english    de        fr         es          it          pt
circle     Kreis     cercle     círculo     cerchio     círculo
rectangle  Rechteck  rectangle  rectángulo  rettangolo  retângulo
triangle   Dreieck   triangle   triángulo   triangolo   triângulo
red        rot       rouge      rojo        rosso       vermelho
green      grün      vert       verde       verde       verde
blue       blau      bleu       azul        blu         azul
black      schwarz   noir       negro       nero        preto
gray       grau      gris       gris        grigio      cinza
yellow     gelb      jaune      amarillo    giallo      amarelo
teal       türkis    turquoise  turquesa    turchese    turquesa
brown      braun     marron     marrón      marrone     marrom
yes        ja        oui        sí          sì          sim
no         nein      non        no          no          não
"""


def glossary_columns(table: str) -> dict[str, dict[str, str]]:
    """A whitespace-separated table with a header row (`english`, then language codes) as {language: {word: ...}}."""
    header, *rows = (line.split() for line in table.strip().splitlines())
    return {language: {row[0]: row[column] for row in rows} for column, language in enumerate(header) if column}


WORDS = {"zh": ZH, **glossary_columns(EUROPEAN_GLOSSARY)}
GERMAN_NEUTER = ("rectangle", "triangle")  # das Rechteck, das Dreieck: "ein rotes Rechteck", but "ein roter Kreis"

DESCRIPTIONS = {
    "en": EN_DESCRIPTION,
    "zh": ZH_DESCRIPTION,
    "fr": "un {shape} {colour}",
    "es": "un {shape} {colour}",
    "it": "un {shape} {colour}",
    "pt": "um {shape} {colour}",
}

# Three phrasings per kind in each European language, built only from words the tables already had (the vocabulary
# is unchanged). With one, a Qwen2 pivot tied the reply language to that one sentence: asked in an unseen German
# phrasing, it answered in English (docs/mpm-mini.md, "Run G"). Chinese keeps its one, as the shipped default learnt it.
TRAIN_TEMPLATES = {
    "zh": ZH_TRAIN_TEMPLATES,
    "de": {
        "shape": ("Welche Form ist im Bild?", "Welche Figur ist im Bild?", "Was für eine Figur zeigt das Bild?"),
        "colour": (
            "Welche Farbe hat die Form?",
            "Welche Farbe hat die Figur?",
            "Was für eine Farbe hat die Form im Bild?",
        ),
        "has_colour": ("Ist die Form {colour}?", "Hat die Form die Farbe {colour}?", "Ist die Figur {colour}?"),
        "has_shape": ("Ist im Bild ein {shape}?", "Ist die Figur ein {shape}?", "Ist im Bild die Form ein {shape}?"),
    },
    "fr": {
        "shape": (
            "Quelle forme y a-t-il dans l'image ?",
            "Quelle forme montre l'image ?",
            "L'objet est de quelle forme ?",
        ),
        "colour": ("De quelle couleur est l'objet ?", "Quelle couleur a l'objet ?", "L'objet est de quelle couleur ?"),
        "has_colour": (
            "L'objet est-il {colour} ?",
            "Dans l'image, l'objet est-il {colour} ?",
            "L'objet est {colour} ?",
        ),
        "has_shape": (
            "Y a-t-il un {shape} dans l'image ?",
            "L'objet est-il un {shape} ?",
            "Dans l'image, y a-t-il un {shape} ?",
        ),
    },
    "es": {
        "shape": ("¿Qué forma hay en la imagen?", "¿Qué forma muestra la imagen?", "¿De qué forma es el objeto?"),
        "colour": ("¿De qué color es el objeto?", "¿Qué color muestra la imagen?", "¿El objeto es de qué color?"),
        "has_colour": ("¿El objeto es {colour}?", "¿En la imagen el objeto es {colour}?", "¿Es el objeto {colour}?"),
        "has_shape": ("¿Hay un {shape} en la imagen?", "¿El objeto es un {shape}?", "¿Hay en la imagen un {shape}?"),
    },
    "it": {
        "shape": ("Che forma c'è nell'immagine?", "Che forma mostra l'immagine?", "Di che forma è l'oggetto?"),
        "colour": ("Di che colore è l'oggetto?", "Che colore mostra l'immagine?", "L'oggetto è di che colore?"),
        "has_colour": ("L'oggetto è {colour}?", "L'oggetto è {colour} nell'immagine?", "È l'oggetto {colour}?"),
        "has_shape": ("C'è un {shape} nell'immagine?", "È un {shape} l'oggetto?", "C'è un {shape}?"),
    },
    "pt": {
        "shape": ("Que forma há na imagem?", "Que forma a imagem mostra?", "De que forma é o objeto?"),
        "colour": ("De que cor é o objeto?", "Que cor a imagem mostra?", "O objeto é de que cor?"),
        "has_colour": ("O objeto é {colour}?", "Há um objeto {colour} na imagem?", "É o objeto {colour}?"),
        "has_shape": ("Há um {shape} na imagem?", "É um {shape} o objeto?", "Há na imagem um {shape}?"),
    },
}
EVAL_TEMPLATES = {
    "zh": ZH_EVAL_TEMPLATES,
    "de": {
        "shape": ("Was für eine Form siehst du?", "Welche Form hat das Objekt?"),
        "colour": ("In welcher Farbe ist das Objekt?", "Welche Farbe siehst du?"),
        "has_colour": ("Ist das Objekt {colour}?", "Ist die Figur im Bild {colour}?"),
        "has_shape": ("Ist das Objekt ein {shape}?", "Zeigt das Bild ein {shape}?"),
    },
    "fr": {
        "shape": ("Quelle est la forme de l'objet ?", "Tu vois quelle forme ?"),
        "colour": ("Quelle est la couleur de l'objet ?", "Tu vois quelle couleur ?"),
        "has_colour": ("Est-ce que l'objet est {colour} ?", "L'objet de l'image est-il {colour} ?"),
        "has_shape": ("Est-ce que l'objet est un {shape} ?", "L'image montre-t-elle un {shape} ?"),
    },
    "es": {
        "shape": ("¿Cuál es la forma del objeto?", "¿Qué forma ves?"),
        "colour": ("¿Cuál es el color del objeto?", "¿Qué color ves?"),
        "has_colour": ("¿Es {colour} el objeto?", "¿El objeto de la imagen es {colour}?"),
        "has_shape": ("¿Es el objeto un {shape}?", "¿La imagen muestra un {shape}?"),
    },
    "it": {
        "shape": ("Qual è la forma dell'oggetto?", "Che forma vedi?"),
        "colour": ("Qual è il colore dell'oggetto?", "Che colore vedi?"),
        "has_colour": ("È {colour} l'oggetto?", "L'oggetto nell'immagine è {colour}?"),
        "has_shape": ("L'oggetto è un {shape}?", "L'immagine mostra un {shape}?"),
    },
    "pt": {
        "shape": ("Qual é a forma do objeto?", "Que forma você vê?"),
        "colour": ("Qual é a cor do objeto?", "Que cor você vê?"),
        "has_colour": ("É {colour} o objeto?", "O objeto da imagem é {colour}?"),
        "has_shape": ("O objeto é um {shape}?", "A imagem mostra um {shape}?"),
    },
}
# the caption requests of the pivot's text in the new languages (the original's, for English and Chinese, are in
# training/data.py)
CAPTION_REQUESTS = {
    "de": ("Beschreibe das Bild kurz", "Was zeigt das Bild?"),
    "fr": ("Décris l'image brièvement", "Que montre l'image ?"),
    "es": ("Describe la imagen brevemente", "¿Qué muestra la imagen?"),
    "it": ("Descrivi l'immagine brevemente", "Cosa mostra l'immagine?"),
    "pt": ("Descreva a imagem brevemente", "O que a imagem mostra?"),
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
    if language != "en":
        words = {key: WORDS[language][value] if value else value for key, value in words.items()}
    return template.format(**{key: value for key, value in words.items() if value})


def answer_in(language: str, answer: str) -> str:
    return answer if language == "en" else WORDS[language][answer]


def describe(language: str, colour: str, shape: str) -> str:
    if language == "de":  # the adjective's ending follows the noun's gender
        ending = "es" if shape in GERMAN_NEUTER else "er"
        return f"ein {WORDS['de'][colour]}{ending} {WORDS['de'][shape]}"
    return fill(DESCRIPTIONS[language], language, colour, shape)


def train_templates(language: str) -> dict[str, tuple[str, ...]]:
    """The phrasings training may use in ``language``: easy-vqa's for English, the training table otherwise."""
    return EN_TEMPLATES if language == "en" else TRAIN_TEMPLATES[language]


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
    texts = list(ZH) + list(DESCRIPTIONS.values())
    texts += [word for words in WORDS.values() for word in words.values()]
    texts += [describe("de", colour, shape) for colour in COLOURS for shape in SHAPES]
    texts += [request for requests in CAPTION_REQUESTS.values() for request in requests]
    texts += [*REFUSALS.values(), *PLAIN_WRAPPERS["en"], *PLAIN_WRAPPERS["zh"]]
    texts += [
        question
        for table in (OUT_OF_WORLD, HELD_OUT_OUT_OF_WORLD)
        for questions in table.values()
        for question in questions
    ]
    tables = (
        EN_TEMPLATES,
        *TRAIN_TEMPLATES.values(),
        *EVAL_TEMPLATES.values(),
        *PLAIN_TEMPLATES.values(),
        *HELD_OUT_PARAPHRASES.values(),
    )
    for table in tables:
        for templates in table.values():
            texts += list(templates)
    return texts


# Plain questions, as a new user types them (issue 17): the shipped default must not need easy-vqa's lower-case
# templates. `PLAIN_TEMPLATES` are more English and Chinese phrasings per kind, with synonyms (colour / color; shape /
# figure / object; image / picture) and imperative forms; `PLAIN_WRAPPERS` polite and casual frames around any
# question; `surface` varies capitals and punctuation. `HELD_OUT_PARAPHRASES` are phrasings no training text contains
# (tested), built from words the training text does contain: the measure of whether the model understands a question
# rather than recognising a sentence.
PLAIN_TEMPLATES = {
    "en": {
        "shape": (
            "what shape is it?",
            "which shape is in the picture?",
            "what is the object in the image?",
            "name the shape.",
            "tell me the shape of the object.",
            "what kind of figure is shown?",
            "which figure do you see?",
            "what object is in the picture?",
            "say which shape it has.",
        ),
        "colour": (
            "what colour is it?",
            "which colour is the object?",
            "what color does the figure have?",
            "name the colour.",
            "tell me the color of the object.",
            "what is the colour of the figure?",
            "which color do you see?",
            "what colour is the shape in the picture?",
            "identify the colour of the object.",
            "can you tell me what colour it is?",
        ),
        "has_colour": (
            "is it {colour}?",
            "is the object {colour}?",
            "is the figure {colour}?",
            "do you see something {colour}?",
            "is the shape in the picture {colour}?",
        ),
        "has_shape": (
            "is it a {shape}?",
            "is this a {shape}?",
            "is the object a {shape}?",
            "do you see a {shape}?",
            "does the picture show a {shape}?",
        ),
    },
    "zh": {
        "shape": (
            "图中画了什么形状？",
            "图里是什么图形？",
            "图片中的物体是什么？",
            "说出图中的形状。",
            "告诉我这个物体的形状。",
            "图中画的是什么图形？",
        ),
        "colour": (
            "这是什么颜色？",
            "物体是什么颜色的？",
            "说出它的颜色。",
            "告诉我这个图形的颜色。",
            "图片中的形状是什么颜色？",
            "图里的物体是什么颜色？",
            "你能说出它的颜色吗？",
        ),
        "has_colour": (
            "它是{colour}的吗？",
            "这个物体是{colour}的吗？",
            "图形是{colour}的吗？",
            "图片里的形状是{colour}的吗？",
        ),
        "has_shape": ("这是{shape}吗？", "图中的物体是{shape}吗？", "图里画的是{shape}吗？", "图片中有一个{shape}吗？"),
    },
}
PLAIN_WRAPPERS = {
    "en": (
        "{question}",
        "please, {question}",
        "{question} please",
        "hi! {question}",
        "excuse me, {question}",
        "{question} thanks",
        "could you help? {question}",
        "quick question: {question}",
    ),
    "zh": (
        "{question}",
        "请问{question}",
        "你好，{question}",
        "麻烦你，{question}",
        "{question}谢谢",
        "请帮我看看，{question}",
    ),
}
HELD_OUT_PARAPHRASES = {
    "en": {
        "shape": (
            "Which shape is the object?",
            "Please name the figure in the picture.",
            "Identify the shape.",
            "Can you tell me which figure this is?",
        ),
        "colour": (
            "Say which colour it has.",
            "Which color is the figure?",
            "Please name the color of the object.",
            "Can you tell me the colour of the shape?",
        ),
        "has_colour": (
            "Is the shape {colour}?",
            "Please tell me: is the figure in the picture {colour}?",
            "Do you see a {colour} object?",
        ),
        "has_shape": (
            "Is the figure a {shape}?",
            "Do you see a {shape} in the picture?",
            "Please tell me: is this object a {shape}?",
        ),
    },
    "zh": {
        "shape": (
            "图中的物体是什么形状？",
            "请说出图片里的图形。",
            "这个物体是什么图形？",
            "你能告诉我图中是什么形状吗？",
        ),
        "colour": (
            "这个图形是什么颜色？",
            "请说出物体的颜色。",
            "图中的图形是什么颜色的？",
            "你能告诉我它是什么颜色吗？",
        ),
        "has_colour": (
            "图中的物体是{colour}的吗？",
            "请告诉我，这个图形是{colour}的吗？",
            "图片里的物体是{colour}的吗？",
        ),
        "has_shape": ("这个物体是{shape}吗？", "请告诉我，图片中的图形是{shape}吗？", "图里的形状是{shape}吗？"),
    },
}
# questions about anything outside this world get a short refusal, not a guess
REFUSALS = {
    "en": "sorry, I can only tell the colour and shape of the object.",
    "zh": "抱歉，我只能回答物体的颜色和形状。",
}
OUT_OF_WORLD = {
    "en": (
        "what is the weather like?",
        "who drew this?",
        "what animal is this?",
        "what is written in the image?",
        "where was this picture taken?",
        "how old is this person?",
        "what time is it?",
        "is the dog happy?",
        "what is the name of the man?",
        "what is the car doing?",
        "how much does it cost?",
        "tell me a joke.",
        # the forms of in-world questions, about things outside the world: a held-out "What animal do you see?" got
        # a shape, "Who is the person in the picture?" got "no"
        "what animal is in the image?",
        "is there a person in the picture?",
        "who is in the image?",
        "what is the shape doing?",
        "what food is in the picture?",
        "which city is shown in the image?",
    ),
    "zh": (
        "今天天气怎么样？",
        "这是谁画的？",
        "这是什么动物？",
        "图片上写了什么字？",
        "这张照片是在哪里拍的？",
        "这个人多大了？",
        "现在几点了？",
        "小狗开心吗？",
        "那个男人叫什么名字？",
        "这辆车在做什么？",
        "这个多少钱？",
        "给我讲个笑话。",
        "这里有动物吗？",
        "图中有人吗？",
        "这个人是谁？",
        "这个图形在做什么？",
        "图片里有什么食物？",
        "图中是哪个城市？",
    ),
}
HELD_OUT_OUT_OF_WORLD = {
    "en": (
        "Who is the person in the picture?",
        "What animal do you see?",
        "Where was this taken?",
        "What is the weather in the picture?",
    ),
    "zh": ("图片里的人是谁？", "图里有什么动物？", "这是在哪里拍的？", "图片里的天气怎么样？"),
}


FINAL_PUNCTUATION = "?.？。!！"


def surface(question: str, language: str, rng) -> str:
    """``question`` as a user might type it: in a polite or casual frame (English and Chinese), with its first letter
    capitalised or not, its final punctuation kept, dropped or doubled."""
    if language in PLAIN_WRAPPERS:
        question = rng.choice(PLAIN_WRAPPERS[language]).format(question=question)
    if question[:1].isalpha() and question[:1].isascii() and rng.random() < 0.5:
        question = question[:1].swapcase() + question[1:]
    ending = question[-1:]
    if ending in FINAL_PUNCTUATION and question[:-1]:
        question = question[:-1] + rng.choice((ending, ending, "", ending * 2))
    return question


def half_surfaced(question: str, language: str, rng) -> str:
    """Half the time, ``question`` as `surface` writes it; otherwise as it is."""
    return surface(question, language, rng) if rng.random() < 0.5 else question
