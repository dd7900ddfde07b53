//! Direct preference optimisation (Rafailov et al. 2023): the SFT policy trained on preferences
//! directly, with no reward model and no sampling; its implicit reward is β·(log π − log π_ref)
//! against the frozen SFT model. It reads the same preference data as `reward` (an import folder
//! with K-way groups, a rankings CSV, comparisons with ties and margins, ranked groups, HH-RLHF,
//! OpenAssistant) through `reward`'s readers, and trains with the same plumbing (`trainer`).
//!
//! [`run`] reads top to bottom: read and split the preferences by prompt → tokenize (each
//! response once per group) → the reference's log-probabilities of every response, computed once
//! before training with the frozen model, stored as `reference_logprobs.json` (a resumed run reads
//! them back) and the reference dropped from memory → for each optimizer step: one padded forward
//! of the policy over the batch's groups, [`loss::batch_loss`], backward, clip, AdamW → validate
//! (pairwise accuracy of the implicit rewards with a Wilson interval, as `reward` validates) →
//! checkpoint → the policy as an HF causal-LM folder.

#![forbid(unsafe_code)]

pub mod loss;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use loss::{LossKind, PairStats};
use model::ops::to_f32_vec;
use model::{CausalLm, Heads, ModelMeta, Tokenizer};
use reward::data::{DataSection, Group, Ties};
use reward::eval::Validation;
use reward::sequence_logprobs;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use trainer::run::Saving;
use trainer::{Best, Check, Fingerprint, Run, TrainSection};

