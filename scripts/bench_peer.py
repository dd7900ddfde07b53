#!/usr/bin/env python3
"""The PyTorch peer of `model bench`: Hugging Face transformers on PyTorch, fp32, eager attention,
on the same shapes as the Rust benchmark. Prints one JSON line per measurement:
    {"shape": ..., "what": "train"|"generate", "impl": "pytorch", "tokens_per_s": x}

    python scripts/bench_peer.py --shape small --steps 5 --reps 2 [--matmul bf16]

--matmul bf16 sets torch.backends.mkldnn.matmul.fp32_precision = "bf16" (fp32 weights and
activations, matrix products on bf16 operands through oneDNN, AMX where the CPU has it: the same
contract as our `matmul = "bf16"`); its rows are named "pytorch-bf16".
"""
import argparse
import json
import time

import torch
import transformers as tf

SHAPES = {
    "small": dict(vocab=8192, hidden=256, inter=688, layers=4, heads=4),
    "medium": dict(vocab=16384, hidden=512, inter=1376, layers=8, heads=8),
}
TRAIN_BATCH, TRAIN_SEQ = 8, 128
GEN_BATCH, GEN_PROMPT, GEN_NEW = 16, 32, 64


def config(s):
    return tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["heads"], max_position_embeddings=2048,
                          tie_word_embeddings=False, attn_implementation="eager",
                          pad_token_id=0, eos_token_id=None, bos_token_id=None)


def train(s, steps, warmup):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config(s)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, eps=1e-8, weight_decay=0.01)
    timed = 0.0
    for step in range(warmup + steps):
        ids = torch.randint(0, s["vocab"], (TRAIN_BATCH, TRAIN_SEQ + 1))
        start = time.perf_counter()
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, s["vocab"]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step >= warmup:
            timed += time.perf_counter() - start
    return TRAIN_BATCH * TRAIN_SEQ * steps / timed


def generate(s, reps):
    torch.manual_seed(1)
    model = tf.LlamaForCausalLM(config(s)).eval()
    ids = torch.randint(0, s["vocab"], (GEN_BATCH, GEN_PROMPT))
    mask = torch.ones_like(ids)
    timed = 0.0
    with torch.no_grad():
        for rep in range(reps + 1):
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW)
            assert out.shape[1] == GEN_PROMPT + GEN_NEW
            if rep > 0:
                timed += time.perf_counter() - start
    return GEN_BATCH * GEN_NEW * reps / timed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--matmul", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    s = SHAPES[a.shape]
    name = "pytorch"
    if a.matmul == "bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        name = "pytorch-bf16"
    for what, tps in (("train", train(s, a.steps, a.warmup)), ("generate", generate(s, a.reps))):
        print(json.dumps({"shape": a.shape, "what": what, "impl": name, "tokens_per_s": round(tps, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
