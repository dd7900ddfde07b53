//! `labeling simulate --family NAME`: a suite of task families unlike the demo, for choosing
//! training defaults (learning rates, KL coefficients, reward-model sizes) that are not tuned to
//! the demo alone. Each family is generated like the demo ([`crate::simulate`]): from a seed, into
//! the same files (`demonstrations.jsonl`, `prompts.jsonl`, `eval_prompts.jsonl`, `rankings.csv`,
//! `task.json`, and `heldout_candidates.jsonl`, 150 prompts by default), with the same simulated
//! labelers, but with its own answer form, gold rule, K, labeler noise and share of careless
//! demonstrators:
//!
//! | family   | problems                                                    | correct form           | gold rule          | K | noise | sloppy | Chinese |
//! |----------|-------------------------------------------------------------|------------------------|--------------------|---|-------|--------|---------|
//! | `words`  | repeat a word N times, reverse, uppercase, last word, dashes | ` stone stone stone`   | `normalized_match` | 3 | 0.10  | 0.4    | 0%      |
//! | `choice` | largest number, longest word, odd one out (A–D)             | ` The answer is (B).`  | `choice`           | 4 | 0.30  | 0.5    | 10%     |
//! | `zh`     | 加减乘, counting characters, comparing                      | ` 7加5等于12。答案是12。` | `final_answer`     | 5 | 0.20  | 0.5    | 100%    |
//! | `json`   | addition, subtraction, counting words and letters           | ` {"answer": 12}`      | `json_answer`      | 2 | 0.15  | 0.6    | 10%     |
//!
//! Careless demonstrators give the right answer in a wrong form, which the gold rule scores 0:
//! `words` wraps it in chatter (" Sure! Here it is: stone stone stone"), `choice` gives the value
//! instead of the letter (" 47"), `zh` a bare or hedged number (" 嗯……12吧"), `json` plain text
//! (" the answer is 12").
//!
//! Besides the demo's candidate kinds (correct; verbose where the gold rule allows it; nearly
//! right; wrong format; wrong), each comparison offers, with probability
//! [`DEGENERATE_SHARE`] each, the degenerate responses a policy finds when it hacks a reward
//! model: an empty response, a repeated one, a refusal. The gold preference ranks them below
//! everything else; since the reward model sees them in few comparisons, the held-out candidates
//! show whether it learned to score them low.
//!
//! `--k`, `--noise`, `--sloppy` and `--heldout-candidates` override a family's values
//! ([`FamilyArgs`]). `task.json` names the family (`"family"`) and its gold rule (`"gold_rule"`,
//! the string `evaluate --gold` and ppo's `reward.rule` take).
//!
//! The `words` gold rule lowercases both sides, so it cannot check the uppercase task's case;
//! the demonstrations and the labelers still teach it.

use crate::simulate::{
    self, Candidate, CandidateKind, DEGENERATE_SHARE, PHRASE_WORDS, ProblemKind, SimulateParams,
    Simulated, Task, TaskGenerator, TaskInfo, TaskSpec, WORDS, degenerate, heldout_kinds, numbered,
    spelled,
};
use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashSet;
use std::path::Path;

/// A task family of `labeling simulate --family`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// The project's demo task (`datasets/demo/task/` is seed 0).
    Demo,
    /// String tasks answered by the bare answer; gold `normalized_match`.
    Words,
    /// Multiple choice answered by a letter; gold `choice`.
    Choice,
    /// Arithmetic, counting and comparing, all in Chinese; gold `final_answer`.
    Zh,
    /// Arithmetic and counting answered as JSON; gold `json_answer`.
    Json,
}

/// A family's own values of the options that `--k`, `--noise`, `--sloppy` and
/// `--heldout-candidates` override.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FamilyDefaults {
    pub k: usize,
    pub noise: f64,
    pub sloppy: f64,
    pub heldout_candidates: usize,
}

impl Family {
    /// The families besides the demo.
    pub const SUITE: [Family; 4] = [Family::Words, Family::Choice, Family::Zh, Family::Json];

