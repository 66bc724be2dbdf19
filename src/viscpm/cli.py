"""The `viscpm` command line (also `python -m viscpm`). Its commands (`viscpm COMMAND --help` for every option):

    viscpm convert chat|paint --checkpoint ORIGINAL.pt --vocab bee.txt --output DIR   original checkpoint -> Hub folder
    viscpm chat [--model DIR] --image PATH --question TEXT                           one answer about an image
    viscpm paint [--model DIR] -o PNG PROMPT                                          text to image
    viscpm train chat-pretrain|chat-sft|paint --config FILE [--set KEY=VALUE] [--resume]
    viscpm merge-lora ADAPTER_DIR --output DIR [--base DIR]                           a LoRA adapter into its base
    viscpm assemble-chat --pivot DIR [--vision DIR] --output DIR                      VisCPM-Chat around any LLM
    viscpm experiment mpm-mini|paint-mini [--output DIR] [--quick]                    the toy-scale MpM runs
    viscpm serve [--model DIR] [--paint-model DIR]                                    the HTTP API
    viscpm demo chat|paint [--model DIR]                                              the browser demo

One function per (sub)command, all wired up in `build_parser()`: a new command (`paint`, `train`, `serve`, `demo`)
is a `_add_<name>_parser(subcommands)` plus a `_run_<name>(args) -> int`; a new converter is one more parser under
`convert`. Bad input ends in one line `viscpm: error: ...` on stderr and exit status 2 (argparse's convention), never
in a traceback.
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__, budgets, defaults

PROG = "viscpm"
# exit status of a usage or input error (argparse's own) and of an interrupt (128 + SIGINT)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """Bad input a command found: printed as one `viscpm: error: ...` line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < budgets.SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**64 - 1, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------------- convert


def _add_convert_parser(subcommands) -> None:
    convert = subcommands.add_parser(
        "convert",
        help="convert an original VisCPM checkpoint into a Hugging Face folder",
        description="Convert an original VisCPM checkpoint into a folder that transformers' Auto classes load "
        "(after `import viscpm`).",
    )
    models = convert.add_subparsers(dest="model", metavar="MODEL", required=True)

    chat = models.add_parser(
        "chat",
        help="VisCPM-Chat",
        description="Convert an original VisCPM-Chat checkpoint (model, tokenizer, image processor, processor) into "
        "DIR. The folder appears only when complete.",
    )
    _add_conversion_arguments(chat)
    chat.set_defaults(handler=_run_convert_chat)

    paint = models.add_parser(
        "paint",
        help="VisCPM-Paint",
        description="Convert an original VisCPM-Paint checkpoint (CPM-Bee text encoder, bridge, UNet) and a Stable "
        "Diffusion 2.1 base VAE into a diffusers pipeline folder. The folder appears only when complete.",
    )
    _add_conversion_arguments(paint)
    paint.add_argument("--vae", type=Path, metavar="DIR", help="diffusers AutoencoderKL folder (SD 2.1 base's VAE)")
    paint.set_defaults(handler=_run_convert_paint)


