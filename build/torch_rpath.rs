// With the `tch` feature, embeds the LibTorch library folder as an rpath so that the binaries and
// tests run without LD_LIBRARY_PATH. The folder is torch's `lib/` of the Python that
// LIBTORCH_USE_PYTORCH builds against (`python3` on PATH, or $LIBTORCH_PYTHON), or $LIBTORCH/lib.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_PYTHON");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let lib = match std::env::var("LIBTORCH") {
        Ok(root) => Some(format!("{root}/lib")),
        Err(_) => {
            let python = std::env::var("LIBTORCH_PYTHON").unwrap_or_else(|_| "python3".into());
            std::process::Command::new(python)
                .args([
                    "-c",
                    "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
    };
    match lib {
        Some(dir) => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        None => println!(
            "cargo:warning=tch: torch's lib folder not found; set LD_LIBRARY_PATH at run time"
        ),
    }
}
