#!/usr/bin/env python3
"""TRL's RewardTrainer against a task's gold scorer, epoch by epoch: the TRL side of
scripts/bench_agreement.sh (read its header). TRL is installed by that script, never needed by
the product.

    bench_rm_agreement.py trl --task TASK --sft SFT_DIR --epochs 5 --lr 1e-3 [--seed 0] \
        [--batch-pairs 16] [--max-length 128] [--template T] >> OUT.jsonl
        Trains AutoModelForSequenceClassification (num_labels = 1, a new head on the SFT
        checkpoint's trunk) with RewardTrainer on every pair of TASK/rankings.csv: each
        (prompt, labeler) ranking flattened to all its pairs of different ranks (ties dropped),
        all groups (no validation split), the prompt templated as our stages template it. After
        each epoch the model scores TASK/heldout_candidates.jsonl and one JSON line is printed.

    bench_rm_agreement.py table OUT.jsonl
        Markdown: per family, each method at its best epoch (TRL) or step count (ours).

How TRL 1.16 sees the text (read from trl/trainer/reward_trainer.py): it appends the EOS string to
"chosen" and "rejected" when missing, tokenises prompt + response as one string, and drops pairs
longer than max_length; the model's score is read at the last non-pad token, i.e. at EOS (our SFT
folders have pad <|pad|> ≠ eos <|endoftext|>). Our `reward` scores template(prompt) + response
+ EOS at EOS too, so both sides score the same sequences; the held-out candidates are scored here
by the same rule (EOS appended, right padding, batches of 32).

The agreement is `reward agreement`'s (reward/src/agreement.rs): every pair of candidates of one
prompt whose gold differs, correct when the gold-better one gets the higher reward, a tie half;
also by the kind of the gold-worse candidate.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_trl  # noqa: E402  (quiet, load_tokenizer, common_args, drop_printer)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def ranking_pairs(task, template):
    """All pairs of different ranks within each (prompt, labeler) ranking of rankings.csv."""
    groups, order = defaultdict(list), []
    with open(os.path.join(task, "rankings.csv"), encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["prompt_id"], row.get("labeler_id", ""))
            if key not in groups:
                order.append(key)
            groups[key].append(row)
    pairs = []
    for key in order:
        rows = groups[key]
        prompt = template.replace("{prompt}", rows[0]["prompt"])
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                ri, rj = int(rows[i]["rank"]), int(rows[j]["rank"])
                if ri == rj:
                    continue
                better, worse = (rows[i], rows[j]) if ri < rj else (rows[j], rows[i])
                pairs.append({"prompt": prompt, "chosen": better["response"],
                              "rejected": worse["response"]})
    return pairs, len(order)


def agreement(cands, rewards):
    """reward agreement's numbers: overall and by the gold-worse candidate's kind."""
    by_prompt = defaultdict(list)
    for c, r in zip(cands, rewards):
        by_prompt[c["prompt_id"]].append((c, r))
    total, correct = 0, 0.0
    kinds = defaultdict(lambda: [0, 0.0])
    for items in by_prompt.values():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (ca, ra), (cb, rb) = items[a], items[b]
                if ca["gold"] == cb["gold"]:
                    continue
                (hi, rh), (lo, rl) = ((ca, ra), (cb, rb)) if ca["gold"] > cb["gold"] else ((cb, rb), (ca, ra))
                s = 1.0 if rh > rl else 0.5 if rh == rl else 0.0
                total += 1
                correct += s
                k = kinds[lo.get("kind", "?")]
                k[0] += 1
                k[1] += s
    return (correct / total if total else math.nan, total,
            {k: round(v[1] / v[0], 4) for k, v in sorted(kinds.items())})


def score(model, tok, texts, batch=32):
    import torch

    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out.extend(model(**enc).logits[:, 0].float().tolist())
    if was_training:
        model.train()
    return out


def run_trl(a):
    bench_trl.quiet()
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(a.seed)
    task_info = json.load(open(os.path.join(a.task, "task.json")))
    family = task_info.get("family", "demo")
    pairs, groups = ranking_pairs(a.task, a.template)
    cands = read_jsonl(os.path.join(a.task, "heldout_candidates.jsonl"))
    tok = bench_trl.load_tokenizer(a.sft)
    tok.padding_side = "right"
    texts = [a.template.replace("{prompt}", c["prompt"]) + c["response"] + tok.eos_token for c in cands]

    for lr in [float(x) for x in a.lr.split(",")]:
        model = tf.AutoModelForSequenceClassification.from_pretrained(a.sft, num_labels=1,
                                                                      dtype=torch.float32)
        model.config.pad_token_id = tok.pad_token_id
        steps_per_epoch = len(pairs) // a.batch_pairs
        args = dict(bench_trl.common_args(os.path.join(a.work, "trl"), steps_per_epoch * a.epochs,
                                          a.batch_pairs, lr, a.seed))
        args.update(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                    warmup_steps=5, max_length=a.max_length, disable_dropout=True,
                    center_rewards_coefficient=None, dataset_num_proc=None)
        t0 = time.perf_counter()
        lines = []

        class EpochEnd(tf.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step % steps_per_epoch == 0:
                    acc, n, by_kind = agreement(cands, score(kw["model"], tok, texts))
                    rec = {"impl": "trl", "method": "RewardTrainer", "family": family, "task": a.task,
                           "seed": a.seed, "lr": lr, "epoch": state.global_step // steps_per_epoch,
                           "steps": state.global_step, "pairs": len(pairs), "groups": groups,
                           "batch_pairs": a.batch_pairs, "agreement": round(acc, 4),
                           "candidate_pairs": n, "by_worse_kind": by_kind,
                           "seconds": round(time.perf_counter() - t0, 1),
                           "trl": __import__("trl").__version__}
                    lines.append(rec)
                    print(json.dumps(rec), flush=True)

        trainer = RewardTrainer(model=model, args=RewardConfig(**args), train_dataset=Dataset.from_list(pairs),
                                processing_class=tok, callbacks=[EpochEnd()])
        bench_trl.drop_printer(trainer)
        trainer.train()
        assert len(lines) == a.epochs, (len(lines), a.epochs)


def table(a):
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    best = {}
    for r in rows:
        key = (r["family"], r["method"])
        if key not in best or r["agreement"] > best[key]["agreement"]:
            best[key] = r
    print("| family | method | best agreement with gold | at | all settings tried |")
    print("|---|---|---|---|---|")
    for (family, method), r in sorted(best.items()):
        tried = sorted({(x.get("lr"), x.get("epoch") or x.get("steps")) for x in rows
                        if x["family"] == family and x["method"] == method}, key=str)
        at = f"lr {r['lr']}, epoch {r['epoch']}" if r["impl"] == "trl" else f"{r['steps']} steps"
        print(f"| {family} | {method} | {r['agreement']:.3f} | {at} | {len(tried)} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trl")
    t.add_argument("--task", required=True)
    t.add_argument("--sft", required=True)
    t.add_argument("--work", default="/tmp/bench_rm_agreement")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--lr", default="1e-3", help="one or more, comma-separated")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-pairs", type=int, default=16)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--template", default="Human: {prompt}\n\nAssistant:")
    s = sub.add_parser("table")
    s.add_argument("results")
    a = p.parse_args()
    run_trl(a) if a.cmd == "trl" else table(a)


if __name__ == "__main__":
    main()