def _add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every `viscpm convert MODEL` shares."""
    parser.add_argument("--checkpoint", type=Path, metavar="ORIGINAL.pt", help="original checkpoint")
    parser.add_argument("--vocab", type=Path, metavar="bee.txt", help="CPM-Bee vocabulary file")
    parser.add_argument(
        "--output", required=True, type=Path, metavar="PATH", help="folder to write (.pt file with --to-original)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="original-format JSON config, for what the weights do not show (default: the released model's)",
    )
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="weights dtype (default: the checkpoint's)")
    parser.add_argument(
        "--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (default 5GB)"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the written weights and comparing them with the source"
    )
    parser.add_argument(
        "--to-original",
        type=Path,
        metavar="DIR",
        help="the other way: write the converted folder DIR back as an original checkpoint at --output",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def _convert(args: argparse.Namespace, to_hub: Callable, to_original: Callable) -> int:
    """Run one direction of a conversion with the shared checks and one-line errors."""
    from .conversion.checkpoint import CheckpointError

    try:
        if args.to_original is not None:
            if not args.to_original.is_dir():
                raise CommandError(f"--to-original {args.to_original}: no such folder")
            if args.output.exists() and not args.overwrite:
                raise CommandError(f"{args.output} exists: choose another --output or pass --overwrite")
            output = to_original(args.to_original, args.output)
            print(f"wrote {args.to_original} back as {output}")
            return 0
        for flag, path in (("--checkpoint", args.checkpoint), ("--vocab", args.vocab)):
            if path is None:
                raise CommandError(f"{flag} is required (or --to-original DIR)")
        for flag, path in (("--checkpoint", args.checkpoint), ("--vocab", args.vocab), ("--config", args.config)):
            if path is not None and not path.is_file():
                raise CommandError(f"{flag} {path}: no such file")
        output = to_hub(args)
    except json.JSONDecodeError as error:
        raise CommandError(f"--config {args.config} is not valid JSON: {error}") from error
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    except OSError as error:  # a full disk, a folder that cannot be written
        raise CommandError(f"--output {args.output}: {error.strerror or error} ({error.filename or ''})") from error
    except (TypeError, KeyError) as error:
        if args.config is None:
            raise
        raise CommandError(f"--config {args.config}: a value is missing or of the wrong type ({error})") from error
    print(f"converted {args.checkpoint} to {output}")
    return 0


def _conversion_options(args: argparse.Namespace) -> dict:
    return dict(
        config=args.config,
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        verify=not args.no_verify,
    )


def _run_convert_chat(args: argparse.Namespace) -> int:
    from .conversion.chat import chat_to_original, convert_chat

    def to_hub(args):
        return convert_chat(args.checkpoint, args.vocab, args.output, **_conversion_options(args))

    return _convert(args, to_hub, chat_to_original)


def _run_convert_paint(args: argparse.Namespace) -> int:
    with _needs_extra("converting Paint", "paint"):
        from .conversion.paint import convert_paint, paint_to_original

    def to_hub(args):
        if args.vae is None or not args.vae.is_dir():
            raise CommandError(f"--vae {args.vae}: give the folder of a diffusers AutoencoderKL (SD 2.1 base's VAE)")
        return convert_paint(args.checkpoint, args.vocab, args.vae, args.output, **_conversion_options(args))

    return _convert(args, to_hub, paint_to_original)


# ------------------------------------------------------------------------------------------------------------- chat


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """For the commands that load a model to answer (chat, paint, serve, demo): transformers' weight-loading bars and
    advisory warnings (e.g. generation flags that greedy search ignores) are off unless --verbose. Long work keeps its
    bars (conversion, training; paint's steps on a terminal: `_draw`). The previous settings come back afterwards."""
    if verbose:
        yield
        return
    from transformers.utils import logging as transformers_logging

    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_bitsandbytes(verbose: bool):
    """diffusers and peft import bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 its import logs
    a note about an optional kernel package: noise for every command, quantizing or not. Off unless --verbose."""
    bitsandbytes_logger = logging.getLogger("bitsandbytes")
    level = bitsandbytes_logger.level
    if not verbose:
        bitsandbytes_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bitsandbytes_logger.setLevel(level)


def _load(what: str, load: Callable, folder: Path):
    """`load(folder)`. A folder the user names can fail to load in many ways (truncated weights, a config value of
    the wrong type, a missing file): each ends in one line naming the folder and the cause."""
    try:
        return load(folder)
    except Exception as error:
        raise CommandError(f"--model {folder}: cannot load the {what} ({type(error).__name__}: {error})") from error


def _add_pixel_budget_argument(parser) -> None:
    parser.add_argument(
        "--max-pixel-steps",
        type=_positive_int,
        default=budgets.DEFAULT_PAINT_PIXEL_STEPS,
        metavar="N",
        help="refuse drawing beyond height x width x steps x images = N, before it starts "
        f"(default {budgets.DEFAULT_PAINT_PIXEL_STEPS:,}: four 512x512 images at 50 steps)",
    )


def _add_chat_budget_arguments(parser, asked_with: str) -> None:
    parser.add_argument(
        "--max-prompt-tokens",
        type=_positive_int,
        metavar="N",
        help="refuse a prompt (question, conversation so far, image slots) longer than N tokens, before generating "
        "(default: the model folder's max_prompt_length, the original's 3000 for the released model)",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=budgets.DEFAULT_MAX_TOKENS,
        metavar="N",
        help=f"the most tokens one answer may ask for ({asked_with}) or get (default {budgets.DEFAULT_MAX_TOKENS})",
    )


def _add_verbose_argument(parser) -> None:
    parser.add_argument(
        "--verbose", action="store_true", help="show the libraries' model-loading progress bars and warnings"
    )


def _add_chat_parser(subcommands) -> None:
    chat = subcommands.add_parser(
        "chat",
        help="ask VisCPM-Chat a question about an image",
        description="Ask a converted VisCPM-Chat model one question about an image (on CPU, float32). Decoding "
        "defaults come from the folder's generation_config.json (the original's: beam search with 3 beams); the "
        "options below override them only when given.",
    )
    chat.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="converted VisCPM-Chat folder (default: the toy model shipped with viscpm, trained by "
        "`viscpm experiment mpm-mini`)",
    )
    chat.add_argument("--image", required=True, type=Path, metavar="PATH", help="image file")
    chat.add_argument("--question", required=True, metavar="TEXT", help="the question (CPM-Bee markup: write < as <<)")
    chat.add_argument(
        "--context",
        default="",
        metavar="TEXT",
        help='the conversation so far, "User: ...\\nAI: ...\\n" per turn (the "context" of an earlier --json)',
    )
    chat.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", help="most tokens to generate (within --max-tokens)"
    )
    chat.add_argument("--num-beams", type=_positive_int, metavar="N", help="beams of the beam search (1: greedy)")
    chat.add_argument("--do-sample", action="store_true", help="sample instead of searching")
    chat.add_argument("--seed", type=_seed, metavar="S", help="seed torch's random generator (for --do-sample)")
    chat.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object {"answer", "context", "token_ids"} instead of the answer',
    )
    _add_chat_budget_arguments(chat, "--max-new-tokens")
    _add_verbose_argument(chat)
    chat.set_defaults(handler=_run_chat)


