#!/usr/bin/env python3
"""The TRL side of scripts/bench_stages.sh (read that script's header for what is measured and how
the two sides are kept comparable). TRL is installed by the benchmark, never needed by the product.

Subcommands (the driver calls them in this order):

    bench_trl.py prepare --task datasets/demo/task --template T --out WORK
        Writes the data both sides train on: texts.txt (for `model init`'s BPE), sft.jsonl (the
        demonstrations without exact duplicates), groups.jsonl (ranked groups of K = 4 responses
        with four distinct ranks, from rankings.csv), pairs.jsonl (each group flattened to its
        C(4,2) = 6 (prompt, chosen, rejected) pairs, prompt already templated), comparisons.jsonl
        (the same pairs with the raw prompt, for our `dpo` on flat comparisons) and prompts.jsonl
        (the RL prompts, templated).

    bench_trl.py run --preset P --work WORK --init DIR --policy DIR --reward-model DIR [...]
        SFTTrainer, RewardTrainer, RLOOTrainer, GRPOTrainer and DPOTrainer on that data, from the
        same model folders as our stages; prints one JSON line per measurement.

    bench_trl.py ours --preset P --stage S --metrics RUN/metrics.jsonl [...]
        (S: sft, reward, rloo, grpo, dpo, dpo_pairs)
        Reads our stage's metrics.jsonl and prints its JSON line in the same form.

    bench_trl.py table RESULTS.jsonl
        The table of ratios (ours / TRL) against the targets.

Timing of a TRL trainer: a TrainerCallback takes the time at every on_step_end; a measured step
is the interval from the previous step's end to its own end, i.e. the dataloader fetch and the
collation of its batch, `training_step` (forward, loss, backward), gradient clipping, the
optimizer and scheduler steps and zero_grad. No logging, evaluation or saving happens in it
(logging_strategy / eval_strategy / save_strategy "no"). The on_step_begin → on_step_end time,
which leaves the batch fetch and collation out, is reported too (`per_s_step_only`).
"""
import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict

K = 4
PAIRS_PER_GROUP = K * (K - 1) // 2  # 6


# ---------------------------------------------------------------------------------------------
# prepare


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def prepare(a):
    os.makedirs(a.out, exist_ok=True)
    tpl = a.template

    # SFT: exact (prompt, response) duplicates removed, first kept, as `sft` does.
    seen, demos = set(), []
    for d in read_jsonl(os.path.join(a.task, "demonstrations.jsonl")):
        key = (d["prompt"], d["response"])
        if key not in seen:
            seen.add(key)
            demos.append({"prompt": d["prompt"], "response": d["response"]})
    write_jsonl(os.path.join(a.out, "sft.jsonl"), demos)

    # The BPE of `model init` learns from these lines: the templated prompts and the responses
    # (what `sft` trains its BPE on for a new model; `model init` reads a line per text).
    with open(os.path.join(a.out, "texts.txt"), "w", encoding="utf-8") as f:
        for d in demos:
            for text in (tpl.replace("{prompt}", d["prompt"]), d["response"]):
                for line in text.splitlines():
                    if line.strip():
                        f.write(line + "\n")

    # Reward: each labeler's ranking of a prompt's K = 4 responses is a group; only groups with
    # four distinct ranks are kept (no ties), so that every group is exactly 6 comparisons.
    groups = defaultdict(list)
    order = []
    with open(os.path.join(a.task, "rankings.csv"), encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["prompt_id"], row.get("labeler_id", ""))
            if key not in groups:
                order.append(key)
            groups[key].append(row)
    out_groups, pairs = [], []
    for key in order:
        rows = groups[key]
        ranks = [int(r["rank"]) for r in rows]
        if len(rows) != K or len(set(ranks)) != K:
            continue
        g = {
            "prompt_id": key[0],
            "prompt": rows[0]["prompt"],
            "labeler_id": key[1],
            "response_ids": [r["response_id"] for r in rows],
            "responses": [r["response"] for r in rows],
            "ranks": ranks,
        }
        out_groups.append(g)
        prompt = tpl.replace("{prompt}", g["prompt"])
        for i in range(K):
            for j in range(i + 1, K):
                better, worse = (i, j) if ranks[i] < ranks[j] else (j, i)
                pairs.append({"prompt": prompt, "chosen": g["responses"][better],
                              "rejected": g["responses"][worse]})
    write_jsonl(os.path.join(a.out, "groups.jsonl"), out_groups)
    write_jsonl(os.path.join(a.out, "pairs.jsonl"), pairs)
    # The same pairs, in the same order, with the raw prompt: flat comparisons for our `dpo`
    # (which applies the template itself), i.e. exactly the rows TRL's DPOTrainer trains on.
    raw = [g["prompt"] for g in out_groups for _ in range(PAIRS_PER_GROUP)]
    write_jsonl(os.path.join(a.out, "comparisons.jsonl"),
                [{"prompt": r, "chosen": p["chosen"], "rejected": p["rejected"]}
                 for r, p in zip(raw, pairs, strict=True)])

    # RLOO / GRPO prompts, templated as our `ppo` templates them (the SFT policy's template).
    prompts = [{"prompt": tpl.replace("{prompt}", p["prompt"])}
               for p in read_jsonl(os.path.join(a.task, "prompts.jsonl"))]
    write_jsonl(os.path.join(a.out, "prompts.jsonl"), prompts)
    print(f"prepared {a.out}: {len(demos)} demonstrations, {len(out_groups)} tie-free K=4 groups "
          f"({len(pairs)} pairs), {len(prompts)} prompts")