trainer::stage_config! {
    /// The `dpo` config (configs/dpo.toml documents every key).
    pub struct DpoConfig {
        pub model: ModelSection,
        pub data: DataSection,
        #[serde(default)]
        pub loss: LossSection,
        pub train: TrainSection,
        /// LoRA adapters on the policy (frozen) instead of training all its weights.
        #[serde(default)]
        pub lora: Option<model::LoraConfig>,
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The SFT policy (an HF causal-LM folder), trained here.
    pub policy: PathBuf,
    /// The frozen reference of the implicit reward; default: `policy`.
    #[serde(default)]
    pub reference: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossSection {
    /// "sigmoid" (DPO; with label_smoothing > 0 conservative DPO), "ipo" or "listwise"
    /// (Plackett–Luce on whole K-way rankings).
    pub kind: LossKind,
    /// β: the strength of the KL constraint to the reference; 0.1 as TRL.
    pub beta: f64,
    /// ε of conservative DPO: the share of labels assumed flipped; 0 is plain DPO.
    pub label_smoothing: f64,
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            kind: LossKind::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

impl trainer::StageConfig for DpoConfig {
    fn check(&self, c: &mut Check) {
        c.lora(self.lora.as_ref(), "model.policy", true);
        c.within("loss.beta", self.loss.beta, 1e-6, 1e3);
        c.that(
            "loss.label_smoothing",
            self.loss.label_smoothing,
            (0.0..0.5).contains(&self.loss.label_smoothing),
            "in [0, 0.5)",
        );
        if self.loss.kind != LossKind::Sigmoid && self.loss.label_smoothing > 0.0 {
            c.that(
                "loss.label_smoothing",
                self.loss.label_smoothing,
                false,
                "0 unless loss.kind = \"sigmoid\" (conservative DPO smooths the sigmoid loss)",
            );
        }
        c.that(
            "data.ties",
            format!("{:?}", self.data.ties).to_lowercase(),
            self.data.ties == Ties::Drop,
            "\"drop\" (DPO has no term for a tie)",
        );
        c.that(
            "data.demonstrations",
            self.data
                .demonstrations
                .as_ref()
                .map_or(String::new(), |p| p.display().to_string()),
            self.data
                .demonstrations
                .as_ref()
                .is_none_or(|p| p.as_os_str().is_empty()),
            "unset (it is the reward model's normalisation; DPO has none)",
        );
        self.data.check(c);
        self.train.check(c);
    }
}

/// What a run ends with (`summary.json`): `reward`'s fields (the validation is the implicit
/// rewards' agreement with the held-out rankings) and the policy's folder.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub run: reward::PreferenceSummary,
    pub final_dir: PathBuf,
}

/// The response tokens (with EOS) of each sequence of `groups`, in order.
fn response_lengths(groups: &[&Group]) -> Vec<usize> {
    groups
        .iter()
        .flat_map(|g| {
            g.sequences
                .iter()
                .zip(&g.prompt_lens)
                .map(|(s, &p)| s.len() - p.max(1))
        })
        .collect()
}

/// The rows of `groups` (each response once) with their prompt lengths.
fn rows_of(groups: &[&Group]) -> (Vec<Vec<u32>>, Vec<usize>) {
    (
        groups.iter().flat_map(|g| g.sequences.clone()).collect(),
        groups.iter().flat_map(|g| g.prompt_lens.clone()).collect(),
    )
}

/// Summed log-probabilities of every response of `groups` under `model` (no autodiff), `batch`
/// groups per forward; one vector per group.
pub fn group_logprobs(
    model: &CausalLm,
    groups: &[Group],
    batch: usize,
    pad: u32,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(groups.len());
    for chunk in groups.chunks(batch.max(1)) {
        let refs: Vec<&Group> = chunk.iter().collect();
        let (rows, prompts) = rows_of(&refs);
        let lp = to_f32_vec(sequence_logprobs(model, &rows, &prompts, pad)?);
        let mut at = 0;
        for g in chunk {
            out.push(lp[at..at + g.k()].to_vec());
            at += g.k();
        }
    }
    Ok(out)
}

/// The reference's log-probabilities of the training and validation responses, and what they
/// were computed for (a resumed run reuses them only for the same reference and data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogprobs {
    pub reference: PathBuf,
    pub data_fingerprint: String,
    pub train: Vec<Vec<f32>>,
    pub validation: Vec<Vec<f32>>,
}

const REFERENCE_FILE: &str = "reference_logprobs.json";

impl ReferenceLogprobs {
    /// The stored ones of the run `resume` belongs to (its parent folder), when they match.
    fn stored(resume: Option<&Path>, reference: &Path, fingerprint: &str) -> Option<Self> {
        let path = resume?.parent()?.join(REFERENCE_FILE);
        let stored: Self = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        (stored.reference == reference && stored.data_fingerprint == fingerprint).then(|| {
            println!(
                "reference log-probabilities read from {} (not recomputed)",
                path.display()
            );
            stored
        })
    }

    /// Computes them with the frozen reference, which is dropped afterwards.
    fn compute(
        cfg: &DpoConfig,
        (train, valid): (&[Group], &[Group]),
        tok: &Tokenizer,
        fingerprint: &str,
        device: &Device,
    ) -> Result<Self> {
        let dir = cfg.model.reference.as_ref().unwrap_or(&cfg.model.policy);
        let (reference, ref_tok, _) =
            model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), None, device)
                .with_context(|| format!("the reference policy {}", dir.display()))?;
        if !ref_tok.same_ids(tok) {
            bail!(
                "model.reference {}: its tokenizer differs from the policy's ({} vs {} tokens); the implicit reward compares the two models token by token",
                dir.display(),
                ref_tok.vocab_size(),
                tok.vocab_size()
            );
        }
        let reference = reference.with_dropout(0.0).keep_frozen(cfg.dtype);
        let b = cfg.train.eval_batch_size;
        Ok(Self {
            reference: dir.clone(),
            data_fingerprint: fingerprint.to_string(),
            train: group_logprobs(&reference, train, b, tok.pad_id)?,
            validation: group_logprobs(&reference, valid, b, tok.pad_id)?,
        })
    }

    /// Writes them into `out` (temp file, then rename).
    fn save(&self, out: &Path) -> Result<()> {
        let tmp = out.join(format!(".{REFERENCE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_string(self)?)?;
        std::fs::rename(&tmp, out.join(REFERENCE_FILE))?;
        Ok(())
    }
}

/// Validation of `model`'s implicit rewards on `groups` (None without groups).
pub fn validate(
    model: &CausalLm,
    groups: &[Group],
    reference: &[Vec<f32>],
    cfg: &DpoConfig,
    pad: u32,
) -> Result<Option<Validation>> {
    if groups.is_empty() {
        return Ok(None);
    }
    let policy = group_logprobs(model, groups, cfg.train.eval_batch_size, pad)?;
    let beta = cfg.loss.beta as f32;
    let rewards: Vec<Vec<f32>> = policy
        .iter()
        .zip(reference)
        .map(|(p, r)| p.iter().zip(r).map(|(p, r)| beta * (p - r)).collect())
        .collect();
    Ok(Some(reward::eval::validate(groups, &rewards)))
}

/// Loads the policy to train: from `resume`, else `model.policy`; dropout off (the policy's
/// log-probabilities must be comparable with the reference's).
fn load_policy(
    cfg: &DpoConfig,
    resume: Option<&Path>,
    device: &Device,
) -> Result<(CausalLm, Tokenizer)> {
    // With LoRA: model.policy, frozen, with new adapters or the checkpoint's.
    let dir = match (&cfg.lora, resume) {
        (None, Some(r)) => r,
        _ => &cfg.model.policy,
    };
    let (m, tok, _) = model::checkpoint::load_with_tokenizer(dir, Some(Heads::LM), None, device)
        .with_context(|| format!("model.policy = {}", dir.display()))?;
    let m = match &cfg.lora {
        None => m,
        Some(l) => m.adapt(l, cfg.seed, resume)?.keep_frozen(cfg.dtype),
    };
    Ok((m.with_dropout(0.0), tok))
}

/// Runs DPO with the config and its TOML text as used; `resume` continues from a checkpoint.
pub fn run(cfg: &DpoConfig, config_used: &str, resume: Option<&Path>) -> Result<Summary> {
    trainer::state::check_checkpoint(resume, "dpo")?;
    let base_device = model::parse_device(&cfg.device)?;
    let device = base_device.clone().autodiff();
    println!(
        "matrix products: {}",
        model::set_matmul_precision(cfg.matmul)
    );
    let (t, l) = (&cfg.train, &cfg.loss);
    let template = model::checkpoint::resolve_template(
        cfg.data.template.as_deref(),
        Some(cfg.model.policy.as_path()),
    )?;
    let meta = ModelMeta {
        stage: Some("dpo".into()),
        prompt_template: Some(template.as_str().to_string()),
        reward_normalization: None,
        chat_template: None,
    };
    let (train_raw, valid_raw) = reward::read_data(&cfg.data, cfg.seed)?;
    let (mut policy, tok) = load_policy(cfg, resume, &device)?;
    let (train, valid, dropped) =
        reward::data::tokenize_split((&train_raw, &valid_raw), &tok, &template, &cfg.data)?;
    let mut fingerprint = Fingerprint::default();
    for g in train.iter().chain(&valid) {
        for s in &g.sequences {
            fingerprint.tokens(s);
        }
        fingerprint.tokens(&g.ranks);
    }
    let fingerprint = fingerprint.hex();
    let reference_dir = cfg.model.reference.as_ref().unwrap_or(&cfg.model.policy);
    let reference = match ReferenceLogprobs::stored(resume, reference_dir, &fingerprint) {
        Some(r) => r,
        None => {
            ReferenceLogprobs::compute(cfg, (&train, &valid), &tok, &fingerprint, &base_device)?
        }
    };

    let saving = Saving::new(
        &tok,
        &meta,
        "responses_per_s",
        Best::highest("eval_accuracy"),
    );
    let (mut run, mut optim, mut order) = Run::for_training(
        cfg.setup(config_used, resume),
        t,
        (train.len(), fingerprint),
        saving,
    )?;
    reference.save(&cfg.out)?;
    let plan_loss = reward::LossSection {
        kind: match l.kind {
            LossKind::Listwise => reward::LossKind::Listwise,
            LossKind::Sigmoid | LossKind::Ipo => reward::LossKind::Pairwise,
        },
        ..reward::LossSection::default()
    };
    let mut last_eval = None;
    let mut last_loss = f64::NAN;
    let pad = tok.pad_id;
    run.baseline(|| validate(&policy.valid(), &valid, &reference.validation, cfg, pad))?;
    while !run.done() {
        run.begin_step();
        // Nothing else of a run draws from the device's generator than dropout (LoRA's).
        trainer::seed_step(&device, cfg.seed, run.state.step);
        let idx = order.take(run.state.examples_seen, t.examples_per_step());
        let mut accumulator = GradientsAccumulator::new();
        let (mut step_loss, mut responses) = (0.0, 0);
        let (mut pairs, mut rewards, mut logps) = (Vec::new(), Vec::new(), Vec::new());
        for micro in idx.chunks(t.batch_size) {
            // All responses of the micro-batch's groups in one padded forward.
            let groups: Vec<&Group> = micro.iter().map(|&i| &train[i]).collect();
            let plan = reward::plan(&groups, &plan_loss, Ties::Drop);
            let (rows, prompts) = rows_of(&groups);
            let ref_host: Vec<f32> = micro
                .iter()
                .flat_map(|&i| reference.train[i].clone())
                .collect();
            let n = ref_host.len();
            let mut pol = sequence_logprobs(&policy, &rows, &prompts, pad)?;
            let mut refs = Tensor::<1>::from_data(TensorData::new(ref_host, [n]), &device);
            if l.kind == LossKind::Ipo {
                let len: Vec<f32> = response_lengths(&groups)
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                let len = Tensor::<1>::from_data(TensorData::new(len, [n]), &device);
                pol = pol / len.clone();
                refs = refs / len;
            }
            // TRL's metrics from this micro-batch's non-tied pairs.
            let base = rewards.len();
            for (gi, g) in groups.iter().enumerate() {
                let first = base + plan.groups[gi].start;
                pairs.extend(pairs_of(g, first));
            }
            rewards.extend(to_f32_vec(loss::implicit_rewards(
                pol.clone().detach(),
                refs.clone(),
                l.beta,
            )));
            logps.extend(to_f32_vec(pol.clone().detach()));
            let batch_loss = loss::batch_loss(pol, refs, &plan, l.kind, l.beta, l.label_smoothing)
                .div_scalar(t.grad_accum as f64);
            step_loss += batch_loss.clone().into_scalar::<f32>() as f64;
            let grads = GradientsParams::from_grads(batch_loss.backward(), &policy);
            accumulator.accumulate(&policy, grads);
            responses += rows.len();
        }
        let mut fields;
        let grads = accumulator.grads();
        (policy, fields) = run.optimizer_step(&mut optim, (policy, grads), step_loss, responses)?;
        last_loss = step_loss;
        let s = PairStats::of(&pairs, &rewards, &logps);
        for (k, v) in [
            ("rewards/chosen", s.chosen),
            ("rewards/rejected", s.rejected),
            ("rewards/margins", s.margin),
            ("rewards/accuracies", s.accuracy),
            ("logps/chosen", s.logps_chosen),
            ("logps/rejected", s.logps_rejected),
        ] {
            fields.insert(k.into(), json!(v));
        }
        let evaluated = run.after_step(&policy, &optim, fields, |frozen| {
            validate(frozen, &valid, &reference.validation, cfg, pad)
        })?;
        last_eval = evaluated.or(last_eval);
    }
    let final_dir = cfg.out.join("final");
    model::save_with_meta(&policy.valid(), Some(&tok), &meta, &final_dir)?;
    let summary = Summary {
        run: reward::PreferenceSummary::of(&run, last_loss, (&train, &valid), dropped, last_eval),
        final_dir,
    };
    run.finish(&summary)?;
    Ok(summary)
}

/// The non-tied (better, worse) pairs of a group, as rows from `first`.
fn pairs_of(g: &Group, first: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..g.k() {
        for j in 0..g.k() {
            if g.ranks[i] < g.ranks[j] {
                out.push((first + i, first + j));
            }
        }
    }
    out
}
