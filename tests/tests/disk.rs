//! A full disk during a checkpoint (issue 29), simulated with a file-size limit (RLIMIT_FSIZE,
//! as `ulimit -f` sets; the binaries turn the SIGXFSZ it raises into the write error a full disk
//! gives): a resumed `sft` run whose next checkpoint cannot be written exits with status 1 and an
//! error naming the file, leaves no part of that checkpoint (no folder under its name, no
//! temporary folder), and the checkpoint before it is intact: resuming from it again, with room
//! on the disk, ends bit-identical to an uninterrupted run.

use e2e::{bin, files_under, metrics_without_timing, root, small_run};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

fn sft_args(out: &Path) -> Vec<String> {
    let mut a = small_run("sft", out);
    for s in ["train.max_steps=60", "train.keep_last=10"] {
        a.extend(["--set".into(), s.into()]);
    }
    a
}

/// Runs `sft` with `args` under a file-size limit of `limit` bytes.
fn sft_with_file_size_limit(args: &[String], limit: u64) -> std::process::Output {
    let mut cmd = Command::new(bin("sft"));
    cmd.current_dir(root()).args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &l) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_one_before_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let (ok, _, err) = e2e::run_exe(&bin("sft"), &sft_args(&full));
    assert!(ok, "{err}");
    let size = |f: &str| {
        std::fs::metadata(full.join("checkpoint-000060").join(f))
            .unwrap()
            .len()
    };
    let (weights, moments) = (
        size("model.safetensors"),
        size("trainer_state/optimizer.bpk"),
    );
    assert!(weights < moments, "{weights} vs {moments}");
    // The disk fills while the optimizer's moments are written: the weights before them fit, so
    // the checkpoint is half written when the error comes.
    let (limit, file) = ((weights + moments) / 2, "trainer_state/optimizer.bpk");
    {
        let out = tmp.path().join(format!("limited-{limit}"));
        let mut cmd = Command::new(bin("sft"));
        cmd.current_dir(root()).args(sft_args(&out));
        let newest = e2e::kill_once_written(&mut cmd, &out.join("checkpoint-000010"), &out);
        let step: usize = newest
            .to_string_lossy()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(step < 60, "the run ended before it was killed");
        let next = out.join(format!("checkpoint-{:06}", step + 10));
        let before = files_under(&newest, &[]);
        let mut resume = sft_args(&out);
        resume.extend(["--resume".into(), newest.display().to_string()]);
        let o = sft_with_file_size_limit(&resume, limit);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "limit {limit}: {err}");
        let tmp_dir = out.join(format!(".checkpoint-{:06}.tmp", step + 10));
        assert!(
            err.contains(&format!(
                "writing checkpoint {} (nothing of it was kept)",
                next.display()
            )) && err.contains(&tmp_dir.join(file).display().to_string())
                && err.contains("File too large"),
            "limit {limit}: {err}"
        );
        assert!(!next.exists(), "{} was left", next.display());
        assert!(!tmp_dir.exists(), "{} was left", tmp_dir.display());
        assert!(!out.join("final").exists());
        assert!(
            files_under(&newest, &[]) == before,
            "{} changed",
            newest.display()
        );
        // With room again, the same resume ends as the uninterrupted run.
        let (ok, _, err) = e2e::run_exe(&bin("sft"), &resume);
        assert!(ok, "{err}");
        let skip = ["config.toml", "summary.json", "metrics.jsonl", ".lock"];
        // Optimizer files are not byte-stable between runs (their record's layout), even
        // uninterrupted: the weights they lead to are compared.
        let files = |d: &Path| {
            let mut f = files_under(d, &skip);
            f.retain(|k, _| !k.ends_with(".bpk"));
            f
        };
        let (want, got) = (files(&full), files(&out));
        let differ: Vec<&String> = want
            .keys()
            .chain(got.keys())
            .filter(|f| want.get(*f) != got.get(*f))
            .collect();
        assert!(
            differ.is_empty(),
            "limit {limit}: the resumed run's files differ from the uninterrupted run's: {differ:?}"
        );
        assert_eq!(metrics_without_timing(&full), metrics_without_timing(&out));
    }
}
