#!/usr/bin/env bash
# Stage-level benchmark against Hugging Face TRL: the same tiny and small models, data and lengths,
# on this CPU, our stage vs TRL's trainer in one run:
#   sft    vs SFTTrainer     tokens/s       target >= 1.5x
#   reward vs RewardTrainer  comparisons/s  target >= 2x   (K = 4 groups; TRL trains the 6 pairs)
#   rloo   vs RLOOTrainer    episodes/s     target >= 2x   (our `ppo` with advantage.estimator =
#                                                           "rloo": no critic, as RLOO)
#   grpo   vs GRPOTrainer    episodes/s     target >= 2x   (our `ppo` with advantage.estimator =
#                                                           "grpo"; beta 0 as GRPO's default)
#   dpo    vs DPOTrainer     comparisons/s  target >= 2x   (K = 4 groups; TRL trains the 6 pairs)
#   dpo(pairs) vs DPOTrainer comparisons/s  target >= 2x   (our `dpo` on the same flat pairs as
#                                                           TRL: the same rows; DPO_FLAT=0 skips)
# It prints every command it runs, one JSON line per measurement
#   {"preset", "stage", "impl", "unit", "per_s", ...}
# (all of them also in $OUT_DIR/results.jsonl) and, at the end, a table of ratios ours / TRL.
# The TRL side is scripts/bench_trl.py. The numbers are reported as they come out: nothing is tuned
# for either side beyond making them do the same work.
#
# Environment:
#   SHAPES="tiny small"   presets to run (`model init --preset`)
#   BIN_DIR               our binaries (default target/release); SKIP_BUILD=1 skips
#                         `cargo build --release --bins`
#   PYTHON                a python with torch 2.9.0 + transformers (default: .venv/bin/python if it
#                         exists, else a new .venv-bench with `pip install torch==2.9.0 transformers`).
#                         TRL is always installed into it here (`pip install trl`, torch and
#                         transformers held at their installed versions by a constraints file);
#                         TRL_SPEC pins another version (default: trl, the newest that fits).
#   OUT_DIR               default runs/bench-stages (wiped per preset)
#   MATMUL                fp32 (default) or bf16: our `matmul` config key, and on the TRL side
#                         torch.backends.mkldnn.matmul.fp32_precision = "bf16" (the same contract:
#                         fp32 weights, matrix products on bf16 operands through oneDNN)
#   SFT_STEPS             measured SFT steps; the same number of warm-up steps runs first (default 60)
#   RM_WARMUP, RM_STEPS   reward warm-up / measured steps (default 5 / 40)
#   RL_WARMUP, RL_ITERS   RLOO and GRPO warm-up / measured iterations (generation rounds), the
#                         same for both pairs (default 3 / 12; the older names PPO_WARMUP /
#                         PPO_ITERS are read when these are unset)
#   DPO_WARMUP, DPO_STEPS DPO warm-up / measured steps (default 5 / 40)
#   DPO_FLAT              1 (default): also our `dpo` on the flat pairs (the dpo(pairs) row); 0 skips
#   ROUNDS                rounds per preset, each running our stages then TRL's (default
#                         2); the table takes each side's best round and shows the range over
#                         the rounds (a shared machine's noise only ever slows a run down; the
#                         same rule as `model bench --rounds`)
#   Per preset: SFT_STEPS_small=... etc. override for one preset.
# With the defaults the whole run (both presets, 2 rounds) takes several minutes on a 2-core CPU
# after the build (and the TRL install); the two RL pairs take most of it. Run it on an otherwise
# idle machine: it prints how busy the CPU was with other work before each preset and how much
# CPU time other processes took while the preset ran, with a warning when they took more than 5%.
# Under contention PyTorch (OpenMP threads on every core) slows down far more than ours: on this
# 2-core machine a concurrent `cargo build` cut TRL's rates 3-25x and ours hardly at all, so such
# a run says nothing about either.
#
# What is the same on both sides (the fairness rules):
# - Model: for each preset a fresh `model init` folder (Llama architecture, tied embeddings, a
#   byte-level BPE trained on the demonstrations; vocab 1024 for tiny, 8192 asked for small, which
#   the demo corpus caps at 1140 tokens — printed by `model init`; so "small" here is the small
#   trunk with a ~1.1k vocabulary, not model bench's 8192). Both sides load the same
#   folder (transformers reads config.json, model.safetensors and tokenizer.json), so they start
#   from identical weights and tokenizer. The reward model of both sides is that folder's trunk
#   with a fresh scalar head. The policy of rloo/grpo/dpo is the SFT folder written by our sft run
#   here, and that same folder is the frozen reference (where one is used); the reward model of
#   rloo/grpo is the folder written by our reward run (an HF LlamaForSequenceClassification, which
#   transformers loads; TRL gets it as reward_funcs, with its tokenizer as
#   reward_processing_classes). One model, not an ensemble (ensemble.members 1, no monitor model:
#   configs/reward.toml's default is 3 members + a monitor). TRL scores with its raw output; ours
#   applies the normalisation our reward run stores with it (an offset and scale from the
#   training responses: one affine map per score, no work to speak of).
# - Data: written once by `bench_trl.py prepare` from datasets/demo/task: the demonstrations
#   without exact duplicates; the rankings' groups with K = 4 distinct ranks (tie-free, so that a
#   group is exactly C(4,2) = 6 comparisons) and those groups flattened to their pairs (TRL's
#   reward and DPO data, and our dpo(pairs)); the RL prompts. Template
#   "Human: {prompt}\n\nAssistant:" on both sides (TRL gets the prompts already templated).
# - Numerics: fp32 everywhere (TRL: bf16=False; its default is bf16; MATMUL=bf16 changes only the
#   matrix products, on both sides), AdamW with betas
#   0.9/0.999, eps 1e-8, weight decay 0, global grad-norm clip 1.0, no gradient checkpointing
#   (TRL's configs default to it; our stages never recompute), no dropout, the same learning
#   rates and schedules (sft: 3e-3, 5 warm-up steps, cosine to 0.1x; reward: 1e-3, same shape;
#   dpo: 1e-4, same shape; rloo/grpo: 3e-5 constant). Learning rates do not change the speed;
#   they are matched anyway.
# - sft vs SFTTrainer: batch 16 examples, max_length 128 (longer examples dropped on both sides;
#   TRL would cut them), no packing, no padding-free, loss on the response + EOS only
#   (prompt/completion records, completion_only_loss=True; TRL appends EOS to the completion as
#   our sft appends the EOS token). Unit: tokens = the real (non-padding) input tokens of the
#   step's rows minus one per row, i.e. prompt + response + EOS - 1 per example — what our
#   `tokens_per_s` counts (our step feeds tokens[..n-1]; TRL feeds all n tokens and ignores the
#   last position, so TRL is credited with the same units for one more position of work per row).
#   The two sides draw their batches in different seeded orders from the same examples.
# - reward vs RewardTrainer: one reward model on each side (ours: ensemble.members 1,
#   ensemble.monitor false). 8 groups per step for ours (all 4 x 8 = 32 responses in one padded
#   forward, the loss over the groups' 48 pairs), 48 pairs per step for TRL (per_device batch 48:
#   96 rows, chosen + rejected, in one forward): the same comparisons per optimizer step.
#   max_length 128 (nothing in this data comes near it). Our metrics give responses/s (4 per
#   group); comparisons/s = responses/s x 6/4. TRL: pairs/s.
# - rloo vs RLOOTrainer and grpo vs GRPOTrainer (our `ppo` binary, critic-free estimators; the
#   settings as TRL 1.x's trainers define them, read from trl/trainer/{rloo,grpo}_*.py):
#   the same episode shape: 16 episodes per iteration = 4 prompts x 4 samples (ours:
#   rollout.batch_size 4 prompts, rollout.samples_per_prompt 4; TRL: num_generations 4,
#   generation_batch_size = per_device_train_batch_size 8 x steps_per_generation 2 = 16), and the
#   same optimizer steps per rollout: 4 passes over it in minibatches of 8, i.e. 8 policy AdamW
#   steps (ours: ppo.epochs 4, ppo.minibatch_size 8; TRL: num_iterations 4, per_device batch 8,
#   steps_per_generation 2, gradient_accumulation_steps 1). max_new_tokens 24
#   (max_completion_length), temperature 1, top-k 0, top-p 1, stop at EOS; ratio clip 0.2 on both
#   sides (epsilon); no entropy bonus (both still compute the entropy for their metrics), no
#   reward clipping and no penalty for a response without EOS (ours: reward.clip_score 0,
#   reward.penalize_missing_eos false; TRL: reward_clip_range None, mask_truncated_completions
#   false), no critic, no value loss (critic-free estimators: nothing loaded or trained; the JSON
#   line says "critic": false). Both: sampling with a KV cache (ours: our KV-cache batch path;
#   TRL: transformers' generate), decode and re-tokenise for the reward model, reward-model
#   forward, a no-grad forward of the policy over the rollout (the old log-probs: RLOO always
#   computes them; GRPO does because steps_per_generation x num_iterations > 1 step per
#   generation), the clipped policy loss and its backward per minibatch.
#   rloo: KL in the reward, as RLOO: beta 0.3 x the sequence's summed k1 KL (log p - log p_ref of
#     the sampled tokens under the rollout policy) subtracted from the score (ours: kl.coef 0.3,
#     kl.in_reward true, kl.estimator k1, kl.adaptive false: -beta KL_t per token plus the score,
#     and a response's return is their sum, the same number); so both run the reference forward.
#     Advantage: the return minus the mean of the other 3 samples' returns, not normalised (ours:
#     estimator "rloo"; TRL: normalize_advantages false, its default). Loss: RLOO clips one
#     ratio per sequence, exp(sum of the token log-ratios), and averages over sequences; ours
#     clips per token and is set to ppo.loss_agg "seq-mean-token-sum" (each sequence's sum,
#     averaged over sequences), whose gradient is RLOO's at ratio 1. The same work either way.
#   grpo: beta 0 (GRPOConfig's default): TRL loads and runs no
#     reference model. Ours: kl.coef 0 with GRPO's KL form (kl.in_reward false, kl.estimator k3:
#     a loss term, here times 0). Advantage (R - group mean) / (group std + eps) (ours: estimator
#     "grpo", eps 1e-6; TRL: scale_rewards "group", eps 1e-4). Loss: per-token ratios and clip on
#     both; aggregated as the minibatch's token-mean (ours: ppo.loss_agg "token-mean"; TRL:
#     loss_type "bnpo", the same formula; its default "dapo" divides by the generation batch's
#     mean tokens per minibatch instead, the same work).
#   Unit: episodes (sampled responses trained on) per second.
# - dpo vs DPOTrainer: the preference data of the reward bench, DPO's sigmoid loss with beta 0.1,
#   no label smoothing, max_length 128 (nothing in this data comes near it), the SFT folder as
#   policy and as reference. Batch: 8 groups per step for ours (train.batch_size 8: all 4 x 8 = 32
#   responses in one padded forward, the loss over the groups' 48 pairs), 48 pairs per step for
#   TRL (per_device batch 48: 96 rows, chosen + rejected, in one forward): the same comparisons
#   per optimizer step. The reference: ours computes its log-probabilities of every response once,
#   before the first step (reference_logprobs.json), then drops it; TRL is run with
#   precompute_ref_log_probs=True, which does the same in its constructor (ref_model unset: the
#   policy before training is the reference). Neither is in the timed window. TRL's default
#   (precompute_ref_log_probs=False) would add a no-grad reference forward over the 96 rows to
#   every step: not what ours does, so not used. Our metrics give responses/s (4 per group);
#   comparisons/s = responses/s x 6/4. TRL: pairs/s.
#   dpo(pairs): our dpo on the same 48 flat pairs per step as TRL (comparisons.jsonl: the pairs
#   in TRL's order with the raw prompt; data.kind comparisons, train.batch_size 48: 96 rows in
#   one forward), so the rows per step are equal too; comparisons/s = responses/s / 2.
#
# What each side's timed window holds (warm-up steps excluded on both sides):
# - ours (trainer::Run begin_step..end_step, the `*_per_s` of metrics.jsonl): sft / reward / dpo:
#   the step's batch assembly from pre-tokenised examples, forward, loss, backward, global-norm
#   clip, AdamW; rloo / grpo: the whole iteration — generation, scoring, the no-grad forwards,
#   rewards and advantages, all epochs of policy steps. Not in it: logging, evaluation,
#   checkpoints (evaluation is off: validation_fraction 0; checkpoints only after the last step),
#   samples.jsonl (off), the monitor (off: monitor.enabled false; it has no held-out model here
#   anyway), dpo's reference log-probabilities (before the first step).
# - TRL (a TrainerCallback's times at on_step_end, bench_trl.py): from the previous step's end
#   to this step's end: the dataloader fetch and collation of the batch, training_step (for RLOO
#   and GRPO the round's generation, reward scoring and old/ref log-probs happen inside the first
#   step of a round), clipping, optimizer and scheduler steps, zero_grad. Logging, evaluation and
#   saving are off (strategies "no", no progress printer); DPO's precomputed reference
#   log-probabilities are computed in its constructor, before. TRL's own per-step bookkeeping
#   stays in (it is part of its trainers: SFTTrainer's token-accuracy / entropy metrics from its
#   fused LM head, RewardTrainer's and DPOTrainer's accuracy / margin, RLOO's and GRPO's completion
#   and clip statistics), as do transformers' per-step FLOP and token counters. Ours keeps its
#   own (dpo's TRL-named reward/log-prob metrics, ppo's iteration record). `per_s_step_only` in
#   TRL's JSON lines leaves the fetch/collation out.
# - Window sizes: sft: ours logs every N steps over 2N steps, so its last metrics line is exactly
#   the last N steps; TRL runs the same 2N steps and times the last N. reward, dpo, rloo, grpo: a
#   metrics line per step/iteration, all with the same units, so the rate over the measured ones
#   is exact (harmonic mean of the per-step rates); TRL times whole rounds (8 optimizer steps) for
#   RLOO and GRPO.
#
# Differences that remain (not removable without changing one side's algorithm):
# - Padding: both sides pad each batch to its longest row; our forward then runs the projections
#   and the MLP on the real tokens only (attention in the padded layout), TRL/transformers on every
#   position (TRL's padding_free mode flattens the batch, which is correct only with FlashAttention,
#   not available on the CPU; DPOTrainer has it disabled for now). Same values for the real
#   tokens; about 30% of an SFT batch here is padding.
# - Attention: TRL/transformers use their default (sdpa) kernel; ours its own attention.
#   PyTorch uses its default intra-op threads (printed as torch_threads); ours its own pool. Both
#   processes run alone on the same cores, one after the other.
# - LM head: both sides run it only at the positions whose next token is a target (SFT: response
#   + EOS; DPO: each response + EOS; RLOO/GRPO: the response block). SFTTrainer and DPOTrainer do
#   it in tiles with a fused log-prob kernel (plus entropy and top-1 for SFT's metrics); ours
#   gathers those positions' hidden states, then LM head and log-softmax.
# - grpo: at kl.coef 0 with the monitor off (set here) our `ppo` neither loads nor runs the
#   reference policy and adds no KL term (`PpoConfig::measures_kl`), as TRL's GRPO with beta 0.
# - reward and dpo (not dpo(pairs)): ours forwards each response of a K = 4 group once (32 rows
#   per step) and forms the 48 pairs from the 32 results; TRL forwards each pair's chosen and
#   rejected (96 rows per step: each response 3 times). In our favour: the group layout
#   (InstructGPT's) is part of our stages, the reason they read groups. dpo(pairs) removes it
#   (the same 96 rows on both sides).
# - rloo / grpo sampling: both sides draw their 4 prompts per iteration in different seeded
#   orders from the same prompts; response lengths follow the same policy and sampling but are
#   random on both sides (both JSON lines carry the measured iterations' mean response length,
#   EOS included). RLOO's clip is per sequence, ours per token (see above: the same work). TRL
#   splits the shuffled rollout into its 2 minibatches once and reuses them for all 4 passes;
#   ours reshuffles every epoch (the same work).
# - TRL's RewardTrainer and DPOTrainer tokenise prompt+response as one string, ours tokenises
#   template(prompt) and the response separately; with this BPE (split at spaces and
#   punctuation) the lengths agree.
# - AdamW: transformers' default optimizer (torch's fused AdamW kernel on this torch); ours burn's
#   AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=${BIN_DIR:-target/release}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "+ cargo build --release --bins"
  cargo build --release --bins
