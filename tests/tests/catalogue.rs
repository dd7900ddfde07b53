//! The catalogue of bad inputs (issue 29): malformed and truncated files, wrong types,
//! out-of-range keys and flags, mismatched model folders, over-long and empty records, Unicode
//! edge cases and missing files, across `labeling`, `sft`, `reward`, `ppo`, `dpo`, `evaluate` and
//! `model`. Every case must exit non-zero with one error on stderr that names the file and the
//! line, key, flag or field at fault, without a panic, and leave nothing behind in its output
//! folder (no `--out`, no `*.tmp`). One test runs every case and reports every failing one.
//!
//! The inputs are tiny: one SFT policy and one reward model trained for two steps on a few
//! records, and copies of them edited into the broken folders, built once for the whole binary.

use e2e::{bin, root, run};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One bad input: `stage args` (with `{T}` for the fixture folder and `{OUT}` for the case's
/// output path) must fail naming every string of `must_name` (`{T}` replaced too) and must not
/// name any of `must_not`.
struct Case {
    name: &'static str,
    stage: &'static str,
    args: &'static [&'static str],
    must_name: &'static [&'static str],
    must_not: &'static [&'static str],
}

const fn case(
    name: &'static str,
    stage: &'static str,
    args: &'static [&'static str],
    must_name: &'static [&'static str],
) -> Case {
    Case {
        name,
        stage,
        args,
        must_name,
        must_not: &[],
    }
}

/// The arguments of a two-step tiny `sft` run on `{T}/demos.jsonl`, before a case's own `--set`.
macro_rules! sft {
    ($($a:expr),* $(,)?) => {
        &["--config", "configs/sft.toml", "--out", "{OUT}", "--set", "train.max_steps=2",
          "--set", "train.eval_every=0", "--set", "model.vocab_size=300",
          "--set", "data.path=\"{T}/demos.jsonl\"", $($a),*]
    };
}

/// `sft` on the data file `{T}/in/NAME`.
macro_rules! sft_on {
    ($file:literal) => {
        sft!("--set", concat!("data.path=\"{T}/in/", $file, "\""))
    };
}

macro_rules! reward {
    ($($a:expr),* $(,)?) => {
        &["--config", "configs/reward.toml", "--out", "{OUT}", "--set", "model.base=\"{T}/sft\"",
          "--set", "train.max_steps=2", "--set", "train.eval_every=0",
          "--set", "ensemble.members=1", "--set", "ensemble.monitor=false",
          "--set", "ensemble.bootstrap=false", "--set", "data.path=\"{T}/rank.csv\"", $($a),*]
    };
}

macro_rules! ppo {
    ($($a:expr),* $(,)?) => {
        &["--config", "configs/ppo.toml", "--out", "{OUT}", "--set", "model.policy=\"{T}/sft\"",
          "--set", "model.reward_model=\"{T}/rm\"", "--set", "train.iterations=1",
          "--set", "rollout.batch_size=2", "--set", "ppo.minibatch_size=2",
          "--set", "monitor.enabled=false", "--set", "rollout.max_new_tokens=4",
          "--set", "data.prompts=\"{T}/prompts.jsonl\"", $($a),*]
    };
}

macro_rules! dpo {
    ($($a:expr),* $(,)?) => {
        &["--config", "configs/dpo.toml", "--out", "{OUT}", "--set", "model.policy=\"{T}/sft\"",
          "--set", "train.max_steps=2", "--set", "train.eval_every=0",
          "--set", "data.path=\"{T}/rank.csv\"", $($a),*]
    };
}

macro_rules! evaluate {
    ($($a:expr),* $(,)?) => {
        &["--policy", "{T}/sft", "--reward-model", "{T}/rm", "--prompts", "{T}/prompts.jsonl",
          "--out", "{OUT}", "--max-new-tokens", "2", $($a),*]
    };
}

macro_rules! import {
    ($file:literal) => {
        &["import", concat!("{T}/in/", $file), "--out", "{OUT}"]
    };
}

