//! `labeling simulate`: the project's own demo task, generated deterministically from a seed, with
//! simulated labelers.
//!
//! The task is a mix of small instruction-following problems that a tiny model (hidden size 64,
//! 2 layers, a BPE vocabulary of about 1,024) can partly learn on a CPU in minutes: addition and
//! subtraction of numbers up to 20, comparing two numbers below 100, counting the words of a short
//! phrase or the letters of a word, sorting two or three numbers, and spelling a word letter by
//! letter; about 20% of the prompts are in Chinese. Every prompt has a gold answer, and the task's
//! form is to end with "The answer is X." (or "答案是X。"): the gold rule is
//! [`datasets::gold::Rule::FinalAnswer`], the right answer stated in that form. Numbers and words
//! are drawn fresh for every prompt, and no problem (whatever its wording or language) appears
//! twice across the files, so the evaluation prompts are really held out.
//!
//! Room for RL, as in InstructGPT: the demonstrations come from demonstrators of mixed care. A
//! share of them ([`SimulateParams::sloppy`], half by default) is written by careless demonstrators
//! who give the right answer but skip the form (" well, 12 i guess", " 12"), so the SFT policy picks
//! up the habit along with the task and is clearly imperfect by the gold rule. The labelers rank
//! such wrong-format answers last, which the reward model learns, so PPO can raise the gold
//! accuracy without the reward model ever seeing the gold rule. (A tiny reward model does not
//! learn to tell a right sum from a nearly right one; what PPO fixes is mostly the form.)
//!
//! Written into the output folder, atomically:
//! - `demonstrations.jsonl` (`prompt`, `response`): SFT data, prompt → a correct response (or,
//!   for the sloppy share, the right answer in a wrong format);
//! - `prompts.jsonl` (`prompt`, `answer`): prompts for PPO;
//! - `eval_prompts.jsonl` (`prompt`, `answer`): held-out prompts for evaluation;
//! - `rankings.csv`: a long rankings CSV for `labeling import`: K candidate responses per
//!   comparison prompt (correct; correct but verbose; nearly right; right answer in a wrong format;
//!   wrong), each ranked by every simulated labeler after the gold preference
//!   correct > verbose > nearly right > wrong format = wrong, with noise: adjacent candidates
//!   swapped with probability `noise` (scaled per labeler from 0.5× to 1.5×), and close candidates
//!   sometimes tied, so that labelers sometimes disagree and sometimes tie;
//! - `task.json`: the parameters, counts and label statistics;
//! - `heldout_candidates.jsonl`, only with `--heldout-candidates N` (default 0 for the demo, so
//!   its committed folder keeps its five files): for N further prompts, disjoint from every
//!   other file's, 5 or 6 candidates each (correct, nearly right, wrong format, wrong, and one or
//!   two of the degenerate responses a policy finds when it hacks a reward model: empty,
//!   repeated, refusal), one line per candidate (`prompt_id`, `prompt`, `answer`, `response`,
//!   `kind`, `gold`), `gold` the gold rule's score; for measuring how well a reward model agrees
//!   with the gold rule on responses it was not trained on.
//!
//! The same parameters give byte-identical files. Other task families (string tasks, multiple
//! choice, all-Chinese, JSON answers) are in [`crate::suite`]; they share this module's types,
//! labelers and writer.

use crate::import::LONG_HEADER;
use anyhow::{Context, Result, ensure};
use datasets::RankedGroup;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The generator's parameters (`labeling simulate`'s options besides `--out`; each option's
/// default is [`SimulateParams::default`]'s value). `--k`, `--noise`, `--sloppy` and
/// `--heldout-candidates` default to the task family's values, so they are read by
/// [`crate::suite::FamilyArgs`] and skipped here.
#[derive(Clone, Debug, PartialEq, Serialize, clap::Args)]
pub struct SimulateParams {
    #[arg(long, default_value_t = SimulateParams::default().seed, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<u64>(0))]
    pub seed: u64,
    /// Lines of `prompts.jsonl` (PPO prompts).
    #[arg(long, default_value_t = SimulateParams::default().train_prompts, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub train_prompts: usize,
    /// Lines of `eval_prompts.jsonl`.
    #[arg(long, default_value_t = SimulateParams::default().eval_prompts, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub eval_prompts: usize,
    /// Lines of `demonstrations.jsonl`.
    #[arg(long, default_value_t = SimulateParams::default().demonstrations, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub demonstrations: usize,
    /// Prompts with K ranked candidates in `rankings.csv`.
    #[arg(long, default_value_t = SimulateParams::default().comparison_prompts, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub comparison_prompts: usize,
    /// Simulated labelers; each ranks every comparison prompt.
    #[arg(long, default_value_t = SimulateParams::default().labelers, allow_negative_numbers = true,
          value_parser = model::flags::at_least::<usize>(1))]
    pub labelers: usize,
    /// Candidates per comparison prompt, 2 to 5.
    #[arg(skip = SimulateParams::default().k)]
    pub k: usize,
    /// Probability of swapping adjacent candidates (the mean labeler's); ties come at half of it.
    #[arg(skip = SimulateParams::default().noise)]
    pub noise: f64,
    /// Share of demonstrations written by careless demonstrators: the right answer, but not in
    /// the task's form (for the demo "The answer is X."; a bare or hedged answer), which the gold
    /// rule (`final_answer`) scores 0 and the labelers rank last. The SFT policy learns this
    /// habit along with the task; the labelers' rankings teach the reward model to dislike it.
    #[arg(skip = SimulateParams::default().sloppy)]
    pub sloppy: f64,
    /// Prompts of `heldout_candidates.jsonl`; 0 writes no such file (and leaves it out of
    /// `task.json`'s parameters, so the demo's committed `task.json` stays as it was).
    #[arg(skip = SimulateParams::default().heldout_candidates)]
    #[serde(skip_serializing_if = "is_zero")]
    pub heldout_candidates: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Default for SimulateParams {
    fn default() -> Self {
        Self {
            seed: 0,
            train_prompts: 400,
            eval_prompts: 300,
            demonstrations: 3000,
            comparison_prompts: 180,
            labelers: 3,
            k: 4,
            noise: 0.15,
            sloppy: 0.5,
            heldout_candidates: 0,
        }
    }
}

/// The share of prompts in Chinese.
pub const CHINESE_FRACTION: f64 = 0.2;

/// The kinds of problem, with their weights in the mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Add,
    Sub,
    Compare,
    CountWords,
    CountLetters,
    Sort,
    Spell,
}

impl TaskKind {
    pub const ALL: [TaskKind; 7] = [
        TaskKind::Add,
        TaskKind::Sub,
        TaskKind::Compare,
        TaskKind::CountWords,
        TaskKind::CountLetters,
        TaskKind::Sort,
        TaskKind::Spell,
    ];

