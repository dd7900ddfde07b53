#!/usr/bin/env python3
"""TRL's RewardTrainer against a task's gold scorer, epoch by epoch: the TRL side of
scripts/bench_agreement.sh (read its header). TRL is installed by that script, never needed by
the product.

    bench_rm_agreement.py [trl] --task TASK --sft SFT_DIR [--epochs 5] [--lr 3e-4[,1e-3,...]]
        [--batch-pairs 16] [--seed 0] [--max-length 128] [--template T] [--out OUT.jsonl]
        TRL's RewardTrainer from the same SFT checkpoint on the same rankings (flattened to pairs,
        all of them): AutoModelForSequenceClassification (num_labels = 1, a new head on the SFT
        checkpoint's trunk, as scripts/bench_trl.py's run_reward) trained on every pair of
        TASK/rankings.csv, i.e. each (prompt, labeler) ranking flattened to all its pairs of
        different ranks (better = lower rank; ties dropped), all groups (no validation split,
        which ours keeps). bench_trl.common_args (fp32 CPU, AdamW, clip 1.0, batch of
        --batch-pairs pairs = 2 × that many sequences, last incomplete batch dropped), cosine
        schedule to 0.1 × lr with 5 warmup steps, no dropout, no reward centering, over
        --epochs real epochs of the data. After each epoch (a TrainerCallback's on_epoch_end)
        the model, in eval mode without grad, scores TASK/heldout_candidates.jsonl and one JSON
        line is printed (and appended to --out):
          {"impl": "trl", "trainer"/"method": "RewardTrainer", "task", "family" (task.json),
           "lr", "epoch", "steps", "pairs" (what TRL trained on), "agreement",
           "candidate_pairs", "by_worse_kind": {kind: accuracy}, "seconds" (training time so
           far, the scoring excluded), ...}
        A comma list of lrs trains one fresh model per lr (the same seed each), one after another.
        The subcommand word `trl` may be left out.

    bench_rm_agreement.py table OUT.jsonl
        Markdown: per family, each method (TRL: per lr) at its best epoch (TRL) or step count
        (ours, the lines scripts/bench_agreement.sh writes), and the whole curve.

How TRL 1.16 sees the text (trl/trainer/reward_trainer.py, RewardTrainer._prepare_dataset, for a
non-conversational dataset with an explicit "prompt" column): it appends the EOS *string* to
"chosen" and "rejected" when they do not already end with it, then tokenises prompt + chosen
(and prompt + rejected) as ONE string with the tokenizer's __call__ (add_special_tokens left on;
our ByteLevel tokenizer has no post-processor, so nothing is added), and drops pairs with either
side longer than max_length (no cutting). DataCollatorForPreference pads right with pad_token_id,
chosen rows then rejected rows in one forward; the loss is -logsigmoid(r_chosen - r_rejected).
The model's score is read at the rightmost token that is not pad_token_id (transformers'
GenericForSequenceClassification), i.e. at EOS, since our SFT folders have pad <|pad|> (1) ≠
eos <|endoftext|> (0); RewardTrainer also copies the tokenizer's pad_token_id into the model
config. Were pad == eos, EOS itself would count as padding and the score would be read at the
token before it: this script refuses that case.

Our `reward` encodes template(prompt) and the response separately and joins the ids + EOS
(reward/src/data.rs `fit`). The held-out candidates are scored here by exactly that encoding
(no cut is needed: like `reward agreement`, the limit is max_position_embeddings), right-padded
in batches of 32 through the model's forward. The script checks, and reports in each line
("tokenization_mismatches"), how many training sequences TRL's one-string tokenisation encodes
differently from ours' separate one (0 on the task suite: responses start with a space, a
ByteLevel pre-token boundary); it also checks that every TRL training sequence ends with EOS and
that padded batch scores equal unpadded one-by-one scores (so the score is read at EOS).

The agreement is `reward agreement`'s (reward/src/agreement.rs): every pair of candidates of one
prompt whose gold differs, correct when the gold-better one gets the higher reward, a tie half;
also by the kind of the gold-worse candidate.

lr: the default 3e-4 was the best of 1e-4 / 3e-4 / 1e-3 on words-0 (seed 0, 5 epochs, batch 16
pairs, TRL 1.16; agreement per epoch 1..5):
    1e-4  0.807 0.806 0.800 0.804 0.807
    3e-4  0.813 0.831 0.812 0.806 0.807
    1e-3  0.813 0.771 0.786 0.801 0.798   (configs/reward.toml's lr, ours' default)
(ours, `reward` with ensemble.members = 1, 150 steps at 1e-3: 0.833). One task and one seed,
664 candidate pairs (a 95% interval is about ±0.03): pass --lr 1e-4,3e-4,1e-3 on other tasks.
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
import bench_trl  # noqa: E402  (quiet, load_tokenizer, common_args, drop_printer, read_jsonl)

TEMPLATE = "Human: {prompt}\n\nAssistant:"
SCORE_BATCH = 32


def ranking_pairs(task, template):
    """All pairs of different ranks within each (prompt, labeler) ranking of rankings.csv, the
    prompt templated; and the number of groups."""
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
    """reward agreement's numbers: (accuracy, pairs judged, {gold-worse kind: accuracy})."""
    by_prompt = defaultdict(list)
    for c, r in zip(cands, rewards):
        by_prompt[str(c["prompt_id"])].append((c, r))
    total, correct = 0, 0.0
    kinds = defaultdict(lambda: [0, 0.0])
    for items in by_prompt.values():
        for a in range(len(items)):
            for b in range(a + 1, len(items)):
                (ca, ra), (cb, rb) = items[a], items[b]
                if ca["gold"] == cb["gold"]:
                    continue
                (_, rh), (lo, rl) = ((ca, ra), (cb, rb)) if ca["gold"] > cb["gold"] else ((cb, rb), (ca, ra))
                s = 1.0 if rh > rl else 0.5 if rh == rl else 0.0
                total += 1
                correct += s
                k = kinds[lo.get("kind") or "?"]
                k[0] += 1
                k[1] += s
    return (correct / total if total else math.nan, total,
            {k: round(v[1] / v[0], 4) for k, v in sorted(kinds.items())})


