#!/usr/bin/env python3
"""Writes tiny random Hugging Face models and reference outputs for the model crate's parity tests.

Run by hand when the fixtures change (needs torch + transformers):
    python scripts/make_parity_fixtures.py model/tests/fixtures

Each fixture folder holds config.json, the safetensors weights and reference.json:
  input_ids / attention_mask  [2, T], row 1 left-padded;
  position_ids                cumsum(mask) - 1 (what generation uses for left padding);
  logits                      [2, T, V] float32 (real positions only are compared);
  greedy                      for each row's unpadded prompt, 6 greedy tokens by full recompute;
  scores                      (sequence classifiers) the score at the last real token.
"""
import copy
import json
import os
import sys

import torch
import transformers as tf

torch.manual_seed(0)
OUT = sys.argv[1] if len(sys.argv) > 1 else "model/tests/fixtures"
V = 96
IDS = [[5, 17, 33, 2, 91, 40, 8, 63, 12, 77], [0, 0, 0, 44, 3, 19, 60, 21, 85, 9]]
MASK = [[1] * 10, [0, 0, 0] + [1] * 7]


def llama_cfg(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def randomize(model):
    # HF init leaves biases and norms at 0 / 1; make every tensor count.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln" in name else 0.0))
            else:
                p.copy_(torch.randn_like(p) * 0.08)


def reference(model, classifier):
    ids = torch.tensor(IDS)
    mask = torch.tensor(MASK)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = {"input_ids": IDS, "attention_mask": MASK, "position_ids": pos.tolist()}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos)
        if classifier:
            ref["scores"] = out.logits[:, 0].tolist()
            return ref
        ref["logits"] = out.logits.float().tolist()
        greedy = []
        for r in range(2):
            seq = [t for t, m in zip(IDS[r], MASK[r]) if m]
            new = []
            for _ in range(6):
                x = torch.tensor([seq + new])
                new.append(int(model(input_ids=x).logits[0, -1].argmax()))
            greedy.append(new)
        ref["greedy"] = greedy
    return ref


def write(name, model, classifier=False, dtype=None, shard=None):
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    model.eval()
    kw = {"max_shard_size": shard} if shard else {}
    if dtype is not None:
        # Round the parameters only (module.to() would also round buffers such as RoPE's
        # inv_freq), save a copy in `dtype`, and take the reference in f32 from the rounded
        # weights, as the Rust side computes.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float32))
        copy.deepcopy(model).to(dtype).save_pretrained(path, safe_serialization=True, **kw)
    else:
        model.save_pretrained(path, safe_serialization=True, **kw)
    ref = reference(model, classifier)
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(name, "written", sorted(os.listdir(path)))


def main():
    # Llama, GQA, untied head.
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_cfg(tie_word_embeddings=False)))
    randomize(m)
    write("llama_gqa_untied", m)
    # Llama, tied head, llama3 RoPE scaling, weights stored as bf16.
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**llama_cfg(
        tie_word_embeddings=True, num_key_value_heads=4, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})))
    randomize(m)
    write("llama_tied_llama3_bf16", m, dtype=torch.bfloat16)
    # Qwen2: attention bias on q/k/v, sharded weights.
    m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_cfg(tie_word_embeddings=False)))
    randomize(m)
    write("qwen2_bias_sharded", m, shard="40KB")
    # Mistral, through the same code.
    m = tf.MistralForCausalLM(tf.MistralConfig(**llama_cfg(tie_word_embeddings=False, sliding_window=None)))
    randomize(m)
    write("mistral", m)
    # GPT-2: learned positions, LayerNorm, gelu_new, Conv1D, tied head.
    m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    randomize(m)
    write("gpt2", m)
    # Scalar head: Llama sequence classifier (reward model layout).
    m = tf.LlamaForSequenceClassification(tf.LlamaConfig(**llama_cfg(num_labels=1)))
    randomize(m)
    write("llama_score", m, classifier=True)


if __name__ == "__main__":
    main()
