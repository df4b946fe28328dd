"""What the span read sees at the answer position of a recall item (research/span_read.py).

    python research/span_trace.py --checkpoint ~/.cache/longmem/runs/span --item single/016384/001
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from span_read import AUSTEN, HELD_OUT, SpanRead, install  # noqa: E402

from longmem.evaluation.recall import recall_items  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.loading import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--item", required=True)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    model = load_model(checkpoint=args.checkpoint).eval()
    spec = json.loads((args.checkpoint / "span_report.json").read_text())["span"]
    span = SpanRead(model.adapter.num_heads, model.adapter.head_dim, spec["positions"], spec["hits"], spec["reach"], 0.0)
    span.load_state_dict(torch.load(args.checkpoint / "span.pt"), strict=False)  # earlier runs lack hit_weight
    install(model, span)
    tok = model.tokenizer
    task, length, _ = args.item.split("/")
    settings = EvalSettings(task="recall", window=model.config.memory.window, recall_tasks=(task,),
                            recall_lengths=(int(length),), recall_trials=10,
                            recall_styles=("restate", "paraphrase"))  # the suite as these runs measured it
    items, _ = recall_items([(HELD_OUT, (AUSTEN / HELD_OUT).read_text())],
                            lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids), settings)
    item = next(i for i in items if i["id"] == args.item)
    x = torch.as_tensor(item["prompt"])[None]
    start = model.local_start(x.shape[1])
    bank = model.new_bank(1)
    captured = {}
    import longmem.sidenet as sn

    read = sn.next_token_read

    def spy(retrieval, *a, **k):
        captured["span"] = retrieval.span
        out = read(retrieval, *a, **k)
        captured["weights"], captured["ids"] = out[1], retrieval.next_token_ids
        return out

    sn.next_token_read = spy
    with torch.no_grad():
        model.write_memory(x[:, :start], bank)
        out = model(x[:, start:], bank=bank, previous_ids=x[:, start - 1])
    s_out, s_weights, s_ids, mix = captured["span"]
    t = -1
    print("question:", repr(tok.decode(x[0, -24:])), "answers:", item["answers"])
    print("greedy next:", repr(tok.decode(out.logits[0, -1].argmax())), "copy gate:",
          round(float(out.readout.copy_gate[0, -1]), 3))
    print("span mix per head:", [round(float(m), 3) for m in mix[0, :, t]])
    G = s_weights.shape[1] // s_ids.shape[1]
    first = tok(" " + item["answers"][0], add_special_tokens=False).input_ids[0]
    for h in range(s_ids.shape[1]):
        ids = s_ids[0, h, t]
        where = (ids == first).nonzero().flatten().tolist()
        print(f"kv head {h}: answer's first token {tok.decode(first)!r} among the candidates at", where,
              "weights", [[round(float(s_weights[0, h * G + g, t, j]), 3) for j in where] for g in range(G)])
    for h in range(s_weights.shape[1]):
        w = s_weights[0, h, t]
        top = w.topk(args.top)
        ids = s_ids[0, h // G, t]
        print(f"head {h}: span top", [(tok.decode(int(ids[j])), round(float(v), 3)) for v, j in zip(top.values, top.indices)])
    K = captured["weights"].shape[-1] - s_weights.shape[-1]
    for h in range(0, captured["weights"].shape[1], G):
        w = captured["weights"][0, h, t, :K]
        top = w.topk(4)
        ids = captured["ids"][0, h // G, t, :K]
        print(f"head {h}: next top", [(tok.decode(int(ids[j])), round(float(v), 3)) for v, j in zip(top.values, top.indices)])


if __name__ == "__main__":
    sys.exit(main())
