"""Retrieval trace: which memory chunks each head read for one token, with what weight, and how
much of the layer's attention went to memory (the gate). The tool that says why memory did or
did not help. With memory_read="next" a chunk's weight is on its tokens as matches, and the value
read is that of the token after each match ("followed_by"). With a copy head the trace also shows
its gate and what the model alone and the copy each predicted."""

from __future__ import annotations

import torch

from .memory import Memory, MemoryBank
from .model import InputError, LongMem


@torch.no_grad()
def retrieval_trace(model: LongMem, bank: Memory, ids: torch.Tensor, position: int = -1, top: int = 3,
                    stream: int = 0) -> dict:
    """ids (1, T): the local text (its last `window` tokens are used); position indexes into them."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.numel() == 0:
        raise InputError("trace needs one non-empty sequence of token ids, shape (1, T)")
    ids = ids[:, -model.config.memory.window :]
    T = ids.shape[1]
    if not -T <= position < T:
        raise InputError(f"position {position} is outside the {T} local tokens")
    position %= T
    model.eval()
    copy_head, copy_inputs = model.sidenet.memory_copy, []
    hook = copy_head.register_forward_hook(lambda m, args, out: copy_inputs.append(args)) if copy_head else None
    try:
        out = model(ids, bank=bank, streams=[stream])
    finally:
        if hook is not None:
            hook.remove()
    read = out.readout
    c = model.config.memory.chunk_size
    decode = (lambda t: model.tokenizer.decode(t)) if model.tokenizer is not None else (lambda t: str(t))
    heads = []
    group = read.weights.shape[1] // read.retrieval.num_heads  # query heads per search head
    for h in range(read.weights.shape[1]):
        r = h // group
        mass = read.weights[0, h, position].float().reshape(-1, c).sum(-1)  # (k,) weight per chunk
        order = mass.argsort(descending=True)[:top]
        chunks = []
        for j in order.tolist():
            if read.retrieval.positions[0, r, position, j] < 0:
                continue
            chunk = {
                "text": decode([t for t in read.retrieval.token_ids[0, r, position, j].tolist() if t >= 0]),
                "stream_position": int(read.retrieval.positions[0, r, position, j]),
                "score": round(float(read.retrieval.scores[0, r, position, j]), 4),
                "weight": round(float(mass[j]), 4),
            }
            if read.retrieval.next_token_ids is not None:  # the next read takes what followed each token
                following = read.retrieval.next_token_ids[0, r, position, j * c : (j + 1) * c].tolist()
                chunk["followed_by"] = decode([t for t in following if t >= 0])
            chunks.append(chunk)
        heads.append({"head": h, "gate": round(float(read.gate[0, h, position]), 4), "chunks": chunks})
    probs = torch.softmax(out.logits[0, position].float(), -1)
    next_id = int(probs.argmax())
    copy = None
    if copy_inputs and copy_inputs[0][2] is not None:  # what the model alone and the copy each said
        log_model, p_copy, z, _ = copy_head.parts(*copy_inputs[0])
        p_model = log_model[0, position].exp()
        top = lambda p: [{"token": decode([int(i)]), "p": round(float(p[i]), 4)} for i in p.topk(3).indices]  # noqa: E731
        copy = {"gate": round(float(torch.sigmoid(z[0, position, 0])), 4),
                "model_top": top(p_model), "copy_top": top(p_copy[0, position])}
    return {
        "token": decode([int(ids[0, position])]),
        "position": position,
        "memory_tokens": bank.num_tokens(stream) if isinstance(bank, MemoryBank) else None,
        "predicted_next": decode([next_id]),
        "predicted_probability": round(float(probs[next_id]), 4),
        "heads": heads,
        "copy": copy,  # with a copy head: its gate g and the two distributions it mixes
    }
