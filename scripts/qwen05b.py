#!/usr/bin/env python3
"""Writes a Qwen2.5-0.5B-shaped model folder with random weights (no hub is reachable here):
24 layers, hidden 896, 14 query / 2 key-value heads, intermediate 4864, vocab 151,936, tied
embeddings, q/k/v biases, bf16 safetensors, as transformers writes it; and a byte-level BPE
tokenizer trained on the demo task's texts with Qwen's special tokens and ChatML template.

    python scripts/qwen05b.py OUT_DIR [TEXTS_JSONL]

Used by scripts/qwen05b.sh (the 0.5B pipeline on this machine).
"""
import json
import os
import sys

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

out = sys.argv[1]
texts_path = sys.argv[2] if len(sys.argv) > 2 else "datasets/demo/task/demonstrations.jsonl"
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
cfg = tf.Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=151645,
    pad_token_id=151643,
    torch_dtype="bfloat16",
)
model = tf.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)

# A small byte-level BPE on the demo texts; the special tokens get Qwen's ids' roles (the
# embedding table keeps Qwen's 151,936 rows; ids above the tokenizer's are never produced).
texts = []
for line in open(texts_path):
    r = json.loads(line)
    texts += [r.get("prompt", ""), r.get("response", "")]
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=specials,
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(os.path.join(out, "tokenizer.json"))
ids = {s: tok.token_to_id(s) for s in specials}
# config.json's special ids must be the tokenizer's.
c = json.load(open(os.path.join(out, "config.json")))
c["eos_token_id"] = ids["<|im_end|>"]
c["pad_token_id"] = ids["<|endoftext|>"]
c["bos_token_id"] = None
json.dump(c, open(os.path.join(out, "config.json"), "w"), indent=2)
chatml = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "bos_token": None, "chat_template": chatml, "model_max_length": 32768},
          open(os.path.join(out, "tokenizer_config.json"), "w"), indent=2)
n = sum(p.numel() for p in model.parameters())
print(f"{out}: {n / 1e6:.1f}M parameters, bf16; tokenizer of {tok.get_vocab_size()} tokens")
