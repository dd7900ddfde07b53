#!/usr/bin/env python3
"""Loads a model folder written by the Rust model crate with transformers and checks its outputs
against a reference.json written by make_parity_fixtures.py.

    python scripts/check_hf_load.py SAVED_DIR REFERENCE_JSON

Exits 0 and prints `max_abs_diff=...` when outputs agree within 1e-4; exits 1 otherwise.
"""
import json
import sys

import torch
import transformers as tf

saved, ref_path = sys.argv[1], sys.argv[2]
ref = json.load(open(ref_path))
arch = json.load(open(f"{saved}/config.json"))["architectures"][0]
cls = tf.AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else tf.AutoModelForCausalLM
model = cls.from_pretrained(saved, dtype=torch.float32).eval()
ids = torch.tensor(ref["input_ids"])
mask = torch.tensor(ref["attention_mask"])
pos = torch.tensor(ref["position_ids"])
with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
if "scores" in ref:
    diff = (out[:, 0] - torch.tensor(ref["scores"])).abs().max().item()
else:
    want = torch.tensor(ref["logits"])
    real = mask.bool()
    diff = (out[real] - want[real]).abs().max().item()
print(f"{arch} max_abs_diff={diff:.3e}")
sys.exit(0 if diff < 1e-4 else 1)