def encode_ours(tok, prompt_text, response):
    """reward/src/data.rs `fit` without a cut: ids(template(prompt)) ++ ids(response) ++ [EOS]."""
    ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    return ids + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def score(model, seqs, pad_id, batch=SCORE_BATCH):
    """The model's reward of each id sequence: right-padded batches, the forward reads the score
    at the last non-pad token (EOS); eval mode, no grad; the training mode is restored."""
    import torch

    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i:i + batch]
            n = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            out.extend(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())
    if was_training:
        model.train()
    return out


def check_padding(model, seqs, pad_id):
    """Padded batch scores == one-by-one unpadded scores (a batch with very different lengths):
    the score is read at each sequence's own last token, EOS."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    pick = [seqs[i] for i in order[:4] + order[len(order) // 2:len(order) // 2 + 4] + order[-4:]]
    batched = score(model, pick, pad_id, batch=len(pick))
    alone = [score(model, [s], pad_id, batch=1)[0] for s in pick]
    worst = max(abs(x - y) for x, y in zip(batched, alone))
    assert worst < 1e-4, f"padded and unpadded scores differ by {worst}"
    return worst


def emit(rec, out):
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def run_trl(a):
    bench_trl.quiet()
    import torch
    import transformers as tf
    import trl
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    task_info = json.load(open(os.path.join(a.task, "task.json")))
    family = task_info.get("family", "demo")
    pairs, groups = ranking_pairs(a.task, a.template)
    cands = bench_trl.read_jsonl(os.path.join(a.task, "heldout_candidates.jsonl"))
    tok = bench_trl.load_tokenizer(a.sft)
    tok.padding_side = "right"
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    if pad_id is None or pad_id == eos_id:
        sys.exit(f"{a.sft}: pad token {tok.pad_token!r} is the EOS token {tok.eos_token!r} (or "
                 "unset); the score would not be read at EOS. Use an SFT folder with its own pad.")
    seqs = [encode_ours(tok, a.template.replace("{prompt}", c["prompt"]), c["response"]) for c in cands]
    cfg = tf.AutoConfig.from_pretrained(a.sft)
    longest = max(len(s) for s in seqs)
    assert longest <= cfg.max_position_embeddings, (longest, cfg.max_position_embeddings)

    for lr in [float(x) for x in str(a.lr).split(",") if x.strip()]:
        tf.set_seed(a.seed)  # the same new head for every lr
        model = tf.AutoModelForSequenceClassification.from_pretrained(a.sft, num_labels=1,
                                                                      dtype=torch.float32)
        model.config.pad_token_id = pad_id
        args = dict(bench_trl.common_args(os.path.join(a.work, "trl"), -1, a.batch_pairs, lr, a.seed))
        args.update(num_train_epochs=a.epochs, lr_scheduler_type="cosine_with_min_lr",
                    lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=5,
                    max_length=a.max_length, disable_dropout=True, center_rewards_coefficient=None,
                    dataset_num_proc=None)
        lines, clock = [], {"start": None, "eval": 0.0}
        info = {}

        class EpochEnd(tf.TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock["start"] = time.perf_counter()

            def on_epoch_end(self, args, state, control, **kw):
                t = time.perf_counter()
                rewards = score(kw["model"], seqs, pad_id)
                acc, n, by_kind = agreement(cands, rewards)
                clock["eval"] += time.perf_counter() - t
                rec = {"impl": "trl", "trainer": "RewardTrainer", "method": "RewardTrainer",
                       "family": family, "task": a.task, "sft": a.sft, "seed": a.seed, "lr": lr,
                       "epoch": len(lines) + 1, "steps": state.global_step, "pairs": info["pairs"],
                       "pairs_before_filter": len(pairs), "groups": groups,
                       "batch_pairs": a.batch_pairs, "max_length": a.max_length,
                       "agreement": round(acc, 4), "candidate_pairs": n, "by_worse_kind": by_kind,
                       "reward_mean": round(sum(rewards) / len(rewards), 4),
                       "tokenization_mismatches": info["mismatches"],
                       "seconds": round(time.perf_counter() - clock["start"] - clock["eval"], 1),
                       "trl": trl.__version__, "transformers": tf.__version__,
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
                lines.append(rec)
                emit(rec, a.out)

        trainer = RewardTrainer(model=model, args=RewardConfig(**args),
                                train_dataset=Dataset.from_list(pairs), processing_class=tok,
                                callbacks=[EpochEnd()])
        bench_trl.drop_printer(trainer)

        # What TRL will train on: every sequence ends with EOS, and the ids are ours' encoding.
        ds = trainer.train_dataset
        info["pairs"] = len(ds)
        for ex in ds:
            for side in ("chosen_ids", "rejected_ids"):
                assert ex[side][-1] == eos_id, f"a TRL sequence does not end with EOS: {ex[side][-5:]}"
        # TRL's encoding (one string, EOS string appended, __call__ defaults) against ours.
        info["mismatches"] = mism = sum(
            tok(p["prompt"] + p[side] + tok.eos_token)["input_ids"] != encode_ours(tok, p["prompt"], p[side])
            for p in pairs for side in ("chosen", "rejected"))
        worst = check_padding(model, seqs, pad_id)
        print(f"# lr {lr}: {len(ds)} of {len(pairs)} pairs (max_length {a.max_length}) from "
              f"{groups} groups, {len(ds) // a.batch_pairs} steps per epoch; every sequence ends "
              f"with EOS (id {eos_id}, pad {pad_id}); {mism} tokenised differently from ours; "
              f"padded vs unpadded scores within {worst:.1e}", file=sys.stderr, flush=True)
        trainer.train()
        assert len(lines) == a.epochs, (len(lines), a.epochs)


def table(a):
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    curves = defaultdict(list)
    for r in rows:
        key = (r["family"], r.get("method") or r.get("trainer"), r.get("lr") if r["impl"] == "trl" else None)
        curves[key].append(r)
    print("| family | method | lr | best agreement with gold | at | curve | by gold-worse kind at best |")
    print("|---|---|---|---|---|---|---|")
    for (family, method, lr), rs in sorted(curves.items(), key=lambda kv: tuple(map(str, kv[0]))):
        unit = "epoch" if rs[0]["impl"] == "trl" else "steps"
        rs = sorted(rs, key=lambda r: r[unit])
        best = max(rs, key=lambda r: r["agreement"])
        curve = " / ".join(f"{r['agreement']:.3f}" for r in rs)
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in best.get("by_worse_kind", {}).items())
        print(f"| {family} | {method} | {'' if lr is None else lr} | {best['agreement']:.3f} | "
              f"{unit} {best[unit]} | {curve} | {kinds} |")


def main():
    argv = sys.argv[1:]
    if argv and argv[0].startswith("--") and argv[0] not in ("-h", "--help"):
        argv = ["trl"] + argv  # the subcommand word may be left out
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trl", help="train with RewardTrainer, agreement after each epoch")
    t.add_argument("--task", required=True)
    t.add_argument("--sft", required=True)
    t.add_argument("--out", help="also append the JSON lines to this file")
    t.add_argument("--work", default="/tmp/bench_rm_agreement", help="the Trainer's output_dir (nothing is saved)")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--lr", default="3e-4", help="one or more, comma-separated (default 3e-4)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-pairs", type=int, default=16)
    t.add_argument("--max-length", type=int, default=128)
    t.add_argument("--template", default=TEMPLATE)
    s = sub.add_parser("table", help="markdown table of the best epoch per family / method / lr")
    s.add_argument("results")
    a = p.parse_args(argv)
    run_trl(a) if a.cmd == "trl" else table(a)


if __name__ == "__main__":
    main()