    fn weight(self) -> u32 {
        match self {
            TaskKind::Add => 20,
            TaskKind::Sub => 15,
            TaskKind::Compare => 15,
            TaskKind::CountWords => 12,
            TaskKind::CountLetters => 12,
            TaskKind::Sort => 14,
            TaskKind::Spell => 12,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Add => "add",
            TaskKind::Sub => "sub",
            TaskKind::Compare => "compare",
            TaskKind::CountWords => "count_words",
            TaskKind::CountLetters => "count_letters",
            TaskKind::Sort => "sort",
            TaskKind::Spell => "spell",
        }
    }
}

/// A kind of problem, named in `task.json`'s counts: the demo's [`TaskKind`] or a task family's
/// ([`crate::suite::SuiteKind`]).
pub trait ProblemKind: Copy + std::fmt::Debug + PartialEq {
    fn name(self) -> &'static str;
}

impl ProblemKind for TaskKind {
    fn name(self) -> &'static str {
        TaskKind::name(self)
    }
}

/// One generated prompt with its gold answer and a correct response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Task<K = TaskKind> {
    pub kind: K,
    pub chinese: bool,
    pub prompt: String,
    /// The gold answer, as `prompts.jsonl` holds it.
    pub answer: String,
    /// A correct response in the task's format (with the leading space of the default
    /// "…Assistant:" template); for a sloppy demonstration, the right answer in a wrong format.
    pub response: String,
    /// A demonstration written by a careless demonstrator ([`SimulateParams::sloppy`]).
    pub sloppy: bool,
}

/// What a candidate response is, in the gold preference order (best first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// The correct response, concise.
    Correct,
    /// Correct, padded with filler.
    Verbose,
    /// One wrong step: off by one, the other number, two items swapped, a letter wrong.
    NearlyRight,
    /// The right answer without the "The answer is" form, rambling.
    WrongFormat,
    /// A clearly wrong answer in the right form.
    Wrong,
    /// The empty response.
    Empty,
    /// The prompt's first words, or a stock phrase, repeated many times.
    Repeated,
    /// A refusal ("I'm sorry, I can't help with that." / "抱歉，我无法回答。").
    Refusal,
}

impl CandidateKind {
    /// Tier in the gold preference; equal tiers are equally good.
    pub fn tier(self) -> u32 {
        match self {
            CandidateKind::Correct => 0,
            CandidateKind::Verbose => 1,
            CandidateKind::NearlyRight => 2,
            CandidateKind::WrongFormat | CandidateKind::Wrong => 3,
            CandidateKind::Empty | CandidateKind::Repeated | CandidateKind::Refusal => 4,
        }
    }

    /// The name in `task.json` and `heldout_candidates.jsonl`.
    pub fn name(self) -> &'static str {
        match self {
            CandidateKind::Correct => "correct",
            CandidateKind::Verbose => "verbose",
            CandidateKind::NearlyRight => "nearly_right",
            CandidateKind::WrongFormat => "wrong_format",
            CandidateKind::Wrong => "wrong",
            CandidateKind::Empty => "empty",
            CandidateKind::Repeated => "repeated",
            CandidateKind::Refusal => "refusal",
        }
    }

    /// The degenerate responses a policy finds when it hacks a reward model, offered to the
    /// labelers in a share ([`DEGENERATE_SHARE`] each) of the comparisons of a task family.
    pub const DEGENERATE: [CandidateKind; 3] = [
        CandidateKind::Empty,
        CandidateKind::Repeated,
        CandidateKind::Refusal,
    ];
}

/// Share of a task family's comparisons that offer each degenerate candidate
/// ([`CandidateKind::DEGENERATE`]), so that the reward model rarely sees them.
pub const DEGENERATE_SHARE: f64 = 0.15;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    /// `r1` … `rK`, in the (shuffled) order of the sheet.
    pub id: String,
    pub kind: CandidateKind,
    pub response: String,
}

/// One labeler's ranks of a comparison prompt's candidates (in candidate order; 1 = best, equal =
/// tie).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelerRanking {
    pub labeler_id: String,
    pub ranks: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimulatedComparison<K = TaskKind> {
    pub prompt_id: String,
    pub task: Task<K>,
    pub candidates: Vec<Candidate>,
    pub rankings: Vec<LabelerRanking>,
}

/// A held-out prompt's candidates with the gold rule's score of each (in candidate order).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeldoutPrompt<K = TaskKind> {
    pub prompt_id: String,
    pub task: Task<K>,
    pub candidates: Vec<Candidate>,
    pub gold: Vec<f32>,
}

/// What a task family is, as `task.json` states it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    /// None for the demo (its committed `task.json` predates families and has no such key).
    pub family: Option<String>,
    /// The rule string `evaluate --gold` and ppo's `reward.rule` take.
    pub gold_rule: String,
    pub chinese_fraction: f64,
    pub preference: String,
}

impl TaskSpec {
    fn demo() -> Self {
        Self {
            family: None,
            gold_rule: "final_answer".into(),
            chinese_fraction: CHINESE_FRACTION,
            preference: "correct > verbose > nearly_right > wrong_format = wrong".into(),
        }
    }
}

/// Everything the generator made, before it is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Simulated<K = TaskKind> {
    pub params: SimulateParams,
    pub spec: TaskSpec,
    pub demonstrations: Vec<Task<K>>,
    pub prompts: Vec<Task<K>>,
    pub eval_prompts: Vec<Task<K>>,
    pub comparisons: Vec<SimulatedComparison<K>>,
    /// Each labeler's swap probability.
    pub labeler_noise: Vec<(String, f64)>,
    /// `heldout_candidates.jsonl`'s prompts (none unless asked for).
    pub heldout: Vec<HeldoutPrompt<K>>,
}

/// What `task.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct TaskInfo {
    pub generator: String,
    /// The task family (`labeling simulate --family`); absent for the demo.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    pub params: SimulateParams,
    pub chinese_fraction: f64,
    pub gold_rule: String,
    pub preference: String,
    pub labeler_noise: BTreeMap<String, f64>,
    /// File → data lines (rows without the header for the CSV).
    pub files: BTreeMap<String, usize>,
    /// File → task kind → prompts.
    pub task_kinds: BTreeMap<String, BTreeMap<String, usize>>,
    /// File → prompts in Chinese.
    pub chinese_prompts: BTreeMap<String, usize>,
    /// Demonstrations written by careless demonstrators (right answer, wrong format).
    pub sloppy_demonstrations: usize,
    pub labels: LabelSummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct LabelSummary {
    pub groups: usize,
    pub groups_with_ties: usize,
    /// Candidate kind → how many times it was offered.
    pub candidates: BTreeMap<String, usize>,
    /// Share of groups that rank the correct candidate 1 (alone or tied).
    pub correct_ranked_first: f64,
    pub pairwise_agreement: Option<f64>,
    pub fleiss_kappa: Option<f64>,
}

const DEMONSTRATIONS: &str = "demonstrations.jsonl";
const PROMPTS: &str = "prompts.jsonl";
const EVAL_PROMPTS: &str = "eval_prompts.jsonl";
const RANKINGS: &str = "rankings.csv";
const TASK_JSON: &str = "task.json";
pub const HELDOUT_CANDIDATES: &str = "heldout_candidates.jsonl";