# ---------------------------------------------------------------------------------------------
# run (TRL)


def quiet():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # DPOTrainer's reference precompute bar
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_tokenizer(folder):
    """The folder's tokenizer.json as a transformers tokenizer, special tokens from the folder."""
    import transformers as tf

    try:
        tok = tf.AutoTokenizer.from_pretrained(folder)
    except Exception:  # no usable tokenizer_config.json: build it from tokenizer.json + config
        cfg = json.load(open(os.path.join(folder, "config.json")))
        tj = json.load(open(os.path.join(folder, "tokenizer.json")))
        by_id = {t["id"]: t["content"] for t in tj.get("added_tokens", [])}
        tok = tf.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                         eos_token=by_id.get(cfg.get("eos_token_id")),
                                         pad_token=by_id.get(cfg.get("pad_token_id")))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class StepClock:
    """Times at on_step_begin / on_step_end (perf_counter), and what each step processed."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kw):
                clock.ends.append(time.perf_counter())

        self.callback = CB()
        self.begins, self.ends, self.units = [], [], []

    def window(self, first, last):
        """(seconds step-end to step-end, seconds begin-to-end only, units) of steps first..last
        (1-based, inclusive); needs first >= 2 (step 1 has no previous step end)."""
        assert first >= 2 and len(self.ends) >= last, (first, last, len(self.ends))
        total = self.ends[last - 1] - self.ends[first - 2]
        only = sum(self.ends[i] - self.begins[i] for i in range(first - 1, last))
        units = sum(self.units[first - 1:last])
        return total, only, units


def common_args(out_dir, steps, batch, lr, seed):
    """The TrainingArguments every trainer here gets: fp32 on the CPU, AdamW (transformers'
    default, the fused torch kernel) with betas 0.9/0.999, eps 1e-8, no weight decay, global
    grad-norm clip 1.0, no gradient checkpointing (TRL's configs default to it; our stages do not
    recompute), no logging/eval/saving, single-process data loading."""
    return dict(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        seed=seed,
        data_seed=seed,
    )


def drop_printer(trainer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def train_counting(trainer_cls, clock, count, **kwargs):
    """Trains a `trainer_cls` (with `clock`'s callback, without the progress printers) whose every
    training step appends count(inputs), its units, to clock.units. Returns the trainer."""

    class Counting(trainer_cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.units.append(count(inputs))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Counting(callbacks=[clock.callback], **kwargs)
    drop_printer(trainer)
    trainer.train()
    return trainer


def emit(rec):
    print(json.dumps(rec), flush=True)


def env_fields():
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def run_sft(a, tok):
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tpl = a.template
    eos = tok.eos_token
    records, too_long = [], 0
    for d in read_jsonl(os.path.join(a.work, "sft.jsonl")):
        prompt = tpl.replace("{prompt}", d["prompt"])
        # `sft` drops an example longer than max_length (prompt + response + EOS); TRL would cut
        # it, so the same ones are dropped here.
        n = len(tok(prompt + d["response"] + eos, add_special_tokens=False)["input_ids"])
        if n > a.sft_max_length:
            too_long += 1
            continue
        records.append({"prompt": prompt, "completion": d["response"]})
    model = tf.AutoModelForCausalLM.from_pretrained(a.init, dtype=torch.float32)
    clock = StepClock()
    steps = a.sft_warmup + a.sft_steps
    args = SFTConfig(**common_args(os.path.join(a.out, "sft"), steps, a.sft_batch, a.sft_lr, a.seed),
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                     warmup_steps=5, max_length=a.sft_max_length, packing=False,
                     completion_only_loss=True, dataset_num_proc=None)

    def tokens(inputs):
        # Counted as `sft` counts: the real tokens of the inputs minus one per row (our step
        # feeds tokens[..n-1]; TRL feeds all n and ignores the last position's logits).
        mask = inputs["attention_mask"]
        return int(mask.sum().item()) - mask.shape[0]

    train_counting(SFTTrainer, clock, tokens, model=model, args=args,
                   train_dataset=Dataset.from_list(records), processing_class=tok)
    total, only, units = clock.window(a.sft_warmup + 1, steps)
    emit({"preset": a.preset, "stage": "sft", "impl": "trl", "trainer": "SFTTrainer",
          "unit": "tokens", "per_s": round(units / total, 1),
          "per_s_step_only": round(units / only, 1), "warmup_steps": a.sft_warmup,
          "measured_steps": a.sft_steps, "seconds": round(total, 3), "units": units,
          "batch": a.sft_batch, "max_length": a.sft_max_length, "examples": len(records),
          "dropped_too_long": too_long, "attn": model.config._attn_implementation,
          "optim": str(args.optim), **env_fields()})


def run_reward(a, tok):
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    pairs = read_jsonl(os.path.join(a.work, "pairs.jsonl"))
    model = tf.AutoModelForSequenceClassification.from_pretrained(a.init, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    clock = StepClock()
    steps = a.rm_warmup + a.rm_steps
    batch = PAIRS_PER_GROUP * a.rm_groups  # the same comparisons per optimizer step as ours
    args = RewardConfig(**common_args(os.path.join(a.out, "reward"), steps, batch, a.rm_lr, a.seed),
                        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                        warmup_steps=5, max_length=a.rm_max_length, disable_dropout=True,
                        center_rewards_coefficient=None, dataset_num_proc=None)

    trainer = train_counting(RewardTrainer, clock,
                             lambda inputs: inputs["input_ids"].shape[0] // 2,  # chosen + rejected
                             model=model, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tok)
    total, only, units = clock.window(a.rm_warmup + 1, steps)
    emit({"preset": a.preset, "stage": "reward", "impl": "trl", "trainer": "RewardTrainer",
          "unit": "comparisons", "per_s": round(units / total, 2),
          "per_s_step_only": round(units / only, 2), "warmup_steps": a.rm_warmup,
          "measured_steps": a.rm_steps, "seconds": round(total, 3), "units": units,
          "pairs_per_step": batch, "rows_per_step": 2 * batch, "max_length": a.rm_max_length,
          "train_pairs": len(trainer.train_dataset), "attn": model.config._attn_implementation,
          **env_fields()})


def run_rl(a, tok, kind):
    """RLOOTrainer (kind "rloo") or GRPOTrainer ("grpo") on the RL prompts, our SFT policy and our
    reward model; the episode shape and optimizer steps of our `ppo` run (see bench_stages.sh)."""
    import torch
    import transformers as tf
    from datasets import Dataset

    prompts = read_jsonl(os.path.join(a.work, "prompts.jsonl"))
    policy = tf.AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    rm = tf.AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1,
                                                              dtype=torch.float32)
    rm_tok = load_tokenizer(a.reward_model)
    tok.padding_side = "left"
    clock = StepClock()
    # One generation round: generation_batch_size = per_device_train_batch_size (the minibatch,
    # 8) × steps_per_generation (2) = 16 completions (4 prompts × num_generations 4), trained on
    # in minibatches of 8 for num_iterations = 4 passes: 8 optimizer steps per round, as our
    # iteration (4 prompts × 4 samples, 4 epochs × 2 minibatches of 8).
    episodes = a.rl_prompts * a.rl_samples
    steps_per_generation = episodes // a.rl_minibatch
    assert steps_per_generation * a.rl_minibatch == episodes, (episodes, a.rl_minibatch)
    steps_per_round = steps_per_generation * a.rl_epochs
    rounds = a.rl_warmup + a.rl_iters
    common = dict(**common_args(os.path.join(a.out, kind), steps_per_round * rounds,
                                a.rl_minibatch, a.rl_lr, a.seed),
                  lr_scheduler_type="constant", warmup_steps=0,
                  steps_per_generation=steps_per_generation, num_generations=a.rl_samples,
                  num_iterations=a.rl_epochs, max_completion_length=a.rl_max_new_tokens,
                  temperature=1.0, top_p=1.0, top_k=0, epsilon=0.2, disable_dropout=True,
                  log_completions=False)
    if kind == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

        # KL as RLOO does it: beta × the sequence's summed k1 KL subtracted from its reward;
        # leave-one-out baseline, advantages not normalised (its default).
        args = Config(**common, beta=a.rloo_beta, normalize_advantages=False)
        extra = {"beta": a.rloo_beta, "normalize_advantages": False,
                 "ratio": "per sequence (RLOO's)"}
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

        # beta 0 (GRPO's default): no reference model is loaded or run. loss_type "bnpo": the
        # per-token losses summed over the minibatch / its real tokens, i.e. our token-mean (TRL's
        # default "dapo" divides by the generation batch's mean tokens per minibatch instead: the
        # same work). scale_rewards "group" (its default): (R - group mean) / (group std + 1e-4).
        args = Config(**common, beta=a.grpo_beta, loss_type="bnpo", scale_rewards="group")
        extra = {"beta": a.grpo_beta, "loss_type": args.loss_type,
                 "scale_rewards": str(args.scale_rewards)}
    episodes_per_round = args.generation_batch_size
    assert episodes_per_round == episodes, (episodes_per_round, episodes)

    lengths = []  # mean completion length (EOS included, as ours counts) per generation round

    class Counting(Trainer):
        def _generate(self, prompts):
            out = super()._generate(prompts)
            lengths.append(sum(len(c) for c in out[1]) / max(1, len(out[1])))
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            out = super().training_step(model, inputs, num_items_in_batch)
            # Episodes are counted once, at the step that generated them (the first of a round).
            clock.units.append(episodes_per_round if (self._step - 1) % steps_per_round == 0 else 0)
            return out

    trainer = Counting(model=policy, reward_funcs=rm, args=args, train_dataset=Dataset.from_list(prompts),
                       processing_class=tok, reward_processing_classes=rm_tok,
                       callbacks=[clock.callback])
    drop_printer(trainer)
    trainer.train()
    first = a.rl_warmup * steps_per_round + 1
    total, only, units = clock.window(first, rounds * steps_per_round)
    lengths = lengths[a.rl_warmup:]  # the measured rounds
    emit({"preset": a.preset, "stage": kind, "impl": "trl", "trainer": Trainer.__name__,
          "unit": "episodes", "per_s": round(units / total, 3),
          "per_s_step_only": round(units / only, 3), "warmup_iterations": a.rl_warmup,
          "measured_iterations": a.rl_iters, "seconds": round(total, 3), "units": units,
          "episodes_per_iteration": episodes_per_round,
          "prompts_x_generations": f"{a.rl_prompts}x{a.rl_samples}",
          "optimizer_steps_per_iteration": steps_per_round,
          "max_new_tokens": a.rl_max_new_tokens, **extra,
          "reference_model": trainer.ref_model is not None,
          "response_length_mean": round(sum(lengths) / len(lengths), 2) if lengths else None,
          "attn": policy.config._attn_implementation, **env_fields()})


def run_dpo(a, tok):
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = read_jsonl(os.path.join(a.work, "pairs.jsonl"))
    policy = tf.AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    clock = StepClock()
    steps = a.dpo_warmup + a.dpo_steps
    batch = PAIRS_PER_GROUP * a.dpo_groups  # the same comparisons per optimizer step as ours
    # precompute_ref_log_probs: the reference's log-probabilities of every pair computed once, in
    # the trainer's constructor (before the timed steps), with the policy itself before training
    # (no ref_model passed: the SFT folder is the reference), as our `dpo` computes them once
    # before its first step. TRL's default (False) would run the reference forward in every step.
    args = DPOConfig(**common_args(os.path.join(a.out, "dpo"), steps, batch, a.dpo_lr, a.seed),
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                     warmup_steps=5, max_length=a.dpo_max_length, loss_type=["sigmoid"],
                     beta=a.dpo_beta, label_smoothing=0.0, precompute_ref_log_probs=True,
                     disable_dropout=True, dataset_num_proc=None)
    trainer = train_counting(DPOTrainer, clock,
                             lambda inputs: inputs["input_ids"].shape[0] // 2,  # chosen + rejected
                             model=policy, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tok)
    total, only, units = clock.window(a.dpo_warmup + 1, steps)
    emit({"preset": a.preset, "stage": "dpo", "impl": "trl", "trainer": "DPOTrainer",
          "unit": "comparisons", "per_s": round(units / total, 2),
          "per_s_step_only": round(units / only, 2), "warmup_steps": a.dpo_warmup,
          "measured_steps": a.dpo_steps, "seconds": round(total, 3), "units": units,
          "pairs_per_step": batch, "rows_per_step": 2 * batch, "max_length": a.dpo_max_length,
          "beta": a.dpo_beta, "loss_type": "sigmoid", "precompute_ref_log_probs": True,
          "train_pairs": len(trainer.train_dataset),
          "attn": policy.config._attn_implementation, **env_fields()})


def run(a):
    quiet()
    import torch

    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.init)
    stages = a.stages.split(",")
    if "sft" in stages:
        run_sft(a, tok)
    if "reward" in stages:
        run_reward(a, load_tokenizer(a.init))
    for kind in ("rloo", "grpo"):
        if kind in stages:
            run_rl(a, load_tokenizer(a.policy), kind)
    if "dpo" in stages:
        run_dpo(a, load_tokenizer(a.policy))


# ---------------------------------------------------------------------------------------------
# ours: our stage's metrics.jsonl → the same JSON line


def ours(a):
    lines = [json.loads(l) for l in open(a.metrics) if l.strip()]
    rec = {"preset": a.preset, "stage": a.stage, "impl": "ours"}
    if a.stage == "sft":
        # Run with log_every = N and 2N steps: the line of step 2N covers exactly steps N+1..2N.
        last = [l for l in lines if "tokens_per_s" in l][-1]
        assert last["step"] == a.warmup + a.steps, (last["step"], a.warmup, a.steps)
        rec.update(unit="tokens", per_s=round(last["tokens_per_s"], 1), warmup_steps=a.warmup,
                   measured_steps=a.steps)
    else:
        key, unit = {
            "reward": ("responses_per_s", "comparisons"),
            "dpo": ("responses_per_s", "comparisons"),
            "dpo_pairs": ("responses_per_s", "comparisons"),
            "rloo": ("episodes_per_s", "episodes"),
            "grpo": ("episodes_per_s", "episodes"),
        }[a.stage]
        per_step = a.per_step
        rl = unit == "episodes"
        if not rl and not a.pairs_per_step:  # K = 4 groups: 6 comparisons per 4 rows
            a.pairs_per_step = per_step * PAIRS_PER_GROUP // K
        by_step = {l["step"]: l[key] for l in lines if key in l}
        steps = range(a.warmup + 1, a.warmup + a.steps + 1)
        missing = [s for s in steps if s not in by_step]
        assert not missing, f"{a.metrics}: no {key} at steps {missing}"
        # One line per step (log_every = 1) and the same units every step: the window's rate is
        # units / Σ(units / rate_i), the harmonic mean of the per-step rates.
        seconds = sum(per_step / by_step[s] for s in steps)
        units = per_step * len(steps)
        # Reward / DPO count forward rows (responses): a K = 4 group has 4 rows and 6 comparisons,
        # a flat comparison 2 rows and 1 comparison (--pairs-per-step / --per-step).
        scale = 1.0 if rl else a.pairs_per_step / per_step
        rec.update(unit=unit, per_s=round(scale * units / seconds, 3 if rl else 2),
                   seconds=round(seconds, 3), units=round(scale * units))
        if not rl:
            rec.update(warmup_steps=a.warmup, measured_steps=a.steps,
                       responses_per_s=round(units / seconds, 2), rows_per_step=per_step,
                       pairs_per_step=a.pairs_per_step)
        else:
            rec.update(warmup_iterations=a.warmup, measured_iterations=a.steps,
                       episodes_per_iteration=per_step)
            window = [l for l in lines if a.warmup < l["step"] <= a.warmup + a.steps]
            keys = ("time_generate_s", "time_score_s", "time_forward_s", "time_train_s")
            for k in keys:
                rec[k] = round(sum(l.get(k, 0.0) for l in window), 3)
            rec["response_length_mean"] = round(
                sum(l["response_length_mean"] for l in window) / max(1, len(window)), 2)
            # Critic-free: no value loss may appear (a critic would mean a different workload).
            rec["critic"] = any("value_loss" in l for l in window)
    emit(rec)


# ---------------------------------------------------------------------------------------------
# table


TARGETS = {"sft": 1.5, "reward": 2.0, "rloo": 2.0, "grpo": 2.0, "dpo": 2.0, "dpo_pairs": 2.0}
VERSUS = {"sft": "sft vs SFTTrainer", "reward": "reward vs RewardTrainer",
          "rloo": "rloo vs RLOOTrainer", "grpo": "grpo vs GRPOTrainer",
          "dpo": "dpo vs DPOTrainer", "dpo_pairs": "dpo(pairs) vs DPOTrainer"}
# The TRL measurement a stage of ours is compared with (dpo_pairs: our dpo on TRL's flat pairs).
TRL_STAGE = {"dpo_pairs": "dpo"}


def table(a):
    """The ratios of each side's best round (the highest rate: a shared machine's noise only ever
    slows a run down), with the range over the rounds when there are several."""
    recs = [json.loads(l) for l in open(a.results) if l.strip().startswith("{")]
    by = {}
    for r in recs:
        by.setdefault((r["preset"], r["stage"], r["impl"]), []).append(r["per_s"])
    presets = list(dict.fromkeys(r["preset"] for r in recs))
    rounds = max((len(v) for v in by.values()), default=1)
    width = max(len(v) for v in VERSUS.values())
    head = f"{'preset':<7} {'stage':<{width}} {'unit/s':<14} {'ours':>10} {'TRL':>10} {'ours/TRL':>9} {'target':>7}  met"
    if rounds > 1:
        head += f"   range over {rounds} rounds: ours / TRL"
    print(head)
    print("-" * len(head))
    units = {(r["preset"], r["stage"]): r["unit"] for r in recs}
    for p in presets:
        for s in TARGETS:
            o, t = by.get((p, s, "ours")), by.get((p, TRL_STAGE.get(s, s), "trl"))
            if not o or not t:
                continue
            ratio = max(o) / max(t)
            met = "yes" if ratio >= TARGETS[s] else "no"
            line = (f"{p:<7} {VERSUS[s]:<{width}} {units[(p, s)] + '/s':<14} {max(o):>10.2f} {max(t):>10.2f} "
                    f"{ratio:>8.2f}x {'>=' + str(TARGETS[s]) + 'x':>7}  {met}")
            if rounds > 1:
                line += f"   {min(o):.2f}-{max(o):.2f} / {min(t):.2f}-{max(t):.2f}"
            print(line)


# ---------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("prepare")
    q.add_argument("--task", required=True)
    q.add_argument("--template", required=True)
    q.add_argument("--out", required=True)

    q = sub.add_parser("run")
    q.add_argument("--preset", required=True)
    q.add_argument("--work", required=True, help="the prepare folder")
    q.add_argument("--out", required=True, help="TRL's output_dir parent (nothing is saved there)")
    q.add_argument("--init", required=True, help="the `model init` folder (SFT and reward start)")
    q.add_argument("--policy", help="the RLOO/GRPO/DPO policy folder (our SFT output)")
    q.add_argument("--reward-model", help="our reward stage's output folder")
    q.add_argument("--stages", default="sft,reward,rloo,grpo,dpo")
    q.add_argument("--matmul", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: fp32 weights, matrix products on bf16 operands (oneDNN)")
    q.add_argument("--template", default="Human: {prompt}\n\nAssistant:")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sft-warmup", type=int, required=True)
    q.add_argument("--sft-steps", type=int, required=True)
    q.add_argument("--sft-batch", type=int, default=16)
    q.add_argument("--sft-max-length", type=int, default=128)
    q.add_argument("--sft-lr", type=float, default=3e-3)
    q.add_argument("--rm-warmup", type=int, required=True)
    q.add_argument("--rm-steps", type=int, required=True)
    q.add_argument("--rm-groups", type=int, default=8)
    q.add_argument("--rm-max-length", type=int, default=128)
    q.add_argument("--rm-lr", type=float, default=1e-3)
    q.add_argument("--rl-warmup", type=int, required=True, help="RLOO/GRPO warm-up generation rounds")
    q.add_argument("--rl-iters", type=int, required=True, help="RLOO/GRPO measured generation rounds")
    q.add_argument("--rl-prompts", type=int, default=4, help="prompts per generation round")
    q.add_argument("--rl-samples", type=int, default=4, help="num_generations (completions per prompt)")
    q.add_argument("--rl-minibatch", type=int, default=8, help="per_device_train_batch_size")
    q.add_argument("--rl-epochs", type=int, default=4, help="num_iterations (passes per round)")
    q.add_argument("--rl-max-new-tokens", type=int, default=24)
    q.add_argument("--rl-lr", type=float, default=3e-5)
    q.add_argument("--rloo-beta", type=float, default=0.3)
    q.add_argument("--grpo-beta", type=float, default=0.0)
    q.add_argument("--dpo-warmup", type=int, required=True)
    q.add_argument("--dpo-steps", type=int, required=True)
    q.add_argument("--dpo-groups", type=int, default=8, help="our groups per step; TRL gets 6x pairs")
    q.add_argument("--dpo-max-length", type=int, default=128)
    q.add_argument("--dpo-beta", type=float, default=0.1)
    q.add_argument("--dpo-lr", type=float, default=1e-4)

    q = sub.add_parser("ours")
    q.add_argument("--preset", required=True)
    q.add_argument("--stage", choices=list(TARGETS), required=True)
    q.add_argument("--metrics", required=True)
    q.add_argument("--warmup", type=int, required=True)
    q.add_argument("--steps", type=int, required=True)
    q.add_argument("--per-step", type=int, default=0,
                   help="units every step (reward/dpo: forward rows, rloo/grpo: episodes)")
    q.add_argument("--pairs-per-step", type=int, default=0, help="reward/dpo: comparisons every step (default: per-step x 6/4, K = 4 groups)")

    q = sub.add_parser("table")
    q.add_argument("results")

    a = p.parse_args()
    if a.cmd == "run":
        if a.matmul == "bf16":
            import torch
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    {"prepare": prepare, "run": run, "ours": ours, "table": table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
