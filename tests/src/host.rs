//! What the test host can do, decided by the same probe `ferry check` uses.
//!
//! The rule for every guest test: in CI (`CI=true`) a missing /dev/kvm or a
//! missing tool the CI script installs is a failure; elsewhere it is a skip
//! that says so on the test's output.

use std::path::{Path, PathBuf};
use std::process::Command;

pub use vmm::check::KvmKind;

/// True when running under CI, where nothing may be skipped for lack of KVM.
pub fn is_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Prints a visible skip line for `test`. Written to the stderr handle
/// rather than through `eprintln!`, which the test harness captures and
/// hides for a passing test: a skip must show in every run's output.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// The KVM kind of this host, or `None` (after printing why) when the test
/// cannot run a guest here. Panics in CI when /dev/kvm is unusable.
pub fn require_kvm(test: &str) -> Option<KvmKind> {
    match vmm::check::probe() {
        Ok(report) => {
            if let Some(missing) = report.missing_required() {
                if is_ci() {
                    panic!("{test}: KVM lacks a required capability: {missing}");
                }
                skip(test, &format!("KVM lacks {missing}"));
                return None;
            }
            Some(report.kind)
        }
        Err(e) => {
            if is_ci() {
                panic!("{test}: CI requires KVM: {e}");
            }
            skip(test, &e.to_string());
            None
        }
    }
}

/// Like [`require_kvm`], but the test also needs hardware virtualization
/// (a Linux guest reaching userspace). On kvm_pvm this is a skip, in CI too,
/// with the reason printed.
pub fn require_hw_virt(test: &str) -> bool {
    match require_kvm(test) {
        Some(KvmKind::Hardware) => true,
        Some(KvmKind::Pvm) => {
            skip(
                test,
                "host has kvm_pvm, not hardware virtualization: a Linux guest cannot reach userspace here",
            );
            false
        }
        None => false,
    }
}

/// Whether `tool` is on PATH. In CI a missing tool is a failure (the CI
/// script installs them all); elsewhere the test is skipped.
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if is_ci() {
            panic!("{test}: CI requires `{tool}` (resources/setup-host installs it)");
        }
        skip(
            test,
            &format!("`{tool}` is not installed (run resources/setup-host)"),
        );
    }
    found
}

/// Whether the tests run as root (network namespaces, TAP devices).
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if is_ci() {
            panic!("{test}: CI runs as root");
        }
        skip(test, "needs root for network namespaces and TAP devices");
    }
    root
}

/// The repository's top directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A file or directory under the temporary directory that is removed
/// when dropped, so a failing test cleans up as well as a passing one.
pub struct TempPath(PathBuf);

impl TempPath {
    /// `$TMPDIR/ferry-<name>-<pid>` (nothing is created).
    pub fn new(name: &str) -> TempPath {
        TempPath(std::env::temp_dir().join(format!("ferry-{name}-{}", std::process::id())))
    }

    /// Takes charge of `path` (anywhere).
    pub fn at(path: PathBuf) -> TempPath {
        TempPath(path)
    }

    /// The path as a command-line argument.
    pub fn arg(&self) -> &str {
        self.0.to_str().expect("temporary paths are UTF-8")
    }
}

impl std::ops::Deref for TempPath {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl AsRef<Path> for TempPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}
