# Copyright 2026 The viscpm authors. Licensed under the Apache License, Version 2.0.
"""Tokenizer for CPM-Bee, the language model of VisCPM.

CPM-Bee text is a small markup language: `<name>` is a special token (`<ans>`, `<unk>`, `<ans_1>`, ...), `<<` is
a literal `<`, and everything else is split by greedy longest match over a plain-text vocabulary. Special tokens
that are not in the vocabulary (`<ans_1>`, `<b>`) and runs of characters that are not in it (emoji, rare CJK, tabs)
get "ext" ids local to one encoding call (`vocab_size + k`), listed in an ext table that maps them back to text.
"""

import os
from typing import NamedTuple

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}

# The vocabulary file has one token per line, so newline and space are spelled as these two entries.
VOCAB_FILE_SPELLING = {"\n": "</n>", " ": "</_>"}


class CpmBeeToken(NamedTuple):
    """One token of a CPM-Bee text, with the details the original tokenizer reports."""

    text: str
    # Offset in the text after `<<` escapes are resolved: every `<<` counts as one character (original behaviour).
    start: int
    # A maximal run of characters that are not in the vocabulary.
    is_unk: bool
    # A `<...>` token (in the vocabulary or not).
    is_special: bool


def load_vocab(vocab_file: str) -> dict[str, int]:
    """Reads a CPM-Bee vocabulary: the id of a token is its line index, empty lines not counted."""
    vocab: dict[str, int] = {}
    # Text mode with universal newlines, like the original, so `\r\n` files load the same.
    with open(vocab_file, encoding="utf-8") as reader:
        for line in reader:
            token = line.removesuffix("\n")
            if not token:
                continue
            if token in vocab:
                # The original silently gives a repeated line the id `len(vocab)`, which shifts every later id.
                raise ValueError(f"{vocab_file} lists the token {token!r} twice; every vocabulary line must be unique.")
            vocab[token] = len(vocab)
    return vocab


def is_special_token_text(text: str) -> bool:
    return text.startswith("<") and text.endswith(">")