const CASES: &[Case] = &[
    // ---- sft: malformed, truncated and odd data files ----
    case(
        "sft_truncated_jsonl",
        "sft",
        sft_on!("trunc.jsonl"),
        &["trunc.jsonl", "line 3", "not valid JSON"],
    ),
    case(
        "sft_wrong_type",
        "sft",
        sft_on!("wrong_type.jsonl"),
        &[
            "wrong_type.jsonl",
            "line 2",
            "`response`",
            "expected a string",
        ],
    ),
    case(
        "sft_missing_field",
        "sft",
        sft_on!("missing_field.jsonl"),
        &[
            "missing_field.jsonl",
            "line 2",
            "`response`",
            "column missing",
        ],
    ),
    case(
        "sft_bom_inside_the_file",
        "sft",
        sft_on!("mid_bom.jsonl"),
        &["mid_bom.jsonl", "line 2"],
    ),
    case(
        "sft_invalid_utf8",
        "sft",
        sft_on!("bad_utf8.jsonl"),
        &["bad_utf8.jsonl", "line 2", "not UTF-8"],
    ),
    case(
        "sft_nul_byte",
        "sft",
        sft_on!("nul.jsonl"),
        &["nul.jsonl", "line 2", "NUL"],
    ),
    case(
        "sft_csv_extra_cell",
        "sft",
        sft_on!("extra_cell.csv"),
        &["extra_cell.csv", "line 3", "3 cells"],
    ),
    case(
        "sft_csv_unclosed_quote",
        "sft",
        sft_on!("unclosed.csv"),
        &["unclosed.csv", "line 3", "never closed"],
    ),
    case(
        "sft_empty_file",
        "sft",
        sft_on!("empty.jsonl"),
        &["empty.jsonl", "no demonstrations"],
    ),
    case(
        "sft_blank_lines_only",
        "sft",
        sft_on!("blank.jsonl"),
        &["blank.jsonl", "no demonstrations"],
    ),
    case(
        "sft_broken_gzip",
        "sft",
        sft_on!("broken.jsonl.gz"),
        &["broken.jsonl.gz", "gzip"],
    ),
    case(
        "sft_not_parquet",
        "sft",
        sft_on!("bad.parquet"),
        &["bad.parquet", "Parquet"],
    ),
    case(
        "sft_truncated_parquet",
        "sft",
        sft_on!("truncated.parquet"),
        &["truncated.parquet", "Parquet"],
    ),
    case(
        "sft_missing_file",
        "sft",
        sft_on!("nonexistent.jsonl"),
        &["nonexistent.jsonl", "cannot read"],
    ),
    case(
        "sft_unknown_extension",
        "sft",
        sft_on!("demos.txt"),
        &["demos.txt", "format"],
    ),
    // ---- sft: config keys ----
    case(
        "sft_negative_lr",
        "sft",
        sft!("--set", "train.lr=-1"),
        &["sft.toml", "`train.lr`", "out of range"],
    ),
    case(
        "sft_zero_batch",
        "sft",
        sft!("--set", "train.batch_size=0"),
        &["sft.toml", "`train.batch_size`"],
    ),
    case(
        "sft_validation_fraction_over_one",
        "sft",
        sft!("--set", "data.validation_fraction=1.5"),
        &["sft.toml", "`data.validation_fraction`"],
    ),
    case(
        "sft_unknown_key",
        "sft",
        sft!("--set", "train.lrr=1"),
        &["sft.toml", "unknown key `train.lrr`"],
    ),
    case(
        "sft_unknown_top_level_key",
        "sft",
        sft!("--set", "bogus=1"),
        &["sft.toml", "unknown key `bogus`"],
    ),
    case(
        "sft_batch_size_a_string",
        "sft",
        sft!("--set", "train.batch_size=\"eight\""),
        &["sft.toml", "`train.batch_size`", "eight"],
    ),
    case(
        "sft_unknown_preset",
        "sft",
        sft!("--set", "model.preset=\"huge\""),
        &["sft.toml", "`model.preset`", "huge", "tiny"],
    ),
    case(
        "sft_vocab_below_the_byte_alphabet",
        "sft",
        sft!("--set", "model.vocab_size=5"),
        &["sft.toml", "`model.vocab_size`", "at least 258"],
    ),
    case(
        "sft_unknown_decay",
        "sft",
        sft!("--set", "train.decay=\"cosin\""),
        &["sft.toml", "`train.decay`", "cosin"],
    ),
    case(
        "sft_missing_base_folder",
        "sft",
        sft!("--set", "model.base=\"{T}/nonexistent\""),
        &["{T}/nonexistent", "model folder not found"],
    ),
    case(
        "sft_column_mapped_to_nothing",
        "sft",
        sft!("--set", "data.columns.prompt=\"question\""),
        &["demos.jsonl", "line 1", "`question`"],
    ),
    // ---- labeling import: rankings CSVs ----
    case(
        "import_rank_a_word",
        "labeling",
        import!("rank_word.csv"),
        &[
            "rank_word.csv",
            "line 3",
            "`rank`",
            "\"first\"",
            "1 error(s)",
        ],
    ),
    case(
        "import_rank_zero",
        "labeling",
        import!("rank_zero.csv"),
        &["rank_zero.csv", "line 3", "`rank`", "1 error(s)"],
    ),
    case(
        "import_rank_arabic_digit",
        "labeling",
        import!("rank_arabic.csv"),
        &["rank_arabic.csv", "line 3", "`rank`", "١"],
    ),
    case(
        "import_rank_cjk_long",
        "labeling",
        import!("rank_cjk.csv"),
        &["rank_cjk.csv", "line 3", "`rank`", "这是一个", "…"],
    ),
    case(
        "import_rank_rtl_override",
        "labeling",
        import!("rank_rtl.csv"),
        &["rank_rtl.csv", "line 3", "`rank`", "\\u{202e}"],
    ),
    case(
        "import_duplicate_response_id",
        "labeling",
        import!("dup_response.csv"),
        &[
            "dup_response.csv",
            "line 3",
            "`response_id`",
            "appears twice",
        ],
    ),
    case(
        "import_one_response",
        "labeling",
        import!("single.csv"),
        &["single.csv", "line 2", "has 1 response", "1 error(s)"],
    ),
    case(
        "import_no_rank_column",
        "labeling",
        import!("no_rank.csv"),
        &["no_rank.csv", "line 1", "`rank`"],
    ),
    case(
        "import_prompt_text_differs",
        "labeling",
        import!("two_prompts.csv"),
        &[
            "two_prompts.csv",
            "line 3",
            "`prompt`",
            "different prompt text",
        ],
    ),
    case(
        "import_crlf_unclosed_quote",
        "labeling",
        import!("crlf_unclosed.csv"),
        &["crlf_unclosed.csv", "line 3", "never closed"],
    ),
    case(
        "import_bom_then_invalid_utf8",
        "labeling",
        import!("bom_bad_utf8.csv"),
        &["bom_bad_utf8.csv", "line 3", "not UTF-8"],
    ),
    case(
        "import_wide_ranking_names_no_column",
        "labeling",
        import!("wide_bad.csv"),
        &["wide_bad.csv", "line 2", "`ranking`", "response_3"],
    ),
    case(
        "import_wide_ranking_syntax",
        "labeling",
        import!("wide_syntax.csv"),
        &["wide_syntax.csv", "line 2", "`ranking`"],
    ),
    case(
        "import_nul_in_a_cell",
        "labeling",
        import!("nul.csv"),
        &["nul.csv", "line 3", "NUL"],
    ),
    case(
        "import_empty_file",
        "labeling",
        import!("empty.csv"),
        &["empty.csv", "line 1", "header"],
    ),
    case(
        "import_missing_file",
        "labeling",
        import!("nonexistent.csv"),
        &["nonexistent.csv", "cannot read"],
    ),
    // ---- labeling export-sheet ----
    case(
        "export_sheet_prompt_longer_than_context",
        "labeling",
        &[
            "export-sheet",
            "--policy",
            "{T}/short",
            "--prompts",
            "{T}/long_prompts.jsonl",
            "--k",
            "2",
            "--out",
            "{OUT}.csv",
            "--max-new-tokens",
            "4",
        ],
        &[
            "long_prompts.jsonl",
            "line 2",
            "`prompt`",
            "context of 32 tokens",
            "max_position_embeddings",
        ],
    ),
    case(
        "export_sheet_reward_model_as_policy",
        "labeling",
        &[
            "export-sheet",
            "--policy",
            "{T}/rm",
            "--prompts",
            "{T}/prompts.jsonl",
            "--k",
            "2",
            "--out",
            "{OUT}.csv",
            "--max-new-tokens",
            "2",
        ],
        &["{T}/rm", "no LM head"],
    ),
    case(
        "export_sheet_k_one",
        "labeling",
        &[
            "export-sheet",
            "--policy",
            "{T}/sft",
            "--prompts",
            "{T}/prompts.jsonl",
            "--k",
            "1",
            "--out",
            "{OUT}.csv",
        ],
        &["--k", "≥ 2"],
    ),
    case(
        "export_sheet_top_p_over_one",
        "labeling",
        &[
            "export-sheet",
            "--policy",
            "{T}/sft",
            "--prompts",
            "{T}/prompts.jsonl",
            "--out",
            "{OUT}.csv",
            "--top-p",
            "2",
        ],
        &["--top-p 2", "(0, 1]"],
    ),
    // ---- model ----
    case(
        "generate_prompt_longer_than_context",
        "model",
        &[
            "generate",
            "{T}/short",
            "--input",
            "{T}/long_prompts.jsonl",
            "--out",
            "{OUT}.jsonl",
            "--max-new-tokens",
            "4",
        ],
        &[
            "long_prompts.jsonl",
            "line 2",
            "`prompt`",
            "context of 32 tokens",
        ],
    ),
    case(
        "generate_from_a_reward_model",
        "model",
        &["generate", "{T}/rm", "--prompt", "hi"],
        &["{T}/rm", "no LM head"],
    ),
    case(
        "generate_top_p_over_one",
        "model",
        &["generate", "{T}/sft", "--prompt", "hi", "--top-p", "1.5"],
        &["--top-p 1.5", "(0, 1]"],
    ),
    case(
        "generate_negative_temperature",
        "model",
        &[
            "generate",
            "{T}/sft",
            "--prompt",
            "hi",
            "--temperature",
            "-1",
        ],
        &["--temperature -1", "≥ 0"],
    ),
    case(
        "generate_negative_max_new_tokens",
        "model",
        &[
            "generate",
            "{T}/sft",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "-1",
        ],
        &["--max-new-tokens", "out of range"],
    ),
    case(
        "generate_input_line_not_json",
        "model",
        &["generate", "{T}/sft", "--input", "{T}/in/trunc.jsonl"],
        &["trunc.jsonl", "line 3", "not valid JSON"],
    ),
    case(
        "score_text_longer_than_context",
        "model",
        &["score", "{T}/short", "--input", "{T}/long_text.jsonl"],
        &["long_text.jsonl", "line 2", "`text`", "context of 32"],
    ),
    case(
        "score_with_a_reward_model",
        "model",
        &["score", "{T}/rm", "--input", "{T}/long_text.jsonl"],
        &["{T}/rm", "no LM head"],
    ),
    case(
        "model_hidden_size_disagrees_with_weights",
        "model",
        &["info", "{T}/m/hidden"],
        &[
            "model.safetensors",
            "model.embed_tokens.weight",
            "[300, 128]",
        ],
    ),
    case(
        "model_heads_do_not_divide_hidden",
        "model",
        &["info", "{T}/m/heads5"],
        &["config.json", "num_attention_heads"],
    ),
    case(
        "model_kv_heads_do_not_divide_heads",
        "model",
        &["info", "{T}/m/kv3"],
        &["config.json", "num_key_value_heads"],
    ),
    case(
        "model_vocab_size_a_string",
        "model",
        &["info", "{T}/m/vocab_string"],
        &["config.json", "`vocab_size`", "\"300\""],
    ),
    case(
        "model_truncated_config",
        "model",
        &["info", "{T}/m/config_truncated"],
        &["config.json", "not valid JSON"],
    ),
    case(
        "model_truncated_tokenizer",
        "model",
        &["info", "{T}/m/tokenizer_truncated"],
        &["tokenizer.json", "line 1"],
    ),
    case(
        "model_tokenizer_of_another_model",
        "model",
        &["info", "{T}/m/tokenizer_other"],
        &["tokenizer.json", "400 tokens", "vocab_size is 300"],
    ),
    case(
        "model_tensor_dtype_i32",
        "model",
        &["info", "{T}/m/dtype"],
        &["model.safetensors", "model.norm.weight", "I32"],
    ),
    case(
        "model_truncated_safetensors",
        "model",
        &["info", "{T}/m/safetensors_truncated"],
        &["model.safetensors", "safetensors"],
    ),
    case(
        "model_broken_rlhf_json",
        "model",
        &["generate", "{T}/m/rlhf_broken", "--prompt", "hi"],
        &["rlhf.json"],
    ),
    case(
        "model_without_tokenizer",
        "model",
        &["generate", "{T}/m/no_tokenizer", "--prompt", "hi"],
        &["{T}/m/no_tokenizer", "tokenizer.json"],
    ),
    case(
        "init_vocab_below_the_byte_alphabet",
        "model",
        &[
            "init",
            "--texts",
            "{T}/demos.jsonl",
            "--vocab-size",
            "5",
            "--out",
            "{OUT}",
        ],
        &["--vocab-size", "≥ 258"],
    ),
    case(
        "init_unknown_preset",
        "model",
        &[
            "init",
            "--preset",
            "huge",
            "--texts",
            "{T}/demos.jsonl",
            "--out",
            "{OUT}",
        ],
        &["--preset", "huge", "tiny"],
    ),
    case(
        "init_texts_invalid_utf8",
        "model",
        &["init", "--texts", "{T}/in/bad_utf8.jsonl", "--out", "{OUT}"],
        &["bad_utf8.jsonl", "line 2", "not UTF-8"],
    ),
    // ---- reward ----
    case(
        "reward_margin_a_word",
        "reward",
        reward!("--set", "data.path=\"{T}/in/cmp_margin.jsonl\""),
        &["cmp_margin.jsonl", "line 2", "`margin`", "a number"],
    ),
    case(
        "reward_tie_maybe",
        "reward",
        reward!("--set", "data.path=\"{T}/in/cmp_tie.jsonl\""),
        &["cmp_tie.jsonl", "line 2", "`tie`"],
    ),
    case(
        "reward_ranks_count_differs",
        "reward",
        reward!("--set", "data.path=\"{T}/in/group_ranks.jsonl\""),
        &["group_ranks.jsonl", "line 1", "`ranks`"],
    ),
    case(
        "reward_group_of_one",
        "reward",
        reward!("--set", "data.path=\"{T}/in/group_k1.jsonl\""),
        &["group_k1.jsonl", "line 1", "`responses`", "K ≥ 2"],
    ),
    case(
        "reward_truncated_gzip",
        "reward",
        reward!("--set", "data.path=\"{T}/in/broken.jsonl.gz\""),
        &["broken.jsonl.gz", "gzip"],
    ),
    case(
        "reward_unknown_loss",
        "reward",
        reward!("--set", "loss.kind=\"hinge\""),
        &["reward.toml", "`loss.kind`", "hinge"],
    ),
    case(
        "reward_zero_members",
        "reward",
        reward!("--set", "ensemble.members=0"),
        &["reward.toml", "`ensemble.members`"],
    ),
    case(
        "reward_base_is_missing",
        "reward",
        reward!("--set", "model.base=\"{T}/nonexistent\""),
        &["model.base", "{T}/nonexistent"],
    ),
    case(
        "reward_score_with_an_sft_model",
        "reward",
        &["score", "{T}/sft", "--input", "{T}/pairs.jsonl"],
        &["{T}/sft", "no scalar head"],
    ),
    case(
        "reward_score_negative_batch_size",
        "reward",
        &[
            "score",
            "{T}/rm",
            "--input",
            "{T}/pairs.jsonl",
            "--batch-size",
            "-2",
        ],
        &["--batch-size", "out of range"],
    ),
    case(
        "reward_score_negative_uncertainty_coef",
        "reward",
        &[
            "score",
            "{T}/rm",
            "--input",
            "{T}/pairs.jsonl",
            "--uncertainty-coef",
            "-1",
        ],
        &["--uncertainty-coef", "-1"],
    ),
    case(
        "reward_score_input_not_json",
        "reward",
        &["score", "{T}/rm", "--input", "{T}/in/trunc.jsonl"],
        &["trunc.jsonl", "line 3"],
    ),
    // ---- ppo ----
    case(
        "ppo_top_p_over_one",
        "ppo",
        ppo!("--set", "rollout.top_p=1.5"),
        &["ppo.toml", "`rollout.top_p`"],
    ),
    case(
        "ppo_negative_kl",
        "ppo",
        ppo!("--set", "kl.coef=-0.1"),
        &["ppo.toml", "`kl.coef`"],
    ),
    case(
        "ppo_unknown_rule",
        "ppo",
        ppo!("--set", "reward.rule=\"bogus\""),
        &["reward.rule", "bogus"],
    ),
    case(
        "ppo_prompt_field_missing",
        "ppo",
        ppo!("--set", "data.prompts=\"{T}/in/prompts_missing.jsonl\""),
        &["prompts_missing.jsonl", "line 2", "`prompt`"],
    ),
    case(
        "ppo_answer_a_list",
        "ppo",
        ppo!("--set", "data.prompts=\"{T}/in/prompts_answer_list.jsonl\""),
        &["prompts_answer_list.jsonl", "line 1", "`answer`"],
    ),
    case(
        "ppo_empty_prompts",
        "ppo",
        ppo!("--set", "data.prompts=\"{T}/in/empty.jsonl\""),
        &["empty.jsonl", "no prompts"],
    ),
    case(
        "ppo_prompt_longer_than_context",
        "ppo",
        ppo!(
            "--set",
            "model.policy=\"{T}/short\"",
            "--set",
            "data.prompts=\"{T}/long_prompts.jsonl\""
        ),
        &["long_prompts.jsonl", "line 2", "`prompt`"],
    ),
    case(
        "ppo_reward_model_without_a_head",
        "ppo",
        ppo!("--set", "model.reward_model=\"{T}/sft\""),
        &["model.reward_model", "no scalar head"],
    ),
    case(
        "ppo_critic_not_a_folder",
        "ppo",
        ppo!("--set", "model.critic=\"nope\""),
        &["model.critic", "nope"],
    ),
    case(
        "ppo_reference_with_another_tokenizer",
        "ppo",
        ppo!("--set", "model.reference=\"{T}/big\""),
        &["model.reference", "tokenizer"],
    ),
    // ---- dpo ----
    case(
        "dpo_truncated_jsonl",
        "dpo",
        dpo!("--set", "data.path=\"{T}/in/trunc.jsonl\""),
        &["trunc.jsonl", "line 3"],
    ),
    case(
        "dpo_unknown_key",
        "dpo",
        dpo!("--set", "loss.betta=0.1"),
        &["dpo.toml", "unknown key `loss.betta`"],
    ),
    case(
        "dpo_rank_zero_in_a_group",
        "dpo",
        dpo!("--set", "data.path=\"{T}/in/group_rank0.jsonl\""),
        &["group_rank0.jsonl", "line 1", "`ranks`"],
    ),
    // ---- evaluate ----
    case(
        "evaluate_prompt_longer_than_context",
        "evaluate",
        &[
            "--policy",
            "{T}/short",
            "--reward-model",
            "{T}/rm",
            "--prompts",
            "{T}/long_prompts.jsonl",
            "--out",
            "{OUT}",
            "--max-new-tokens",
            "4",
        ],
        &[
            "long_prompts.jsonl",
            "line 2",
            "`prompt`",
            "32-token context",
        ],
    ),
    case(
        "evaluate_negative_top_k",
        "evaluate",
        evaluate!("--top-k", "-1"),
        &["--top-k", "out of range"],
    ),
    case(
        "evaluate_negative_max_prompts",
        "evaluate",
        evaluate!("--max-prompts", "-3"),
        &["--max-prompts", "out of range"],
    ),
    case(
        "evaluate_top_p_over_one",
        "evaluate",
        evaluate!("--top-p", "1.5"),
        &["--top-p 1.5"],
    ),
    case(
        "evaluate_reward_model_is_an_sft_model",
        "evaluate",
        &[
            "--policy",
            "{T}/sft",
            "--reward-model",
            "{T}/sft",
            "--prompts",
            "{T}/prompts.jsonl",
            "--out",
            "{OUT}",
            "--max-new-tokens",
            "2",
        ],
        &["--reward-model", "{T}/sft", "no scalar head"],
    ),
    case(
        "evaluate_policy_is_a_reward_model",
        "evaluate",
        &[
            "--policy",
            "{T}/rm",
            "--reward-model",
            "{T}/rm",
            "--prompts",
            "{T}/prompts.jsonl",
            "--out",
            "{OUT}",
            "--max-new-tokens",
            "2",
        ],
        &["--policy", "{T}/rm", "no LM head"],
    ),
    case(
        "evaluate_unknown_gold_rule",
        "evaluate",
        evaluate!("--gold", "nonsense"),
        &["--gold", "nonsense"],
    ),
];

