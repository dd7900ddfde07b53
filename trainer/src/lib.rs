//! Training plumbing shared by the `sft`, `reward` and `ppo` stages, written once: the command
//! line, TOML configs with `--set` overrides, learning-rate schedules, checkpoints with exact
//! resume, `metrics.jsonl` and progress, and the NaN guard. Gradient clipping by global norm lives
//! in `model::ops`.
//!
//! It holds no algorithm: each stage's loop reads top to bottom in its own crate.

#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod optim;
pub mod order;
pub mod run;
pub mod schedule;
pub mod state;

pub use optim::{Check, TrainSection, optimizer_step};
pub use order::{EpochOrder, Fingerprint};
pub use run::{Best, Cadence, Run, Setup};
pub use state::SavedModel;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The command line every stage takes.
#[derive(clap::Args, Debug, Clone)]
pub struct StageArgs {
    /// The stage's TOML config (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key: --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub sets: Vec<String>,
    /// Output folder (overrides `out` in the config).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue exactly from a checkpoint folder written by this stage.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// `cpu` or `cuda:N` (overrides `device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Overrides `seed`.
    #[arg(long, allow_negative_numbers = true, value_parser = model::flags::at_least::<u64>(0))]
    pub seed: Option<u64>,
}

/// A stage config: deserialised by [`config::load_config`], then range-checked.
pub trait StageConfig: serde::de::DeserializeOwned + serde::Serialize {
    /// Adds the config's range errors to `c` (each names the key and the config file).
    fn check(&self, c: &mut Check);
}

impl StageArgs {
    /// Parses the command line of stage `name`.
    pub fn parse(name: &'static str, about: &'static str) -> Self {
        use clap::{Args, FromArgMatches};
        let cmd = Self::augment_args(
            clap::Command::new(name)
                .about(about)
                .version(env!("CARGO_PKG_VERSION")),
        );
        Self::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
    }

    /// Reads the config with every override applied and checks it; returns it with its TOML text
    /// as used.
    pub fn load<T: StageConfig>(&self) -> Result<(T, String)> {
        let (cfg, used): (T, String) = config::load_config(&self.config, &self.all_sets())?;
        let mut c = Check::new(&self.config);
        cfg.check(&mut c);
        c.finish()?;
        Ok((cfg, used))
    }

    /// The config overrides implied by --out, --device and --seed, after the explicit --set ones.
    pub fn all_sets(&self) -> Vec<String> {
        let mut s = self.sets.clone();
        if let Some(o) = &self.out {
            s.push(format!("out={}", toml_string(&o.to_string_lossy())));
        }
        if let Some(d) = &self.device {
            s.push(format!("device={}", toml_string(d)));
        }
        if let Some(seed) = self.seed {
            s.push(format!("seed={seed}"));
        }
        s
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Stops the run on a NaN or infinite `what` (loss, gradient norm), naming the last good
/// checkpoint.
pub fn check_finite(
    what: &str,
    value: f64,
    step: usize,
    last_checkpoint: Option<&Path>,
) -> Result<()> {
    if value.is_finite() {
        return Ok(());
    }
    let last = last_checkpoint.map_or("none was written yet".to_string(), |p| {
        p.display().to_string()
    });
    bail!(
        "{what} is {value} at step {step}; stopping. The last good checkpoint is {last}. Lower the learning rate or check the data."
    )
}

/// Seeds the device's generator for optimizer step `step` of a run with seed `seed`: dropout
/// masks (the model's, LoRA's) are then a function of (seed, step), so a resumed run draws the
/// same ones.
pub fn seed_step(device: &burn::tensor::Device, seed: u64, step: usize) {
    device.seed(seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
}

/// Creates `out`, locks it for this run ([`OutLock`]: a second run into the same folder is
/// refused while this one lives), and writes the config used into it as `config.toml`. Keep the
/// returned lock for as long as the run writes into `out`.
pub fn prepare_out(out: &Path, config_used: &str) -> Result<OutLock> {
    if out.exists() && !out.is_dir() {
        bail!(
            "{}: the output folder is an existing file; choose another `out` (or --out)",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    let lock = OutLock::acquire(out)?;
    let tmp = out.join(".config.toml.tmp");
    std::fs::write(&tmp, config_used).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out.join("config.toml"))
        .with_context(|| format!("renaming {} to config.toml", tmp.display()))?;
    Ok(lock)
}

/// The file in an output folder that the run writing there holds locked (and writes its pid in).
pub const LOCK_FILE: &str = ".lock";

/// A run's hold on its output folder: an OS advisory lock (`flock`) on `out/.lock`, which the
/// operating system releases when the process ends in any way, `kill -9` and power loss
/// included, so a dead run never leaves the folder locked. The file stays (it holds the last
/// holder's pid); only a live process's lock counts. Released when dropped.
#[derive(Debug)]
pub struct OutLock {
    _file: std::fs::File,
}

impl OutLock {
    /// Locks `out` (an existing folder) for this process, or says which folder is in use and, when
    /// known, the pid of the process using it.
    pub fn acquire(out: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = out.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let by = text
                    .trim()
                    .parse::<u32>()
                    .map_or("another run".to_string(), |pid| {
                        format!("another run (pid {pid})")
                    });
                bail!(
                    "{}: {by} is writing into this output folder; wait for it to end, or choose another `out` (or --out)",
                    out.display()
                );
            }
            // A file system without advisory locks: run unlocked rather than not at all.
            Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                eprintln!(
                    "warning: {}: this file system cannot lock files; make sure no other run writes into {}",
                    path.display(),
                    out.display()
                );
                return Ok(Self { _file: file });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
            }
        }
        (|| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        })()
        .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_out_folder_is_locked_until_its_lock_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let lock = prepare_out(&out, "seed = 1\n").unwrap();
        // A second open of the lock file conflicts, even from this process (flock is per open
        // file), and changes nothing in the folder.
        let e = prepare_out(&out, "seed = 2\n").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: another run (pid {}) is writing into this output folder; wait for it to end, or choose another `out` (or --out)",
                out.display(),
                std::process::id()
            )
        );
        assert_eq!(
            std::fs::read_to_string(out.join("config.toml")).unwrap(),
            "seed = 1\n"
        );
        drop(lock);
        let _again = prepare_out(&out, "seed = 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("config.toml")).unwrap(),
            "seed = 2\n"
        );
    }
}