class CpmBeeTokenizer(PreTrainedTokenizer):
    """
    Construct a CPM-Bee tokenizer over the original CPM-Bee vocabulary file (`bee.txt`).

    Two ways to encode:

    - [`~CpmBeeTokenizer.encode_with_ext_table`] is the original `CPMBeeTokenizer.encode`: ids plus an ext table that
      gives every unknown special token and every out-of-vocabulary run its own id `vocab_size + k`. This is what
      CPM-Bee's structured input format (`structured_cpmbee.py`) is built on.
    - The usual `tokenizer(text)` / `tokenizer.encode(text)` give the same ids for text inside the vocabulary, and
      the `<unk>` id for what would be an ext id (transformers' convention for unknown tokens).

    `decode(ids, ext_table=...)` is the original decode: ids found in `ext_table` decode to their text, negative ids
    are skipped, ext ids missing from the table are dropped, plain tokens are re-escaped (`<` -> `<<`) and special
    tokens are not, so that the result is CPM-Bee markup for the same text.

    Args:
        vocab_file (`str`):
            Path to the vocabulary file: one token per line, `</n>` and `</_>` standing for newline and space.
        unk_token, bos_token, eos_token, pad_token, mask_token (`str`):
            Special tokens; each must be a line of the vocabulary file.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ("input_ids", "attention_mask")

    def __init__(
        self,
        vocab_file,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        **kwargs,
    ):
        # The base class initializer already asks for the vocabulary, so it has to be loaded first.
        self.encoder = load_vocab(vocab_file)
        for character, spelling in VOCAB_FILE_SPELLING.items():
            if spelling in self.encoder:
                self.encoder[character] = self.encoder.pop(spelling)
        self.decoder = {token_id: token for token, token_id in self.encoder.items()}
        # Greedy matching never produces a `<...>` entry: those are only reachable through the markup.
        self._plain_tokens = {token for token in self.encoder if not is_special_token_text(token)}
        self._max_plain_token_length = max((len(token) for token in self._plain_tokens), default=1)

        named_special_tokens = {
            "unk_token": unk_token,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "mask_token": mask_token,
        }
        missing = {
            name: str(token)
            for name, token in named_special_tokens.items()
            if token is not None and str(token) not in self.encoder
        }
        if missing:
            # transformers would append them after the vocabulary, where CPM-Bee puts its ext ids.
            raise ValueError(
                f"{vocab_file} lacks the special tokens {missing}; add each of them as a line of the file."
            )

        super().__init__(**named_special_tokens, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def ans_token_id(self) -> int:
        """Id of `<ans>`, which marks the segments CPM-Bee has to predict."""
        return self.encoder["<ans>"]

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **self.added_tokens_encoder}

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        unknown = [str(token) for token in new_tokens or [] if str(token) and str(token) not in self.encoder]
        if unknown:
            raise ValueError(
                f"Cannot add {unknown}: CPM-Bee uses the ids after its vocabulary for ext-table tokens, and its own "
                "`<...>` markup decides what is special. Add them as lines of the vocabulary file instead."
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    @staticmethod
    def escape(text: str) -> str:
        """Makes `text` literal: without it, `<` starts a special token."""
        return text.replace("<", "<<")

    def tokenize(self, text: str, **kwargs) -> list[str]:
        # The base class first splits the text on its registered special tokens, which would read `<<s>` as
        # `<` + `<s>`; in CPM-Bee markup it is a literal `<` followed by `s>`. The markup alone decides.
        return self._tokenize(text)

    def _tokenize(self, text: str) -> list[str]:
        return [token.text for token in self.tokenize_with_details(text)]

    def tokenize_with_details(self, text: str) -> list[CpmBeeToken]:
        """Tokenizes `text` like the original `CPMBeeTokenizer.tokenize`, reporting each token's offset and kind."""
        tokens = []
        offset = 0
        for chunk, is_special in self._split_markup(text):
            if is_special:
                tokens.append(CpmBeeToken(chunk, offset, is_unk=False, is_special=True))
            else:
                tokens.extend(self._split_plain_text(chunk, offset))
            offset += len(chunk)
        return tokens

    def _split_markup(self, text: str) -> list[tuple[str, bool]]:
        """Splits `text` into `(chunk, is_special)` pairs: plain chunks (escapes resolved) and `<...>` tokens."""
        chunks = []
        plain = []
        position = 0
        while position < len(text):
            character = text[position]
            if character != "<":
                plain.append(character)
                position += 1
                continue
            if position + 1 == len(text):
                raise self._markup_error(f"Unexpected end of text `{text}`")
            if text[position + 1] == "<":
                plain.append("<")
                position += 2
                continue
            # The character right after `<` belongs to the name even if it is `>`: `<>x>` is one special token.
            end = position + 2
            while end < len(text) and text[end] not in "<>":
                end += 1
            if end == len(text):
                raise self._markup_error(f"Unexpected end of text `{text}`")
            if text[end] == "<":
                raise self._markup_error(f"Invalid special token at pos {end}")
            if plain:
                chunks.append(("".join(plain), False))
                plain = []
            chunks.append((text[position : end + 1], True))
            position = end + 1
        if plain:
            chunks.append(("".join(plain), False))
        return chunks

    @staticmethod
    def _markup_error(problem: str) -> ValueError:
        return ValueError(
            f"{problem}: `<` starts a special token such as `<ans>`; write `<<` for a literal `<` "
            "(CpmBeeTokenizer.escape does this for a whole text)."
        )

    def _split_plain_text(self, text: str, offset: int) -> list[CpmBeeToken]:
        """Greedy longest match; characters with no match are grouped into one unknown token per maximal run."""
        tokens = []
        unknown_run_start = None
        position = 0
        while position < len(text):
            piece = self._longest_plain_token_at(text, position)
            if piece is None:
                if unknown_run_start is None:
                    unknown_run_start = position
                position += 1
                continue
            if unknown_run_start is not None:
                run = text[unknown_run_start:position]
                tokens.append(CpmBeeToken(run, offset + unknown_run_start, is_unk=True, is_special=False))
                unknown_run_start = None
            tokens.append(CpmBeeToken(piece, offset + position, is_unk=False, is_special=False))
            position += len(piece)
        if unknown_run_start is not None:
            run = text[unknown_run_start:]
            tokens.append(CpmBeeToken(run, offset + unknown_run_start, is_unk=True, is_special=False))
        return tokens

    def _longest_plain_token_at(self, text: str, position: int) -> str | None:
        for end in range(min(len(text), position + self._max_plain_token_length), position, -1):
            if text[position:end] in self._plain_tokens:
                return text[position:end]
        return None

    def encode_with_ext_table(
        self, text: str, past_table: dict[int, str] | None = None
    ) -> tuple[list[int], dict[int, str]]:
        """
        The original `CPMBeeTokenizer.encode`: ids of `text` and the ext table of the ids past the vocabulary.

        Unknown special tokens and out-of-vocabulary runs get `vocab_size + k`, the same id for the same text.
        `past_table` (for example the table of an earlier call) is copied into the returned table, which is a new
        dict, and its entries are reused.
        """
        ext_table = dict(past_table or {})
        ext_ids = {token: token_id for token_id, token in ext_table.items()}
        ids = []
        for token in self.tokenize_with_details(text):
            if token.is_unk or (token.is_special and token.text not in self.encoder):
                if token.text not in ext_ids:
                    # Counted from the reverse table, as in the original (a past table repeating a text is smaller).
                    new_id = self.vocab_size + len(ext_ids)
                    ext_ids[token.text] = new_id
                    ext_table[new_id] = token.text
                ids.append(ext_ids[token.text])
            else:
                ids.append(self.encoder[token.text])
        return ids, ext_table

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[str(self.unk_token)])

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index, str(self.unk_token))

    def _token_as_text(self, token: str) -> str:
        """How `token` is written in CPM-Bee markup."""
        if token in self._plain_tokens:
            return self.escape(token)
        # Special tokens, and the texts of ext-table tokens, are written as they are.
        return token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(self._token_as_text(token) for token in tokens)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        ext_table: dict[int, str] | None = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        ext_table = ext_table or {}
        skipped_ids = set(self.all_special_ids) if skip_special_tokens else set()
        pieces = []
        for token_id in token_ids:
            # The ext table comes first: a per-sample table may give a plain id such as `<unk>` its real text.
            if token_id in ext_table:
                pieces.append(ext_table[token_id])
            elif token_id < 0 or token_id >= self.vocab_size:
                # Negative ids are padding / ignored labels, and an ext id without its table has no text.
                continue
            elif token_id not in skipped_ids:
                pieces.append(self._token_as_text(self.decoder[token_id]))
        text = "".join(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory")
        vocab_file = os.path.join(
            save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        )
        lines = [
            VOCAB_FILE_SPELLING.get(self.decoder[token_id], self.decoder[token_id])
            for token_id in range(self.vocab_size)
        ]
        # `newline=""` keeps `\n` on every platform; no final newline, like the original bee.txt.
        with open(vocab_file, "w", encoding="utf-8", newline="") as writer:
            writer.write("\n".join(lines))
        return (vocab_file,)


__all__ = ["CpmBeeToken", "CpmBeeTokenizer"]
