//! The binary refuses a bad configuration with a message that names the key.

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_embedjoin"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("EMBEDJOIN_CONFIG")
        .output()
        .expect("the binary runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_bad_config_file_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[shards]\nmailbox_capacity = 0\n").unwrap();
    let (code, stderr) = run(&["--config", file.to_str().unwrap(), "serve"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("shards.mailbox_capacity"), "{stderr}");
}

#[test]
fn environment_variables_override_the_file_and_are_validated() {
    let (code, stderr) = run(&["serve"], &[("EMBEDJOIN__REDIS__URL", "http://nope")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("redis.url"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let (code, stderr) = run(&["--config", "/nonexistent/embedjoin.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("embedjoin.toml"), "{stderr}");
}
