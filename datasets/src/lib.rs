//! Data for the RLHF pipeline: readers for JSONL, CSV and Parquet into typed records
//! (demonstrations, prompts, comparisons, ranked groups; plain text or conversational message lists
//! in TRL's formats) with column mapping, the preference types
//! shared with the `labeling` crate and the one expansion of ranked groups into pairs, adapters for
//! HH-RLHF and OpenAssistant, deterministic splitting by prompt, de-duplication and length
//! filtering, and the tokenisation (a prompt template, or a model's chat template) and batching the
//! stages train on.
//!
//! It is not a labeling tool (see the `labeling` crate) and holds no model code.

#![forbid(unsafe_code)]

pub mod adapters;
pub mod chat;
pub mod error;
pub mod gold;
pub mod preference;
pub mod read;
pub mod records;
pub mod split;
pub mod tokenize;

pub use chat::{
    ChatComparison, ChatPrompt, ChatRankedGroup, Conversation, Message, PreferenceRecords,
    PromptRecords, SftRecords, extract_prompt, load_chat_comparisons, load_chat_prompts,
    load_conversations, load_preference_records, load_prompt_records, load_sft_records,
};
pub use error::{DataError, Result};
pub use gold::{CompiledRule, Rule, extract_answer, gold_answer, normalize, parse_rule};
pub use preference::{Comparison, RankedGroup, expand_pairs};
pub use read::{Format, Record, read_records};
pub use records::{
    Demonstration, PromptRecord, Source, load_comparisons, load_demonstrations, load_prompts,
    load_ranked_groups,
};