    pub fn name(self) -> &'static str {
        match self {
            Family::Demo => "demo",
            Family::Words => "words",
            Family::Choice => "choice",
            Family::Zh => "zh",
            Family::Json => "json",
        }
    }

    /// The gold rule, as `evaluate --gold` and ppo's `reward.rule` take it.
    pub fn gold_rule(self) -> &'static str {
        match self {
            Family::Demo | Family::Zh => "final_answer",
            Family::Words => "normalized_match",
            Family::Choice => "choice",
            Family::Json => "json_answer",
        }
    }

    pub fn defaults(self) -> FamilyDefaults {
        let (k, noise, sloppy, heldout_candidates) = match self {
            Family::Demo => {
                let d = SimulateParams::default();
                (d.k, d.noise, d.sloppy, d.heldout_candidates)
            }
            Family::Words => (3, 0.10, 0.4, 150),
            Family::Choice => (4, 0.30, 0.5, 150),
            Family::Zh => (5, 0.20, 0.5, 150),
            Family::Json => (2, 0.15, 0.6, 150),
        };
        FamilyDefaults {
            k,
            noise,
            sloppy,
            heldout_candidates,
        }
    }

    /// The share of prompts in Chinese.
    pub fn chinese_fraction(self) -> f64 {
        match self {
            Family::Demo => simulate::CHINESE_FRACTION,
            Family::Words => 0.0,
            Family::Choice | Family::Json => 0.1,
            Family::Zh => 1.0,
        }
    }

    /// The kinds of problem, with their weights in the mix.
    fn kinds(self) -> &'static [(SuiteKind, u32)] {
        match self {
            Family::Demo => &[],
            Family::Words => &[
                (SuiteKind::Repeat, 25),
                (SuiteKind::Reverse, 20),
                (SuiteKind::Uppercase, 20),
                (SuiteKind::LastWord, 25),
                (SuiteKind::Dashes, 10),
            ],
            Family::Choice => &[
                (SuiteKind::Largest, 40),
                (SuiteKind::Longest, 30),
                (SuiteKind::OddOneOut, 30),
            ],
            Family::Zh => &[
                (SuiteKind::Add, 25),
                (SuiteKind::Sub, 20),
                (SuiteKind::Mul, 15),
                (SuiteKind::CountChars, 20),
                (SuiteKind::Compare, 20),
            ],
            Family::Json => &[
                (SuiteKind::Add, 30),
                (SuiteKind::Sub, 25),
                (SuiteKind::CountWords, 35),
                (SuiteKind::CountLetters, 10),
            ],
        }
    }

    /// The candidate kinds besides the correct and the degenerate ones. `words` offers no
    /// verbose candidate: chatter around its bare answer is its wrong format.
    fn other_kinds(self) -> Vec<CandidateKind> {
        let mut kinds = vec![
            CandidateKind::NearlyRight,
            CandidateKind::WrongFormat,
            CandidateKind::Wrong,
        ];
        if self != Family::Words {
            kinds.insert(0, CandidateKind::Verbose);
        }
        kinds
    }

    fn preference(self) -> String {
        let verbose = if self == Family::Words {
            ""
        } else {
            " > verbose"
        };
        format!(
            "correct{verbose} > nearly_right > wrong_format = wrong > empty = repeated = refusal"
        )
    }
}

/// `labeling simulate`'s family options: the family, and the options whose defaults are the
/// family's ([`Family::defaults`]).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct FamilyArgs {
    /// Task family: demo (the project's demo task), words, choice, zh or json.
    #[arg(long, value_enum, default_value_t = Family::Demo)]
    pub family: Family,
    /// Candidates per comparison prompt, 2 to 5 (2 to 4 for words); default: the family's (demo
    /// 4, words 3, choice 4, zh 5, json 2).
    #[arg(long, allow_negative_numbers = true, value_parser = model::flags::at_least::<usize>(2))]
    pub k: Option<usize>,
    /// Probability of swapping adjacent candidates (the mean labeler's); ties come at half of it.
    /// Default: the family's (demo 0.15, words 0.10, choice 0.30, zh 0.20, json 0.15).
    #[arg(long, allow_negative_numbers = true)]
    pub noise: Option<f64>,
    /// Share of demonstrations written by careless demonstrators: the right answer in a wrong
    /// form, which the gold rule scores 0 and the labelers rank low. Default: the family's (demo
    /// 0.5, words 0.4, choice 0.5, zh 0.5, json 0.6).
    #[arg(long, allow_negative_numbers = true)]
    pub sloppy: Option<f64>,
    /// Prompts of `heldout_candidates.jsonl` (0: no such file). Default: 0 for demo, 150 for the
    /// other families.
    #[arg(long, allow_negative_numbers = true, value_parser = model::flags::at_least::<usize>(0))]
    pub heldout_candidates: Option<usize>,
}

impl FamilyArgs {
    /// `params` with the options given, or else the family's values.
    pub fn resolve(&self, params: SimulateParams) -> SimulateParams {
        let d = self.family.defaults();
        SimulateParams {
            k: self.k.unwrap_or(d.k),
            noise: self.noise.unwrap_or(d.noise),
            sloppy: self.sloppy.unwrap_or(d.sloppy),
            heldout_candidates: self.heldout_candidates.unwrap_or(d.heldout_candidates),
            ..params
        }
    }
}

/// Generates the family's task and writes it into `out` atomically; the demo is
/// [`simulate::simulate_to_dir`]'s.
pub fn simulate_family_to_dir(
    family: Family,
    params: &SimulateParams,
    out: &Path,
) -> Result<TaskInfo> {
    match family {
        Family::Demo => simulate::simulate_to_dir(params, out),
        _ => generate(family, params)?.write_dir(out),
    }
}

/// The kinds of problem of the suite's families.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SuiteKind {
    Repeat,
    Reverse,
    Uppercase,
    LastWord,
    Dashes,
    Largest,
    Longest,
    OddOneOut,
    Add,
    Sub,
    Mul,
    Compare,
    CountChars,
    CountWords,
    CountLetters,
}

