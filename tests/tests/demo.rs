//! The README's first command, `scripts/demo.sh`, end to end on a reduced config: labeling import →
//! sft → reward → ppo → evaluate. Every artifact must exist and parse, the report's numbers must
//! be finite, and the plots must be PNG files.

use std::process::Command;

fn finite_numbers(v: &serde_json::Value, at: &str) {
    match v {
        serde_json::Value::Number(n) => {
            assert!(n.as_f64().is_some_and(f64::is_finite), "{at} = {n}")
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                finite_numbers(x, &format!("{at}[{i}]"));
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                finite_numbers(x, &format!("{at}.{k}"));
            }
        }
        _ => {}
    }
}

#[test]
fn demo_script_runs_the_whole_pipeline() {
    let root = e2e::root();
    // demo.sh runs with SKIP_BUILD=1: the binaries must be built (this panics, saying so).
    e2e::bin("evaluate");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let o = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .env("OUT_DIR", &out)
        .env("SKIP_BUILD", "1")
        .env("SFT_STEPS", "60")
        .env("RM_STEPS", "20")
        .env("PPO_ITERS", "3")
        .env("EVAL_PROMPTS", "12")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Each stage's command is printed before it runs; the report's path is printed last.
    for cmd in [
        "labeling import",
        "sft --config",
        "reward --config",
        "ppo --config",
        "evaluate --policy",
    ] {
        assert!(
            stdout.contains(&format!("/{cmd}")),
            "{cmd} not printed:\n{stdout}"
        );
    }
    assert!(stdout.trim_end().ends_with("eval/report.md"), "{stdout}");
    for stage in ["sft", "reward", "ppo"] {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(stage).join("summary.json")).unwrap(),
        )
        .unwrap();
        assert!(summary.is_object(), "{stage}");
        // The shipped reward config trains an ensemble: members and the monitor each a run of
        // their own, final/ their manifest and models.
        let runs = if stage == "reward" {
            let manifest: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("reward/final/ensemble.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                manifest["members"].as_array().unwrap().len(),
                3,
                "{manifest}"
            );
            assert_eq!(manifest["monitor"], "monitor", "{manifest}");
            vec![
                "reward/member-0",
                "reward/member-1",
                "reward/member-2",
                "reward/monitor",
            ]
        } else {
            vec![stage]
        };
        for run in runs {
            for line in std::fs::read_to_string(out.join(run).join("metrics.jsonl"))
                .unwrap()
                .lines()
            {
                serde_json::from_str::<serde_json::Value>(line).unwrap();
            }
            assert!(
                out.join(run).join("final/model.safetensors").exists(),
                "{run}"
            );
        }
    }
    let eval = out.join("eval");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();
    finite_numbers(&metrics, "metrics");
    for line in std::fs::read_to_string(eval.join("samples.jsonl"))
        .unwrap()
        .lines()
    {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    let report = std::fs::read_to_string(eval.join("report.md")).unwrap();
    assert!(
        report.contains("| metric |") && !report.contains("NaN"),
        "{report}"
    );
    let pngs: Vec<_> = std::fs::read_dir(&eval)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    assert!(pngs.len() >= 5, "{pngs:?}");
    for p in pngs {
        let bytes = std::fs::read(&p).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 2000,
            "{}",
            p.display()
        );
    }
}
