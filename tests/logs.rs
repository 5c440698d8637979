//! `log_file`: the log goes to a file instead of stderr, and SIGHUP reopens it, so logrotate can rename the
//! file and then reload (packaging/hookrunner.logrotate).

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::util::*;

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn wait_text(path: &Path, needle: &str) -> bool {
    wait_until(Duration::from_secs(10), || read(path).contains(needle))
}

#[test]
fn log_file_takes_the_log_and_sighup_reopens_it_after_a_rename() {
    let log = tempfile::tempdir().expect("tempdir");
    let current = log.path().join("hookrunner.log");
    let env = Env::new().config(&format!("log_file = {current:?}"));
    env.script("Ping", "echo pong-$HOOKRUNNER_REQUEST_ID");
    let mut server = Server::spawn(env.serve_command("127.0.0.1:0"));
    assert!(
        wait_text(&current, "listening on "),
        "no log file: {}",
        server.log()
    );
    let text = read(&current);
    let addr = text
        .lines()
        .find_map(|l| l.split("listening on ").nth(1))
        .expect("address")
        .trim();
    server.addr = addr.parse().expect("address");
    let first = server.post("/hooks/Ping", b"");
    assert_eq!(first.status, 200);
    let first_id = first.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(wait_text(&current, &format!("pong-{first_id}")));
    // Nothing but what precedes loading the configuration went to stderr.
    assert!(!server.log().contains("listening on"), "{}", server.log());

    // What logrotate does: rename, then reload.
    let rotated = log.path().join("hookrunner.log.1");
    fs::rename(&current, &rotated).expect("rename");
    server.signal(libc::SIGHUP);
    assert!(
        wait_text(&current, "reloaded"),
        "no new file after SIGHUP: {}",
        read(&rotated)
    );
    let second = server.post("/hooks/Ping", b"");
    let second_id = second.json()["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(wait_text(&current, &format!("pong-{second_id}")));
    let old = read(&rotated);
    assert!(
        old.contains(&format!("pong-{first_id}")) && !old.contains(&second_id),
        "{old}"
    );
    // A reload that fails (here on the routes) reopens the log all the same: logrotate renamed it and
    // signalled, and the renamed file is compressed and deleted later.
    let rotated_again = log.path().join("hookrunner.log.2");
    fs::rename(&current, &rotated_again).expect("rename");
    env.routes("Ping Ping colour=red\n");
    server.signal(libc::SIGHUP);
    assert!(
        wait_text(&current, "reload failed"),
        "no new file after a failed reload: {}",
        read(&rotated_again)
    );
    assert!(!read(&rotated_again).contains("reload failed"));
    // The file is the daemon's alone: not readable by others.
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&current).expect("stat").permissions().mode();
    assert_eq!(mode & 0o007, 0, "{mode:o}");
}
