//! `rust-version` in Cargo.toml is the true minimum: the highest `rust-version` any locked
//! dependency declares (for this host), no lower and no higher.

use std::process::Command;

fn version(v: &str) -> Vec<u32> {
    v.split('.')
        .map(|x| x.parse().expect("a numeric version part"))
        .collect()
}

#[test]
fn rust_version_is_the_highest_a_dependency_needs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let host = String::from_utf8(Command::new(rustc).arg("-vV").output().unwrap().stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "xattn")
        .and_then(|p| p["rust_version"].as_str())
        .expect("xattn declares rust-version");
    let (needed, by) = packages
        .iter()
        .filter(|p| p["name"] != "xattn")
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].to_string())))
        .max()
        .expect("some dependency declares a rust-version");
    assert_eq!(
        version(ours),
        needed,
        "Cargo.toml says rust-version {ours}; the dependencies need {needed:?} ({by})"
    );
}
