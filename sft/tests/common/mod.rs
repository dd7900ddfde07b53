//! What the `sft` binary's test files share: the workspace root and running `sft`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (configs and datasets are given relative to it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `sft` with the repo's config and overrides; returns (success, stdout, stderr).
pub fn sft(sets: &[&str], extra: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sft"));
    cmd.current_dir(root())
        .args(["--config", "configs/sft.toml"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.args(extra).output().expect("running sft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