def _chat_folder(model_dir: Path | None) -> Path:
    """The VisCPM-Chat folder to load: `--model`, or the shipped toy model without it; fails early, and clearly, on a
    folder that is not a converted VisCPM-Chat model."""
    from .modeling.configuration_viscpm_chat import VisCPMChatConfig

    if model_dir is None:
        return _shipped_default(defaults.CHAT, "config.json", "--model", "chat")

    if not model_dir.exists():
        raise CommandError(f"--model {model_dir}: no such folder")
    if not model_dir.is_dir():
        raise CommandError(f"--model {model_dir}: not a folder (pass the folder `viscpm convert chat` wrote)")
    config_file = model_dir / "config.json"
    hint = "convert the original checkpoint with `viscpm convert chat`"
    if not config_file.is_file():
        raise CommandError(f"--model {model_dir}: no config.json, not a converted VisCPM-Chat folder ({hint})")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, OSError) as error:
        raise CommandError(f"--model {model_dir}: cannot read config.json ({error})") from error
    if model_type != VisCPMChatConfig.model_type:
        raise CommandError(
            f"--model {model_dir}: a {model_type!r} model, not VisCPM-Chat ({VisCPMChatConfig.model_type!r}); {hint}"
        )
    return model_dir


def _shipped_default(folder: Path, marker: str, flag: str, kind: str) -> Path:
    """A toy model shipped in the package (docs/mpm-mini.md, docs/paint-mini.md), used when `flag` is not given."""
    if not (folder / marker).is_file():
        raise CommandError(
            f"no {flag} given and the shipped default {folder} is missing: pass {flag} DIR (a folder written by "
            f"`viscpm convert {kind}`), or reinstall viscpm"
        )
    return folder


def _paint_folder(model_dir: Path | None, flag: str = "--model") -> Path:
    """The VisCPM-Paint pipeline folder to load: `flag`'s, or the shipped toy pipeline without it."""
    if model_dir is None:
        return _shipped_default(defaults.PAINT, "model_index.json", flag, "paint")
    if not (model_dir / "model_index.json").is_file():
        raise CommandError(
            f"{flag} {model_dir}: not a converted VisCPM-Paint folder (no model_index.json); write one with "
            "`viscpm convert paint`"
        )
    return model_dir


