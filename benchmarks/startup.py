"""Start-up of the `viscpm` command and a toy chat end to end, against the imports they cannot avoid.

Each command runs `--repeats` times in a fresh process (wall clock, median and best), one after the other, offline.
The reference rows are `python -c "import torch"` and `from transformers import PreTrainedModel` (what loading any
transformers model costs before our code runs); the ratio column divides by `import torch`. About a minute with
the defaults:

    python benchmarks/startup.py
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = REPO_ROOT / "examples" / "circle.png"


def commands(viscpm: list[str]) -> list[tuple[str, list[str]]]:
    python = [sys.executable, "-c"]
    return [
        ("import torch", [*python, "import torch"]),
        ("from transformers import PreTrainedModel", [*python, "from transformers import PreTrainedModel"]),
        ("import viscpm", [*python, "import viscpm"]),
        ("viscpm --help", [*viscpm, "--help"]),
        ("viscpm chat --help", [*viscpm, "chat", "--help"]),
        ("viscpm chat (toy model, greedy)", [*viscpm, "chat", "--image", str(IMAGE), "--question", "图中是什么形状？"]),
        (
            "viscpm paint (toy model, 25 steps)",
            [*viscpm, "paint", "一个红色的圆形", "--steps", "25", "--seed", "0", "-o", "startup-paint.png"],
        ),
    ]


def wall_times(command: list[str], repeats: int, cwd: Path) -> list[float]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=environment, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (5)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/viscpm-startup"), help="where paint writes")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    executable = shutil.which("viscpm")
    viscpm = [executable] if executable else [sys.executable, "-m", "viscpm"]

    rows = []
    for name, command in commands(viscpm):
        times = wall_times(command, args.repeats, args.workdir)
        rows.append((name, statistics.median(times), min(times)))
    reference = rows[0][1]
    print(f"{os.cpu_count()} CPUs, {args.repeats} runs each, wall clock in a fresh process\n")
    print("| command | median s | best s | / import torch |")
    print("|---|---|---|---|")
    for name, median, best in rows:
        print(f"| `{name}` | {median:.2f} | {best:.2f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()
