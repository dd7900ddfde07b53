//! Stage 3 of InstructGPT (Ouyang et al. 2022, §3.5): the SFT policy optimised with PPO against a
//! reward model, with a per-token KL penalty to the SFT (reference) policy; or with the
//! critic-free estimators of 2024–25 (GRPO, Dr. GRPO, RLOO, REINFORCE++) on the same loop. The
//! details follow "The N+ implementation details of RLHF with PPO" (Huang et al. 2024), cleanrl's
//! `ppo.py`, OpenRLHF and verl; the math is in [`core`], the update steps in [`step`].
//!
//! [`run`] reads top to bottom in the order of one iteration:
//! 1. rollout: a batch of prompts (template from the policy's folder), each repeated
//!    `samples_per_prompt` times, left padded, sampled on the model crate's KV-cache batch path;
//!    each response ends at its first EOS;
//! 2. score: the reward model (normalised as stored with it, optionally clipped) or a rule
//!    reward; a response without EOS gets `missing_eos_penalty` instead;
//! 3. forward passes over the whole rollout, without autodiff: the policy's log-probabilities
//!    (the "old" ones of the ratio, recomputed by a forward pass as TRL and OpenRLHF do, under the
//!    same temperature-scaled distribution the loss uses), the reference policy's, the critic's
//!    values (with a critic);
//! 4. per-token rewards −β·KL_t plus the score on the last token (β fixed or adaptive), or the KL
//!    as a loss term instead;
//! 5. advantages: GAE (γ, λ) and whitening, or a critic-free estimator;
//! 6. epochs over shuffled minibatches: [`step::policy_step`] (clipped policy loss, entropy
//!    bonus, KL loss, PPO-ptx) beside [`step::critic_step`] (clipped value loss); global-norm
//!    clipping; an epoch stops early when the approximate KL passes a limit;
//! 7. update β, log an [`step::IterationRecord`], write samples, checkpoint.

#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod monitor;
pub mod rollout;
pub mod step;

pub use config::*;

use crate::core::{Estimator, KlController};
use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor};
use model::ops::{to_f32_vec, token_tensor};
use model::{CausalLm, Heads, ModelMeta, SamplingConfig, TokenBatch, Tokenizer};
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use reward::scorer::mean_std;
use reward::{Scorer, ScorerOptions};
use rollout::{Prompt, Rollout};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use step::{Batch, Critic, IterationRecord, StepContext, UpdateStats};
use trainer::state::{SavedModel, load_optimizer};
use trainer::{Best, Cadence, EpochOrder, Fingerprint, Run};

/// What a run ends with (`summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub iterations: usize,
    /// Mean score of the first and the last iteration's rollouts.
    pub first_score_mean: f64,
    pub last_score_mean: f64,
    pub last_kl: f64,
    pub final_dir: PathBuf,
    /// Iterations (1-based) at which the monitor warned of over-optimisation.
    pub overoptimization_warnings: Vec<usize>,
    /// The iteration `best/` holds (by the held-out signal), when one was kept.
    pub best_iteration: Option<usize>,
}

/// The KL controller of the config.
fn kl_controller(k: &KlSection) -> KlController {
    if k.adaptive {
        KlController::Adaptive(core::AdaptiveKlController::new(k.coef, k.target, k.horizon))
    } else {
        KlController::Fixed(k.coef)
    }
}

/// The models of a run: the trained policy and critic (on the autodiff device; no critic with a
/// critic-free estimator), the frozen reference policy and the scorer (without autodiff).
struct Models {
    policy: CausalLm,
    critic: Option<CausalLm>,
    /// None when nothing reads the KL ([`PpoConfig::measures_kl`]).
    reference: Option<CausalLm>,
    tokenizer: Tokenizer,
    scorer: Scorer,
    /// The held-out reward model of the monitor, if any.
    monitor: Option<Scorer>,
    policy_meta: ModelMeta,
}