impl ProblemKind for SuiteKind {
    fn name(self) -> &'static str {
        match self {
            SuiteKind::Repeat => "repeat",
            SuiteKind::Reverse => "reverse",
            SuiteKind::Uppercase => "uppercase",
            SuiteKind::LastWord => "last_word",
            SuiteKind::Dashes => "dashes",
            SuiteKind::Largest => "largest",
            SuiteKind::Longest => "longest",
            SuiteKind::OddOneOut => "odd_one_out",
            SuiteKind::Add => "add",
            SuiteKind::Sub => "sub",
            SuiteKind::Mul => "mul",
            SuiteKind::Compare => "compare",
            SuiteKind::CountChars => "count_chars",
            SuiteKind::CountWords => "count_words",
            SuiteKind::CountLetters => "count_letters",
        }
    }
}

/// Generates a suite family's task in memory (not the demo's: that is [`simulate::generate`]).
/// The draws go in the order evaluation prompts, held-out candidates, PPO prompts, comparisons,
/// demonstrations: the held-out prompts are drawn before the small problem sets (a word to
/// reverse, a word's letters to count) run out, so they mix the kinds like the evaluation
/// prompts; the demonstrations, drawn last, take what is left.
pub fn generate(family: Family, params: &SimulateParams) -> Result<Simulated<SuiteKind>> {
    if family == Family::Demo {
        bail!("the demo task is simulate::generate's; suite::generate makes the other families");
    }
    let others = family.other_kinds();
    let names: Vec<&str> = others.iter().map(|k| k.name()).collect();
    simulate::validate(
        params,
        others.len() + 1,
        &format!("(correct, {})", names.join(", ")),
    )?;
    let spec = TaskSpec {
        family: Some(family.name().to_string()),
        gold_rule: family.gold_rule().to_string(),
        chinese_fraction: family.chinese_fraction(),
        preference: family.preference(),
    };
    let g = Generator {
        family,
        rng: StdRng::seed_from_u64(params.seed),
        keys: HashSet::new(),
        prompts: HashSet::new(),
    };
    simulate::run_pipeline(g, params, spec)
}

