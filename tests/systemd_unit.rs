//! The shipped unit passes `systemd-analyze verify` (with ExecStart pointed at
//! the binary under test, since the installed path does not exist here).

use std::process::Command;

#[test]
fn unit_file_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    }
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kedge.service");
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/local/bin/kedge", env!("CARGO_BIN_EXE_kedge"));
    assert!(text.contains("Type=notify"));
    let dir = std::env::temp_dir().join(format!("kedge-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kedge.service");
    std::fs::write(&path, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // verify exits 0 on some warnings; none may mention our unit.
    assert!(!stderr.contains("kedge.service:"), "{stderr}");
}
