//! The bookkeeping of a training run, written once for every stage: the output folder, resume
//! (state, seed and data checks), the log / eval / save cadence, throughput, the best checkpoint
//! by a metric with a direction, the checkpoints the NaN guard can fall back to, and the final
//! `summary.json`. A stage's loop calls it around its own math.

use crate::metrics::Metrics;
use crate::optim::TrainSection;
use crate::schedule::Schedule;
use crate::state::{
    SavedModel, TrainerState, check_resume, load_state, prune_checkpoints, save_checkpoint,
};
use anyhow::Result;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use model::{CausalLm, ModelMeta, Tokenizer};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// When to log, evaluate and save, in steps (0: only at the end, except `log_every`).
#[derive(Clone, Copy, Debug)]
pub struct Cadence {
    pub log_every: usize,
    pub eval_every: usize,
    pub save_every: usize,
    pub keep_last: usize,
}

impl From<&crate::optim::TrainSection> for Cadence {
    fn from(t: &crate::optim::TrainSection) -> Self {
        Self {
            log_every: t.log_every,
            eval_every: t.eval_every,
            save_every: t.save_every,
            keep_last: t.keep_last,
        }
    }
}

/// A validation result: the value that picks `best/`, and the fields it adds to a metrics line.
pub trait Evaluation {
    fn metric(&self) -> f64;
    fn record(&self, fields: &mut Map<String, Value>);
}

/// What a stage's one model needs for checkpoints and `best/`.
#[derive(Clone, Debug)]
pub struct Saving {
    pub tokenizer: Tokenizer,
    pub meta: ModelMeta,
    /// Units per second in metrics lines: `tokens_per_s`, `responses_per_s`.
    pub rate_name: &'static str,
    /// The validation metric that picks `best/`.
    pub best: Best,
}

impl Saving {
    pub fn new(
        tokenizer: &Tokenizer,
        meta: &ModelMeta,
        rate_name: &'static str,
        best: Best,
    ) -> Self {
        Self {
            tokenizer: tokenizer.clone(),
            meta: meta.clone(),
            rate_name,
            best,
        }
    }
}

/// Which validation metric picks `best/`, and whether higher is better.
#[derive(Clone, Copy, Debug)]
pub struct Best {
    pub metric: &'static str,
    pub higher_is_better: bool,
}

impl Best {
    /// `metric`, higher is better (accuracy).
    pub fn highest(metric: &'static str) -> Self {
        Self {
            metric,
            higher_is_better: true,
        }
    }

    /// `metric`, lower is better (loss).
    pub fn lowest(metric: &'static str) -> Self {
        Self {
            metric,
            higher_is_better: false,
        }
    }
}

/// Where a run writes and what it continues from.
#[derive(Clone, Copy, Debug)]
pub struct Setup<'a> {
    pub out: &'a Path,
    /// The config as used (overrides applied), written as `config.toml`.
    pub config_used: &'a str,
    pub seed: u64,
    pub resume: Option<&'a Path>,
}

pub struct Run {
    pub out: PathBuf,
    /// The learning-rate schedule over `total_steps`.
    pub schedule: Schedule,
    pub state: TrainerState,
    pub total_steps: usize,
    /// The checkpoint this run resumed from.
    pub resumed_from: Option<PathBuf>,
    cadence: Cadence,
    best: Best,
    metrics: Metrics,
    /// Checkpoints this run can fall back to: (step, folder).
    saved: Vec<(usize, PathBuf)>,
    /// (units, seconds) since the last log line.
    window: (f64, f64),
    step_started: Option<Instant>,
    /// What `after_step` saves with a one-model stage's checkpoints.
    saving: Option<Saving>,
    /// `[train]` of a run made by `for_training`: clipping, examples per step, data size.
    training: Option<(f64, usize, usize)>,
    /// This run's lock on `out`, held until the run is dropped (after `finish`).
    _lock: crate::OutLock,
}

impl Run {
    /// Creates and locks `out` (writing the config used as `config.toml`; a second run into the
    /// same folder is refused while this one lives) and, with `resume`, reads the
    /// checkpoint's state after checking that its seed and data fingerprint match this run's.
    /// Call it after the data and models have loaded, so that bad input leaves nothing behind.
    pub fn start(
        setup: Setup,
        schedule: Schedule,
        cadence: Cadence,
        best: Best,
        data_fingerprint: String,
    ) -> Result<Self> {
        let Setup {
            out,
            config_used,
            seed,
            resume,
        } = setup;
        let total_steps = schedule.total_steps;
        let mut state = TrainerState {
            step: 0,
            examples_seen: 0,
            seed,
            data_fingerprint: data_fingerprint.clone(),
            best_metric: None,
            best_step: None,
            stage: Value::Null,
        };
        if let Some(dir) = resume {
            let loaded = load_state(dir)?;
            check_resume(dir, &loaded, seed, &data_fingerprint)?;
            if loaded.step > total_steps {
                anyhow::bail!(
                    "{}: the checkpoint is at step {} but this run has {total_steps} steps (train.max_steps or train.epochs; train.iterations in ppo); lengthen the run to at least {} steps, or resume from an earlier checkpoint",
                    dir.display(),
                    loaded.step,
                    loaded.step
                );
            }
            state = loaded;
            state.data_fingerprint = data_fingerprint;
        }
        let lock = crate::prepare_out(out, config_used)?;
        let metrics = Metrics::open(out, total_steps, state.step)?;
        Ok(Self {
            out: out.to_path_buf(),
            schedule,
            saved: resume
                .map(|d| (state.step, d.to_path_buf()))
                .into_iter()
                .collect(),
            resumed_from: resume.map(Path::to_path_buf),
            state,
            total_steps,
            cadence,
            best,
            metrics,
            window: (0.0, 0.0),
            step_started: None,
            saving: None,
            training: None,
            _lock: lock,
        })
    }