/// Writes `bytes` to `dir/name`.
fn put(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A copy of model folder `from` at `to` with `edit` applied to its config.json.
fn edited_config(from: &Path, to: &Path, edit: impl FnOnce(&mut Value)) {
    copy_dir(from, to);
    let path = to.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, v.to_string()).unwrap();
}

/// The fixture folder: tiny models, their broken copies and the bad files of the cases.
fn build_fixtures(t: &Path) {
    let demos: String =
        std::fs::read_to_string(root().join("datasets/demo/task/demonstrations.jsonl"))
            .unwrap()
            .lines()
            .take(60)
            .map(|l| format!("{l}\n"))
            .collect();
    put(t, "demos.jsonl", &demos);
    put(t, "demos.txt", &demos);
    let rankings: String = std::fs::read_to_string(root().join("datasets/demo/task/rankings.csv"))
        .unwrap()
        .lines()
        .take(81)
        .map(|l| format!("{l}\n"))
        .collect();
    put(t, "rank.csv", &rankings);
    put(
        t,
        "prompts.jsonl",
        "{\"prompt\":\"Compute 2 plus 2.\",\"answer\":\"4\"}\n{\"prompt\":\"Compute 3 plus 1.\",\"answer\":\"4\"}\n",
    );
    let long = format!(
        "Compute {}.",
        (0..60)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" plus ")
    );
    put(
        t,
        "long_prompts.jsonl",
        format!(
            "{}\n{}\n",
            json!({"prompt": "hi", "answer": "2"}),
            json!({"prompt": long, "answer": "1"})
        ),
    );
    put(
        t,
        "long_text.jsonl",
        format!("{}\n{}\n", json!({"text": "hi"}), json!({"text": long})),
    );
    put(
        t,
        "pairs.jsonl",
        format!("{}\n", json!({"prompt": "hi", "response": "ok"})),
    );

    let s = |p: &Path| p.to_str().unwrap().to_string();
    let sft_run = |out: &Path, vocab: usize| {
        run(
            "sft",
            &[
                "--config",
                "configs/sft.toml",
                "--out",
                &s(out),
                "--set",
                &format!("data.path=\"{}\"", s(&t.join("demos.jsonl"))),
                "--set",
                "train.max_steps=2",
                "--set",
                "train.eval_every=0",
                "--set",
                &format!("model.vocab_size={vocab}"),
            ],
        );
    };
    sft_run(&t.join("sft_run"), 300);
    copy_dir(&t.join("sft_run/final"), &t.join("sft"));
    sft_run(&t.join("big_run"), 400);
    copy_dir(&t.join("big_run/final"), &t.join("big"));
    run(
        "reward",
        &[
            "--config",
            "configs/reward.toml",
            "--out",
            &s(&t.join("rm_run")),
            "--set",
            &format!("model.base=\"{}\"", s(&t.join("sft"))),
            "--set",
            &format!("data.path=\"{}\"", s(&t.join("rank.csv"))),
            "--set",
            "train.max_steps=2",
            "--set",
            "train.eval_every=0",
            "--set",
            "ensemble.members=1",
            "--set",
            "ensemble.monitor=false",
            "--set",
            "ensemble.bootstrap=false",
        ],
    );
    copy_dir(&t.join("rm_run/final"), &t.join("rm"));
    let short = |v: &mut Value| v["max_position_embeddings"] = json!(32);
    edited_config(&t.join("sft"), &t.join("short"), short);

    // Broken model folders.
    let m = t.join("m");
    let sft = t.join("sft");
    edited_config(&sft, &m.join("hidden"), |v| v["hidden_size"] = json!(128));
    edited_config(&sft, &m.join("heads5"), |v| {
        v["num_attention_heads"] = json!(5);
        v.as_object_mut().unwrap().remove("head_dim");
    });
    edited_config(&sft, &m.join("kv3"), |v| {
        v["num_key_value_heads"] = json!(3)
    });
    edited_config(&sft, &m.join("vocab_string"), |v| {
        v["vocab_size"] = json!("300")
    });
    copy_dir(&sft, &m.join("config_truncated"));
    let config = std::fs::read(sft.join("config.json")).unwrap();
    put(&m.join("config_truncated"), "config.json", &config[..100]);
    copy_dir(&sft, &m.join("tokenizer_truncated"));
    let tokenizer = std::fs::read(sft.join("tokenizer.json")).unwrap();
    put(
        &m.join("tokenizer_truncated"),
        "tokenizer.json",
        &tokenizer[..1000],
    );
    copy_dir(&sft, &m.join("tokenizer_other"));
    std::fs::copy(
        t.join("big/tokenizer.json"),
        m.join("tokenizer_other/tokenizer.json"),
    )
    .unwrap();
    // The dtype of one tensor rewritten in the safetensors header (same length: F32 -> I32).
    copy_dir(&sft, &m.join("dtype"));
    let mut st = std::fs::read(sft.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(st[8..8 + n].to_vec()).unwrap();
    let at = header.find("\"model.norm.weight\"").unwrap();
    let f32_at = at + header[at..].find("F32").unwrap();
    st[8 + f32_at] = b'I';
    put(&m.join("dtype"), "model.safetensors", &st);
    copy_dir(&sft, &m.join("safetensors_truncated"));
    let st = std::fs::read(sft.join("model.safetensors")).unwrap();
    put(
        &m.join("safetensors_truncated"),
        "model.safetensors",
        &st[..5000],
    );
    copy_dir(&sft, &m.join("rlhf_broken"));
    put(&m.join("rlhf_broken"), "rlhf.json", "{\"stage\": 3\n");
    copy_dir(&sft, &m.join("no_tokenizer"));
    std::fs::remove_file(m.join("no_tokenizer/tokenizer.json")).unwrap();

    // Bad data files.
    let d = t.join("in");
    std::fs::create_dir_all(&d).unwrap();
    put(
        &d,
        "trunc.jsonl",
        "{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"c\",\"response\":\"d\"}\n{\"prompt\":\"e\",\"response\":\n",
    );
    put(
        &d,
        "wrong_type.jsonl",
        "{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"c\",\"response\":[5]}\n",
    );
    put(
        &d,
        "missing_field.jsonl",
        "{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"c\",\"reply\":\"d\"}\n",
    );
    put(&d, "mid_bom.jsonl", b"{\"prompt\":\"a\",\"response\":\"b\"}\n\xef\xbb\xbf{\"prompt\":\"c\",\"response\":\"d\"}\n");
    put(
        &d,
        "bad_utf8.jsonl",
        b"{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"c\xff\xfe\",\"response\":\"d\"}\n",
    );
    put(
        &d,
        "nul.jsonl",
        b"{\"prompt\":\"a\",\"response\":\"b\"}\n{\"prompt\":\"c\x00\",\"response\":\"d\"}\n",
    );
    put(&d, "extra_cell.csv", "prompt,response\na,b\nc,d,e\n");
    put(&d, "unclosed.csv", "prompt,response\na,b\n\"c,d\ne,f\n");
    put(&d, "empty.jsonl", "");
    put(&d, "blank.jsonl", "\n\n");
    let mut gz = Vec::new();
    {
        use std::io::Write;
        let mut z = flate2_free_gzip(&mut gz);
        z.write_all(demos.as_bytes()).unwrap();
    }
    put(&d, "broken.jsonl.gz", &gz[..gz.len() / 2]);
    put(&d, "bad.parquet", "not parquet\n");
    // A real Parquet file (labeling import's) cut in half.
    let labels = t.join("labels");
    run(
        "labeling",
        &["import", &s(&t.join("rank.csv")), "--out", &s(&labels)],
    );
    let pq = std::fs::read(labels.join("rankings.parquet")).unwrap();
    put(&d, "truncated.parquet", &pq[..pq.len() / 2]);
    put(
        &d,
        "cmp_margin.jsonl",
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"margin\":\"big\"}\n",
    );
    put(
        &d,
        "cmp_tie.jsonl",
        "{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\"}\n{\"prompt\":\"a\",\"chosen\":\"b\",\"rejected\":\"c\",\"tie\":\"maybe\"}\n",
    );
    put(
        &d,
        "group_ranks.jsonl",
        "{\"prompt_id\":\"1\",\"prompt\":\"a\",\"responses\":[\"x\",\"y\"],\"ranks\":[1]}\n",
    );
    put(
        &d,
        "group_k1.jsonl",
        "{\"prompt_id\":\"1\",\"prompt\":\"a\",\"responses\":[\"x\"],\"ranks\":[1]}\n",
    );
    put(
        &d,
        "group_rank0.jsonl",
        "{\"prompt_id\":\"1\",\"prompt\":\"a\",\"responses\":[\"x\",\"y\"],\"ranks\":[1,0]}\n",
    );
    put(
        &d,
        "prompts_missing.jsonl",
        "{\"prompt\":\"hi\"}\n{\"question\":\"x\"}\n",
    );
    put(
        &d,
        "prompts_answer_list.jsonl",
        "{\"prompt\":\"hi\",\"answer\":[1,2]}\n",
    );
    let h = "prompt_id,prompt,response_id,response,labeler_id,rank";
    put(
        &d,
        "rank_word.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,b,l1,first\n"),
    );
    put(
        &d,
        "rank_zero.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,b,l1,0\n"),
    );
    put(
        &d,
        "rank_arabic.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,b,l1,١\n"),
    );
    put(
        &d,
        "rank_cjk.csv",
        format!(
            "{h}\np1,你好,r1,a,l1,1\np1,你好,r2,b,l1,{}\n",
            "这是一个非常长的回答".repeat(20)
        ),
    );
    put(
        &d,
        "rank_rtl.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,b,l1,\u{202e}evil\n"),
    );
    put(
        &d,
        "dup_response.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r1,a,l1,2\np1,hi,r2,b,l1,3\n"),
    );
    put(&d, "single.csv", format!("{h}\np1,hi,r1,a,l1,1\n"));
    put(
        &d,
        "no_rank.csv",
        "prompt_id,prompt,response_id,response,labeler_id\np1,hi,r1,a,l1\n",
    );
    put(
        &d,
        "two_prompts.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hello,r2,b,l1,2\n"),
    );
    put(
        &d,
        "crlf_unclosed.csv",
        format!("{h}\r\np1,hi,r1,a,l1,1\r\np1,hi,r2,\"b\r\n"),
    );
    put(
        &d,
        "bom_bad_utf8.csv",
        [
            b"\xef\xbb\xbf".as_slice(),
            format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,").as_bytes(),
            b"\xff,l1,2\n",
        ]
        .concat(),
    );
    put(
        &d,
        "wide_bad.csv",
        "prompt_id,prompt,labeler_id,response_1,response_2,ranking\np1,hi,l1,a,b,1>3\n",
    );
    put(
        &d,
        "wide_syntax.csv",
        "prompt_id,prompt,labeler_id,response_1,response_2,ranking\np1,hi,l1,a,b,1>>2\n",
    );
    put(
        &d,
        "nul.csv",
        format!("{h}\np1,hi,r1,a,l1,1\np1,hi,r2,b\0,l1,2\n"),
    );
    put(&d, "empty.csv", "");
}

