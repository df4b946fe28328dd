"""Which backbone heads find a fact's value from a question asked in other words?

The memory read matches each query token to memory by the backbone key of one layer. A question in
other words ends on its own tokens (" ... Answer:"), so the answer position has to find the value
by what the value's key carries about its context, as the backbone's own retrieval heads do when
the fact is in its window. This probe measures, on held-out recall prompts short enough for the
backbone's window, for every layer and head at the question's last position:

    attn      the backbone's own attention weight on the value's first token (RoPE, causal)
    rank      the value's first token's rank among all prompt tokens by the position-free score
              q·k (RoPE left out, as memory keys are stored), and its cosine rank

    python research/retrieval_heads.py --length 2048 --trials 12
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import AUSTEN  # noqa: E402

from longmem.evaluation.recall import recall_items, recall_score  # noqa: E402
from longmem.evaluation.tasks import EvalSettings  # noqa: E402
from longmem.loading import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--task", default="single")
    ap.add_argument("--style", default="paraphrase")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--chat", action="store_true",
                    help="only the backbone's greedy answers, with the prompt sent as one user turn of its chat template")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = load_model().eval()
    ad, tok = model.adapter, model.tokenizer
    G = ad.num_heads // ad.num_kv_heads
    settings = EvalSettings(task="recall", window=model.config.memory.window, recall_tasks=(args.task,),
                            recall_lengths=(args.length,), recall_trials=args.trials * 2,
                            recall_styles=("restate", "paraphrase"))  # the suite as these runs measured it
    items, _ = recall_items([("persuasion.txt", (AUSTEN / "persuasion.txt").read_text())],
                            lambda s: np.asarray(tok(s, add_special_tokens=False).input_ids), settings)
    items = [i for i in items if i["style"] == args.style][: args.trials]
    if args.chat:
        right = 0
        for item in items:
            text = tok.decode(item["prompt"]).strip()
            x = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
            out = tok.decode(ad.model.generate(x, max_new_tokens=28, do_sample=False)[0, x.shape[1]:])
            ok = recall_score(out, item["answers"]) == 1.0
            right += ok
            print(f"{item['id']} value={item['answers'][0]!r} chat answer={out!r} {'RIGHT' if ok else 'wrong'}", flush=True)
        print(f"\nbackbone, chat template, greedy right: {right}/{len(items)}")
        return
    captured = {}

    def hook(name):
        def f(_m, _a, out):
            captured[name] = out

        return f

    handles = []
    for li, layer in enumerate(ad.layers):
        handles.append(layer.self_attn.q_proj.register_forward_hook(hook(("q", li))))
        handles.append(layer.self_attn.k_proj.register_forward_hook(hook(("k", li))))
    L, H = ad.num_layers, ad.num_heads
    attn = np.zeros((len(items), L, H))
    rank = np.zeros((len(items), L, H))
    crank = np.zeros((len(items), L, H))
    correct = []
    for n, item in enumerate(items):
        prompt = item["prompt"]
        first = tok(" " + item["answers"][0], add_special_tokens=False).input_ids
        fp = item["fact_positions"][0]
        # the value's first token inside the planted fact
        ids = list(prompt)
        where = [p for p in range(fp, min(len(ids), fp + 40)) if ids[p:p + len(first)] == first]
        if not where:  # the tokenizer merged the value with its neighbour: take its first sub-token match
            where = [p for p in range(fp, min(len(ids), fp + 40)) if ids[p] == first[0]]
        vpos = where[0]
        x = ad.with_start(torch.as_tensor(prompt)[None])
        shift = x.shape[1] - len(prompt)
        vpos += shift
        out = ad.model(x)
        pred = tok.decode(out.logits[0, -1].argmax())
        T = x.shape[1]
        pos = torch.arange(T)[None]
        for li in range(L):
            q = captured[("q", li)].view(1, T, -1, ad.head_dim).transpose(1, 2)  # (1, H, T, D)
            k = captured[("k", li)].view(1, T, -1, ad.head_dim).transpose(1, 2)  # (1, Hkv, T, D)
            qr, kr = ad.apply_positions(q, k, pos, li)
            kr = kr.repeat_interleave(G, 1)
            kk = k.repeat_interleave(G, 1)
            s = (qr[:, :, -1:] @ kr.transpose(-1, -2))[0, :, 0] * ad.attention_scale(li)  # (H, T)
            a = s.softmax(-1)
            attn[n, li] = a[:, vpos].numpy()
            free = (q[:, :, -1:] @ kk.transpose(-1, -2))[0, :, 0, : T - 1]  # (H, T-1) all but the query
            rank[n, li] = (free > free[:, vpos: vpos + 1]).sum(-1).numpy()
            cos = free / (q[:, :, -1].norm(dim=-1)[0][:, None] * kk[0, :, : T - 1].norm(dim=-1))
            crank[n, li] = (cos > cos[:, vpos: vpos + 1]).sum(-1).numpy()
        # as the recall suite decodes and scores it
        gen = ad.model.generate(x, max_new_tokens=item["max_new_tokens"], do_sample=False)
        text = tok.decode(gen[0, x.shape[1]:])
        correct.append(recall_score(text, item["answers"]) == 1.0)
        print(f"{item['id']} {item['style']} value={item['answers'][0]!r} at {vpos}/{T} next={pred!r} "
              f"greedy={text!r} {'RIGHT' if correct[-1] else 'wrong'}", flush=True)
    print(f"\nbackbone greedy right: {sum(correct)}/{len(correct)}")
    mean_attn = attn.mean(0)
    order = np.argsort(-mean_attn.ravel())[: args.top]
    print("\nheads with the most attention on the value (in context, RoPE):")
    print("layer head  mean attn  median rank q.k  top-16 share q.k  median cos rank  top-64 share cos")
    for o in order:
        li, h = divmod(int(o), H)
        print(f"{li:5d} {h:4d}  {mean_attn[li, h]:9.3f}  {np.median(rank[:, li, h]):15.0f}  "
              f"{(rank[:, li, h] < 16).mean():16.2f}  {np.median(crank[:, li, h]):15.0f}  {(crank[:, li, h] < 64).mean():16.2f}")
    print("\nper layer: best head's top-16 share (position-free q.k), best head's mean attention")
    for li in range(L):
        share = (rank[:, li] < 16).mean(0)
        mark = "  <- memory layer" if li == model.config.resolved_memory_layer else ""
        print(f"layer {li:2d}: top-16 share {share.max():.2f} (head {share.argmax()}), "
              f"attn {mean_attn[li].max():.3f} (head {mean_attn[li].argmax()}){mark}")
    for h_ in handles:
        h_.remove()


if __name__ == "__main__":
    sys.exit(main())