fi
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
task=datasets/demo/task
template=$'Human: {prompt}\n\nAssistant:'
out=${OUT_DIR:-runs/bench-stages}
shapes=${SHAPES:-tiny small}
rounds=${ROUNDS:-2}
matmul=${MATMUL:-fp32}
dpo_flat=${DPO_FLAT:-1}
# The RL episode shape (header: 4 prompts x 4 samples = 16 episodes, 4 passes in minibatches of 8)
# and the KL / DPO coefficients, the same on both sides.
rl_prompts=4 rl_samples=4 rl_minibatch=8 rl_epochs=4 rl_max_new=24
rloo_beta=0.3 grpo_beta=0 dpo_beta=0.1

# Prints a command (shell-quoted, so that it can be pasted) and runs it.
show() {
  echo
  printf '+'
  printf ' %q' "$@"
  echo
}
run() {
  show "$@"
  "$@"
}

# Python: absolute path; TRL installed here, with torch and transformers held where they are.
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=$root/.venv/bin/python
else
  py=$root/.venv-bench/bin/python
  if [ ! -x "$py" ]; then
    run python3 -m venv .venv-bench
    run "$py" -m pip install -q torch==2.9.0 transformers
  fi
fi
case "$py" in /*) ;; *) py=$(command -v "$py") ;; esac
mkdir -p "$out"
"$py" - >"$out/constraints.txt" <<'EOF'
import importlib.metadata as m
for name in ("torch", "transformers"):
    print(f"{name}=={m.version(name)}")
EOF
run "$py" -m pip install -q "${TRL_SPEC:-trl}" -c "$out/constraints.txt"
"$py" -c 'import trl, transformers, torch; print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")'
# How busy the CPU is with other work (one second of /proc/stat, before we start anything):
# these stages are timed on all cores, so anything else running makes both sides noisy (PyTorch's
# OpenMP threads suffer most from it).
cpu_busy() {
  local a b busy total i
  read -r -a a </proc/stat
  sleep 1
  read -r -a b </proc/stat
  busy=0
  for i in 1 2 3 6 7 8; do busy=$((busy + b[i] - a[i])); done
  total=$((busy + b[4] - a[4] + b[5] - a[5]))
  local pct=$((100 * busy / (total > 0 ? total : 1)))
  echo "machine: $(nproc) cores, ${pct}% busy with other work over the last second; $(uptime)"
  if [ "$pct" -gt 15 ]; then
    echo "WARNING: the CPU is ${pct}% busy with other work: the timings below are noisy"
  fi
}
cpu_busy

# CPU time the rest of the machine used while a preset ran: all busy time in /proc/stat minus our
# own children's (`times`; the stages and TRL run one at a time, so theirs is all of ours).
clk=$(getconf CLK_TCK)
busy_cs() {
  local a
  read -r -a a </proc/stat
  echo $(((a[1] + a[2] + a[3] + a[6] + a[7] + a[8]) * 100 / clk))
}
ours_cs() {
  times >"$out/.times" # not in a subshell: its children's times would be 0
  awk 'NR == 2 { s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); s += p[1] * 60 + p[2] } printf "%d", s * 100 }' "$out/.times"
}
mark() {
  mark_busy=$(busy_cs)
  ours_cs >"$out/.mark"
  mark_ours=$(cat "$out/.mark")
  mark_wall=$(date +%s)
}
other_work() {
  local busy ours wall other
  busy=$(($(busy_cs) - mark_busy))
  ours_cs >"$out/.mark"
  ours=$(($(cat "$out/.mark") - mark_ours))
  wall=$(($(date +%s) - mark_wall))
  other=$((busy > ours ? busy - ours : 0))
  echo "CPU time while $1 ran: ours + TRL $((ours / 100)) s, other processes $((other / 100)) s (wall ${wall} s x $(nproc) cores)"
  if [ "$wall" -gt 0 ] && [ $((other / wall)) -gt $((5 * $(nproc))) ]; then
    echo "WARNING: other processes used more than 5% of the CPU while $1 ran: its timings are noisy"
  fi
}

results=$out/results.jsonl
: >"$results"
: >"$out/load.txt"
# Runs a command whose stdout holds JSON lines: shows them and keeps them in results.jsonl.
collect() {
  show "$@"
  "$@" | tee "$out/.last-output"
  grep '^{' "$out/.last-output" >>"$results" || true
}

# A per-preset override (SFT_STEPS_small) or the global value or the default.
knob() {
  local name=$1 preset=$2 default=$3 v
  v="${name}_${preset}"
  v=${!v:-}
  [ -n "$v" ] || v=${!name:-$default}
  echo "$v"
}

work=$out/data
run "$py" scripts/bench_trl.py prepare --task "$task" --template "$template" --out "$work"

for preset in $shapes; do
  o=$out/$preset
  rm -rf "$o"
  mkdir -p "$o"
  sft_n=$(knob SFT_STEPS "$preset" 60)
  rm_w=$(knob RM_WARMUP "$preset" 5)
  rm_n=$(knob RM_STEPS "$preset" 40)
  rl_w=$(knob RL_WARMUP "$preset" "$(knob PPO_WARMUP "$preset" 3)")
  rl_n=$(knob RL_ITERS "$preset" "$(knob PPO_ITERS "$preset" 12)")
  dpo_w=$(knob DPO_WARMUP "$preset" 5)
  dpo_n=$(knob DPO_STEPS "$preset" 40)
  case "$preset" in tiny) vocab=1024 ;; *) vocab=8192 ;; esac
  echo
  echo "=== $preset: sft $sft_n+$sft_n steps, reward $rm_w+$rm_n steps," \
    "rloo/grpo $rl_w+$rl_n iterations, dpo $dpo_w+$dpo_n steps, $rounds round(s)"
  cpu_busy
  mark
  run "$bin/model" init --preset "$preset" --texts "$work/texts.txt" --vocab-size "$vocab" --seed 0 \
    --out "$o/init"

  for round in $(seq 1 "$rounds"); do
    echo
    echo "--- $preset: round $round of $rounds"
    # Each round's stages start afresh (the same seeds: the same folders for TRL's side).
    rm -rf "$o/sft" "$o/reward" "$o/rloo" "$o/grpo" "$o/dpo" "$o/dpo-pairs" "$o/trl"
    # Ours. Evaluation off (no validation split), checkpoints only after the last step.
    run "$bin/sft" --config configs/sft.toml --out "$o/sft" --set matmul="$matmul" \
      --set model.base="$o/init" --set data.path="$work/sft.jsonl" \
      --set data.template="$template" --set data.validation_fraction=0 --set data.max_length=128 \
      --set data.packing=false --set train.batch_size=16 --set train.grad_accum=1 \
      --set train.max_steps=$((2 * sft_n)) --set train.log_every="$sft_n" \
      --set train.eval_every=0 --set train.save_every=0 --set train.lr=3e-3 \
      --set train.warmup_steps=5 --set train.max_grad_norm=1.0
    run "$bin/reward" --config configs/reward.toml --out "$o/reward" --set matmul="$matmul" \
      --set model.base="$o/init" --set data.path="$work/groups.jsonl" --set data.kind=ranked_groups \
      --set data.template="$template" --set data.validation_fraction=0 --set data.max_length=128 \
      --set data.ties=drop --set data.demonstrations= --set loss.kind=pairwise \
      --set loss.forward=groups --set ensemble.members=1 --set ensemble.monitor=false \
      --set train.batch_size=8 --set train.grad_accum=1 \
      --set train.max_steps=$((rm_w + rm_n)) --set train.log_every=1 --set train.eval_every=0 \
      --set train.save_every=0 --set train.lr=1e-3 --set train.max_grad_norm=1.0
    # rloo and grpo: our ppo with a critic-free estimator, the keys TRL's trainers fix (header).
    rl_common=(--set matmul="$matmul" --set model.policy="$o/sft/final"
      --set model.reward_model="$o/reward/final" --set data.prompts="$task/prompts.jsonl"
      --set rollout.batch_size="$rl_prompts" --set rollout.samples_per_prompt="$rl_samples"
      --set rollout.max_new_tokens="$rl_max_new" --set rollout.temperature=1.0
      --set rollout.top_k=0 --set rollout.top_p=1.0 --set reward.penalize_missing_eos=false
      --set reward.clip_score=0 --set reward.whiten_rewards=false --set kl.adaptive=false
      --set ppo.epochs="$rl_epochs" --set ppo.minibatch_size="$rl_minibatch" --set ppo.clip_eps=0.2
      --set ppo.entropy_coef=0 --set ppo.max_approx_kl=0 --set ppo.ptx_coef=0
      --set monitor.enabled=false --set train.iterations=$((rl_w + rl_n)) --set train.lr=3e-5
      --set train.warmup_steps=0 --set train.decay=constant --set train.log_every=1
      --set train.save_every=0 --set train.sample_every=0 --set train.max_grad_norm=1.0)
    run "$bin/ppo" --config configs/ppo.toml --out "$o/rloo" "${rl_common[@]}" \
      --set advantage.estimator=rloo --set kl.coef="$rloo_beta" --set kl.in_reward=true \
      --set kl.estimator=k1 --set ppo.loss_agg=seq-mean-token-sum
    run "$bin/ppo" --config configs/ppo.toml --out "$o/grpo" "${rl_common[@]}" \
      --set advantage.estimator=grpo --set kl.coef="$grpo_beta" --set kl.in_reward=false \
      --set kl.estimator=k3 --set ppo.loss_agg=token-mean
    dpo_common=(--set matmul="$matmul" --set model.policy="$o/sft/final"
      --set data.template="$template" --set data.validation_fraction=0 --set data.max_length=128
      --set data.ties=drop --set loss.kind=sigmoid --set loss.beta="$dpo_beta"
      --set loss.label_smoothing=0 --set train.grad_accum=1
      --set train.max_steps=$((dpo_w + dpo_n)) --set train.log_every=1 --set train.eval_every=0
      --set train.save_every=0 --set train.lr=1e-4 --set train.warmup_steps=5
      --set train.decay=cosine --set train.min_lr_ratio=0.1 --set train.max_grad_norm=1.0)
    run "$bin/dpo" --config configs/dpo.toml --out "$o/dpo" "${dpo_common[@]}" \
      --set data.path="$work/groups.jsonl" --set data.kind=ranked_groups --set train.batch_size=8
    if [ "$dpo_flat" = 1 ]; then
      run "$bin/dpo" --config configs/dpo.toml --out "$o/dpo-pairs" "${dpo_common[@]}" \
        --set data.path="$work/comparisons.jsonl" --set data.kind=comparisons \
        --set train.batch_size=$((6 * 8))
    fi

    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage sft \
      --metrics "$o/sft/metrics.jsonl" --warmup "$sft_n" --steps "$sft_n"
    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage reward \
      --metrics "$o/reward/metrics.jsonl" --warmup "$rm_w" --steps "$rm_n" --per-step $((4 * 8)) \
      --pairs-per-step $((6 * 8))
    for kind in rloo grpo; do
      collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage "$kind" \
        --metrics "$o/$kind/metrics.jsonl" --warmup "$rl_w" --steps "$rl_n" \
        --per-step $((rl_prompts * rl_samples))
    done
    collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage dpo \
      --metrics "$o/dpo/metrics.jsonl" --warmup "$dpo_w" --steps "$dpo_n" --per-step $((4 * 8)) \
      --pairs-per-step $((6 * 8))
    if [ "$dpo_flat" = 1 ]; then
      collect "$py" scripts/bench_trl.py ours --preset "$preset" --stage dpo_pairs \
        --metrics "$o/dpo-pairs/metrics.jsonl" --warmup "$dpo_w" --steps "$dpo_n" \
        --per-step $((2 * 6 * 8)) --pairs-per-step $((6 * 8))
    fi

    # TRL, on the same folders and data.
    collect "$py" scripts/bench_trl.py run --preset "$preset" --work "$work" --out "$o/trl" \
      --init "$o/init" --policy "$o/sft/final" --reward-model "$o/reward/final" \
      --template "$template" --matmul "$matmul" \
      --sft-warmup "$sft_n" --sft-steps "$sft_n" --sft-batch 16 --sft-max-length 128 \
      --rm-warmup "$rm_w" --rm-steps "$rm_n" --rm-groups 8 --rm-max-length 128 \
      --rl-warmup "$rl_w" --rl-iters "$rl_n" --rl-prompts "$rl_prompts" --rl-samples "$rl_samples" \
      --rl-minibatch "$rl_minibatch" --rl-epochs "$rl_epochs" --rl-max-new-tokens "$rl_max_new" \
      --rl-lr 3e-5 --rloo-beta "$rloo_beta" --grpo-beta "$grpo_beta" \
      --dpo-warmup "$dpo_w" --dpo-steps "$dpo_n" --dpo-groups 8 --dpo-max-length 128 \
      --dpo-beta "$dpo_beta" --dpo-lr 1e-4
  done
  echo
  other_work "$preset" >"$out/.load" # not in a pipeline (a subshell): see ours_cs
  cat "$out/.load"
  cat "$out/.load" >>"$out/load.txt"
done

echo
cpu_busy
echo "results: $results"
echo
"$py" scripts/bench_trl.py table "$results"
cat "$out/load.txt"