/// A gzip writer without a gzip dependency: a stored (uncompressed) deflate stream is enough
/// to be cut in half.
fn flate2_free_gzip(out: &mut Vec<u8>) -> GzStored<'_> {
    GzStored {
        out,
        data: Vec::new(),
    }
}

struct GzStored<'a> {
    out: &'a mut Vec<u8>,
    data: Vec<u8>,
}

impl std::io::Write for GzStored<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.data.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for GzStored<'_> {
    fn drop(&mut self) {
        self.out
            .extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        let chunks: Vec<&[u8]> = self.data.chunks(65535).collect();
        for (i, c) in chunks.iter().enumerate() {
            self.out.push(u8::from(i + 1 == chunks.len()));
            let len = c.len() as u16;
            self.out.extend_from_slice(&len.to_le_bytes());
            self.out.extend_from_slice(&(!len).to_le_bytes());
            self.out.extend_from_slice(c);
        }
        // CRC32 and size are not needed: the stream is cut before them.
        self.out.extend_from_slice(&[0; 8]);
    }
}

/// Runs one case in its own empty folder; what is wrong with its result, if anything.
fn check(c: &Case, t: &Path) -> Option<String> {
    let dir = t.join("cases").join(c.name);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let fill = |s: &str| {
        s.replace("{T}", t.to_str().unwrap())
            .replace("{OUT}", out.to_str().unwrap())
    };
    let args: Vec<String> = c.args.iter().map(|a| fill(a)).collect();
    let o = Command::new(bin(c.stage))
        .current_dir(root())
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let mut wrong = Vec::new();
    if o.status.success() {
        wrong.push("exited 0".to_string());
    }
    if err.contains("panicked") || err.contains("backtrace") {
        wrong.push("panicked".to_string());
    }
    let error_lines = err.lines().filter(|l| l.starts_with("error")).count();
    if error_lines != 1 {
        wrong.push(format!("{error_lines} lines start with `error`, not one"));
    }
    for s in c.must_name {
        let s = fill(s);
        if !err.contains(&s) {
            wrong.push(format!("does not name {s:?}"));
        }
    }
    for s in c.must_not {
        if err.contains(s) {
            wrong.push(format!("names {s:?}"));
        }
    }
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    if !left.is_empty() {
        wrong.push(format!("left {left:?} behind"));
    }
    if wrong.is_empty() {
        None
    } else {
        Some(format!(
            "{} ({} {}): {}\n  stderr: {}",
            c.name,
            c.stage,
            args.join(" "),
            wrong.join("; "),
            err.trim().replace('\n', "\n          ")
        ))
    }
}

/// Every case of the catalogue: exit ≠ 0, one error naming the file and the line / key / flag /
/// field, nothing written. All failures are reported together.
#[test]
fn every_bad_input_gets_one_error_naming_file_and_place_and_writes_nothing() {
    assert!(CASES.len() >= 45, "{} cases", CASES.len());
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "case names are unique");
    let tmp = tempfile::tempdir().unwrap();
    let t: PathBuf = tmp.path().to_path_buf();
    build_fixtures(&t);
    let failures: Vec<String> = CASES.iter().filter_map(|c| check(c, &t)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
