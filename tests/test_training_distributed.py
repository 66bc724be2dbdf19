"""`viscpm train` as 2 CPU processes under `accelerate launch` (gloo): DDP and DeepSpeed ZeRO-2 / ZeRO-3, each
stage, against one process with the same global batch (issue 18).

Every run uses texts made of the vocabulary's own characters: CPM-Bee scores an out-of-vocabulary word against the
batch's ext table, so with such words a sample's loss depends on the samples sharing its batch (as in the original)
and a split batch cannot give the same loss.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO_ROOT
from tiny_models import tiny_chat_with, tiny_pipeline, tiny_vocab, write_vocab

pytestmark = pytest.mark.slow  # subprocesses: about 20 s per launch on 2 cores

deepspeed = pytest.importorskip("deepspeed", reason="the distributed extra (deepspeed) is not installed")

STEPS = 6
GLOBAL_BATCH = 8
# float sums in another order (the gradients' all-reduce, DeepSpeed's flattened and partitioned optimizer); Adam
# turns a gradient's last bits into up to about 2e-4 of a weight over the run (measured), against the 5e-2 that
# training moves it: a wrong gradient scale or a skipped step would move it by whole steps of 1e-2
RTOL, ATOL, WEIGHT_ATOL = 1e-3, 1e-5, 5e-4
ZERO = {stage: REPO_ROOT / "configs" / f"deepspeed-zero{stage}.json" for stage in (2, 3)}
ENGINES = {
    "DDP": [],
    "DeepSpeed ZeRO-2": ["--set", f"training.deepspeed={ZERO[2]}"],
    "DeepSpeed ZeRO-3": ["--set", f"training.deepspeed={ZERO[3]}"],
}
STAGES = ("chat-pretrain", "chat-sft-lora", "paint")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "black": (10, 10, 10)}


def covering_vocab(texts: list[str]) -> list[str]:
    """CPM-Bee's special tokens and the structure keys, then every character of `texts`: no ext-table entries."""
    from viscpm.experiments.mpm_mini import STRUCTURE_WORDS

    return tiny_vocab(*STRUCTURE_WORDS, *sorted(set("".join(texts)) - set(" \n<>")))


def captions(folder: Path, texts: list[str]) -> Path:
    """Eight records: each colour's image twice, with captions from `texts`."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for index, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (40, 40), rgb).save(folder / f"{name}.png")
        records += [{"image": f"{name}.png", "caption": texts[(2 * index + copy) % len(texts)]} for copy in (0, 1)]
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny VisCPM-Chat whose vocabulary covers the caption requests, a tiny Paint pipeline, their caption data,
    and DeepSpeed's CPU communication op built once (two processes building it at once can abort)."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    from viscpm.modeling.tokenization_cpmbee import CpmBeeTokenizer
    from viscpm.training.data import CAPTION_PROMPTS_EN, CAPTION_PROMPTS_ZH

    ShareMemCommBuilder().load()
    root = tmp_path_factory.mktemp("distributed")
    chat_captions = ["a red one", "green", "blue and black", "红色"]
    vocab = write_vocab(root, covering_vocab([*CAPTION_PROMPTS_EN, *CAPTION_PROMPTS_ZH, *chat_captions]))
    torch.manual_seed(0)
    model, processor = tiny_chat_with(CpmBeeTokenizer(vocab_file=str(vocab)))
    model.save_pretrained(root / "chat")
    processor.save_pretrained(root / "chat")
    captions(root / "chat-data", chat_captions)
    tiny_pipeline(root).save_pretrained(root / "paint")
    captions(root / "paint-data", ["a red cat", "b dog", "c", "a b c"])  # words of the tiny Paint vocabulary
    return root


def stage_config(workspace: Path, stage: str, output: str, batch: int, steps: int = STEPS, save_steps: int = 1000):
    """The YAML config of `stage` (`chat-sft-lora`: chat-sft with a LoRA adapter) at `batch` per process."""
    data = "paint-data" if stage == "paint" else "chat-data"
    entries = {
        "model": str(workspace / ("paint" if stage == "paint" else "chat")),
        "output_dir": str(workspace / output),
        "data": {
            "sources": [{"path": str(workspace / data / "captions.jsonl"), "image_root": str(workspace / data)}],
            "max_length": 96,
        },
        "training": {
            "max_steps": steps,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": batch,
            "logging_steps": 1,
            "save_steps": save_steps,
            "lr_scheduler_type": "constant",
            # a CPU run of several processes is accelerate's MULTI_CPU (gloo): use_cpu says so
            "use_cpu": True,
        },
    }
    if stage == "chat-sft-lora":
        entries["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    if stage == "paint":  # one stage: DeepSpeed cannot stage the unfreezing (test_training.py stages it)
        unfreeze = [{"step": 0, "train": ["bridge", "unet_cross_attention"]}]
        entries["paint"] = {"resolution": 16, "unfreeze": unfreeze, "caption_dropout": 0.3}
    path = workspace / f"{output}.yaml"
    path.write_text(yaml.safe_dump(entries), encoding="utf-8")
    return path


def command_stage(stage: str) -> str:
    return "chat-sft" if stage == "chat-sft-lora" else stage


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(processes: int, *program: str) -> list[str]:
    """`accelerate launch` of a Python program (a script, or `-m module`) on `processes` CPU processes."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    options = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
    return [accelerate, "launch", *options, "--dynamo_backend", "no", "--main_process_port", str(free_port()), *program]


