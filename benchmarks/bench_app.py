"""The browser app's waits against the command line's, in one run on SmolLM2-135M (docs/app.md):

page ready   `python src/app.py` started as a process until its page answers (model cache warm)
edit         Eiffel Tower -> Rome with the fact's six probes: POST /api/edit (click to table) against
             factedit.rome.edit on the same weights (what `src/edit.py` reports as "edit(s) in"), interleaved
undo         POST /api/undo (revert, then the SHA-256 and logits checks)

python benchmarks/bench_app.py --rounds 3
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from factedit import edit, load_model, revert_edits
from factedit.app import App, serve_in_thread
from factedit.cli import check_command
from factedit.paths import REPO_ROOT
from factedit.rome.facts import fact_from_config


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def page_ready(port: int) -> float:
    """Seconds from starting `python src/app.py` until GET / answers."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as hydra_dir:
        process = subprocess.Popen([sys.executable, "src/app.py", f"port={port}", f"hydra.run.dir={hydra_dir}"],
                                   cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            while time.perf_counter() - start < 300:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                    return time.perf_counter() - start
                except OSError:
                    time.sleep(0.1)
            raise RuntimeError("the app did not answer within 300 s")
        finally:
            process.terminate()
            process.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=8199)
    args = parser.parse_args()
    ready = page_ready(args.port)
    print(f"page ready: {ready:.1f} s", flush=True)
    model, tokenizer = load_model("smollm2_135m")
    cfg = check_command("app", [])
    fact = fact_from_config(check_command("edit", ["fact=eiffel_rome"]).fact)
    app = App(cfg, model, tokenizer)
    server, url = serve_in_thread(app)
    body = {"subject": fact.subject, "prompt": fact.prompt, "target_new": fact.target_new,
            "generalization": "\n".join(fact.generalization_probes),
            "specificity": "\n".join(fact.specificity_probes)}  # fmt: skip
    revert_edits(model, edit(model, tokenizer, fact).backup)  # warm-up: templates, first-use costs
    times = {"edit() alone (the CLI's edit time)": [], "app: click to table": [], "app: undo": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        revert_edits(model, edit(model, tokenizer, fact).backup)
        times["edit() alone (the CLI's edit time)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        post(url, "/api/edit", body)
        times["app: click to table"].append(time.perf_counter() - start)
        start = time.perf_counter()
        answer = post(url, "/api/undo", {})
        times["app: undo"].append(time.perf_counter() - start)
        assert answer["weights_exact"] and answer["logits_exact"], answer
    server.shutdown()
    app.close()
    alone = statistics.median(times["edit() alone (the CLI's edit time)"])
    print(f"\nSmolLM2-135M, Eiffel Tower -> Rome with 6 probes, {args.rounds} rounds; page ready {ready:.1f} s")
    print("| what | median s | rounds | vs edit() alone |\n|---|---:|---|---:|")
    for label, values in times.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {label} | {statistics.median(values):.2f} | {shown} | {statistics.median(values) - alone:+.2f} s |")


if __name__ == "__main__":
    main()
