"""The browser app's waits against the command line's, on SmolLM2-135M, as a user meets them (docs/app.md):

page ready   `python src/app.py` started as a process until its page answers (model cache warm)
edit         Eiffel Tower -> Rome with the fact's six probes, to the app process: POST /api/edit (click to table:
             top tokens before and after), then POST /api/continuations (the greedy continuations that complete
             the table), against the time `python src/edit.py fact=eiffel_rome` reports as "edit(s) in" (its
             own process), interleaved round by round; the app process idles while the command runs
undo         POST /api/undo (revert, then the SHA-256 and logits checks)

python benchmarks/bench_app.py --rounds 3
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from factedit.cli import check_command
from factedit.paths import REPO_ROOT
from factedit.rome.facts import fact_from_config


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def start_app(port: int, folder: Path) -> tuple[subprocess.Popen, float]:
    """`python src/app.py` as a process, and the seconds until GET / answers."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "src/app.py", f"port={port}", f"hydra.run.dir={folder}",
                                f"checkpoints_dir={folder / 'checkpoints'}"], cwd=REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while time.perf_counter() - start < 300:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return process, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("the app did not answer within 300 s")


def cli_edit_seconds(folder: Path) -> float:
    """The edit time `python src/edit.py fact=eiffel_rome` logs ("1 edit(s) in 3.7s")."""
    command = [sys.executable, "src/edit.py", "fact=eiffel_rome", f"out_dir={folder}", f"hydra.run.dir={folder}/h"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    found = re.search(r"(\d+) edit\(s\) in ([\d.]+)s", done.stdout + done.stderr)
    if done.returncode or not found:
        raise RuntimeError(f"src/edit.py failed: {(done.stdout + done.stderr)[-2000:]}")
    return float(found.group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8199)
    args = parser.parse_args()
    fact = fact_from_config(check_command("edit", ["fact=eiffel_rome"]).fact)
    body = {"subject": fact.subject, "prompt": fact.prompt, "target_new": fact.target_new,
            "generalization": "\n".join(fact.generalization_probes),
            "specificity": "\n".join(fact.specificity_probes)}  # fmt: skip
    cli, table, full, undo = (
        "src/edit.py: edit(s) in",
        "app: click to table",
        "app: table with continuations",
        "app: undo",
    )
    times = {cli: [], table: [], full: [], undo: []}
    with tempfile.TemporaryDirectory() as tmp:
        process, ready = start_app(args.port, Path(tmp) / "app")
        print(f"page ready: {ready:.1f} s", flush=True)
        url = f"http://127.0.0.1:{args.port}"
        try:
            post(url, "/api/undo", post(url, "/api/edit", body) and {})  # warm-up: statistics, first-use costs
            for round_ in range(args.rounds):
                times[cli].append(cli_edit_seconds(Path(tmp) / f"cli{round_}"))
                start = time.perf_counter()
                edit_id = post(url, "/api/edit", body)["id"]
                times[table].append(time.perf_counter() - start)
                post(url, "/api/continuations", {"id": edit_id})
                times[full].append(time.perf_counter() - start)
                start = time.perf_counter()
                answer = post(url, "/api/undo", {})
                times[undo].append(time.perf_counter() - start)
                assert answer["weights_exact"] and answer["logits_exact"], answer
                print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in times.items()), flush=True)
        finally:
            process.terminate()
            process.wait()
    alone = statistics.median(times[cli])
    print(f"\nSmolLM2-135M, Eiffel Tower -> Rome with 6 probes, {args.rounds} rounds; page ready {ready:.1f} s")
    print("| what | median s | rounds | vs src/edit.py |\n|---|---:|---|---:|")
    for label, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {label} | {statistics.median(values):.2f} | {shown} | {statistics.median(values) - alone:+.2f} s |")


if __name__ == "__main__":
    main()