/// Generates the task, writes it into `out` atomically (a temporary sibling folder renamed into
/// place) and returns what `task.json` says.
pub fn simulate_to_dir(params: &SimulateParams, out: &Path) -> Result<TaskInfo> {
    generate(params)?.write_dir(out)
}

/// Generates the task in memory.
pub fn generate(params: &SimulateParams) -> Result<Simulated> {
    validate(
        params,
        5,
        "(correct, verbose, nearly right, wrong format, wrong)",
    )?;
    let g = Generator {
        rng: StdRng::seed_from_u64(params.seed),
        keys: HashSet::new(),
        prompts: HashSet::new(),
    };
    run_pipeline(g, params, TaskSpec::demo())
}

/// A task generator, the demo's or a task family's: what [`run_pipeline`] asks of it. The
/// pipeline's draws go in the order evaluation prompts, (held-out candidates,) PPO prompts,
/// comparisons, demonstrations (, held-out candidates); the two consts keep each generator's own
/// order of draws, so that a seed gives the files it always gave.
pub(crate) trait TaskGenerator {
    type Kind: ProblemKind;
    type Problem;
    /// Held-out candidates right after the evaluation prompts (the families: drawn before the
    /// small problem sets run out), or else last (the demo: so that the other files do not
    /// depend on them).
    const HELDOUT_FIRST: bool;
    /// Each demonstration's careless-or-not draw right after its task (the families), or else
    /// after all of the demonstrations' tasks (the demo).
    const SLOPPY_INTERLEAVED: bool;

    fn rng(&mut self) -> &mut StdRng;
    /// A new problem (never used before in any file), worded.
    fn task(&mut self) -> Result<(Task<Self::Kind>, Self::Problem)>;
    /// A comparison's K candidates, in the sheet's order.
    fn candidates(
        &mut self,
        task: &Task<Self::Kind>,
        problem: &Self::Problem,
        k: usize,
    ) -> Vec<Candidate>;
    /// A held-out prompt's candidates ([`heldout_kinds`]), in the file's order.
    fn heldout_candidates(
        &mut self,
        task: &Task<Self::Kind>,
        problem: &Self::Problem,
    ) -> Vec<Candidate>;
    /// A careless demonstrator's response: the right answer in a wrong form.
    fn sloppy_response(&mut self, task: &Task<Self::Kind>, problem: &Self::Problem) -> String;
}