fn load_models(cfg: &PpoConfig, resume: Option<&Path>, device: &Device) -> Result<Models> {
    let frozen = device.clone(); // the inner (non-autodiff) device
    let train = device.clone().autodiff();
    // With LoRA the policy is model.policy, frozen, with new adapters or the checkpoint's.
    let policy_dir = match (&cfg.lora, resume) {
        (None, Some(dir)) => dir,
        _ => &cfg.model.policy,
    };
    let load_policy = |d: &Device| {
        model::checkpoint::load_with_tokenizer(policy_dir, Some(Heads::LM), None, d)
            .with_context(|| format!("model.policy = {}", policy_dir.display()))
    };
    let (policy, tokenizer, mut policy_meta) = load_policy(&train)?;
    let policy = match &cfg.lora {
        None => policy,
        Some(l) => {
            if let Some(dir) = resume {
                policy_meta = model::ModelMeta::read(dir)?;
            }
            policy.adapt(l, cfg.seed, resume)?.keep_frozen(cfg.dtype)
        }
    };
    // The KL reference: model.reference when given; else the policy's start, which with LoRA
    // is the policy itself with its adapters off (taken at each iteration, nothing loaded).
    let reference = if cfg.measures_kl() && !(cfg.lora.is_some() && cfg.model.reference.is_none()) {
        let dir = cfg.model.reference.as_ref().unwrap_or(&cfg.model.policy);
        let key = if cfg.model.reference.is_some() {
            "model.reference"
        } else {
            "model.policy"
        };
        let (reference, reference_tok, _) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), None, &frozen)
                .with_context(|| format!("{key} = {}", dir.display()))?;
        if !tokenizer.same_ids(&reference_tok) {
            bail!(
                "model.reference's tokenizer differs from the policy's ({} vs {} tokens); the KL is per token, so the reference must be the model the policy was trained from",
                reference_tok.vocab_size(),
                tokenizer.vocab_size()
            );
        }
        Some(reference.with_dropout(0.0).keep_frozen(cfg.dtype))
    } else {
        None
    };
    let scorer = match (&cfg.reward.rule, &cfg.model.reward_model) {
        (Some(rule), _) => Scorer::Rule(
            datasets::gold::parse_rule(rule)
                .and_then(|r| r.compile())
                .map_err(|e| anyhow::anyhow!("reward.rule = {rule:?}: {e}"))?,
        ),
        (None, Some(dir)) => {
            let options = ScorerOptions {
                aggregate: cfg.reward.ensemble,
                uncertainty_coef: cfg.reward.uncertainty_coef,
                dtype: cfg.dtype,
                ..ScorerOptions::default()
            };
            let scorer = Scorer::load(dir, options, &frozen)
                .with_context(|| format!("model.reward_model = {}", dir.display()))?;
            for d in scorer.unnormalized() {
                println!(
                    "note: {} stores no reward normalisation; its raw scores are used",
                    d.display()
                );
            }
            scorer
        }
        (None, None) => bail!("set model.reward_model or reward.rule"),
    };
    let monitor_dir = match (&cfg.monitor.reward_model, &cfg.model.reward_model) {
        _ if !cfg.monitor.enabled || cfg.reward.rule.is_some() => None,
        (Some(d), _) => Some(d.clone()),
        (None, Some(rm)) => reward::scorer::monitor_dir(rm)?,
        (None, None) => None,
    };
    let monitor = match monitor_dir {
        Some(d) => Some(
            Scorer::load(
                &d,
                ScorerOptions {
                    dtype: cfg.dtype,
                    ..ScorerOptions::default()
                },
                &frozen,
            )
            .with_context(|| format!("the monitor's reward model {}", d.display()))?,
        ),
        None => None,
    };
    let critic = if cfg.advantage.estimator.needs_critic() {
        let critic = load_critic(cfg, resume, &train)?;
        if !tokenizer.same_ids(&critic.1) {
            bail!(
                "the critic's tokenizer differs from the policy's ({} vs {} tokens); the critic reads the policy's tokens, so start it from a reward model trained on the policy (or set model.critic = \"policy\")",
                critic.1.vocab_size(),
                tokenizer.vocab_size()
            );
        }
        Some(critic.0.with_dropout(0.0))
    } else {
        None
    };
    Ok(Models {
        policy: policy.with_dropout(0.0),
        critic,
        reference,
        tokenizer,
        scorer,
        monitor,
        policy_meta,
    })
}

