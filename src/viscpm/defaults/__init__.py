"""Toy models shipped inside the package, so that everything runs with nothing to download.

* `CHAT`: a VisCPM-Chat folder (`AutoModel`, `AutoProcessor`), trained by `viscpm experiment mpm-mini` on easy-VQA's
  coloured shapes in English only, answering in English and Chinese (docs/mpm-mini.md).
* `CPMBEE`: that model's pivot, a CPM-Bee folder (`AutoModelForCausalLM`, `AutoTokenizer`).
* `PAINT`: a VisCPM-Paint pipeline folder (`VisCPMPaintPipeline`), trained by `viscpm experiment paint-mini`
  (docs/paint-mini.md).

They know nothing beyond those toy worlds: convert the released weights for real use.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent

CHAT = _HERE / "viscpm-chat-mini"
CPMBEE = _HERE / "cpmbee-mini"
PAINT = _HERE / "viscpm-paint-mini"

__all__ = ["CHAT", "CPMBEE", "PAINT"]
