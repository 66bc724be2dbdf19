"""Big-model loading on a small machine (issue 18): `from_pretrained(..., device_map="auto", max_memory=...)` keeps
what fits in the memory budget and offloads the rest to disk (accelerate's hooks bring each offloaded module's
weights in for its forward); the model answers as a full load does."""

import torch
from safetensors import safe_open
from transformers import AutoModel

from tiny_models import tiny_chat, tiny_image


def checkpoint_bytes(folder) -> int:
    total = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        for key in weights.keys():
            tensor = weights.get_slice(key)
            total += torch.Size(tensor.get_shape()).numel() * 4  # float32
    return total


def test_offloaded_chat_model_holds_a_fraction_in_memory_and_answers_as_a_full_load(tmp_path):
    model, processor = tiny_chat(tmp_path)
    folder = tmp_path / "chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    size = checkpoint_bytes(folder)
    budget = int(0.5 * size)

    full = AutoModel.from_pretrained(folder).eval()
    offloaded = AutoModel.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": budget}, offload_folder=tmp_path / "offload"
    ).eval()
    placements = set(offloaded.hf_device_map.values())
    assert placements == {"cpu", "disk"}, offloaded.hf_device_map
    resident = sum(p.numel() * p.element_size() for p in offloaded.parameters() if p.device.type != "meta")
    assert 0 < resident <= budget < size

    image = tiny_image(0)
    with torch.no_grad():
        expected = full.chat(image, "what ?", processor, num_beams=1, max_new_tokens=6, return_token_ids=True)
        answered = offloaded.chat(image, "what ?", processor, num_beams=1, max_new_tokens=6, return_token_ids=True)
    assert answered[0] == expected[0] and answered[3] == expected[3]
    assert all(p.device.type == "meta" for p in offloaded.llm.parameters())  # back on disk after the forward