/// The critic with its tokenizer: from the checkpoint resumed, else as `model.critic` says.
fn load_critic(
    cfg: &PpoConfig,
    resume: Option<&Path>,
    train: &Device,
) -> Result<(CausalLm, Tokenizer)> {
    if let Some(l) = &cfg.lora {
        // LoRA on the critic's start (its trunk frozen, its value head trained), new or the
        // checkpoint's.
        let (m, t) = load_critic(
            &PpoConfig {
                lora: None,
                ..cfg.clone()
            },
            None,
            train,
        )?;
        let critic_dir = resume.map(|dir| dir.join("critic"));
        let m = m
            .adapt(l, cfg.seed.wrapping_add(1), critic_dir.as_deref())?
            .keep_frozen(cfg.dtype);
        return Ok((m, t));
    }
    if let Some(dir) = resume {
        let d = dir.join("critic");
        if !d.exists() {
            bail!(
                "{}: the checkpoint has no critic/ (it was written with a critic-free advantage.estimator); resume with the estimator it was trained with",
                dir.display()
            );
        }
        let (m, t, _) =
            model::checkpoint::load_with_tokenizer(&d, Some(Heads::SCALAR), None, train)?;
        return Ok((m, t));
    }
    let choice = cfg.model.critic.as_deref().unwrap_or("reward_model");
    if choice == "policy" {
        let (m, t, _) = model::checkpoint::load_with_tokenizer(
            &cfg.model.policy,
            Some(Heads::NONE),
            None,
            train,
        )?;
        return Ok((m.with_scalar_head(cfg.seed), t));
    }
    let dir: PathBuf = if choice == "reward_model" {
        // An ensemble's critic starts from its first member.
        reward::scorer::first_model_dir(&cfg.model.reward_model.clone().context(
            "model.critic = \"reward_model\" needs model.reward_model; with a rule reward set model.critic = \"policy\"",
        )?)?
    } else {
        PathBuf::from(choice)
    };
    let (m, t, _) = model::checkpoint::load_with_tokenizer(&dir, Some(Heads::SCALAR), None, train)
        .with_context(|| {
            if choice == "reward_model" {
                format!("the critic (model.critic = \"reward_model\": {})", dir.display())
            } else {
                format!(
                    "model.critic = {choice:?} (\"reward_model\", \"policy\", or a reward-model folder)"
                )
            }
        })?;
    Ok((m, t))
}

/// Log-probabilities of each response token under `model` (temperature-scaled) and, with a
/// critic, the values before each response token. batch: the rollout rows; → [b, n] tensors.
fn response_logprobs(
    model: &CausalLm,
    batch: &TokenBatch,
    responses: Tensor<2, burn::tensor::Int>,
    prompt_len: usize,
    temperature: f64,
) -> Result<(Tensor<2>, Tensor<3>)> {
    let [b, n] = responses.dims();
    let hidden = model.forward(batch);
    let d = hidden.dims()[2];
    // Position p−1+t predicts response token t.
    let h = hidden.slice([0..b, prompt_len - 1..prompt_len - 1 + n, 0..d]);
    let logits = model.logits(h)?.div_scalar(temperature);
    let lp = model::ops::token_logprobs(logits.clone(), responses);
    Ok((lp, logits))
}

fn values_of(
    critic: &CausalLm,
    batch: &TokenBatch,
    prompt_len: usize,
    n: usize,
) -> Result<Tensor<2>> {
    let hidden = critic.forward(batch);
    let [b, _, d] = hidden.dims();
    let h = hidden.slice([0..b, prompt_len - 1..prompt_len - 1 + n, 0..d]);
    Ok(critic.scalar(h)?)
}

/// The seed of iteration `it`'s sampling and minibatch order: a function of (seed, iteration),
/// so that a resumed run draws exactly what the uninterrupted one would.
fn iteration_seed(seed: u64, it: usize, salt: u64) -> u64 {
    seed.wrapping_mul(0x9E3779B97F4A7C15)
        .wrapping_add((it as u64).wrapping_mul(1_000_003))
        .wrapping_add(salt)
}

