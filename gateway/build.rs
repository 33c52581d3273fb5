//! Records what the binary is built from, for `gateway --version` and the
//! `gateway.build.info` metric: the git commit (or `WSGW_BUILD_COMMIT`
//! when set, for builds outside a checkout such as a container's), the
//! compiler, the target and the profile.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=WSGW_BUILD_COMMIT");
    let commit = std::env::var("WSGW_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let rustc = output(Command::new(rustc).arg("--version")).unwrap_or_else(|| "unknown".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=WSGW_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=WSGW_BUILD_RUSTC={rustc}");
    println!("cargo:rustc-env=WSGW_BUILD_TARGET={target}");
    println!("cargo:rustc-env=WSGW_BUILD_PROFILE={profile}");
}

/// The checkout's commit, with `-dirty` if tracked files differ from it;
/// reruns when HEAD moves or the index changes.
fn git_commit() -> Option<String> {
    let git_dir = output(Command::new("git").args(["rev-parse", "--absolute-git-dir"]))?;
    println!("cargo:rerun-if-changed={git_dir}/HEAD");
    println!("cargo:rerun-if-changed={git_dir}/index");
    if let Some(head_ref) = output(Command::new("git").args(["symbolic-ref", "-q", "HEAD"])) {
        println!("cargo:rerun-if-changed={git_dir}/{head_ref}");
    }
    let commit = output(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]))?;
    let dirty = Command::new("git")
        .args(["diff-index", "--quiet", "HEAD", "--"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(false);
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}