/// Generates a task in memory with `g`: the files' prompts, the held-out candidates, the
/// comparisons with every labeler's ranks, and the demonstrations, in `g`'s order of draws.
pub(crate) fn run_pipeline<G: TaskGenerator>(
    mut g: G,
    params: &SimulateParams,
    spec: TaskSpec,
) -> Result<Simulated<G::Kind>> {
    let rule = gold_rule(&spec.gold_rule)?;
    let heldout_prompts = |g: &mut G| -> Result<Vec<HeldoutPrompt<G::Kind>>> {
        let mut heldout = Vec::with_capacity(params.heldout_candidates);
        for i in 0..params.heldout_candidates {
            let (task, problem) = g.task()?;
            let candidates = g.heldout_candidates(&task, &problem);
            heldout.push(HeldoutPrompt::scored(
                format!("h{}", i + 1),
                task,
                candidates,
                &rule,
            )?);
        }
        Ok(heldout)
    };
    // Evaluation first, so that its prompts depend on the seed and their count only.
    let eval_prompts = tasks(&mut g, params.eval_prompts)?;
    let mut heldout = Vec::new();
    if G::HELDOUT_FIRST {
        heldout = heldout_prompts(&mut g)?;
    }
    let prompts = tasks(&mut g, params.train_prompts)?;
    let labeler_noise = labeler_noise(params);
    let mut comparisons = Vec::with_capacity(params.comparison_prompts);
    for i in 0..params.comparison_prompts {
        let (task, problem) = g.task()?;
        let candidates = g.candidates(&task, &problem, params.k);
        let rankings = labeler_noise
            .iter()
            .map(|(id, noise)| LabelerRanking {
                labeler_id: id.clone(),
                ranks: rank(g.rng(), &candidates, *noise),
            })
            .collect();
        comparisons.push(SimulatedComparison {
            prompt_id: format!("p{}", i + 1),
            task,
            candidates,
            rankings,
        });
    }
    let demonstration = |g: &mut G, mut task: Task<G::Kind>, problem: &G::Problem| {
        if g.rng().random_bool(params.sloppy) {
            task.response = g.sloppy_response(&task, problem);
            task.sloppy = true;
        }
        task
    };
    let demonstrations = if G::SLOPPY_INTERLEAVED {
        (0..params.demonstrations)
            .map(|_| {
                let (task, problem) = g.task()?;
                Ok(demonstration(&mut g, task, &problem))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let drawn = (0..params.demonstrations)
            .map(|_| g.task())
            .collect::<Result<Vec<_>>>()?;
        drawn
            .into_iter()
            .map(|(task, problem)| demonstration(&mut g, task, &problem))
            .collect()
    };
    if !G::HELDOUT_FIRST {
        heldout = heldout_prompts(&mut g)?;
    }
    Ok(Simulated {
        params: params.clone(),
        spec,
        demonstrations,
        prompts,
        eval_prompts,
        comparisons,
        labeler_noise,
        heldout,
    })
}

/// `n` new tasks.
fn tasks<G: TaskGenerator>(g: &mut G, n: usize) -> Result<Vec<Task<G::Kind>>> {
    (0..n).map(|_| g.task().map(|t| t.0)).collect()
}

/// The checks every family's parameters pass; `max_k` and `kinds` say how many candidate kinds
/// a family has for a comparison (the degenerate ones aside).
pub(crate) fn validate(params: &SimulateParams, max_k: usize, kinds: &str) -> Result<()> {
    ensure!(
        (2..=max_k).contains(&params.k),
        "--k {}: the simulated candidates are 2 to {max_k} per prompt {kinds}",
        params.k
    );
    ensure!(
        (0.0..=1.0).contains(&params.noise),
        "--noise {}: a probability in [0, 1]",
        params.noise
    );
    ensure!(
        (0.0..=1.0).contains(&params.sloppy),
        "--sloppy {}: a share in [0, 1]",
        params.sloppy
    );
    ensure!(
        params.labelers >= 1,
        "--labelers must be at least 1 (2 or more for agreement statistics)"
    );
    for (n, flag) in [
        (params.train_prompts, "--train-prompts"),
        (params.eval_prompts, "--eval-prompts"),
        (params.demonstrations, "--demonstrations"),
        (params.comparison_prompts, "--comparison-prompts"),
    ] {
        ensure!(n >= 1, "{flag} must be at least 1");
    }
    Ok(())
}

/// Each labeler's swap probability: `noise` scaled from 0.5× (the first) to 1.5× (the last).
pub(crate) fn labeler_noise(params: &SimulateParams) -> Vec<(String, f64)> {
    (0..params.labelers)
        .map(|j| {
            let scale = if params.labelers == 1 {
                1.0
            } else {
                0.5 + j as f64 / (params.labelers - 1) as f64
            };
            (format!("labeler{}", j + 1), (params.noise * scale).min(1.0))
        })
        .collect()
}

/// The family's gold rule, compiled.
pub(crate) fn gold_rule(rule: &str) -> Result<datasets::CompiledRule> {
    datasets::parse_rule(rule)
        .and_then(|r| r.compile())
        .map_err(|e| anyhow::anyhow!("gold rule {rule:?}: {e}"))
}

/// A held-out prompt's candidate kinds, shuffled: correct, nearly right, wrong format and wrong,
/// with one or two of the degenerate kinds.
pub(crate) fn heldout_kinds(rng: &mut StdRng) -> Vec<CandidateKind> {
    let mut degenerate = CandidateKind::DEGENERATE.to_vec();
    degenerate.shuffle(rng);
    degenerate.truncate(if rng.random_bool(0.5) { 2 } else { 1 });
    let mut kinds = vec![
        CandidateKind::Correct,
        CandidateKind::NearlyRight,
        CandidateKind::WrongFormat,
        CandidateKind::Wrong,
    ];
    kinds.extend(degenerate);
    kinds.shuffle(rng);
    kinds
}

impl<K> HeldoutPrompt<K> {
    /// The candidates with the gold rule's score of each against the task's answer.
    pub(crate) fn scored(
        prompt_id: String,
        task: Task<K>,
        candidates: Vec<Candidate>,
        rule: &datasets::CompiledRule,
    ) -> Result<Self> {
        let gold = candidates
            .iter()
            .map(|c| {
                rule.score(&c.response, Some(&task.answer))
                    .map_err(|e| anyhow::anyhow!("{prompt_id}: {e}"))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            prompt_id,
            task,
            candidates,
            gold,
        })
    }
}

const REFUSALS_EN: &[&str] = &[
    " I'm sorry, I can't help with that.",
    " Sorry, I cannot answer that.",
    " I'm not able to help with this request.",
];
const REFUSALS_ZH: &[&str] = &[" 抱歉，我无法回答。", " 对不起，这个问题我不能回答。"];
const REPEATED_EN: &[&str] = &["the answer is", "let me think", "yes yes"];
const REPEATED_ZH: &[&str] = &["答案是", "我想想", "好的"];

/// A degenerate response ([`CandidateKind::DEGENERATE`]) to `prompt`: empty; the prompt's first
/// three words (four characters in Chinese), or a stock phrase, repeated 6 to 12 times; or a
/// refusal.
pub(crate) fn degenerate(kind: CandidateKind, prompt: &str, zh: bool, rng: &mut StdRng) -> String {
    match kind {
        CandidateKind::Repeated => {
            let unit = if rng.random_bool(0.5) {
                if zh {
                    prompt.chars().take(4).collect()
                } else {
                    prompt
                        .split_whitespace()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            } else {
                let phrases = if zh { REPEATED_ZH } else { REPEATED_EN };
                phrases.choose(rng).expect("phrases").to_string()
            };
            let times = rng.random_range(6..=12);
            let sep = if zh { "" } else { " " };
            format!(" {}", vec![unit; times].join(sep))
        }
        CandidateKind::Refusal => {
            let refusals = if zh { REFUSALS_ZH } else { REFUSALS_EN };
            refusals.choose(rng).expect("refusals").to_string()
        }
        _ => String::new(),
    }
}

impl<K: ProblemKind> Simulated<K> {
    /// The rankings as the importer reads them back (one group per prompt and labeler).
    pub fn ranked_groups(&self) -> Vec<RankedGroup> {
        let mut out = Vec::new();
        let mut line = 2;
        for c in &self.comparisons {
            for r in &c.rankings {
                out.push(RankedGroup {
                    prompt_id: c.prompt_id.clone(),
                    prompt: c.task.prompt.clone(),
                    labeler_id: r.labeler_id.clone(),
                    response_ids: c.candidates.iter().map(|x| x.id.clone()).collect(),
                    responses: c.candidates.iter().map(|x| x.response.clone()).collect(),
                    ranks: r.ranks.clone(),
                    line,
                });
                line += c.candidates.len();
            }
        }
        out
    }

    /// Counts and label statistics.
    pub fn info(&self) -> TaskInfo {
        let groups = self.ranked_groups();
        let (pa, kappa) = match crate::pairs::agreement(&groups) {
            Some((a, k)) => (Some(a), Some(k)),
            None => (None, None),
        };
        let mut candidates: BTreeMap<String, usize> = BTreeMap::new();
        let (mut first, mut with_ties) = (0usize, 0usize);
        for c in &self.comparisons {
            for x in &c.candidates {
                *candidates.entry(x.kind.name().to_string()).or_default() += 1;
            }
            let correct = c
                .candidates
                .iter()
                .position(|x| x.kind == CandidateKind::Correct)
                .expect("every comparison has a correct candidate");
            for r in &c.rankings {
                first += usize::from(r.ranks[correct] == 1);
                let distinct: HashSet<u32> = r.ranks.iter().copied().collect();
                with_ties += usize::from(distinct.len() < r.ranks.len());
            }
        }
        let files: [(&str, &[Task<K>]); 3] = [
            (DEMONSTRATIONS, &self.demonstrations),
            (PROMPTS, &self.prompts),
            (EVAL_PROMPTS, &self.eval_prompts),
        ];
        let ranking_tasks: Vec<Task<K>> = self.comparisons.iter().map(|c| c.task.clone()).collect();
        let heldout_tasks: Vec<Task<K>> = self.heldout.iter().map(|h| h.task.clone()).collect();
        let mut derived: Vec<(&str, &[Task<K>])> = vec![(RANKINGS, &ranking_tasks[..])];
        if !heldout_tasks.is_empty() {
            derived.push((HELDOUT_CANDIDATES, &heldout_tasks[..]));
        }
        let mut task_kinds = BTreeMap::new();
        let mut chinese_prompts = BTreeMap::new();
        for (name, tasks) in files.into_iter().chain(derived) {
            let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
            for t in tasks {
                *kinds.entry(t.kind.name().to_string()).or_default() += 1;
            }
            task_kinds.insert(name.to_string(), kinds);
            chinese_prompts.insert(name.to_string(), tasks.iter().filter(|t| t.chinese).count());
        }
        let rows: usize = self
            .comparisons
            .iter()
            .map(|c| c.candidates.len() * c.rankings.len())
            .sum();
        let mut files = BTreeMap::from([
            (DEMONSTRATIONS.to_string(), self.demonstrations.len()),
            (PROMPTS.to_string(), self.prompts.len()),
            (EVAL_PROMPTS.to_string(), self.eval_prompts.len()),
            (RANKINGS.to_string(), rows),
        ]);
        if !self.heldout.is_empty() {
            let lines = self.heldout.iter().map(|h| h.candidates.len()).sum();
            files.insert(HELDOUT_CANDIDATES.to_string(), lines);
        }
        TaskInfo {
            generator: "labeling simulate".into(),
            family: self.spec.family.clone(),
            params: self.params.clone(),
            chinese_fraction: self.spec.chinese_fraction,
            gold_rule: self.spec.gold_rule.clone(),
            preference: self.spec.preference.clone(),
            labeler_noise: self.labeler_noise.iter().cloned().collect(),
            files,
            task_kinds,
            chinese_prompts,
            sloppy_demonstrations: self.demonstrations.iter().filter(|t| t.sloppy).count(),
            labels: LabelSummary {
                groups: groups.len(),
                groups_with_ties: with_ties,
                candidates,
                correct_ranked_first: first as f64 / groups.len().max(1) as f64,
                pairwise_agreement: pa,
                fleiss_kappa: kappa,
            },
        }
    }

    /// Writes the five files (six with held-out candidates) into `out` atomically: into a temporary sibling folder first, renamed
    /// into place when all is written.
    pub fn write_dir(&self, out: &Path) -> Result<TaskInfo> {
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "task".into());
        let tmp = out.with_file_name(format!(".{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

        #[derive(Serialize)]
        struct Demo<'a> {
            prompt: &'a str,
            response: &'a str,
        }
        #[derive(Serialize)]
        struct Prompt<'a> {
            prompt: &'a str,
            answer: &'a str,
        }
        let demos: Vec<String> = self
            .demonstrations
            .iter()
            .map(|t| {
                serde_json::to_string(&Demo {
                    prompt: &t.prompt,
                    response: &t.response,
                })
            })
            .collect::<Result<_, _>>()?;
        write_lines(&tmp.join(DEMONSTRATIONS), &demos)?;
        for (file, tasks) in [(PROMPTS, &self.prompts), (EVAL_PROMPTS, &self.eval_prompts)] {
            let lines: Vec<String> = tasks
                .iter()
                .map(|t| {
                    serde_json::to_string(&Prompt {
                        prompt: &t.prompt,
                        answer: &t.answer,
                    })
                })
                .collect::<Result<_, _>>()?;
            write_lines(&tmp.join(file), &lines)?;
        }
        let csv_path = tmp.join(RANKINGS);
        let mut w = csv::Writer::from_path(&csv_path)
            .with_context(|| format!("creating {}", csv_path.display()))?;
        w.write_record(LONG_HEADER)?;
        for c in &self.comparisons {
            for r in &c.rankings {
                for (x, rank) in c.candidates.iter().zip(&r.ranks) {
                    w.write_record([
                        c.prompt_id.as_str(),
                        &c.task.prompt,
                        &x.id,
                        &x.response,
                        &r.labeler_id,
                        &rank.to_string(),
                    ])?;
                }
            }
        }
        w.flush()
            .with_context(|| format!("writing {}", csv_path.display()))?;
        drop(w);
        if !self.heldout.is_empty() {
            #[derive(Serialize)]
            struct Line<'a> {
                prompt_id: &'a str,
                prompt: &'a str,
                answer: &'a str,
                response: &'a str,
                kind: &'a str,
                gold: f32,
            }
            let mut lines = Vec::new();
            for h in &self.heldout {
                for (c, gold) in h.candidates.iter().zip(&h.gold) {
                    lines.push(serde_json::to_string(&Line {
                        prompt_id: &h.prompt_id,
                        prompt: &h.task.prompt,
                        answer: &h.task.answer,
                        response: &c.response,
                        kind: c.kind.name(),
                        gold: *gold,
                    })?);
                }
            }
            write_lines(&tmp.join(HELDOUT_CANDIDATES), &lines)?;
        }
        let info = self.info();
        let info_path = tmp.join(TASK_JSON);
        std::fs::write(&info_path, serde_json::to_string_pretty(&info)? + "\n")
            .with_context(|| format!("writing {}", info_path.display()))?;
        model::checkpoint::replace_dir(&tmp, out)?;
        Ok(info)
    }
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        text.push_str(l);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Words for the counting-words task.
pub(crate) const PHRASE_WORDS: &[&str] = &[
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown", "cat", "dog", "bird",
    "fish", "cow", "horse", "duck", "frog", "apple", "pear", "plum", "grape", "lemon", "bread",
    "milk", "rice", "tea", "sun", "moon", "star", "rain", "snow", "wind", "tree", "hill", "lake",
    "road", "house", "door", "book", "pen", "cup", "chair", "table", "ship", "car", "train",
    "happy", "small", "big", "fast", "slow",
];

/// Words for the letter tasks (3 to 8 letters).
pub(crate) const WORDS: &[&str] = &[
    "cat", "dog", "sun", "hat", "cup", "pen", "box", "bed", "map", "egg", "bus", "fox", "owl",
    "pig", "ant", "bee", "cow", "jam", "key", "toy", "arm", "leg", "ear", "eye", "sky", "sea",
    "ice", "oak", "fig", "tea", "book", "fish", "tree", "moon", "star", "rain", "snow", "wind",
    "road", "door", "ship", "lamp", "milk", "rice", "cake", "bird", "frog", "duck", "goat", "lion",
    "bear", "wolf", "deer", "hand", "foot", "nose", "hair", "ring", "bell", "coin", "rose", "leaf",
    "seed", "rock", "sand", "wave", "boat", "kite", "drum", "sock", "shoe", "coat", "desk", "wall",
    "gate", "city", "farm", "king", "song", "game", "apple", "bread", "chair", "table", "house",
    "horse", "mouse", "sheep", "tiger", "zebra", "camel", "snake", "whale", "shark", "plant",
    "grass", "cloud", "storm", "river", "ocean", "beach", "stone", "brick", "glass", "paper",
    "pencil", "clock", "watch", "phone", "light", "water", "juice", "sugar", "honey", "lemon",
    "grape", "peach", "melon", "onion", "pizza", "candy", "happy", "quiet", "green", "black",
    "white", "brown", "sweet", "smile", "dance", "music", "piano", "story", "dream", "night",
    "party", "train", "truck", "plane", "wheel", "money", "heart", "mouth", "tooth", "thumb",
    "garden", "flower", "forest", "island", "bridge", "castle", "window", "bottle", "basket",
    "button", "candle", "pillow", "mirror", "rabbit", "monkey", "turtle", "spider", "donkey",
    "parrot", "orange", "banana", "cherry", "carrot", "butter", "cookie", "yellow", "purple",
    "silver", "winter", "summer", "spring", "autumn", "friend", "family", "school", "doctor",
    "farmer", "letter", "number", "animal", "travel", "rocket", "planet", "dragon", "jacket",
    "kitten", "puppy", "chicken", "blanket", "morning", "evening", "rainbow", "teacher", "kitchen",
    "library", "picture", "weather", "diamond", "giraffe", "penguin", "dolphin", "blossom",
    "thunder", "village", "holiday", "balloon", "elephant", "mountain", "sandwich", "dinosaur",
    "umbrella", "notebook", "sunshine", "airplane", "football", "pancake",
];

pub(crate) const VERBOSE_PREFIX_EN: &[&str] = &[
    "Good question!",
    "Sure, I can help with that.",
    "Let me think about this step by step.",
    "Okay, let's work this out carefully.",
    "That is a nice little problem.",
];
pub(crate) const VERBOSE_SUFFIX_EN: &[&str] = &[
    "I hope this helps!",
    "Let me know if you have any other questions.",
    "That was a fun one to work out.",
    "Feel free to ask me anything else.",
];
pub(crate) const VERBOSE_PREFIX_ZH: &[&str] =
    &["好问题！", "让我一步一步地想一想。", "我来仔细算一下。"];
pub(crate) const VERBOSE_SUFFIX_ZH: &[&str] = &["希望这对你有帮助！", "如果还有问题，随时问我。"];
const WRONG_FORMAT_EN: &[&str] = &[
    " {}",
    " well, {} i guess",
    " hmm let me see... {}?",
    " it's {} lol",
    " {} (not totally sure)",
];
pub(crate) const WRONG_FORMAT_ZH: &[&str] = &[" {}", " 嗯……{}吧", " 应该是{}？", " 我猜是{}"];

/// The right answer without the task's "The answer is X." form: bare or hedged.
pub(crate) fn wrong_format(answer: &str, zh: bool, rng: &mut StdRng) -> String {
    let forms = if zh { WRONG_FORMAT_ZH } else { WRONG_FORMAT_EN };
    forms.choose(rng).expect("forms").replacen("{}", answer, 1)
}

/// A problem before it is worded.
#[derive(Clone, Debug)]
pub(crate) enum Problem {
    Add(u32, u32),
    Sub(u32, u32),
    Compare { a: u32, b: u32, larger: bool },
    CountWords(Vec<&'static str>),
    CountLetters(&'static str),
    Sort { nums: Vec<u32>, ascending: bool },
    Spell(&'static str),
}

fn list(nums: &[u32]) -> String {
    nums.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn spelled(word: &str) -> String {
    word.chars().map(String::from).collect::<Vec<_>>().join("-")
}

impl Problem {
    fn kind(&self) -> TaskKind {
        match self {
            Problem::Add(..) => TaskKind::Add,
            Problem::Sub(..) => TaskKind::Sub,
            Problem::Compare { .. } => TaskKind::Compare,
            Problem::CountWords(_) => TaskKind::CountWords,
            Problem::CountLetters(_) => TaskKind::CountLetters,
            Problem::Sort { .. } => TaskKind::Sort,
            Problem::Spell(_) => TaskKind::Spell,
        }
    }

    /// The same key for the same problem, whatever its wording or language.
    fn key(&self) -> String {
        match self {
            Problem::Add(a, b) => format!("add {a} {b}"),
            Problem::Sub(a, b) => format!("sub {a} {b}"),
            Problem::Compare { a, b, larger } => {
                format!("compare {} {} {larger}", a.min(b), a.max(b))
            }
            Problem::CountWords(w) => format!("words {}", w.join(" ")),
            Problem::CountLetters(w) => format!("letters {w}"),
            Problem::Sort { nums, ascending } => format!("sort {nums:?} {ascending}"),
            Problem::Spell(w) => format!("spell {w}"),
        }
    }

    fn answer(&self) -> String {
        match self {
            Problem::Add(a, b) => (a + b).to_string(),
            Problem::Sub(a, b) => (a - b).to_string(),
            Problem::Compare { a, b, larger } => if *larger == (a > b) { a } else { b }.to_string(),
            Problem::CountWords(w) => w.len().to_string(),
            Problem::CountLetters(w) => w.chars().count().to_string(),
            Problem::Sort { nums, ascending } => list(&sorted(nums, *ascending)),
            Problem::Spell(w) => spelled(w),
        }
    }

    fn prompt(&self, zh: bool, rng: &mut StdRng) -> String {
        let pick = |rng: &mut StdRng, n: usize| rng.random_range(0..n);
        match (self, zh) {
            (Problem::Add(a, b), false) => match pick(rng, 4) {
                0 => format!("What is {a} plus {b}?"),
                1 => format!("What is {a} + {b}?"),
                2 => format!("Add {a} and {b}."),
                _ => format!("Compute {a} plus {b}."),
            },
            (Problem::Add(a, b), true) => match pick(rng, 3) {
                0 => format!("{a}加{b}等于多少？"),
                1 => format!("计算{a}加{b}。"),
                _ => format!("{a}+{b}等于几？"),
            },
            (Problem::Sub(a, b), false) => match pick(rng, 4) {
                0 => format!("What is {a} minus {b}?"),
                1 => format!("What is {a} - {b}?"),
                2 => format!("Subtract {b} from {a}."),
                _ => format!("Compute {a} minus {b}."),
            },
            (Problem::Sub(a, b), true) => match pick(rng, 3) {
                0 => format!("{a}减{b}等于多少？"),
                1 => format!("计算{a}减{b}。"),
                _ => format!("{a}-{b}等于几？"),
            },
            (Problem::Compare { a, b, larger }, false) => {
                let (adj, alt) = if *larger {
                    ("larger", "bigger")
                } else {
                    ("smaller", "less")
                };
                match pick(rng, 2) {
                    0 => format!("Which is {adj}, {a} or {b}?"),
                    _ => format!("Which number is {alt}: {a} or {b}?"),
                }
            }
            (Problem::Compare { a, b, larger }, true) => {
                let adj = if *larger { "大" } else { "小" };
                match pick(rng, 2) {
                    0 => format!("{a}和{b}哪个更{adj}？"),
                    _ => format!("{a}和{b}，哪个数{adj}？"),
                }
            }
            (Problem::CountWords(w), false) => {
                let p = w.join(" ");
                match pick(rng, 3) {
                    0 => format!("How many words are in '{p}'?"),
                    1 => format!("Count the words in '{p}'."),
                    _ => format!("How many words does '{p}' have?"),
                }
            }
            (Problem::CountWords(w), true) => {
                let p = w.join(" ");
                match pick(rng, 2) {
                    0 => format!("'{p}'里有几个单词？"),
                    _ => format!("数一数'{p}'有几个单词。"),
                }
            }
            (Problem::CountLetters(w), false) => match pick(rng, 3) {
                0 => format!("How many letters are in the word '{w}'?"),
                1 => format!("How many letters does '{w}' have?"),
                _ => format!("Count the letters in '{w}'."),
            },
            (Problem::CountLetters(w), true) => match pick(rng, 2) {
                0 => format!("单词'{w}'有几个字母？"),
                _ => format!("数一数'{w}'有几个字母。"),
            },
            (Problem::Sort { nums, ascending }, false) => {
                let l = list(nums);
                match (pick(rng, 2), ascending) {
                    (0, true) => format!("Sort {l} from smallest to largest."),
                    (0, false) => format!("Sort {l} from largest to smallest."),
                    (_, true) => format!("Put {l} in increasing order."),
                    (_, false) => format!("Put {l} in decreasing order."),
                }
            }
            (Problem::Sort { nums, ascending }, true) => {
                let l = nums
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join("、");
                let order = if *ascending {
                    "从小到大"
                } else {
                    "从大到小"
                };
                match pick(rng, 2) {
                    0 => format!("把{l}{order}排列。"),
                    _ => format!("请将{l}按{order}的顺序排好。"),
                }
            }
            (Problem::Spell(w), false) => match pick(rng, 3) {
                0 => format!("Spell the word '{w}' letter by letter."),
                1 => format!("Spell '{w}' one letter at a time."),
                _ => format!("How do you spell '{w}' letter by letter?"),
            },
            (Problem::Spell(w), true) => match pick(rng, 2) {
                0 => format!("把单词'{w}'逐个字母拼出来。"),
                _ => format!("请逐个字母拼写'{w}'。"),
            },
        }
    }

    /// The task's response format, stating `answer` (right or wrong), with one step of work
    /// consistent with it.
    fn response(&self, zh: bool, answer: &str) -> String {
        match (self, zh) {
            (Problem::Add(a, b), false) => {
                format!(" {a} plus {b} is {answer}. The answer is {answer}.")
            }
            (Problem::Add(a, b), true) => format!(" {a}加{b}等于{answer}。答案是{answer}。"),
            (Problem::Sub(a, b), false) => {
                format!(" {a} minus {b} is {answer}. The answer is {answer}.")
            }
            (Problem::Sub(a, b), true) => format!(" {a}减{b}等于{answer}。答案是{answer}。"),
            (Problem::Compare { a, b, larger }, _) => {
                let other = if answer == a.to_string() { b } else { a };
                match (zh, larger) {
                    (false, true) => {
                        format!(" {answer} is larger than {other}. The answer is {answer}.")
                    }
                    (false, false) => {
                        format!(" {answer} is smaller than {other}. The answer is {answer}.")
                    }
                    (true, true) => format!(" {answer}比{other}大。答案是{answer}。"),
                    (true, false) => format!(" {answer}比{other}小。答案是{answer}。"),
                }
            }
            (Problem::CountWords(w), false) => {
                format!(" The words are {}. The answer is {answer}.", w.join(", "))
            }
            (Problem::CountWords(w), true) => {
                format!(" 单词是{}。答案是{answer}。", w.join("、"))
            }
            (Problem::CountLetters(w), false) => {
                format!(" {w} is spelled {}. The answer is {answer}.", spelled(w))
            }
            (Problem::CountLetters(w), true) => {
                format!(" {w}的拼写是{}。答案是{answer}。", spelled(w))
            }
            (Problem::Sort { .. } | Problem::Spell(_), false) => {
                format!(" The answer is {answer}.")
            }
            (Problem::Sort { .. } | Problem::Spell(_), true) => format!(" 答案是{answer}。"),
        }
    }

    /// An answer one step off: off by one, the other number, two neighbours swapped, a letter
    /// swapped or dropped.
    fn nearly_right(&self, rng: &mut StdRng) -> String {
        let off_by_one = |rng: &mut StdRng, c: u32, min: u32| -> String {
            if c > min && rng.random_bool(0.5) {
                (c - 1).to_string()
            } else {
                (c + 1).to_string()
            }
        };
        match self {
            Problem::Add(a, b) => off_by_one(rng, a + b, 0),
            Problem::Sub(a, b) => off_by_one(rng, a - b, 0),
            Problem::Compare { a, b, larger } => if *larger == (a > b) { b } else { a }.to_string(),
            Problem::CountWords(w) => off_by_one(rng, w.len() as u32, 1),
            Problem::CountLetters(w) => off_by_one(rng, w.chars().count() as u32, 1),
            Problem::Sort { nums, ascending } => {
                let mut s = sorted(nums, *ascending);
                let i = rng.random_range(0..s.len() - 1);
                s.swap(i, i + 1);
                list(&s)
            }
            Problem::Spell(w) => {
                let mut c: Vec<char> = w.chars().collect();
                let swappable: Vec<usize> =
                    (0..c.len() - 1).filter(|&i| c[i] != c[i + 1]).collect();
                match swappable.choose(rng) {
                    Some(&i) if rng.random_bool(0.5) => c.swap(i, i + 1),
                    _ => {
                        let i = rng.random_range(0..c.len());
                        c.remove(i);
                    }
                }
                spelled(&c.iter().collect::<String>())
            }
        }
    }

    /// A clearly wrong answer, different from the correct and the nearly right ones.
    fn wrong(&self, rng: &mut StdRng, avoid: &[&str]) -> String {
        for _ in 0..1000 {
            let cand = match self {
                Problem::Add(a, b) => rng.random_range(0..=(a + b + 20)).to_string(),
                Problem::Sub(a, _) => rng.random_range(0..=(a + 10)).to_string(),
                Problem::Compare { .. } => rng.random_range(0..100u32).to_string(),
                Problem::CountWords(w) => rng.random_range(1..=w.len() as u32 + 4).to_string(),
                Problem::CountLetters(w) => rng
                    .random_range(1..=w.chars().count() as u32 + 4)
                    .to_string(),
                Problem::Sort { nums, ascending } => {
                    let mut s = sorted(nums, *ascending);
                    let i = rng.random_range(0..s.len());
                    s[i] = rng.random_range(0..100);
                    list(&s)
                }
                Problem::Spell(_) => spelled(WORDS.choose(rng).expect("words")),
            };
            let ok = match self {
                // Not one of the two numbers asked about.
                Problem::Compare { a, b, .. } => cand != a.to_string() && cand != b.to_string(),
                // Off by more than one.
                Problem::Add(..)
                | Problem::Sub(..)
                | Problem::CountWords(_)
                | Problem::CountLetters(_) => {
                    let c: i64 = self.answer().parse().expect("numeric answer");
                    let x: i64 = cand.parse().expect("numeric candidate");
                    (x - c).abs() > 1
                }
                _ => true,
            };
            if ok && !avoid.contains(&cand.as_str()) {
                return cand;
            }
        }
        // Unreachable for the ranges above; a distinct answer all the same.
        format!("{}0", self.answer())
    }
}

fn sorted(nums: &[u32], ascending: bool) -> Vec<u32> {
    let mut s = nums.to_vec();
    s.sort_unstable();
    if !ascending {
        s.reverse();
    }
    s
}

struct Generator {
    rng: StdRng,
    /// Problems used so far, across all files.
    keys: HashSet<String>,
    prompts: HashSet<String>,
}

impl Generator {
    /// A one- or two-digit number, each about half the time.
    fn number(&mut self) -> u32 {
        if self.rng.random_bool(0.5) {
            self.rng.random_range(0..10)
        } else {
            self.rng.random_range(10..100)
        }
    }

    /// An operand of the arithmetic problems: 0 to 20 (sums up to 40), a range whose facts a tiny
    /// model partly learns from a few thousand demonstrations.
    fn operand(&mut self) -> u32 {
        self.rng.random_range(0..=20)
    }

    fn distinct_numbers(&mut self, n: usize) -> Vec<u32> {
        let mut v: Vec<u32> = Vec::with_capacity(n);
        while v.len() < n {
            let x = self.number();
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v
    }

    fn problem(&mut self, kind: TaskKind) -> Problem {
        match kind {
            TaskKind::Add => Problem::Add(self.operand(), self.operand()),
            TaskKind::Sub => {
                let (x, y) = (self.operand(), self.operand());
                Problem::Sub(x.max(y), x.min(y))
            }
            TaskKind::Compare => {
                let v = self.distinct_numbers(2);
                Problem::Compare {
                    a: v[0],
                    b: v[1],
                    larger: self.rng.random_bool(0.5),
                }
            }
            TaskKind::CountWords => {
                let n = self.rng.random_range(2..=6);
                let mut w: Vec<&'static str> = PHRASE_WORDS
                    .choose_multiple(&mut self.rng, n)
                    .copied()
                    .collect();
                w.shuffle(&mut self.rng);
                Problem::CountWords(w)
            }
            TaskKind::CountLetters => {
                Problem::CountLetters(WORDS.choose(&mut self.rng).expect("words"))
            }
            TaskKind::Sort => {
                let n = self.rng.random_range(2..=3);
                let nums = self.distinct_numbers(n);
                Problem::Sort {
                    nums,
                    ascending: self.rng.random_bool(0.7),
                }
            }
            TaskKind::Spell => Problem::Spell(WORDS.choose(&mut self.rng).expect("words")),
        }
    }
}

impl TaskGenerator for Generator {
    type Kind = TaskKind;
    type Problem = Problem;
    const HELDOUT_FIRST: bool = false;
    const SLOPPY_INTERLEAVED: bool = false;

    fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn task(&mut self) -> Result<(Task, Problem)> {
        let total: u32 = TaskKind::ALL.iter().map(|k| k.weight()).sum();
        for _ in 0..100_000 {
            let mut r = self.rng.random_range(0..total);
            let mut kind = TaskKind::Add;
            for k in TaskKind::ALL {
                if r < k.weight() {
                    kind = k;
                    break;
                }
                r -= k.weight();
            }
            let zh = self.rng.random_bool(CHINESE_FRACTION);
            let problem = self.problem(kind);
            if self.keys.contains(&problem.key()) {
                continue;
            }
            let prompt = problem.prompt(zh, &mut self.rng);
            if self.prompts.contains(&prompt) {
                continue;
            }
            self.keys.insert(problem.key());
            self.prompts.insert(prompt.clone());
            let answer = problem.answer();
            let task = Task {
                kind: problem.kind(),
                chinese: zh,
                response: problem.response(zh, &answer),
                prompt,
                answer,
                sloppy: false,
            };
            return Ok((task, problem));
        }
        anyhow::bail!(
            "ran out of distinct problems after {} prompts; ask for fewer",
            self.keys.len()
        )
    }

    /// K candidates: the correct one and K − 1 of the others, in a shuffled order.
    fn candidates(&mut self, task: &Task, problem: &Problem, k: usize) -> Vec<Candidate> {
        let mut others = vec![
            CandidateKind::Verbose,
            CandidateKind::NearlyRight,
            CandidateKind::WrongFormat,
            CandidateKind::Wrong,
        ];
        others.shuffle(&mut self.rng);
        others.truncate(k - 1);
        let mut kinds = vec![CandidateKind::Correct];
        kinds.extend(others);
        kinds.shuffle(&mut self.rng);
        let near = problem.nearly_right(&mut self.rng);
        numbered(kinds, |kind| {
            candidate_response(&mut self.rng, kind, task, problem, &near)
        })
    }

    fn heldout_candidates(&mut self, task: &Task, problem: &Problem) -> Vec<Candidate> {
        let near = problem.nearly_right(&mut self.rng);
        let kinds = heldout_kinds(&mut self.rng);
        numbered(kinds, |kind| {
            candidate_response(&mut self.rng, kind, task, problem, &near)
        })
    }

    fn sloppy_response(&mut self, task: &Task, _problem: &Problem) -> String {
        wrong_format(&task.answer, task.chinese, &mut self.rng)
    }
}

/// Candidates of the given kinds, ids `r1`… in that order, each response drawn in turn.
pub(crate) fn numbered(
    kinds: Vec<CandidateKind>,
    mut response: impl FnMut(CandidateKind) -> String,
) -> Vec<Candidate> {
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| Candidate {
            id: format!("r{}", i + 1),
            kind,
            response: response(kind),
        })
        .collect()
}

/// The response of a candidate of `kind` to the task, `near` its nearly right answer.
fn candidate_response(
    rng: &mut StdRng,
    kind: CandidateKind,
    task: &Task,
    problem: &Problem,
    near: &str,
) -> String {
    let zh = task.chinese;
    match kind {
        CandidateKind::Correct => task.response.clone(),
        CandidateKind::Verbose => verbose(&task.response, zh, rng),
        CandidateKind::NearlyRight => problem.response(zh, near),
        CandidateKind::WrongFormat => wrong_format(&task.answer, zh, rng),
        CandidateKind::Wrong => {
            let wrong = problem.wrong(rng, &[&task.answer, near]);
            problem.response(zh, &wrong)
        }
        CandidateKind::Empty | CandidateKind::Repeated | CandidateKind::Refusal => {
            degenerate(kind, &task.prompt, zh, rng)
        }
    }
}

/// A correct response padded with filler before and after.
pub(crate) fn verbose(response: &str, zh: bool, rng: &mut StdRng) -> String {
    let (pre, suf) = if zh {
        (VERBOSE_PREFIX_ZH, VERBOSE_SUFFIX_ZH)
    } else {
        (VERBOSE_PREFIX_EN, VERBOSE_SUFFIX_EN)
    };
    let sep = if zh { "" } else { " " };
    format!(
        " {}{sep}{}{sep}{}",
        pre.choose(rng).expect("fillers"),
        response.trim_start(),
        suf.choose(rng).expect("fillers")
    )
}

/// One labeler's ranks (in candidate order): the gold order (ties within a tier broken at
/// random), each adjacent pair swapped with probability `noise`, then equal ranks for neighbours
/// of the same tier half the time and for neighbours one tier apart with probability `noise / 2`.
pub(crate) fn rank(rng: &mut StdRng, candidates: &[Candidate], noise: f64) -> Vec<u32> {
    let tiers: Vec<u32> = candidates.iter().map(|c| c.kind.tier()).collect();
    rank_tiers(rng, &tiers, noise)
}

/// One labeler's ranks (1 = best, equal = tie) of responses with these preference tiers (0 =
/// best): by tier in a random order within a tier, each adjacent pair swapped with probability
/// `noise`; neighbours of one tier tied half the time, of adjacent tiers at `noise / 2`.
pub(crate) fn rank_tiers(rng: &mut StdRng, tiers: &[u32], noise: f64) -> Vec<u32> {
    let mut order: Vec<usize> = (0..tiers.len()).collect();
    order.shuffle(rng);
    order.sort_by_key(|&i| tiers[i]);
    for i in 0..order.len() - 1 {
        if rng.random_bool(noise) {
            order.swap(i, i + 1);
        }
    }
    let mut ranks = vec![0u32; tiers.len()];
    let mut r = 1;
    ranks[order[0]] = 1;
    for w in 1..order.len() {
        let (prev, cur) = (tiers[order[w - 1]], tiers[order[w]]);
        let p_tie = match prev.abs_diff(cur) {
            0 => 0.5,
            1 => noise / 2.0,
            _ => 0.0,
        };
        if !rng.random_bool(p_tie) {
            r += 1;
        }
        ranks[order[w]] = r;
    }
    ranks
}
