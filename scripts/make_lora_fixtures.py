#!/usr/bin/env python3
"""Writes PEFT LoRA adapters on the model crate's parity fixtures, with PEFT's logits, for the
LoRA tests (model/tests/lora.rs). Needs torch + transformers + peft; run by hand when they change:

    python scripts/make_lora_fixtures.py model/tests/fixtures

For each base fixture BASE it writes BASE/../lora_BASE/: adapter_config.json and
adapter_model.safetensors as `PeftModel.save_pretrained` writes them (random A and B:
init_lora_weights=False, so the adapter changes the outputs), and reference.json with the adapted
model's logits on the base's reference batch ([2, T, V], real positions compared).

  verify BASE_DIR ADAPTER_DIR REFERENCE_JSON
      loads BASE_DIR with transformers and ADAPTER_DIR with peft (an adapter we wrote), and
      compares the logits on the reference batch with REFERENCE_JSON["logits"] (ours);
      exits 0 when within 1e-4.
"""
import json
import os
import sys

import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model

# base fixture -> (target modules, r, alpha, rslora): a subset that leaves fused segments
# unadapted (k of q|k|v, gate of gate|up), all-linear, and GPT-2's Conv1D modules.
CASES = {
    "llama_gqa_untied": (["q_proj", "v_proj", "down_proj", "up_proj"], 4, 8.0, False),
    "qwen2_bias_sharded": ("all-linear", 4, 16.0, True),
    "gpt2": (["c_attn", "c_proj"], 3, 6.0, False),
}


def logits(model, ref):
    ids = torch.tensor(ref["input_ids"])
    mask = torch.tensor(ref["attention_mask"])
    pos = torch.tensor(ref["position_ids"])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def make(root):
    torch.manual_seed(0)
    for base, (targets, r, alpha, rslora) in CASES.items():
        base_dir = os.path.join(root, base)
        ref = json.load(open(os.path.join(base_dir, "reference.json")))
        model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                         init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
        pm = get_peft_model(model, cfg).eval()
        # PEFT's random init of B is small; scale it so the adapter moves the logits clearly.
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.mul_(20.0)
        out = os.path.join(root, f"lora_{base}")
        pm.save_pretrained(out)
        got = logits(pm, ref)
        json.dump({"logits": got.tolist()}, open(os.path.join(out, "reference.json"), "w"))
        with torch.no_grad():
            pm.disable_adapter_layers()
            plain = logits(pm, ref)
            pm.enable_adapter_layers()
        print(f"{out}: max |adapted - base| logits {(got - plain).abs().max().item():.3f}")


def verify(base_dir, adapter_dir, ours_path):
    base_ref = json.load(open(os.path.join(base_dir, "reference.json"))) if os.path.exists(
        os.path.join(base_dir, "reference.json")) else None
    ours = json.load(open(ours_path))
    ref = ours if "input_ids" in ours else base_ref
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter_dir).eval()
    got = logits(pm, ref)
    want = torch.tensor(ours["logits"]).reshape(got.shape)
    real = torch.tensor(ref["attention_mask"]).bool()
    diff = (got[real] - want[real]).abs().max().item()
    print(f"peft max_abs_diff={diff:.3e}")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "verify":
        verify(*sys.argv[2:5])
    else:
        make(sys.argv[1] if len(sys.argv) > 1 else "model/tests/fixtures")
