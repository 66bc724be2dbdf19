"""Run by tests/test_training_distributed.py under `accelerate launch` (2 CPU processes): VisCPM-Chat built from its
config and loaded from a folder while DeepSpeed's ZeRO-3 config is live, so that transformers creates both under
`zero.Init` (every parameter partitioned as it is made); the full parameters, gathered, are saved by the first
process for the test to compare with a plain build and load.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_zero3_init.py MODEL_DIR ZERO3_JSON OUT.pt
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoConfig, AutoModel
from transformers.integrations import HfDeepSpeedConfig

from viscpm.modeling.modeling_viscpm_chat import VisCPMChatForConditionalGeneration


def main(folder: Path, zero3: Path, output: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    settings = json.loads(zero3.read_text())
    # the "auto" entries the Trainer would fill in
    settings.update(
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
        bf16={"enabled": False},
        fp16={"enabled": False},
    )
    live = HfDeepSpeedConfig(settings)  # transformers builds under zero.Init while this object lives
    torch.manual_seed(0)
    models = {
        "built": VisCPMChatForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder)),
        "loaded": AutoModel.from_pretrained(folder),
    }
    states = {}
    for name, model in models.items():
        if not all(hasattr(parameter, "ds_id") for parameter in model.parameters()):
            raise SystemExit(f"{name}: some parameters were not partitioned by zero.Init")
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            states[name] = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if torch.distributed.get_rank() == 0:
        torch.save(states, output)
    del live


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