/// Runs PPO with the config and its TOML text as used; `resume` continues from a checkpoint.
pub fn run(cfg: &PpoConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    trainer::state::check_checkpoint(resume, "ppo")?;
    let base_device = model::parse_device(&cfg.device)?;
    println!(
        "matrix products: {}",
        model::set_matmul_precision(cfg.matmul)
    );
    let device = base_device.clone().autodiff();
    let t = &cfg.train;
    let ppo = &cfg.ppo;
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        Some(cfg.model.policy.as_path()),
    )?;
    let Models {
        mut policy,
        critic,
        reference,
        tokenizer: tok,
        scorer,
        monitor: heldout,
        policy_meta,
    } = load_models(cfg, resume, &base_device)?;
    let context = policy.config().max_position_embeddings;
    let gold = cfg
        .monitor
        .gold
        .as_ref()
        .map(|rule| {
            datasets::gold::parse_rule(rule)
                .and_then(|r| r.compile())
                .map(Scorer::Rule)
                .map_err(|e| anyhow::anyhow!("monitor.gold = {rule:?}: {e}"))
        })
        .transpose()?;
    let prompts = rollout::read_prompts(
        &cfg.data.prompts,
        &cfg.data.columns,
        &tok,
        &template,
        context.saturating_sub(cfg.rollout.max_new_tokens),
        scorer.needs_answer() || gold.as_ref().is_some_and(|g| g.needs_answer()),
    )?;
    let ptx = rollout::read_ptx(ppo, &tok, &template, context)?;
    let meta = ModelMeta {
        stage: Some("ppo".into()),
        prompt_template: Some(template.as_str().to_string()),
        reward_normalization: None,
        chat_template: None,
    };

    // Derived values, computed once.
    let prompts_per_iteration = cfg.rollout.batch_size;
    let group = cfg.rollout.samples_per_prompt;
    let b = prompts_per_iteration * group;
    let temperature = if cfg.rollout.temperature > 0.0 {
        cfg.rollout.temperature
    } else {
        1.0
    };
    let critic_lr_scale = t.critic_lr.map_or(1.0, |c| c / t.lr);
    let mut fingerprint = Fingerprint::default();
    for p in &prompts {
        fingerprint.tokens(&p.tokens);
    }
    let mut run = Run::start(
        cfg.setup(config_used, resume),
        t.schedule(),
        Cadence {
            log_every: t.log_every,
            eval_every: 0,
            save_every: t.save_every,
            keep_last: t.keep_last,
        },
        Best::highest("heldout_score_mean"),
        fingerprint.hex(),
    )?;
    let adamw = || t.adamw().build();
    let optimizer = |name: &str| -> Result<ModuleOptimizer> {
        match resume {
            Some(dir) => load_optimizer(dir, name, adamw()),
            None => Ok(adamw()),
        }
    };
    let mut policy_optim = optimizer("policy")?;
    let mut critic = match critic {
        Some(model) => Some(Critic {
            model,
            optim: optimizer("critic")?,
            meta: ModelMeta {
                stage: Some("ppo-critic".into()),
                ..policy_meta.clone()
            },
        }),
        None => None,
    };
    let mut kl_ctl = match resume {
        Some(_) => serde_json::from_value(run.state.stage["kl_controller"].clone())
            .context("the checkpoint's KL controller state")?,
        None => kl_controller(&cfg.kl),
    };
    if let Some(dir) = resume {
        println!(
            "resumed from {} at iteration {}",
            dir.display(),
            run.state.step
        );
    }
    let mut monitor = match resume.and(run.state.stage.get("monitor")) {
        Some(v) => serde_json::from_value(v.clone()).context("the checkpoint's monitor state")?,
        None => monitor::Monitor::new(cfg.monitor.window),
    };
    // best/ by the held-out model's signal (not by the ensemble's disagreement, which is lowest
    // before any training).
    let keep_best = heldout.is_some();
    if cfg.monitor.enabled && !keep_best && scorer.members() > 0 {
        println!(
            "monitor: {}; no best/ is kept (train the reward model with ensemble.monitor = true, or set monitor.reward_model)",
            if scorer.members() > 1 {
                "no held-out reward model: warnings from the ensemble's disagreement only"
            } else {
                "no held-out reward model and a single reward model: no over-optimisation warnings"
            }
        );
    }
    let mut order = EpochOrder::new(prompts.len(), cfg.seed);
    let mut samples = rollout::Samples::open(&cfg.out, run.state.step)?;
    let (mut first_score, mut last_score, mut last_kl) = (f64::NAN, f64::NAN, f64::NAN);

    let lora_dropout = cfg.lora.as_ref().is_some_and(|l| l.dropout > 0.0);
    while !run.done() {
        run.begin_step();
        // Nothing else of a run draws from the device's generator than dropout (LoRA's).
        trainer::seed_step(&device, cfg.seed, run.state.step);
        let it = run.state.step;
        let started = Instant::now();

        // 1. Rollout: sample `group` responses per prompt on the KV-cache batch path.
        let batch_prompts: Vec<&Prompt> = order
            .take(run.state.examples_seen, prompts_per_iteration)
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(&prompts[i], group))
            .collect();
        let sampling = SamplingConfig {
            max_new_tokens: cfg.rollout.max_new_tokens,
            temperature: cfg.rollout.temperature as f32,
            top_k: cfg.rollout.top_k,
            top_p: cfg.rollout.top_p as f32,
            seed: iteration_seed(cfg.seed, it, 1),
            eos_token_ids: vec![tok.eos_id],
            pad_token_id: tok.pad_id,
        };
        let policy_frozen = policy.valid();
        // With LoRA and no model.reference, the reference is the policy's base weights.
        let base_reference =
            (reference.is_none() && cfg.measures_kl()).then(|| policy_frozen.without_lora());
        let reference = reference.as_ref().or(base_reference.as_ref());
        let prompt_tokens: Vec<Vec<u32>> = batch_prompts.iter().map(|p| p.tokens.clone()).collect();
        let generation = model::generate(&policy_frozen, &prompt_tokens, &sampling)?;
        let roll = Rollout::new(&prompt_tokens, &generation, &tok)?;
        let t_generate = started.elapsed().as_secs_f64();

        // 2–3. Score each response, and the forward passes over the whole rollout without
        // autodiff: old log-probs, reference log-probs, values. All four are independent of each
        // other: they run side by side (`model::device::join`), each returning host values.
        let t0 = Instant::now();
        let (n, p) = (roll.n, roll.p);
        let resp_tokens = token_tensor(&roll.response_tokens, b, n, &base_device);
        let logprobs = |m: &CausalLm| -> Result<Vec<f32>> {
            let (lp, _) = response_logprobs(m, &roll.batch, resp_tokens.clone(), p, temperature)?;
            Ok(to_f32_vec(lp))
        };
        let critic_frozen = critic.as_ref().map(|c| c.model.valid());
        // The held-out monitor model (if any) scores the same responses after the optimised
        // reward.
        let items = rollout::items(&batch_prompts, &roll.texts);
        let score = || {
            let t = Instant::now();
            let scored = scorer.score(&items).and_then(|s| {
                let h = heldout.as_ref().map(|m| m.score(&items)).transpose()?;
                Ok((s, h))
            });
            (scored, t.elapsed().as_secs_f64())
        };
        let values = || -> Result<Option<Vec<f32>>> {
            critic_frozen
                .as_ref()
                .map(|c| Ok(to_f32_vec(values_of(c, &roll.batch, p, n)?)))
                .transpose()
        };
        let forwards = || {
            model::device::join(
                || logprobs(&policy_frozen),
                || model::device::join(|| reference.map(&logprobs).transpose(), values),
            )
        };
        let ((scores, t_score), (old_logprobs, (reference_logprobs, old_values))) =
            model::device::join(score, forwards);
        let (scored, heldout_scored) = scores.map_err(|e| rollout::locate(e, &batch_prompts))?;
        let t_forward = t0.elapsed().as_secs_f64();
        // A response without EOS gets the penalty; scores are clipped (the monitor's alike).
        let finish = |mut v: Vec<f32>| {
            for (s, &eos) in v.iter_mut().zip(&roll.has_eos) {
                if !eos && cfg.reward.penalize_missing_eos {
                    *s = cfg.reward.missing_eos_penalty as f32;
                }
                if cfg.reward.clip_score > 0.0 {
                    *s = s.clamp(-cfg.reward.clip_score as f32, cfg.reward.clip_score as f32);
                }
            }
            v
        };
        let heldout_scores = heldout_scored.map(|h| finish(h.rewards));
        let gold_mean = match &gold {
            Some(g) => Some(
                mean_std(
                    &g.score(&items)
                        .map_err(|e| rollout::locate(e, &batch_prompts))?
                        .rewards,
                )
                .0,
            ),
            None => None,
        };

        // 4. Per-token rewards: −β·KL on every response token plus the score on the last one.
        // 5. Advantages.
        let t0 = Instant::now();
        let mask = &roll.response_mask;
        let beta = kl_ctl.value();
        let batch = advantages(
            cfg,
            Batch {
                kl: Vec::new(),
                scores: finish(scored.rewards.clone()),
                old_logprobs: old_logprobs?,
                reference_logprobs: reference_logprobs?,
                values: old_values?,
                rewards: Vec::new(),
                advantages: Vec::new(),
                returns: None,
                uniform_groups: None,
            },
            mask,
            b,
            n,
            beta,
        );

        // 6. Epochs over shuffled minibatches: the policy's and the critic's steps.
        let lr = run.schedule.at(it);
        let mut stats = UpdateStats::default();
        let mut rng = StdRng::seed_from_u64(iteration_seed(cfg.seed, it, 2));
        let cx = StepContext {
            cfg,
            run: &run,
            ptx: ptx.as_ref(),
            device: &device,
            pad_id: tok.pad_id,
            temperature,
            iteration: it,
            lr,
            critic_lr_scale,
            beta,
        };
        'epochs: for _epoch in 0..ppo.epochs {
            let mut rows: Vec<usize> = (0..b).collect();
            rows.shuffle(&mut rng);
            for rows in rows.chunks(ppo.minibatch_size) {
                // The minibatch without the columns that are padding in all its rows.
                let mb = roll.minibatch(rows);
                let index = stats.minibatches;
                let mut policy_step = |policy| {
                    step::policy_step(&cx, policy, &mut policy_optim, &roll, &mb, &batch, index)
                };
                // The policy's and the critic's steps read the same minibatch and nothing of
                // each other: they run side by side (`model::device::join`; each still splits
                // its own operations across the pool), in separate autodiff graphs. Every
                // operation's result is the same whichever thread computes it.
                // With LoRA dropout both draw masks from the device's generator: one after the
                // other then, in a fixed order, so that a run (and its resume) is reproducible.
                let (p, c) = match critic.take() {
                    Some(cr) if lora_dropout => {
                        let p = policy_step(policy)?;
                        (p, Some(step::critic_step(&cx, cr, &roll, &mb, &batch)?))
                    }
                    Some(cr) => {
                        let (p, c) = model::device::join(
                            || policy_step(policy),
                            || step::critic_step(&cx, cr, &roll, &mb, &batch),
                        );
                        (p?, Some(c?))
                    }
                    None => (policy_step(policy)?, None),
                };
                let (next_policy, policy_stats) = p;
                policy = next_policy;
                let critic_stats = c.map(|(next, s)| {
                    critic = Some(next);
                    s
                });
                stats.add(&policy_stats, critic_stats.as_ref());
                if ppo.max_approx_kl > 0.0 && policy_stats.approx_kl as f64 > ppo.max_approx_kl {
                    stats.early_stopped = true;
                    break 'epochs;
                }
            }
        }
        let t_train = t0.elapsed().as_secs_f64();

        // 7. Update β from this rollout's KL per response, log, write samples, checkpoint.
        let kl_per_response: Vec<f32> = (0..b)
            .map(|r| batch.kl[r * n..(r + 1) * n].iter().sum::<f32>())
            .collect();
        let (kl_mean, _) = mean_std(&kl_per_response);
        let measured_kl = batch.reference_logprobs.is_some();
        kl_ctl.update(kl_mean, b);
        let (score_mean, score_std) = mean_std(&batch.scores);
        // The monitor: the held-out model's mean score, else (an ensemble) minus the members'
        // disagreement, against the optimised score's mean.
        let signal = match (&heldout_scores, scored.members.len()) {
            (Some(h), _) => Some(mean_std(h).0),
            (None, n) if n > 1 && cfg.monitor.enabled => Some(-mean_std(&scored.member_std()).0),
            _ => None,
        };
        let watch = signal.map(|h| (h, monitor.record(it, score_mean, h)));
        let was_within = monitor.kl.is_empty() || monitor.smoothed_kl() <= cfg.monitor.max_kl;
        if measured_kl {
            monitor.record_kl(kl_mean);
        }
        if watch.is_some()
            && cfg.monitor.max_kl > 0.0
            && was_within
            && monitor.smoothed_kl() > cfg.monitor.max_kl
        {
            println!(
                "monitor: at iteration {} the KL from the SFT model (mean of the last {} iterations) is {:.2} nats per response, past monitor.max_kl = {}: best/ is not replaced while it stays there",
                it + 1,
                cfg.monitor.window.min(monitor.kl.len()),
                monitor.smoothed_kl(),
                cfg.monitor.max_kl
            );
        }
        if let Some((_, v)) = &watch
            && v.warning
            && let (Some(p), Some(h)) = (v.proxy, v.heldout)
        {
            println!(
                "warning: over-optimisation at iteration {}: over the last {} iterations the optimised score rose by {:+.3} (s.e. {:.3}) while the {} changed by {:+.3} (s.e. {:.3}); best/ is no longer replaced (it keeps the best held-out signal saved before the first warning)",
                it + 1,
                cfg.monitor.window,
                p.change,
                p.se,
                if heldout_scores.is_some() {
                    "held-out reward model's score"
                } else {
                    "ensemble's agreement (−std)"
                },
                h.change,
                h.se
            );
        }
        if it == 0 || first_score.is_nan() {
            first_score = score_mean;
        }
        last_score = score_mean;
        last_kl = if measured_kl { kl_mean } else { f64::NAN };
        let lengths: Vec<f32> = roll.lengths.iter().map(|&l| l as f32).collect();
        let (len_mean, len_std) = mean_std(&lengths);
        let eos_rate = roll.has_eos.iter().filter(|&&e| e).count() as f64 / b as f64;
        run.end_step(b, prompts_per_iteration);
        let ensemble = scored.members.len() > 1;
        let mut record = IterationRecord {
            score_mean,
            score_std,
            proxy_mean: ensemble.then(|| mean_std(&finish(scored.member_mean())).0),
            ensemble_std: ensemble.then(|| mean_std(&scored.member_std()).0),
            cut_responses: (scored.cut_responses > 0).then_some(scored.cut_responses),
            gold_mean,
            heldout_score_mean: watch.as_ref().map(|w| w.0),
            overoptimization_warning: watch.as_ref().map(|w| w.1.warning),
            kl_per_response: measured_kl.then_some(kl_mean),
            kl_coef: beta,
            explained_variance: batch
                .values
                .as_ref()
                .zip(batch.returns.as_ref())
                .map(|(v, r)| core::explained_variance(v, r, mask)),
            uniform_groups: batch.uniform_groups,
            response_length_mean: len_mean,
            response_length_std: len_std,
            eos_rate,
            lr,
            time_generate_s: t_generate,
            time_score_s: t_score,
            time_forward_s: t_forward,
            time_train_s: t_train,
            ..IterationRecord::default()
        };
        stats.record(&mut record, critic.is_some(), ptx.is_some());
        let fields = match serde_json::to_value(&record)? {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        run.log_step(fields, false, "episodes_per_s")?;
        let done = it + 1;
        if t.sample_every > 0 && done.is_multiple_of(t.sample_every) {
            samples.write(
                done,
                &batch_prompts,
                &roll.texts,
                &batch.scores,
                t.samples_per_log,
            )?;
        }
        if run.save_due() {
            let pf = policy.valid();
            // After a warning, or past monitor.max_kl, the held-out model is suspect too (a policy
            // far from the SFT model can fool both: seen on the suite with β = 0), so best/ stays.
            if keep_best
                && monitor.trusts(cfg.monitor.max_kl)
                && run.improved(monitor.smoothed_heldout())
            {
                run.save_best(&pf, Some(&tok), &meta)?;
            }
            let cf = critic.as_ref().map(|c| c.model.valid());
            let mut models = vec![SavedModel {
                name: "policy",
                model: &pf,
                tokenizer: Some(&tok),
                meta: &meta,
            }];
            let mut optimizers = vec![("policy", &policy_optim)];
            if let (Some(c), Some(cf)) = (&critic, &cf) {
                models.push(SavedModel {
                    name: "critic",
                    model: cf,
                    tokenizer: Some(&tok),
                    meta: &c.meta,
                });
                optimizers.push(("critic", &c.optim));
            }
            run.save(
                &models,
                &optimizers,
                serde_json::json!({ "kl_controller": kl_ctl, "monitor": monitor }),
            )?;
        }
    }
    let final_dir = cfg.out.join("final");
    model::save_with_meta(&policy.valid(), Some(&tok), &meta, &final_dir)?;
    let summary = Summary {
        iterations: run.state.step,
        first_score_mean: first_score,
        last_score_mean: last_score,
        last_kl,
        final_dir,
        overoptimization_warnings: monitor.warnings.iter().map(|i| i + 1).collect(),
        best_iteration: run.state.best_step.filter(|_| keep_best),
    };
    if !summary.overoptimization_warnings.is_empty() {
        println!(
            "warning: the monitor saw over-optimisation at {} of {} iterations (first at {}); compare best/ (iteration {}) with final/",
            summary.overoptimization_warnings.len(),
            summary.iterations,
            summary.overoptimization_warnings[0],
            summary
                .best_iteration
                .map_or("none kept".to_string(), |b| b.to_string())
        );
    }
    run.finish(&summary)?;
    Ok(summary)
}

