"""Held-out recall questions asked over HTTP of a running `longmem serve` endpoint.

Builds the recall suite's items (evaluation templates and key words, the held-out novel) with the
served backbone's tokenizer, sends each prompt as text to /v1/completions (greedy) and scores the
answer as the suite does. Start the server first, e.g.

    longmem serve --backbone gemma3-270m --set passages.blocks=4 --port 8123 --max-prompt-tokens 20000
    python research/served_recall.py --port 8123 --backbone gemma3-270m

A research driver; nothing here is part of the product.
"""

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

from longmem.backbone import resolve_backbone  # noqa: E402
from longmem.evaluation.recall import recall_items, recall_score  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--backbone", default="gemma3-270m", help="the served model's backbone (its tokenizer)")
    ap.add_argument("--tasks", nargs="*", default=["single"])
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--styles", nargs="*", default=["restate", "paraphrase"])
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_backbone(args.backbone))
    settings = EvalSettings(task="recall", recall_tasks=tuple(args.tasks), recall_lengths=tuple(args.lengths),
                            recall_trials=args.trials, recall_styles=tuple(args.styles))
    text = (AUSTEN / "persuasion.txt").read_text()
    items, _ = recall_items([("persuasion.txt", text)],
                            lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids), settings)
    url = f"http://127.0.0.1:{args.port}"
    for _ in range(120):  # the server may still be starting
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=5)
            break
        except OSError:
            time.sleep(5)
    right = 0.0
    for it in items:
        body = json.dumps({"model": "longmem", "prompt": tok.decode(it["prompt"]),
                           "max_tokens": it["max_new_tokens"], "temperature": 0}).encode()
        t0 = time.time()
        request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=600).read())["choices"][0]["text"]
        score = recall_score(answer, it["answers"])
        right += score
        print(json.dumps({"id": it["id"], "style": it["style"], "answers": it["answers"], "text": answer,
                          "score": score, "seconds": round(time.time() - t0, 1)}), flush=True)
    print(f"{right:.0f}/{len(items)} right")


if __name__ == "__main__":
    main()