/// A problem before it is worded.
#[derive(Clone, Debug)]
enum Problem {
    Repeat {
        word: &'static str,
        times: usize,
    },
    /// A word, or two words.
    Reverse(String),
    /// One to three words.
    Uppercase(String),
    LastWord(Vec<&'static str>),
    Dashes(&'static str),
    /// Four distinct numbers.
    Largest(Vec<u32>),
    /// Four words, one strictly longest.
    Longest(Vec<&'static str>),
    /// Three words of one category and one (at `odd`) of another.
    OddOneOut {
        options: Vec<&'static str>,
        odd: usize,
    },
    Add(u32, u32),
    Sub(u32, u32),
    Mul(u32, u32),
    Compare {
        a: u32,
        b: u32,
        larger: bool,
    },
    CountChars(String),
    CountWords(Vec<&'static str>),
    CountLetters(&'static str),
}

const LETTERS: [char; 4] = ['A', 'B', 'C', 'D'];

const ANIMALS: &[&str] = &[
    "cat", "dog", "cow", "horse", "duck", "frog", "bird", "fish", "pig", "goat", "lion", "bear",
    "wolf", "sheep", "mouse", "tiger",
];
const FRUITS: &[&str] = &[
    "apple", "pear", "plum", "grape", "lemon", "peach", "melon", "cherry", "banana", "mango",
];
const COLOURS: &[&str] = &[
    "red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "grey",
];
const CATEGORIES: [&[&str]; 3] = [ANIMALS, FRUITS, COLOURS];

/// Characters of the Chinese counting task.
const HANZI: &[char] = &[
    '山', '水', '花', '鸟', '风', '月', '雨', '雪', '春', '夏', '秋', '冬', '天', '地', '日', '星',
    '云', '海', '河', '湖', '石', '木', '火', '土', '书', '茶', '米', '猫', '狗', '马', '牛', '羊',
    '鱼', '门', '灯', '桥',
];

const CHATTER: &[&str] = &[
    " Sure! Here it is: {}",
    " Okay, here you go: {}",
    " Of course! The result is {}.",
    " Happy to help: {}",
];
const VALUE_EN: &[&str] = &[" {}", " it's {}", " {} for sure", " probably {}"];
const VALUE_ZH: &[&str] = &[" {}", " 应该是{}", " 我选{}"];
const PLAIN_EN: &[&str] = &[" the answer is {}", " {}", " answer: {}", " it's {}"];
const PLAIN_ZH: &[&str] = &[" 答案是{}", " {}", " 应该是{}"];

fn fill(forms: &[&str], value: &str, rng: &mut StdRng) -> String {
    forms.choose(rng).expect("forms").replacen("{}", value, 1)
}

/// One step off: two neighbouring different characters swapped, or one dropped.
fn perturb(s: &str, rng: &mut StdRng) -> String {
    let mut c: Vec<char> = s.chars().collect();
    let swappable: Vec<usize> = (0..c.len() - 1).filter(|&i| c[i] != c[i + 1]).collect();
    match swappable.choose(rng) {
        Some(&i) if rng.random_bool(0.5) => c.swap(i, i + 1),
        _ => {
            let i = rng.random_range(0..c.len());
            c.remove(i);
        }
    }
    c.into_iter().collect()
}

fn reversed(w: &str) -> String {
    w.chars().rev().collect()
}

fn options(opts: &[String]) -> String {
    opts.iter()
        .zip(LETTERS)
        .map(|(o, l)| format!("{l}) {o}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn letter_of(i: usize) -> String {
    LETTERS[i].to_string()
}

fn off_by_one(rng: &mut StdRng, c: u32, min: u32) -> String {
    if c > min && rng.random_bool(0.5) {
        (c - 1).to_string()
    } else {
        (c + 1).to_string()
    }
}

impl Problem {
    fn kind(&self) -> SuiteKind {
        match self {
            Problem::Repeat { .. } => SuiteKind::Repeat,
            Problem::Reverse(_) => SuiteKind::Reverse,
            Problem::Uppercase(_) => SuiteKind::Uppercase,
            Problem::LastWord(_) => SuiteKind::LastWord,
            Problem::Dashes(_) => SuiteKind::Dashes,
            Problem::Largest(_) => SuiteKind::Largest,
            Problem::Longest(_) => SuiteKind::Longest,
            Problem::OddOneOut { .. } => SuiteKind::OddOneOut,
            Problem::Add(..) => SuiteKind::Add,
            Problem::Sub(..) => SuiteKind::Sub,
            Problem::Mul(..) => SuiteKind::Mul,
            Problem::Compare { .. } => SuiteKind::Compare,
            Problem::CountChars(_) => SuiteKind::CountChars,
            Problem::CountWords(_) => SuiteKind::CountWords,
            Problem::CountLetters(_) => SuiteKind::CountLetters,
        }
    }

    /// The same key for the same problem, whatever its wording, language or option order.
    fn key(&self) -> String {
        let sorted = |v: &[&str]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v.join(" ")
        };
        match self {
            Problem::Repeat { word, times } => format!("repeat {word} {times}"),
            Problem::Reverse(w) => format!("reverse {w}"),
            Problem::Uppercase(w) => format!("upper {w}"),
            Problem::LastWord(w) => format!("last {}", w.join(" ")),
            Problem::Dashes(w) => format!("dashes {w}"),
            Problem::Largest(v) => {
                let mut v = v.clone();
                v.sort_unstable();
                format!("largest {v:?}")
            }
            Problem::Longest(w) => format!("longest {}", sorted(w)),
            Problem::OddOneOut { options, odd } => {
                format!("odd {} {}", sorted(options), options[*odd])
            }
            Problem::Add(a, b) => format!("add {a} {b}"),
            Problem::Sub(a, b) => format!("sub {a} {b}"),
            Problem::Mul(a, b) => format!("mul {a} {b}"),
            Problem::Compare { a, b, larger } => {
                format!("compare {} {} {larger}", a.min(b), a.max(b))
            }
            Problem::CountChars(s) => format!("chars {s}"),
            Problem::CountWords(w) => format!("words {}", w.join(" ")),
            Problem::CountLetters(w) => format!("letters {w}"),
        }
    }

    /// The index of the right option of a multiple-choice problem.
    fn right_option(&self) -> usize {
        let argmax = |v: Vec<usize>| (0..v.len()).max_by_key(|&i| v[i]).expect("four options");
        match self {
            Problem::Largest(v) => argmax(v.iter().map(|&x| x as usize).collect()),
            Problem::Longest(w) => argmax(w.iter().map(|w| w.len()).collect()),
            Problem::OddOneOut { odd, .. } => *odd,
            _ => 0,
        }
    }

    /// The options of a multiple-choice problem, as worded.
    fn option_texts(&self) -> Vec<String> {
        match self {
            Problem::Largest(v) => v.iter().map(u32::to_string).collect(),
            Problem::Longest(w) | Problem::OddOneOut { options: w, .. } => {
                w.iter().map(|w| w.to_string()).collect()
            }
            _ => Vec::new(),
        }
    }

    fn answer(&self) -> String {
        match self {
            Problem::Repeat { word, times } => vec![*word; *times].join(" "),
            Problem::Reverse(w) => reversed(w),
            Problem::Uppercase(w) => w.to_uppercase(),
            Problem::LastWord(w) => w.last().expect("words").to_string(),
            Problem::Dashes(w) => spelled(w),
            Problem::Largest(_) | Problem::Longest(_) | Problem::OddOneOut { .. } => {
                letter_of(self.right_option())
            }
            Problem::Add(a, b) => (a + b).to_string(),
            Problem::Sub(a, b) => (a - b).to_string(),
            Problem::Mul(a, b) => (a * b).to_string(),
            Problem::Compare { a, b, larger } => if *larger == (a > b) { a } else { b }.to_string(),
            Problem::CountChars(s) => s.chars().count().to_string(),
            Problem::CountWords(w) => w.len().to_string(),
            Problem::CountLetters(w) => w.len().to_string(),
        }
    }

    /// The prompt: the problem worded, and for `json`'s Chinese arithmetic the request for JSON
    /// (its other prompts say so in their wording).
    fn prompt(&self, family: Family, zh: bool, rng: &mut StdRng) -> String {
        let text = self.wording(zh, rng);
        match self {
            Problem::Add(..) | Problem::Sub(..) if family == Family::Json && zh => {
                format!("{text}请用JSON回答。")
            }
            _ => text,
        }
    }

    fn wording(&self, zh: bool, rng: &mut StdRng) -> String {
        let pick = |rng: &mut StdRng, n: usize| rng.random_range(0..n);
        let opts = options(&self.option_texts());
        match (self, zh) {
            (Problem::Repeat { word, times }, _) => match pick(rng, 3) {
                0 => format!("Repeat the word '{word}' {times} times."),
                1 => format!("Write '{word}' {times} times, separated by spaces."),
                _ => format!("Say '{word}' {times} times."),
            },
            (Problem::Reverse(w), _) => match pick(rng, 3) {
                0 => format!("Reverse '{w}'."),
                1 => format!("Write '{w}' backwards."),
                _ => format!("Spell '{w}' in reverse order."),
            },
            (Problem::Uppercase(w), _) => match pick(rng, 3) {
                0 => format!("Write '{w}' in capital letters."),
                1 => format!("Convert '{w}' to uppercase."),
                _ => format!("Uppercase '{w}'."),
            },
            (Problem::LastWord(w), _) => {
                let p = w.join(" ");
                match pick(rng, 3) {
                    0 => format!("What is the last word of '{p}'?"),
                    1 => format!("Give the final word in '{p}'."),
                    _ => format!("Which word comes last in '{p}'?"),
                }
            }
            (Problem::Dashes(w), _) => match pick(rng, 3) {
                0 => format!("Join the letters of '{w}' with dashes."),
                1 => format!("Write '{w}' with a dash between each letter."),
                _ => format!("Put dashes between the letters of '{w}'."),
            },
            (Problem::Largest(_), false) => match pick(rng, 2) {
                0 => format!("Which number is the largest? {opts}"),
                _ => format!("Pick the biggest number. {opts}"),
            },
            (Problem::Largest(_), true) => match pick(rng, 2) {
                0 => format!("哪个数最大？{opts}"),
                _ => format!("选出最大的数。{opts}"),
            },
            (Problem::Longest(_), false) => match pick(rng, 2) {
                0 => format!("Which word has the most letters? {opts}"),
                _ => format!("Which of these words is the longest? {opts}"),
            },
            (Problem::Longest(_), true) => format!("哪个单词的字母最多？{opts}"),
            (Problem::OddOneOut { .. }, false) => match pick(rng, 2) {
                0 => format!("Which is the odd one out? {opts}"),
                _ => format!("Which one does not belong with the others? {opts}"),
            },
            (Problem::OddOneOut { .. }, true) => format!("哪一个与其他的不是一类？{opts}"),
            (Problem::Add(a, b), false) => match pick(rng, 3) {
                0 => format!("What is {a} plus {b}? Answer as JSON."),
                1 => format!("Compute {a} + {b} and reply with JSON."),
                _ => format!("Add {a} and {b}. Give the answer as a JSON object."),
            },
            (Problem::Sub(a, b), false) => match pick(rng, 3) {
                0 => format!("What is {a} minus {b}? Answer as JSON."),
                1 => format!("Compute {a} - {b} and reply with JSON."),
                _ => format!("Subtract {b} from {a}. Give the answer as a JSON object."),
            },
            (Problem::CountWords(w), false) => {
                let p = w.join(" ");
                match pick(rng, 2) {
                    0 => format!("How many words are in '{p}'? Answer as JSON."),
                    _ => format!("Count the words in '{p}' and reply with JSON."),
                }
            }
            (Problem::CountWords(w), true) => {
                format!("'{}'里有几个单词？请用JSON回答。", w.join(" "))
            }
            (Problem::CountLetters(w), false) => match pick(rng, 2) {
                0 => format!("How many letters does '{w}' have? Answer as JSON."),
                _ => format!("Count the letters in '{w}' and reply with JSON."),
            },
            (Problem::CountLetters(w), true) => format!("单词'{w}'有几个字母？请用JSON回答。"),
            // The Chinese arithmetic, counting and comparing of `zh` (and `json`'s Chinese
            // share, which asks for JSON).
            (Problem::Add(a, b), true) => match pick(rng, 3) {
                0 => format!("{a}加{b}等于多少？"),
                1 => format!("请计算{a}+{b}。"),
                _ => format!("{a}加上{b}是多少？"),
            },
            (Problem::Sub(a, b), true) => match pick(rng, 3) {
                0 => format!("{a}减{b}等于多少？"),
                1 => format!("请计算{a}-{b}。"),
                _ => format!("从{a}里减去{b}，还剩多少？"),
            },
            (Problem::Mul(a, b), _) => match pick(rng, 2) {
                0 => format!("{a}乘以{b}等于多少？"),
                _ => format!("请计算{a}×{b}。"),
            },
            (Problem::Compare { a, b, larger }, _) => {
                let adj = if *larger { "大" } else { "小" };
                match pick(rng, 2) {
                    0 => format!("{a}和{b}哪个更{adj}？"),
                    _ => format!("{a}与{b}相比，哪个数更{adj}？"),
                }
            }
            (Problem::CountChars(s), _) => match pick(rng, 3) {
                0 => format!("“{s}”有几个字？"),
                1 => format!("数一数“{s}”里有几个汉字。"),
                _ => format!("“{s}”一共有几个字？"),
            },
        }
    }

    /// The family's correct form, stating `answer` (right or wrong).
    fn response(&self, family: Family, zh: bool, answer: &str) -> String {
        match family {
            Family::Words => format!(" {answer}"),
            Family::Choice if zh => format!(" 答案是({answer})。"),
            Family::Choice => format!(" The answer is ({answer})."),
            Family::Json => format!(" {{\"answer\": {answer}}}"),
            Family::Zh | Family::Demo => match self {
                Problem::Add(a, b) => format!(" {a}加{b}等于{answer}。答案是{answer}。"),
                Problem::Sub(a, b) => format!(" {a}减{b}等于{answer}。答案是{answer}。"),
                Problem::Mul(a, b) => format!(" {a}乘{b}等于{answer}。答案是{answer}。"),
                Problem::Compare { a, b, larger } => {
                    let other = if answer == a.to_string() { b } else { a };
                    let adj = if *larger { "大" } else { "小" };
                    format!(" {answer}比{other}{adj}。答案是{answer}。")
                }
                Problem::CountChars(s) => format!(" “{s}”有{answer}个字。答案是{answer}。"),
                _ => format!(" 答案是{answer}。"),
            },
        }
    }

    /// The right answer in a wrong form, as a careless demonstrator writes it.
    fn wrong_format(&self, family: Family, zh: bool, rng: &mut StdRng) -> String {
        let answer = self.answer();
        match family {
            Family::Words => fill(CHATTER, &answer, rng),
            Family::Choice => {
                let value = &self.option_texts()[self.right_option()];
                fill(if zh { VALUE_ZH } else { VALUE_EN }, value, rng)
            }
            Family::Json => fill(if zh { PLAIN_ZH } else { PLAIN_EN }, &answer, rng),
            Family::Zh | Family::Demo => simulate::wrong_format(&answer, true, rng),
        }
    }

    /// A correct response, padded: filler around it, or for `json` a second field.
    fn verbose(&self, family: Family, zh: bool, rng: &mut StdRng) -> String {
        let answer = self.answer();
        if family != Family::Json {
            return simulate::verbose(&self.response(family, zh, &answer), zh, rng);
        }
        let steps = match (self, zh) {
            (Problem::Add(a, b), false) => format!("{a} + {b} = {answer}"),
            (Problem::Add(a, b), true) => format!("{a}加{b}等于{answer}"),
            (Problem::Sub(a, b), false) => format!("{a} - {b} = {answer}"),
            (Problem::Sub(a, b), true) => format!("{a}减{b}等于{answer}"),
            (Problem::CountWords(w), _) => w.join(", "),
            (Problem::CountLetters(w), _) => spelled(w),
            _ => answer.clone(),
        };
        format!(" {{\"answer\": {answer}, \"steps\": \"{steps}\"}}")
    }

    /// An answer one step off: one repetition more or less, two letters swapped or one dropped,
    /// the word before the last, the runner-up option, off by one, the other number.
    fn nearly_right(&self, rng: &mut StdRng) -> String {
        match self {
            Problem::Repeat { word, times } => {
                let n = if *times > 2 && rng.random_bool(0.5) {
                    times - 1
                } else {
                    times + 1
                };
                vec![*word; n].join(" ")
            }
            Problem::Reverse(w) => perturb(&reversed(w), rng),
            Problem::Uppercase(w) => perturb(&w.to_uppercase(), rng),
            Problem::LastWord(w) => w[w.len() - 2].to_string(),
            Problem::Dashes(w) => spelled(&perturb(w, rng)),
            Problem::Largest(_) | Problem::Longest(_) => {
                // The runner-up: the best of the other options.
                let right = self.right_option();
                let score = |i: usize| match self {
                    Problem::Largest(v) => v[i] as usize,
                    Problem::Longest(w) => w[i].len(),
                    _ => 0,
                };
                let runner_up = (0..LETTERS.len())
                    .filter(|&i| i != right)
                    .max_by_key(|&i| score(i))
                    .expect("four options");
                letter_of(runner_up)
            }
            Problem::OddOneOut { odd, .. } => {
                let others: Vec<usize> = (0..LETTERS.len()).filter(|i| i != odd).collect();
                letter_of(*others.choose(rng).expect("options"))
            }
            Problem::Add(a, b) => off_by_one(rng, a + b, 0),
            Problem::Sub(a, b) => off_by_one(rng, a - b, 0),
            Problem::Mul(a, b) => off_by_one(rng, a * b, 0),
            Problem::Compare { a, b, larger } => if *larger == (a > b) { b } else { a }.to_string(),
            Problem::CountChars(s) => off_by_one(rng, s.chars().count() as u32, 1),
            Problem::CountWords(w) => off_by_one(rng, w.len() as u32, 1),
            Problem::CountLetters(w) => off_by_one(rng, w.len() as u32, 1),
        }
    }

    /// A clearly wrong answer, different from those in `avoid` (the correct and the nearly right
    /// ones).
    fn wrong(&self, rng: &mut StdRng, avoid: &[&str]) -> String {
        let other_word = |rng: &mut StdRng, w: &str| loop {
            let x = *WORDS.choose(rng).expect("words");
            if x != w {
                return x;
            }
        };
        for _ in 0..1000 {
            let cand = match self {
                Problem::Repeat { word, times } => vec![other_word(rng, word); *times].join(" "),
                Problem::Reverse(w) => reversed(other_word(rng, w)),
                Problem::Uppercase(w) => other_word(rng, w).to_uppercase(),
                Problem::LastWord(w) => {
                    let x = *PHRASE_WORDS.choose(rng).expect("words");
                    if w.contains(&x) {
                        continue;
                    }
                    x.to_string()
                }
                Problem::Dashes(w) => spelled(other_word(rng, w)),
                Problem::Largest(_) | Problem::Longest(_) | Problem::OddOneOut { .. } => {
                    letter_of(rng.random_range(0..LETTERS.len()))
                }
                Problem::Add(a, b) => rng.random_range(0..=(a + b + 20)).to_string(),
                Problem::Sub(a, _) => rng.random_range(0..=(a + 10)).to_string(),
                Problem::Mul(a, b) => rng.random_range(0..=(a * b + 20)).to_string(),
                Problem::Compare { .. } => rng.random_range(0..100u32).to_string(),
                Problem::CountChars(s) => rng
                    .random_range(1..=s.chars().count() as u32 + 4)
                    .to_string(),
                Problem::CountWords(w) => rng.random_range(1..=w.len() as u32 + 4).to_string(),
                Problem::CountLetters(w) => rng.random_range(1..=w.len() as u32 + 4).to_string(),
            };
            let ok = match self {
                Problem::Compare { a, b, .. } => cand != a.to_string() && cand != b.to_string(),
                Problem::Add(..)
                | Problem::Sub(..)
                | Problem::Mul(..)
                | Problem::CountChars(_)
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

struct Generator {
    family: Family,
    rng: StdRng,
    /// Problems used so far, across all files.
    keys: HashSet<String>,
    prompts: HashSet<String>,
}

impl Generator {
    fn distinct_numbers(&mut self, n: usize, range: std::ops::RangeInclusive<u32>) -> Vec<u32> {
        let mut v: Vec<u32> = Vec::with_capacity(n);
        while v.len() < n {
            let x = self.rng.random_range(range.clone());
            if !v.contains(&x) {
                v.push(x);
            }
        }
        v
    }

    fn word(&mut self) -> &'static str {
        WORDS.choose(&mut self.rng).expect("words")
    }

    fn phrase(&mut self, n: std::ops::RangeInclusive<usize>) -> Vec<&'static str> {
        let n = self.rng.random_range(n);
        let mut w: Vec<&'static str> = PHRASE_WORDS
            .choose_multiple(&mut self.rng, n)
            .copied()
            .collect();
        w.shuffle(&mut self.rng);
        w
    }

    fn problem(&mut self, kind: SuiteKind) -> Problem {
        // The arithmetic operands: 0 to 50 (the demo's go to 20).
        let operand = |rng: &mut StdRng| rng.random_range(0..=50u32);
        match kind {
            SuiteKind::Repeat => Problem::Repeat {
                word: self.word(),
                times: self.rng.random_range(2..=6),
            },
            SuiteKind::Reverse => Problem::Reverse(if self.rng.random_bool(0.5) {
                self.word().to_string()
            } else {
                self.phrase(2..=2).join(" ")
            }),
            SuiteKind::Uppercase => Problem::Uppercase(self.phrase(1..=3).join(" ")),
            SuiteKind::LastWord => Problem::LastWord(self.phrase(3..=6)),
            SuiteKind::Dashes => Problem::Dashes(self.word()),
            SuiteKind::Largest => Problem::Largest(self.distinct_numbers(4, 1..=99)),
            SuiteKind::Longest => loop {
                let w: Vec<&'static str> =
                    WORDS.choose_multiple(&mut self.rng, 4).copied().collect();
                let max = w.iter().map(|w| w.len()).max().expect("four words");
                if w.iter().filter(|w| w.len() == max).count() == 1 {
                    break Problem::Longest(w);
                }
            },
            SuiteKind::OddOneOut => {
                let mut cats = CATEGORIES.to_vec();
                cats.shuffle(&mut self.rng);
                let mut options: Vec<&'static str> =
                    cats[0].choose_multiple(&mut self.rng, 3).copied().collect();
                let odd = self.rng.random_range(0..=3);
                options.insert(odd, cats[1].choose(&mut self.rng).expect("words"));
                Problem::OddOneOut { options, odd }
            }
            SuiteKind::Add => Problem::Add(operand(&mut self.rng), operand(&mut self.rng)),
            SuiteKind::Sub => {
                let (x, y) = (operand(&mut self.rng), operand(&mut self.rng));
                Problem::Sub(x.max(y), x.min(y))
            }
            SuiteKind::Mul => {
                Problem::Mul(self.rng.random_range(2..=25), self.rng.random_range(2..=25))
            }
            SuiteKind::Compare => {
                let v = self.distinct_numbers(2, 0..=99);
                Problem::Compare {
                    a: v[0],
                    b: v[1],
                    larger: self.rng.random_bool(0.5),
                }
            }
            SuiteKind::CountChars => {
                let n = self.rng.random_range(2..=7);
                Problem::CountChars(HANZI.choose_multiple(&mut self.rng, n).collect())
            }
            SuiteKind::CountWords => Problem::CountWords(self.phrase(2..=7)),
            SuiteKind::CountLetters => Problem::CountLetters(self.word()),
        }
    }

    /// Candidates of the given kinds, ids `r1`… in that order.
    fn responses(
        &mut self,
        kinds: Vec<CandidateKind>,
        task: &Task<SuiteKind>,
        problem: &Problem,
    ) -> Vec<Candidate> {
        let near = problem.nearly_right(&mut self.rng);
        let (family, zh, rng) = (self.family, task.chinese, &mut self.rng);
        numbered(kinds, |kind| match kind {
            CandidateKind::Correct => task.response.clone(),
            CandidateKind::Verbose => problem.verbose(family, zh, rng),
            CandidateKind::NearlyRight => problem.response(family, zh, &near),
            CandidateKind::WrongFormat => problem.wrong_format(family, zh, rng),
            CandidateKind::Wrong => {
                let wrong = problem.wrong(rng, &[&task.answer, &near]);
                problem.response(family, zh, &wrong)
            }
            CandidateKind::Empty | CandidateKind::Repeated | CandidateKind::Refusal => {
                degenerate(kind, &task.prompt, zh, rng)
            }
        })
    }
}

impl TaskGenerator for Generator {
    type Kind = SuiteKind;
    type Problem = Problem;
    const HELDOUT_FIRST: bool = true;
    const SLOPPY_INTERLEAVED: bool = true;

    fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    fn task(&mut self) -> Result<(Task<SuiteKind>, Problem)> {
        let kinds = self.family.kinds();
        let total: u32 = kinds.iter().map(|k| k.1).sum();
        for _ in 0..100_000 {
            let mut r = self.rng.random_range(0..total);
            let mut kind = kinds[0].0;
            for &(k, w) in kinds {
                if r < w {
                    kind = k;
                    break;
                }
                r -= w;
            }
            let zh = self.rng.random_bool(self.family.chinese_fraction());
            let problem = self.problem(kind);
            let key = problem.key();
            if self.keys.contains(&key) {
                continue;
            }
            let prompt = problem.prompt(self.family, zh, &mut self.rng);
            if self.prompts.contains(&prompt) {
                continue;
            }
            self.keys.insert(key);
            self.prompts.insert(prompt.clone());
            let answer = problem.answer();
            let task = Task {
                kind: problem.kind(),
                chinese: zh,
                response: problem.response(self.family, zh, &answer),
                prompt,
                answer,
                sloppy: false,
            };
            return Ok((task, problem));
        }
        bail!(
            "ran out of distinct {} problems after {} prompts; ask for fewer",
            self.family.name(),
            self.keys.len()
        )
    }

    /// K candidates: the correct one, each degenerate kind with probability
    /// [`DEGENERATE_SHARE`] (as many as fit), and the family's other kinds, in a shuffled order.
    fn candidates(
        &mut self,
        task: &Task<SuiteKind>,
        problem: &Problem,
        k: usize,
    ) -> Vec<Candidate> {
        let mut degenerate: Vec<CandidateKind> = CandidateKind::DEGENERATE
            .into_iter()
            .filter(|_| self.rng.random_bool(DEGENERATE_SHARE))
            .collect();
        degenerate.shuffle(&mut self.rng);
        degenerate.truncate(k - 1);
        let mut others = self.family.other_kinds();
        others.shuffle(&mut self.rng);
        others.truncate(k - 1 - degenerate.len());
        let mut kinds = vec![CandidateKind::Correct];
        kinds.extend(degenerate);
        kinds.extend(others);
        kinds.shuffle(&mut self.rng);
        self.responses(kinds, task, problem)
    }

    fn heldout_candidates(&mut self, task: &Task<SuiteKind>, problem: &Problem) -> Vec<Candidate> {
        let kinds = heldout_kinds(&mut self.rng);
        self.responses(kinds, task, problem)
    }

    fn sloppy_response(&mut self, task: &Task<SuiteKind>, problem: &Problem) -> String {
        problem.wrong_format(self.family, task.chinese, &mut self.rng)
    }
}
