"""Limits on the work one command or request may ask for, checked before the work starts.

A chat's cost grows with its prompt and the tokens it may generate; an image's with its pixels, the denoising steps
and the number of images: `viscpm paint --height 100000 --width 100000` grew until the OOM killer ended it, and one
`{"size": "1024x1024", "n": 4}` request held the server's model for hours on CPU. The CLI and the server refuse such
work up front, naming the limit and the flag that raises it.
"""

SEED_LIMIT = 2**64  # torch's generators take seeds below this

# the most tokens one chat answer may ask for or get
DEFAULT_MAX_TOKENS = 512

# the most rows (chat choices, images) the server runs as one batch: memory grows with it
DEFAULT_MAX_BATCH_ROWS = 8

# pixel-steps: four 512 x 512 images (the released VisCPM-Paint's size) at 50 steps
DEFAULT_PAINT_PIXEL_STEPS = 4 * 512 * 512 * 50


class BudgetError(ValueError):
    """Work beyond a configured limit."""


def paint_size(pipeline, height: int | None, width: int | None) -> tuple[int, int]:
    """The size `pipeline` draws at when asked for `height` x `width` (None: its default)."""
    default = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    return height or default, width or default


def check_paint_budget(height: int, width: int, steps: int, count: int, limit: int, flag: str) -> None:
    work = height * width * steps * count
    if work > limit:
        raise BudgetError(
            f"{count} image(s) of {width}x{height} at {steps} steps is {work:,} pixel-steps, more than the limit of "
            f"{limit:,}: draw less, or raise the limit with {flag}"
        )


def check_prompt_tokens(count: int, limit: int, flag: str) -> None:
    if count > limit:
        raise BudgetError(
            f"the prompt has {count} tokens, more than the limit of {limit}: shorten the question or the conversation "
            f"so far, or raise the limit with {flag}"
        )


def check_new_tokens(name: str, count: int, limit: int, flag: str) -> None:
    """``name`` is how the caller asked for ``count`` new tokens (`max_tokens`, `--max-new-tokens`)."""
    if count > limit:
        raise BudgetError(f"{name} must be from 1 to {limit}, the limit: ask for fewer, or raise the limit with {flag}")


def take_prompt_limit(processor, requested: int | None) -> int:
    """The prompt-token limit a command enforces: ``requested`` (its flag), else the model folder's
    `max_prompt_length`. The processor's own check steps aside, so that the flag may raise the limit too."""
    limit = requested or processor.max_prompt_length
    processor.max_prompt_length = None
    return limit