    /// A run over a data set of `train_len` examples with the `[train]` settings of sft and
    /// reward (steps, schedule and cadence from `t`), its AdamW (resumed when the run is) and the
    /// seeded order of the examples.
    pub fn for_training(
        setup: Setup,
        t: &TrainSection,
        (train_len, data_fingerprint): (usize, String),
        saving: Saving,
    ) -> Result<(Self, ModuleOptimizer, crate::EpochOrder)> {
        let schedule = t.schedule(t.total_steps(train_len));
        let mut run = Self::start(setup, schedule, t.into(), saving.best, data_fingerprint)?;
        run.saving = Some(saving);
        run.training = Some((t.max_grad_norm, t.examples_per_step(), train_len));
        let optim = run.optimizer(t)?;
        Ok((run, optim, crate::EpochOrder::new(train_len, setup.seed)))
    }

    /// AdamW from `[train]`, with the moments of the checkpoint this run resumed from.
    pub fn optimizer(&self, t: &TrainSection) -> Result<ModuleOptimizer> {
        let optim = t.adamw();
        match &self.resumed_from {
            Some(dir) => {
                let optim = crate::state::load_optimizer(dir, "model", optim)?;
                println!("resumed from {} at step {}", dir.display(), self.state.step);
                Ok(optim)
            }
            None => Ok(optim),
        }
    }

    /// Evaluates the untrained model at step 0 (the baseline later evaluations are compared
    /// with); nothing on a resumed run.
    pub fn baseline<E: Evaluation>(
        &mut self,
        evaluate: impl FnOnce() -> Result<Option<E>>,
    ) -> Result<()> {
        if self.state.step == 0
            && let Some(e) = evaluate()?
        {
            let mut fields = Map::new();
            e.record(&mut fields);
            self.metrics.log(0, fields)?;
        }
        Ok(())
    }

    /// One optimizer step of a run made by `for_training`, after the step's gradients: the NaN
    /// guard on `loss`, the scheduled learning rate, global-norm clipping (and the guard on the
    /// norm), AdamW; then the step is counted with the `units` (tokens, responses) it processed.
    /// Returns the updated module and the metrics line so far (`loss`, `lr`, `grad_norm`, `epoch`).
    pub fn optimizer_step<M: Module>(
        &mut self,
        optim: &mut ModuleOptimizer,
        (module, grads): (M, GradientsParams),
        loss: f64,
        units: usize,
    ) -> Result<(M, Map<String, Value>)> {
        let (max_grad_norm, examples, train_len) = self
            .training
            .expect("optimizer_step is for runs made by Run::for_training");
        self.check_finite("loss", loss)?;
        let step = self.state.step;
        let lr = self.schedule.at(step);
        let (module, grad_norm) = crate::optim::optimizer_step(
            optim,
            module,
            grads,
            lr,
            max_grad_norm,
            step + 1,
            self.last_good(),
        )?;
        self.end_step(units, examples);
        let mut fields = Map::new();
        fields.insert(
            "epoch".into(),
            json!(self.state.examples_seen as f64 / train_len.max(1) as f64),
        );
        fields.insert("loss".into(), json!(loss));
        fields.insert("lr".into(), json!(lr));
        fields.insert("grad_norm".into(), json!(grad_norm));
        Ok((module, fields))
    }

    /// After a step of a one-model stage: evaluate when due (saving `best/` on improvement),
    /// write the metrics line when due, and the checkpoint when due. `model` is the trained
    /// module; `evaluate` gets its inference copy. Returns the evaluation when there was one.
    pub fn after_step<E: Evaluation>(
        &mut self,
        model: &CausalLm,
        optimizer: &ModuleOptimizer,
        fields: Map<String, Value>,
        evaluate: impl FnOnce(&CausalLm) -> Result<Option<E>>,
    ) -> Result<Option<E>> {
        // Taken for the call and put back, rather than cloned (a tokenizer) at every step.
        let saving = self
            .saving
            .take()
            .expect("after_step is for runs made by Run::for_training");
        let result = self.after_step_saving(model, optimizer, fields, evaluate, &saving);
        self.saving = Some(saving);
        result
    }

