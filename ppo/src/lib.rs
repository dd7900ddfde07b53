//! Stage 3 of the pipeline: the SFT policy is optimised with PPO against the reward model of stage
//! 2, with a KL penalty towards the frozen SFT (reference) policy so that it does not drift into
//! reward-model exploits (InstructGPT, Ouyang et al. 2022, §3.5; the implementation details follow
//! Huang et al. 2024, "The N+ implementation details of RLHF with PPO: a case study on TL;DR
//! summarization"). Each iteration samples responses to a batch of prompts, scores them with the
//! reward model, turns scores and per-token KL into per-token rewards, estimates advantages with
//! GAE, and takes several epochs of clipped policy and value updates on minibatches.
//!
//! For now the crate holds the loss math of that loop as pure functions in [`core`], tested
//! against PyTorch; the rollout and training loop will be added on top of it later.

pub mod core;