def _run_chat(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise CommandError("--question is empty: ask a question about the image")
    args.model = _chat_folder(args.model)
    with _quiet_libraries(args.verbose):
        return _answer(args)


def _answer(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModel, AutoProcessor

    from .modeling.image_processing_viscpm_chat import InvalidImageError, load_image

    processor = _load("processor", AutoProcessor.from_pretrained, args.model)
    try:
        # the folder's own pixel limit, if it has one
        image_processor = getattr(processor, "image_processor", None)
        image = image_processor.load_image(args.image) if image_processor is not None else load_image(args.image)
    except InvalidImageError as error:  # ImageTooLargeError included
        raise CommandError(f"--image: {error}") from error
    max_prompt_tokens = budgets.take_prompt_limit(processor, args.max_prompt_tokens)
    try:
        # prompt checks (markup, length) before the model is loaded; chat() builds the same prompt again
        prompt_tokens = processor(text=args.question, context=args.context)["input_ids"].shape[1]
        budgets.check_prompt_tokens(prompt_tokens, max_prompt_tokens, "--max-prompt-tokens")
        if args.max_new_tokens is not None:
            budgets.check_new_tokens("--max-new-tokens", args.max_new_tokens, args.max_tokens, "--max-tokens")
    except ValueError as error:  # BudgetError included
        raise CommandError(str(error)) from error
    model = _load("model", functools.partial(AutoModel.from_pretrained, dtype=torch.float32), args.model).eval()

    # without --max-new-tokens: the folder's default, within --max-tokens
    overrides = {
        "max_new_tokens": args.max_new_tokens
        or min(model.generation_config.max_new_tokens or args.max_tokens, args.max_tokens)
    }
    if args.num_beams is not None:
        overrides["num_beams"] = args.num_beams
    if args.do_sample:
        overrides["do_sample"] = True
    if args.seed is not None:
        torch.manual_seed(args.seed)

    answer, context, _, token_ids = model.chat(
        image, args.question, processor, context=args.context, return_token_ids=True, **overrides
    )
    if args.json:
        print(json.dumps({"answer": answer, "context": context, "token_ids": token_ids}, ensure_ascii=False))
    else:
        print(answer)
    return 0


# ------------------------------------------------------------------------------------------------------------ paint


def _add_paint_parser(subcommands) -> None:
    paint = subcommands.add_parser(
        "paint",
        help="draw an image from a prompt with VisCPM-Paint",
        description="Draw an image from a Chinese or English prompt with a converted VisCPM-Paint folder (CPU, fp32).",
    )
    paint.add_argument("prompt", metavar="PROMPT", help="what to draw (CPM-Bee markup: write < as <<)")
    paint.add_argument(
        "--model", type=Path, metavar="DIR", help="converted VisCPM-Paint folder (default: the shipped toy pipeline)"
    )
    paint.add_argument("-o", "--output", required=True, type=Path, metavar="PNG", help="image file to write")
    paint.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    paint.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="denoising steps (default 50)")
    paint.add_argument("--seed", type=_seed, default=None, metavar="S", help="random seed")
    paint.add_argument("--guidance", type=float, default=7.5, metavar="G", help="guidance scale (default 7.5)")
    paint.add_argument("--num-images", type=_positive_int, default=1, metavar="N", help="images to draw")
    paint.add_argument("--height", type=_positive_int, metavar="H", help="image height (default: the model's)")
    paint.add_argument("--width", type=_positive_int, metavar="W", help="image width (default: the model's)")
    _add_pixel_budget_argument(paint)
    _add_verbose_argument(paint)
    paint.set_defaults(handler=_run_paint)


def _run_paint(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CommandError("the prompt is empty: say what to draw")
    args.model = _paint_folder(args.model)
    with _quiet_libraries(args.verbose):
        return _draw(args)


def _draw(args: argparse.Namespace) -> int:
    import torch

    with _needs_extra("viscpm paint", "paint"):
        from .modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    paths = _image_paths(args.output, args.num_images)
    pipeline = _load("pipeline", VisCPMPaintPipeline.from_pretrained, args.model)
    # tqdm's `disable=None` hides the bar when stderr is not a terminal: a script or a pipe gets only the paths
    pipeline.set_progress_bar_config(disable=False if args.verbose else None)
    height, width = budgets.paint_size(pipeline, args.height, args.width)
    try:
        budgets.check_paint_budget(
            height, width, args.steps, args.num_images, args.max_pixel_steps, "--max-pixel-steps"
        )
    except budgets.BudgetError as error:
        raise CommandError(str(error)) from error
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    try:
        images = pipeline(
            args.prompt,
            negative_prompt=args.negative,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.num_images,
            generator=generator,
        ).images
    except ValueError as error:
        raise CommandError(str(error)) from error
    for image, path in zip(images, paths):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        except OSError as error:
            raise CommandError(f"-o {args.output}: cannot write {path} ({error})") from error
        print(path)
    return 0


def _image_paths(output: Path, count: int) -> list[Path]:
    """Where `paint` writes its images, checked before any work: a format PIL writes, a folder that takes files."""
    import tempfile

    from PIL import Image

    extension = output.suffix.lower()
    if Image.registered_extensions().get(extension) not in Image.SAVE:
        raise CommandError(f"-o {output}: {extension or 'no extension'} is not an image format to write (use .png)")
    # the folders still to create are made once the images exist: probe the nearest one there is
    existing = next(folder for folder in output.absolute().parents if folder.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CommandError(f"-o {output}: cannot write into {existing} ({error.strerror or error})") from error
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


# ------------------------------------------------------------------------------------------------------------ train


def _add_train_parser(subcommands) -> None:
    train = subcommands.add_parser(
        "train",
        help="train a stage of MpM: chat-pretrain, chat-sft (full or LoRA / QLoRA) or paint",
        description="Train one stage of MpM on transformers' Trainer, from a YAML config (see configs/). Runs under "
        "`accelerate launch` or `torchrun` for several GPUs.",
    )
    train.add_argument("stage", choices=("chat-pretrain", "chat-sft", "paint"))
    train.add_argument("--config", type=Path, help="YAML config (configs/*.yaml)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set training.learning_rate=1e-4 (repeatable)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.set_defaults(handler=_run_train)


@contextlib.contextmanager
def _needs_extra(what: str, extra: str):
    """A module missing inside becomes one error line that names the extra to install. Any other ImportError (a
    name an installed package lacks: a version mismatch) keeps its traceback, which says what is wrong."""
    try:
        yield
    except ModuleNotFoundError as error:
        raise CommandError(
            f"{what} needs the {extra} extra ({error.name} is missing): pip install 'viscpm[{extra}]'"
        ) from None


def _log_training() -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("viscpm.train").setLevel(logging.INFO)  # the data report and the trainable parameters


def _run_train(args: argparse.Namespace) -> int:
    with _needs_extra("training", "train"):
        import datasets  # noqa: F401  the extra's libraries that the stages import only once they run
        import peft  # noqa: F401

        from .training.run import ConfigError, load_config, train
    _log_training()
    try:
        config = load_config(args.stage, str(args.config) if args.config else None, args.overrides)
        summary, report = train(args.stage, config, resume=args.resume)
    except (ConfigError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None
    print(f"data:\n{report.summary()}")
    print(f"{summary['global_step']} steps, mean training loss {summary['train_loss']:.4f}")
    print(f"saved: {summary['saved']}")
    return 0


def _add_merge_lora_parser(subcommands) -> None:
    merge = subcommands.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model",
        description="Load the base model in full precision, merge the adapter into it, and save a plain "
        "from_pretrained folder (a QLoRA adapter merges into the full-precision base, not the 4-bit one).",
    )
    merge.add_argument("adapter", type=Path, help="the adapter folder `viscpm train chat-sft` wrote")
    merge.add_argument("--output", type=Path, required=True, help="folder for the merged model")
    merge.add_argument("--base", type=Path, help="the base model (default: the one the adapter names)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.set_defaults(handler=_run_merge_lora)


def _run_merge_lora(args: argparse.Namespace) -> int:
    with _needs_extra("merge-lora", "train"):
        from .training.merge import merge_lora
    try:
        folder = merge_lora(args.adapter, args.output, base=args.base, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise CommandError(str(error)) from None
    print(f"merged model written to {folder}")
    return 0


def _add_assemble_chat_parser(subcommands) -> None:
    assemble = subcommands.add_parser(
        "assemble-chat",
        help="a VisCPM-Chat folder on another multilingual LLM as the pivot, ready for viscpm train",
        description="Build a VisCPM-Chat folder whose language model is --pivot (any folder AutoModelForCausalLM and "
        "AutoTokenizer load: weights, tokenizer, chat template, generation config) and whose BEiT-3 and queries come "
        "from --vision (a VisCPM-Chat folder; random without it). The mapping into the pivot's width is new: train it "
        "with `viscpm train chat-pretrain` (docs/mpm-recipe.md).",
    )
    assemble.add_argument("--pivot", required=True, type=Path, metavar="DIR", help="the pivot language model")
    assemble.add_argument("--vision", type=Path, metavar="DIR", help="VisCPM-Chat folder to take BEiT-3 from")
    assemble.add_argument("--output", required=True, type=Path, metavar="DIR", help="folder to write")
    assemble.add_argument("--query-num", type=_positive_int, default=64, metavar="N", help="learned queries (64)")
    assemble.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    assemble.set_defaults(handler=_run_assemble_chat)


def _run_assemble_chat(args: argparse.Namespace) -> int:
    from .training.pivot import assemble_chat

    try:
        folder = assemble_chat(args.pivot, args.output, args.vision, args.query_num, overwrite=args.overwrite)
    except (OSError, ValueError) as error:  # a missing or unloadable folder: transformers' own words
        raise CommandError(str(error).strip().splitlines()[0]) from None
    print(f"VisCPM-Chat on {args.pivot} written to {folder}")
    return 0


# ------------------------------------------------------------------------------------------------------- experiment


def _add_experiment_parser(subcommands) -> None:
    experiment = subcommands.add_parser(
        "experiment",
        help="reproduce the MpM claim at toy scale (mpm-mini: Chat; paint-mini: Paint)",
        description="mpm-mini: two tiny pivots (CPM-Bee and Qwen2) trained from scratch on text in seven languages, "
        "VisCPM-Chat trained on each with English image data and a small translated share, evaluated on held-out "
        "phrasings in English, Chinese, German, French, Spanish, Italian and Portuguese, against two baselines "
        "(docs/mpm-mini.md). paint-mini: the CPM-Bee pivot as VisCPM-Paint's text encoder, trained on English "
        "captions and a small share of Chinese ones, drawing from English and Chinese prompts (docs/paint-mini.md).",
    )
    experiment.add_argument("name", choices=("mpm-mini", "paint-mini"))
    experiment.add_argument("--output", type=Path, help="work and results folder (default: runs/NAME)")
    experiment.add_argument("--seed", type=_int, default=0)
    experiment.add_argument("--quick", action="store_true", help="a few steps on tiny sizes: checks the pipeline")
    experiment.add_argument(
        "--install-default",
        action="store_true",
        help="copy the trained mpm model into the package as the default of `viscpm chat` (mpm-mini) or of "
        "`viscpm paint` (paint-mini)",
    )
    experiment.add_argument(
        "--only-default",
        action="store_true",
        help="mpm-mini: train only the system that ships (mpm on the CPM-Bee pivot, English and Chinese)",
    )
    # the whole of mpm-mini is about 3 hours on 2 CPU cores; a pivot's half or one system is a part of it
    experiment.add_argument(
        "--pivots",
        nargs="+",
        choices=("cpmbee", "qwen2"),
        metavar="PIVOT",
        help="mpm-mini: the pivots to run, of cpmbee and qwen2 (default: both)",
    )
    experiment.add_argument(
        "--systems",
        nargs="+",
        choices=("mpm", "english_pivot", "native"),
        metavar="SYSTEM",
        help="mpm-mini: the systems to run, of mpm, english_pivot and native (default: all three)",
    )
    experiment.add_argument(
        "--resume",
        action="store_true",
        help="mpm-mini: keep the systems the --output folder's table holds and its saved pivots, and train the rest "
        "(the same command, cut short, goes on where it stopped)",
    )
    experiment.set_defaults(handler=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    with _needs_extra("the experiment", "train"):
        from .experiments import mpm_mini, paint_mini
    _log_training()
    experiment, default_folder = {
        "mpm-mini": (mpm_mini, defaults.CHAT),
        "paint-mini": (paint_mini, defaults.PAINT),
    }[args.name]
    output = args.output or Path("runs") / args.name
    config = dataclasses.replace(experiment.QUICK if args.quick else experiment.CONFIG, seed=args.seed)
    given = [option for option in ("only_default", "pivots", "systems", "resume") if getattr(args, option)]
    if given and args.name != "mpm-mini":
        raise CommandError(f"--{given[0].replace('_', '-')} is an option of mpm-mini only: leave it out for paint-mini")
    if args.only_default:
        if args.pivots or args.systems:
            raise CommandError(
                "--only-default trains the shipped system alone (mpm on the CPM-Bee pivot): leave out --pivots and "
                "--systems, or --only-default"
            )
        config = mpm_mini.shipped(config)
    parts = {option: tuple(dict.fromkeys(getattr(args, option))) for option in ("pivots", "systems") if option in given}
    config = dataclasses.replace(config, **parts)  # each pivot and system once, in the order given
    if args.install_default and args.name == "mpm-mini" and not ("mpm" in config.systems and "cpmbee" in config.pivots):
        raise CommandError(
            "--install-default installs the mpm system of the CPM-Bee pivot, which --pivots or --systems leave out: "
            "include mpm and cpmbee, or leave out --install-default"
        )
    if output.exists() and not output.is_dir():
        raise CommandError(f"--output {output} is a file, and the experiment writes a folder: name a folder")
    with _needs_extra("the experiment", "experiment"):
        try:
            resumed = {"resume": True} if args.resume else {}  # an option of mpm-mini only, refused above for paint
            results = experiment.run(output, config, **resumed)
        except mpm_mini.OtherResultsError as error:  # raised before anything loads or trains
            raise CommandError(str(error)) from None
    print(experiment.report_table(results))
    (output / "table.md").write_text(experiment.report_table(results) + "\n", encoding="utf-8")
    experiment.plot(results, output / "accuracy.png")
    print(f"results: {output / 'results.json'}, plot: {output / 'accuracy.png'} ({results['seconds']} s)")
    if args.install_default:
        installed = experiment.install_default(results, "mpm", default_folder)
        print(f"installed: {installed}")
        if args.name == "mpm-mini":  # its pivot ships too, as a CPM-Bee folder
            from .conversion.chat import chat_pivot

            pivot = chat_pivot(installed, defaults.CPMBEE, overwrite=True)
            print(f"installed: {mpm_mini.without_remote_code(pivot)}")
    return 0


# ------------------------------------------------------------------------------------------------------------ serve


def _add_serve_parser(subcommands) -> None:
    serve = subcommands.add_parser(
        "serve",
        help="serve VisCPM-Chat (and Paint) over an OpenAI-compatible HTTP API",
        description="An HTTP server with POST /v1/chat/completions, POST /v1/images/generations, GET /v1/models and "
        "GET /health, in the OpenAI format (the official openai client works against it). Concurrent requests "
        "for the same kind of work run as one batch.",
    )
    serve.add_argument("--model", type=Path, metavar="DIR", help="VisCPM-Chat folder (default: the shipped toy model)")
    serve.add_argument(
        "--paint-model", type=Path, metavar="DIR", help="VisCPM-Paint folder (default: the shipped toy pipeline)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=_int, default=8000, help="port (8000; 0 picks a free one)")
    serve.add_argument("--paint-steps", type=_positive_int, default=50, help="denoising steps per image (50)")
    _add_chat_budget_arguments(serve, "max_tokens")
    serve.add_argument(
        "--max-batch",
        type=_positive_int,
        default=budgets.DEFAULT_MAX_BATCH_ROWS,
        metavar="N",
        help="run up to N concurrent requests' rows (chat choices, images) as one batch "
        f"(default {budgets.DEFAULT_MAX_BATCH_ROWS}; 1: one at a time)",
    )
    serve.add_argument(
        "--replicas",
        type=_positive_int,
        metavar="N",
        help="serve N replicas as a Ray Serve application (the scale extra; a local Ray cluster, or the one "
        "RAY_ADDRESS names) instead of one process",
    )
    serve.add_argument(
        "--replica-cpus",
        type=_positive_float,
        default=1.0,
        metavar="C",
        help="Ray CPUs each replica holds; its torch threads follow them (1)",
    )
    _add_pixel_budget_argument(serve)
    _add_verbose_argument(serve)
    serve.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    with _needs_extra("the server", "serve"):
        from .serving.server import Batching, Limits, VisCPMService, bind, make_server

    model = _chat_folder(args.model)
    paint_model = _paint_folder(args.paint_model, "--paint-model")
    if args.replicas is not None and args.port == 0:
        raise CommandError("--replicas needs a --port other than 0: Ray Serve's proxy does not pick a free one")
    try:
        sock = bind(args.host, args.port)  # before the models load: a taken port fails at once
    except OSError as error:
        raise CommandError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from error
    limits = Limits(
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_tokens, max_pixel_steps=args.max_pixel_steps
    )
    batching = Batching(max_rows=args.max_batch)
    names = ", ".join(folder.name for folder in (model, paint_model) if folder is not None)
    if args.replicas is not None:
        sock.close()  # Ray Serve's proxy listens instead
        with _needs_extra("--replicas", "scale"):
            from .serving.scale_out import application, serve_forever
        app = application(model, paint_model, args.replicas, args.replica_cpus, limits, args.paint_steps, batching)
        ready = f"serving {names} on http://{args.host}:{args.port}/v1 (Ray Serve, {args.replicas} replicas)"
        serve_forever(app, args.host, args.port, lambda: print(ready, flush=True))
        return 0
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    with sock, _quiet_libraries(args.verbose):
        service = VisCPMService(model, paint_model, limits=limits, paint_steps=args.paint_steps, batching=batching)
        host, port = sock.getsockname()[:2]
        print(f"serving {names} on http://{host}:{port}/v1", flush=True)
        make_server(service, sock).run(sockets=[sock])
    return 0


def _add_demo_parser(subcommands) -> None:
    demo = subcommands.add_parser(
        "demo",
        help="a gradio web demo of VisCPM-Chat or VisCPM-Paint",
        description="A gradio app: chat (image upload, multi-turn chat with a streamed answer, clear) or paint "
        "(prompt, negative prompt, steps, seed, gallery).",
    )
    demo.add_argument("app", choices=("chat", "paint"))
    demo.add_argument("--model", type=Path, metavar="DIR", help="model folder (default: the shipped toy model)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=_int, default=7860, help="port (7860)")
    _add_verbose_argument(demo)
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    with _needs_extra("the demo", "demo"):
        from .serving.demo import chat_app, paint_app
    folder = _chat_folder(args.model) if args.app == "chat" else _paint_folder(args.model)
    with _quiet_libraries(args.verbose):
        app = chat_app(folder) if args.app == "chat" else paint_app(folder)
        app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port)
    return 0


# ------------------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="VisCPM (multimodal models pivoting on CPM-Bee) on Hugging Face transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_convert_parser(subcommands)
    _add_chat_parser(subcommands)
    _add_paint_parser(subcommands)
    _add_train_parser(subcommands)
    _add_merge_lora_parser(subcommands)
    _add_assemble_chat_parser(subcommands)
    _add_experiment_parser(subcommands)
    _add_serve_parser(subcommands)
    _add_demo_parser(subcommands)
    return parser


def _configure_stdout() -> None:
    # answers are mostly Chinese: print them as UTF-8 even where the locale says otherwise (e.g. LANG=C)
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (stream.encoding or "").lower().replace("-", "") != "utf8":
            try:
                reconfigure(encoding="utf-8")
            except (ValueError, OSError):
                pass


def _one_line(text: str) -> str:
    """``text`` with its line breaks and other unprintable characters escaped (a path may hold any of them)."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line on `argv` (default: `sys.argv[1:]`) and returns the exit status."""
    parser = build_parser()
    if argv is not None and any("\0" in str(arg) for arg in argv):
        # a shell cannot pass one, a caller of main() can: no path or text the commands take may hold it
        print(f"{PROG}: error: an argument holds a NUL character, which no path or text may contain", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse has printed them
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    _configure_stdout()
    try:
        with _quiet_bitsandbytes(getattr(args, "verbose", False)):
            return args.handler(args)
    except CommandError as error:
        print(f"{PROG}: error: {_one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
