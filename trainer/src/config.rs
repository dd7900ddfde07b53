//! Stage configs: a TOML file read into the stage's serde struct, with `--set key.path=value`
//! overrides applied first. Unknown keys are errors that name the key and the file.

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use toml::{Table, Value};

/// `cpu`, the default device of every stage.
pub fn default_device() -> String {
    "cpu".into()
}

/// Declares a stage's config struct with the top-level keys every stage has (`out`, `seed`,
/// `device`) followed by the stage's own sections. (serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, which every stage config needs, hence a macro.)
#[macro_export]
macro_rules! stage_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Output folder: config.toml, metrics.jsonl, checkpoint-NNNNNN/, final/, summary.json.
            pub out: std::path::PathBuf,
            /// Seed of everything random in the run (init, split, data order, dropout, sampling).
            #[serde(default)]
            pub seed: u64,
            /// `cpu` or `cuda:N` (CUDA with the tch backend).
            #[serde(default = "trainer::config::default_device")]
            pub device: String,
            /// Matrix products: `fp32`, or `bf16` (bf16 operands, f32 sums and weights; AMX
            /// tiles where the CPU has them).
            #[serde(default)]
            pub matmul: model::MatmulPrecision,
            /// How frozen models' matrices are kept (the KL reference, a scoring reward model,
            /// a LoRA base): `auto` (the file's dtype), `f32` or `bf16`; trained weights are f32.
            #[serde(default)]
            pub dtype: model::WeightDtype,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// Where the run writes and what it continues from.
            pub fn setup<'a>(
                &'a self,
                config_used: &'a str,
                resume: Option<&'a std::path::Path>,
            ) -> trainer::Setup<'a> {
                trainer::Setup {
                    out: &self.out,
                    config_used,
                    seed: self.seed,
                    resume,
                }
            }
        }
    };
}

/// Parses one override value: TOML syntax when it parses (`3e-4`, `true`, `[1, 2]`, `"x"`),
/// otherwise the raw text as a string (`--set data.path=train.jsonl`).
fn override_value(raw: &str) -> Value {
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Sets `path` (dotted) to `value` in `table`, creating tables on the way.
fn set_path(table: &mut Table, path: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {path:?}: expected key.path=value");
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("--set {path}: `{p}` is a value, not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// Reads the config file, applies `sets` (`key.path=value`), and deserializes it. Returns the
/// config and its TOML text as used (to be written next to the outputs).
pub fn load_config<T: DeserializeOwned + Serialize>(
    path: &Path,
    sets: &[String],
) -> Result<(T, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the config file", path.display()))?;
    let mut table: Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: invalid TOML: {e}", path.display()))?;
    for s in sets {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {s:?}: expected key.path=value"))?;
        set_path(&mut table, key.trim(), override_value(raw.trim()))?;
    }
    let cfg: T = serde_path_to_error::deserialize(Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if msg.contains("unknown field") {
            anyhow!(
                "{}: unknown key `{key}` ({msg}); check its spelling against the commented config in configs/",
                path.display()
            )
        } else {
            anyhow!("{}: key `{key}`: {msg}", path.display())
        }
    })?;
    let used = toml::to_string_pretty(&cfg).context("serialising the config")?;
    Ok((cfg, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lr: f64,
        #[serde(default)]
        name: String,
    }

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        seed: u64,
        train: Inner,
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "seed = 1\n[train]\nlr = 0.1\n").unwrap();
        let (c, used): (Cfg, String) = load_config(
            &p,
            &[
                "train.lr=3e-4".into(),
                "train.name=run a".into(),
                "seed=7".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            c,
            Cfg {
                seed: 7,
                train: Inner {
                    lr: 3e-4,
                    name: "run a".into()
                }
            }
        );
        assert!(used.contains("lr = 0.0003"), "{used}");

        std::fs::write(&p, "seed = 1\n[train]\nlr = 0.1\nlerning_rate = 2\n").unwrap();
        let e = load_config::<Cfg>(&p, &[]).unwrap_err().to_string();
        assert!(
            e.contains("c.toml") && e.contains("unknown key `train.lerning_rate`"),
            "{e}"
        );
        std::fs::write(&p, "seed = 1\n[train]\nlr = 0.1\n").unwrap();
        let e = load_config::<Cfg>(&p, &["train.typo=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key `train.typo`"), "{e}");
        let e = load_config::<Cfg>(&p, &["seed=abc".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("key `seed`"), "{e}");
        let e = load_config::<Cfg>(&dir.path().join("none.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.toml: cannot read"), "{e}");
    }
}