/// Steps 4–5 on the host: the per-token KL (0 without a reference) and rewards (−β·KL in the reward, or none there when
/// the KL is a loss term; optionally whitened), then the advantages of `cfg.advantage.estimator`
/// (GAE's with its returns, or a critic-free estimator's). Fills `batch`'s `kl`, `rewards`,
/// `advantages`, `returns` and `uniform_groups`. mask: [b, n].
fn advantages(
    cfg: &PpoConfig,
    mut batch: Batch,
    mask: &[bool],
    b: usize,
    n: usize,
    beta: f64,
) -> Batch {
    let ppo = &cfg.ppo;
    batch.kl = match &batch.reference_logprobs {
        Some(r) => core::kl_per_token(&batch.old_logprobs, r, mask, cfg.kl.estimator),
        None => vec![0.0; mask.len()],
    };
    let reward_kl_coef = if cfg.kl.in_reward { beta } else { 0.0 };
    batch.rewards = core::per_token_rewards(&batch.kl, &batch.scores, mask, b, n, reward_kl_coef);
    if cfg.reward.whiten_rewards {
        batch.rewards = core::whiten(&batch.rewards, mask, false);
    }
    match cfg.advantage.estimator {
        Estimator::Gae => {
            let values = batch.values.as_ref().expect("GAE has a critic");
            let (adv, ret) = core::gae(&batch.rewards, values, mask, b, n, ppo.gamma, ppo.lam);
            batch.advantages = if ppo.whiten_advantages {
                core::whiten(&adv, mask, true)
            } else {
                adv
            };
            batch.returns = Some(ret);
        }
        Estimator::ReinforcePp => {
            batch.advantages = core::reinforce_pp_advantages(&batch.rewards, mask, b, n, ppo.gamma);
        }
        est => {
            let returns = core::row_sums(&batch.rewards, b, n);
            let (adv, uniform) =
                core::group_advantages(&returns, cfg.rollout.samples_per_prompt, est);
            batch.advantages = core::broadcast_rows(&adv, mask, b, n);
            batch.uniform_groups = Some(uniform);
        }
    }
    batch
}