def launch_command(stage: str, config: Path, processes: int, *extra: str) -> list[str]:
    """`accelerate launch` of `viscpm train` on `processes` CPU processes (its multi-process launcher is torchrun's:
    `--cpu` alone starts one process unless MPI is installed); one process: plain `python -m viscpm`."""
    train = ["-m", "viscpm", "train", command_stage(stage), "--config", str(config), *extra]
    if processes == 1:
        return [sys.executable, *train]
    return accelerate_launch(processes, *train)


ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, env={**os.environ, **ENVIRONMENT}, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def summary_of(output: Path) -> dict:
    return json.loads((output / "run_summary.json").read_text())


def weights(stage: str, folder: Path) -> dict[str, torch.Tensor]:
    """What a saved result holds: the chat model's parameters, the adapter's, or the pipeline's three modules'."""
    if stage == "chat-sft-lora":
        return load_file(folder / "adapter_model.safetensors")
    if stage == "paint":
        from viscpm.modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

        pipeline = VisCPMPaintPipeline.from_pretrained(folder)
        return {
            f"{name}.{key}": value
            for name in ("text_encoder", "unet", "vae")
            for key, value in getattr(pipeline, name).state_dict().items()
        }
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def references(workspace) -> dict:
    """Each stage in this process, one process with the whole global batch: its losses and saved weights, and the
    weights it started from."""
    from viscpm.training.run import load_config, train

    results = {}
    for stage in STAGES:
        config = load_config(command_stage(stage), str(stage_config(workspace, stage, f"{stage}-one", GLOBAL_BATCH)))
        summary, _ = train(command_stage(stage), config)
        base = workspace / ("paint" if stage == "paint" else "chat")
        results[stage] = {
            "losses": summary["losses"],
            "weights": weights(stage, Path(summary["saved"])),
            "base": None if stage == "chat-sft-lora" else weights(stage, base),
        }
    return results


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_distributed_run_follows_one_process_and_saves_what_it_trained(workspace, references, engine, stage):
    """The loss curve of 2 processes x 4 samples equals that of 1 x 8; the saved result reloads in one process and
    holds the weights one process trained (a LoRA adapter: every tensor, under ZeRO-3 too); frozen weights are the
    starting ones, bit for bit."""
    output = f"{stage}-{engine.replace(' ', '-')}"
    config = stage_config(workspace, stage, output, GLOBAL_BATCH // 2)
    run(launch_command(stage, config, 2, *ENGINES[engine]))
    summary, reference = summary_of(workspace / output), references[stage]
    assert (summary["engine"], summary["processes"], summary["global_step"]) == (engine, 2, STEPS)
    np.testing.assert_allclose(summary["losses"], reference["losses"], rtol=RTOL, atol=ATOL)

    saved = weights(stage, Path(summary["saved"]))
    assert saved.keys() == reference["weights"].keys() and saved
    base = reference["base"]
    for key, value in saved.items():
        if base is not None and torch.equal(reference["weights"][key], base[key]):  # frozen in this stage
            assert torch.equal(value, base[key]), f"{key} is frozen but changed"
        else:
            torch.testing.assert_close(value, reference["weights"][key], rtol=RTOL, atol=WEIGHT_ATOL, msg=key)
    if stage == "chat-sft-lora":
        assert all(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)
    else:
        assert any(not torch.equal(value, base[key]) for key, value in saved.items())


@pytest.mark.parametrize("engine", list(ENGINES))
def test_distributed_killed_run_resumes_where_it_stopped(workspace, references, engine):
    """A 2-process run killed after a checkpoint resumes at the checkpoint's step and follows the uninterrupted
    curve. DDP checkpoints hold the whole model and optimizer, so it resumes on 1 process (with the same global
    batch); DeepSpeed's ZeRO checkpoints are partitioned by process and resume on as many (DeepSpeed refuses
    another number)."""
    output = workspace / f"killed-{engine.replace(' ', '-')}"
    long_run = stage_config(workspace, "chat-pretrain", output.name, GLOBAL_BATCH // 2, steps=500, save_steps=2)
    process = subprocess.Popen(
        launch_command("chat-pretrain", long_run, 2, *ENGINES[engine]),
        env={**os.environ, **ENVIRONMENT},
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = output / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # the launcher and its workers, all at once, as a crash would (torchrun's workers have sessions of their own)
    launcher = psutil.Process(process.pid)
    members = [*launcher.children(recursive=True), launcher]
    for member in members:
        member.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(members, timeout=30)
    from viscpm.training.run import latest_complete_checkpoint

    newest = latest_complete_checkpoint(output)
    assert newest is not None and not (output / "final").exists(), "the run was not interrupted"
    start = int(newest.name.split("-")[-1])
    assert start < STEPS, f"the run got to step {start} before it was killed"

    processes = 1 if engine == "DDP" else 2
    resumed = stage_config(workspace, "chat-pretrain", output.name, GLOBAL_BATCH // processes)
    run(launch_command("chat-pretrain", resumed, processes, *ENGINES[engine], "--resume"))
    summary = summary_of(output)
    assert summary["resumed_from"] == str(newest) and summary["processes"] == processes
    ran = (summary["first_step_here"], summary["steps_run_here"], summary["global_step"])
    assert ran == (start + 1, STEPS - start, STEPS), ran
    np.testing.assert_allclose(summary["losses"], references["chat-pretrain"]["losses"], rtol=RTOL, atol=ATOL)


def test_distributed_zero3_builds_and_loads_the_beit3_tower_whole(workspace, tmp_path):
    """Under ZeRO-3's zero.Init every parameter is partitioned as it is made, so initialisation code that writes
    into a parameter after its module is built writes into an empty shard. Loaded, every tensor equals a plain load;
    built from the config, each constant tensor equals the plain build and each random one has its scale."""
    from transformers import AutoConfig, AutoModel

    from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration

    gathered = tmp_path / "gathered.pt"
    script = REPO_ROOT / "tests" / "distributed_zero3_init.py"
    run(accelerate_launch(2, str(script), str(workspace / "chat"), str(ZERO[3]), str(gathered)))
    states = torch.load(gathered, weights_only=True)
    plain = AutoModel.from_pretrained(workspace / "chat").state_dict()
    assert states["loaded"].keys() == plain.keys()
    assert all(torch.equal(states["loaded"][key], value) for key, value in plain.items())

    torch.manual_seed(0)
    built = VisCPMChatForConditionalGeneration._from_config(AutoConfig.from_pretrained(workspace / "chat"))
    built = built.state_dict()
    assert states["built"].keys() == built.keys()
    vision = [key for key in built if key.startswith("vpm.")]
    assert len(vision) > 20
    for key, value in built.items():
        under_zero3 = states["built"][key]
        if value.float().std() == 0:  # constants: norms' weights, biases
            assert torch.equal(under_zero3, value), key
        else:  # drawn in another order: the same scale, within four standard errors of a sample's deviation
            ratio = (under_zero3.float().std() / value.float().std()).item()
            assert abs(ratio - 1) < 4 / math.sqrt(2 * value.numel()) + 0.05, (key, ratio)


def test_distributed_fsdp_on_cpu_processes_is_refused_rather_than_run_as_ddp(workspace):
    """accelerate enables FSDP for GPU (and other accelerator) processes only: with the repository's FSDP config on
    CPU processes it would train plain DDP and report nothing. viscpm says so instead."""
    fsdp = yaml.safe_load((REPO_ROOT / "configs" / "fsdp.yaml").read_text())["training"]
    config = stage_config(workspace, "chat-pretrain", "fsdp", GLOBAL_BATCH // 2)
    overrides = [
        "--set",
        f"training.fsdp={fsdp['fsdp']}",
        "--set",
        f"training.fsdp_config={json.dumps(fsdp['fsdp_config'])}",
    ]
    result = run(launch_command("chat-pretrain", config, 2, *overrides), check=False)
    assert result.returncode != 0
    assert "accelerate did not enable FSDP" in result.stdout + result.stderr
    assert not (workspace / "fsdp" / "final").exists()


def test_distributed_deepspeed_refuses_staged_paint_unfreezing_and_names_the_fix(workspace):
    """DeepSpeed's optimizer steps every parameter it holds: a part frozen for the first stage would still count
    Adam steps (and decay), and start its own stage with a wrong step."""
    from viscpm.training.run import ConfigError, load_config

    config = stage_config(workspace, "paint", "staged", GLOBAL_BATCH // 2)
    for unfreeze in ("null", "[{step: 0, train: [bridge]}, {step: 2, train: [bridge, unet]}]"):
        with pytest.raises(ConfigError, match="one stage per `viscpm train`"):
            load_config("paint", str(config), [f"training.deepspeed={ZERO[2]}", f"paint.unfreeze={unfreeze}"])
    assert load_config("paint", str(config), [f"training.deepspeed={ZERO[2]}"])["paint"]["unfreeze"]


def test_deepspeed_keeps_the_pivots_own_learning_rate(workspace):
    """ZeRO-2 flattens and partitions every parameter group apart: the pivot's, at a thousandth of the rest's rate,
    moves under what Adam allows it in the run (3.2 times the rate a step, with the default betas) and still moves;
    the rest moves by hundredths."""
    config = stage_config(workspace, "chat-sft", "pivot-rate", GLOBAL_BATCH // 2)
    overrides = ["--set", f"training.deepspeed={ZERO[2]}", "--set", "llm_learning_rate=1e-5"]
    run(launch_command("chat-sft", config, 2, *overrides))
    assert summary_of(workspace / "pivot-rate")["engine"] == "DeepSpeed ZeRO-2"
    before, after = weights("chat-sft", workspace / "chat"), weights("chat-sft", workspace / "pivot-rate" / "final")
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    pivot_moves = [change for name, change in moved.items() if name.startswith("llm.")]
    assert pivot_moves and 0 < max(pivot_moves) < 3.2 * 1e-5 * STEPS, max(pivot_moves)
    assert min(moved["query"], moved["mapping.0.weight"]) > 1e-3, moved


def test_deepspeed_with_its_own_optimizer_refuses_llm_learning_rate_and_names_the_fix(workspace, tmp_path):
    """The pivot's own learning rate splits the Trainer's parameter groups; an optimizer from the DeepSpeed config
    would train everything at one rate, silently."""
    from viscpm.training.run import ConfigError, load_config, train

    zero = json.loads(ZERO[2].read_text()) | {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    (tmp_path / "zero2-adamw.json").write_text(json.dumps(zero))
    config = stage_config(workspace, "chat-sft", "own-optimizer", GLOBAL_BATCH // 2)
    overrides = [f"training.deepspeed={tmp_path / 'zero2-adamw.json'}", "llm_learning_rate=1e-4"]
    with pytest.raises(ConfigError, match="remove the `optimizer` section"):
        train("chat-sft", load_config("chat-sft", str(config), overrides))
    assert not (workspace / "own-optimizer").exists()


@pytest.mark.parametrize("stage", ["chat-pretrain", "chat-sft-lora"])
def test_gradient_accumulation_gives_the_step_of_the_whole_batch(workspace, references, stage):
    """2 micro-batches of 4 accumulate to the step of 1 batch of 8: the chat models normalise their loss by the
    Trainer's count of the step's labelled tokens (`num_items_in_batch`), not by each micro-batch's own. (Paint
    draws its noise per micro-batch, so its accumulated steps match a whole batch's in expectation only.)"""
    from viscpm.training.run import load_config, train

    config = stage_config(workspace, stage, f"{stage}-accumulated", GLOBAL_BATCH // 2)
    config = load_config(command_stage(stage), str(config), ["training.gradient_accumulation_steps=2"])
    summary, _ = train(command_stage(stage), config)
    np.testing.assert_allclose(summary["losses"], references[stage]["losses"], rtol=RTOL, atol=ATOL)
    saved, reference = weights(stage, Path(summary["saved"])), references[stage]["weights"]
    for key, value in saved.items():
        torch.testing.assert_close(value, reference[key], rtol=RTOL, atol=WEIGHT_ATOL, msg=key)


def test_distributed_two_node_launcher_config_starts_eight_processes_per_node_on_one_rendezvous():
    """configs/accelerate-2x8.yaml as `accelerate launch` reads it on the second node: torchrun's arguments (what
    accelerate hands torch.distributed.run) name 2 nodes of 8 processes, this node's rank, and the first node's
    address as the rendezvous; the engine it names for ZeRO-3 is the repository's."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    config = REPO_ROOT / "configs" / "accelerate-2x8.yaml"
    command = ["--config_file", str(config), "--machine_rank", "1", "-m", "viscpm", "train", "chat-sft"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command))
    environment = prepare_multi_gpu_env(args)
    settings = yaml.safe_load(config.read_text())
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == f"{settings['main_process_ip']}:{settings['main_process_port']}"
    assert environment["ACCELERATE_MIXED_PRECISION"] == "no"  # the stage config's training.bf16 decides
    assert "--set training.deepspeed=configs/deepspeed-zero3.json" in config.read_text()
    assert json.loads(ZERO[3].read_text())["zero_optimization"]["stage"] == 3
