//! The shared model crate of the RLHF pipeline: causal language models on burn (Llama family and
//! GPT-2, read from Hugging Face `config.json`), an LM head and a scalar head for reward and value
//! models, a training forward over padded batches, an incremental forward with an external KV
//! cache, batched sampling, Hugging Face checkpoint folders (safetensors in, safetensors out), and
//! tokenizers (load `tokenizer.json`, or train a byte-level BPE).
//!
//! It is not a trainer: schedules, loops and data live in the stage crates; [`ops`] holds the
//! few tensor functions they all share, and [`optim`] the fused AdamW they all step with.

pub mod batch;
pub mod chat;
pub mod checkpoint;
pub mod config;
mod cpu;
pub mod device;
pub mod error;
pub mod flags;
mod fused;
pub mod generate;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod runtime;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use batch::TokenBatch;
pub use checkpoint::{
    Loaded, ModelMeta, RewardNormalization, load, load_with, save, save_adapter, save_with_meta,
};
pub use config::{Family, ModelConfig};
pub use device::{backend_name, parse_device};
pub use error::{ModelError, Result};
pub use fused::{
    MatmulPrecision, PackedWeights, amx_available, matmul_precision, set_matmul_precision,
};
pub use generate::{Generation, SamplingConfig, generate};
pub use lora::LoraConfig;
pub use tokenizer::{PromptTemplate, Tokenizer};
pub use transformer::{CausalLm, Heads, KvCache};
pub use weights::{SafetensorsFiles, WeightDtype};