    fn after_step_saving<E: Evaluation>(
        &mut self,
        model: &CausalLm,
        optimizer: &ModuleOptimizer,
        mut fields: Map<String, Value>,
        evaluate: impl FnOnce(&CausalLm) -> Result<Option<E>>,
        saving: &Saving,
    ) -> Result<Option<E>> {
        // One inference copy of the weights serves the evaluation, `best/` and the checkpoint.
        let frozen = (self.eval_due() || self.save_due()).then(|| model.valid());
        let mut evaluation = None;
        if self.eval_due()
            && let Some(frozen) = &frozen
            && let Some(e) = evaluate(frozen)?
        {
            e.record(&mut fields);
            if self.improved(e.metric()) {
                self.save_best(frozen, Some(&saving.tokenizer), &saving.meta)?;
            }
            evaluation = Some(e);
        }
        self.log_step(fields, evaluation.is_some(), saving.rate_name)?;
        if self.save_due()
            && let Some(frozen) = &frozen
        {
            self.save(
                &[SavedModel {
                    name: "model",
                    model: frozen,
                    tokenizer: Some(&saving.tokenizer),
                    meta: &saving.meta,
                }],
                &[("model", optimizer)],
                Value::Null,
            )?;
        }
        Ok(evaluation)
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.total_steps
    }

    /// The newest checkpoint written before the weights of the current step: what the NaN
    /// guard names when this step's loss or gradient is not finite.
    pub fn last_good(&self) -> Option<&Path> {
        self.saved
            .iter()
            .rev()
            .find(|(s, p)| *s < self.state.step && p.exists())
            .map(|(_, p)| p.as_path())
    }

    /// Stops the run when this step's `what` (loss, gradient norm) is not finite.
    pub fn check_finite(&self, what: &str, value: f64) -> Result<()> {
        crate::check_finite(what, value, self.state.step + 1, self.last_good())
    }

    /// Starts the clock of a step.
    pub fn begin_step(&mut self) {
        self.step_started = Some(Instant::now());
    }

    /// Ends a step that processed `units` (tokens, responses, episodes) and consumed `examples`.
    pub fn end_step(&mut self, units: usize, examples: usize) {
        self.state.step += 1;
        self.state.examples_seen += examples;
        self.window.0 += units as f64;
        self.window.1 += self
            .step_started
            .take()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
    }

    fn due(&self, every: usize) -> bool {
        (every > 0 && self.state.step.is_multiple_of(every)) || self.state.step == self.total_steps
    }

    /// Whether to evaluate after the step just ended.
    pub fn eval_due(&self) -> bool {
        self.due(self.cadence.eval_every)
    }

    /// Whether to save a checkpoint after the step just ended.
    pub fn save_due(&self) -> bool {
        self.due(self.cadence.save_every)
    }

    /// Records a validation value of the best-by metric; true when it is the best so far.
    pub fn improved(&mut self, value: f64) -> bool {
        let better = match self.state.best_metric {
            None => value.is_finite(),
            Some(b) if self.best.higher_is_better => value > b,
            Some(b) => value < b,
        };
        if better {
            self.state.best_metric = Some(value);
            self.state.best_step = Some(self.state.step);
        }
        better
    }

    /// The metric that picks `best/`.
    pub fn best_metric_name(&self) -> &'static str {
        self.best.metric
    }

    /// Writes the metrics line of the step just ended when it is due (every `log_every` steps,
    /// after an evaluation — `fields` then hold more than `always` keys — and at the last step),
    /// adding `{rate_name}` = units per second since the previous line.
    pub fn log_step(
        &mut self,
        mut fields: Map<String, Value>,
        evaluated: bool,
        rate_name: &str,
    ) -> Result<()> {
        if !(self
            .state
            .step
            .is_multiple_of(self.cadence.log_every.max(1))
            || evaluated
            || self.state.step == self.total_steps)
        {
            return Ok(());
        }
        fields.insert(
            rate_name.into(),
            json!(self.window.0 / self.window.1.max(1e-9)),
        );
        self.metrics.log(self.state.step, fields)?;
        self.window = (0.0, 0.0);
        Ok(())
    }

    /// Writes `checkpoint-NNNNNN` with the models, optimizers and the stage's state, and prunes
    /// old ones.
    pub fn save(
        &mut self,
        models: &[SavedModel],
        optimizers: &[(&str, &ModuleOptimizer)],
        stage: Value,
    ) -> Result<PathBuf> {
        self.state.stage = stage;
        let dir = save_checkpoint(&self.out, models, optimizers, &self.state)?;
        prune_checkpoints(&self.out, self.cadence.keep_last)?;
        self.saved.push((self.state.step, dir.clone()));
        Ok(dir)
    }

    /// Saves `out/best` (atomically).
    pub fn save_best(
        &self,
        model: &CausalLm,
        tokenizer: Option<&Tokenizer>,
        meta: &ModelMeta,
    ) -> Result<()> {
        model::save_with_meta(model, tokenizer, meta, &self.out.join("best"))?;
        Ok(())
    }

    /// Closes the progress bar and writes `summary.json` (atomically).
    pub fn finish<S: Serialize>(self, summary: &S) -> Result<()> {
        self.metrics.finish();
        let tmp = self.out.join(".summary.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(summary)? + "\n")?;
        std::fs::rename(&tmp, self.out.join("summary.json"))?;
        Ok(())
    }
}
