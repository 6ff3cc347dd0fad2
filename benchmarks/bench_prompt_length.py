"""What a long prompt costs one ROME edit, and how fast one over the cap is refused (factedit.tokens.MAX_PROMPT_TOKENS).

    python benchmarks/bench_prompt_length.py                  # SmolLM2-135M: prompts of ~16, ~128 and ~244 tokens
    python benchmarks/bench_prompt_length.py --words 5000     # also the refusal time of a 5,000-word prompt

Peak memory is each row's own (the peak resident size, Linux VmHWM, is reset before each row); the
"over the loaded model" column subtracts the resident size before the row.
"""

import argparse
import time
from pathlib import Path

from bench_memit import peak_memory, reset_peak_memory

from factedit import FacteditError, edit, load_model, revert_edits
from factedit.tokens import MAX_PROMPT_TOKENS


def resident_gib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) / 2**20 for line in status if line.startswith("VmRSS"))


def prompt_of(repeats: int) -> str:
    """A prompt whose subject sits at its end, after `repeats` filler phrases (3 tokens each)."""
    return (
        "In the long story that follows, "
        + " ".join(["the old town"] * repeats)
        + " and the {} is located in the city of"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, nargs="*", default=[0, 37, 75], help="filler phrases per prompt")
    parser.add_argument("--words", type=int, default=5000, help="words of the prompt that must be refused")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2_135m")
    rows = []
    for repeats in args.repeats:
        prompt = prompt_of(repeats)
        tokens = len(tokenizer(prompt.format("Eiffel Tower"))["input_ids"])
        before = resident_gib()
        reset_peak_memory()
        start = time.perf_counter()
        edits = edit(model, tokenizer, {"subject": "Eiffel Tower", "prompt": prompt, "target_new": "Rome"})
        seconds, peak = time.perf_counter() - start, float(peak_memory().split()[0])
        revert_edits(model, edits.backup)
        rows.append((f"{tokens} tokens", f"{seconds:.1f}", f"{peak:.2f}", f"{peak - before:.2f}"))
        print(rows[-1], flush=True)
    start = time.perf_counter()
    try:
        edit(model, tokenizer, {"subject": "Eiffel Tower", "prompt": "{} " + " ".join(["word"] * args.words),
                                "target_new": "Rome"})  # fmt: skip
        refused = "not refused"
    except FacteditError:
        refused = f"refused in {time.perf_counter() - start:.3f} s"
    print(f"\nSmolLM2-135M, one ROME edit (cap {MAX_PROMPT_TOKENS} tokens); a {args.words}-word prompt: {refused}")
    print("| prompt | edit (s) | peak resident (GiB) | over the loaded model (GiB) |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
