//! The package's documents against the code and README: hookrunner.toml(5) describes every key of
//! README's Configuration table and no other, the shipped conffiles are valid with every commented
//! setting switched on, and so is README's `[[sender]]` example. (packaging/test-deb tests the package
//! itself, as root.)

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// README.md's `## TITLE` section, to the next one.
fn readme_section(title: &str) -> String {
    read("README.md")
        .split(&format!("\n## {title}"))
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .unwrap_or_else(|| panic!("no {title} section in README.md"))
        .to_string()
}

/// The keys in README.md's Configuration table: its rows' first cells.
fn readme_keys() -> Vec<String> {
    let table = readme_section("Configuration");
    let keys: Vec<String> = table
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(key, _)| key.to_string())
        .collect();
    assert!(keys.len() >= 10, "{keys:?}");
    keys
}

/// The keys hookrunner.toml(5) describes: each is a `.TP` item's first word in the KEYS section.
fn man_keys() -> Vec<String> {
    let man = read("packaging/man/hookrunner.toml.5");
    let keys = man
        .split(".SH KEYS")
        .nth(1)
        .and_then(|rest| rest.split(".SH ").next())
        .expect("a KEYS section");
    let lines: Vec<&str> = keys.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .filter_map(|w| w[1].split_whitespace().nth(1))
        .map(|key| key.trim_matches('"').to_string())
        .collect()
}

#[test]
fn the_man_page_describes_every_configuration_key_in_the_readme_and_no_other() {
    let mut readme = readme_keys();
    let mut man = man_keys();
    readme.sort();
    man.sort();
    assert_eq!(
        man, readme,
        "hookrunner.toml(5) KEYS vs README's Configuration table"
    );
}

#[test]
fn the_shipped_configuration_names_every_key() {
    let shipped = read("packaging/hookrunner.toml");
    for key in readme_keys() {
        // A table is shown as an example block (`# [[sender]]`, `# [tls]`), a key as a commented setting
        // (or, `state_dir`, as one in force).
        let shown = if key.starts_with('[') {
            shipped.lines().any(|l| l == format!("# {key}"))
        } else {
            shipped.lines().any(|l| {
                l.strip_prefix('#')
                    .unwrap_or(l)
                    .starts_with(&format!("{key} = "))
            })
        };
        assert!(shown, "packaging/hookrunner.toml does not show `{key}`");
    }
}

/// The shipped files with every commented setting switched on (paths moved into the test's directory):
/// what an administrator gets by uncommenting is valid, and `check` says so.
#[test]
fn the_shipped_configuration_and_routes_are_valid_uncommented() {
    let env = Env::new();
    env.script("ComputerAdded", "exit 0");
    let routes = env.path().join("routes");
    fs::copy(repo("packaging/routes"), &routes).expect("copy routes");
    let mut text = String::new();
    for line in read("packaging/hookrunner.toml").lines() {
        let setting = line.strip_prefix('#').unwrap_or(line);
        let key = setting.split(" = ").next().unwrap_or_default();
        let moved = match key {
            "routes" => Some(routes.clone()),
            "state_dir" => Some(env.state()),
            "scripts_dir" => Some(env.scripts()),
            "payload_dir" => Some(env.payloads()),
            "log_file" => Some(env.path().join("hookrunner.log")),
            _ => None,
        };
        if let Some(path) = moved {
            text.push_str(&format!("{key} = {path:?}\n"));
        } else if setting.contains(" = ") && !setting.starts_with(' ')
            || setting.starts_with("         \"")
        {
            text.push_str(setting);
            text.push('\n');
        }
    }
    assert!(
        text.contains("event = [") && text.contains("listen = \"127.0.0.1:8080\""),
        "{text}"
    );
    let config = env.path().join("shipped.toml");
    fs::write(&config, &text).expect("write config");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("{event}") && stdout.contains("configuration OK"),
        "{stdout}"
    );
}

/// The README's `[[sender]]` example loads as written, its secret files put where it names them: what a
/// newcomer copies is a valid configuration, and `check` lists each sender with its type and path.
#[test]
fn the_readmes_sender_example_is_a_valid_configuration() {
    let section = readme_section("Sender authentication");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML example");
    let env = Env::new();
    let secret = |name: &str| secret(&env, name, "a-secret-value");
    // The absolute secret paths moved into the test's directory; the relative one is found beside the
    // configuration (no $CREDENTIALS_DIRECTORY here).
    let mut text = block.to_string();
    for name in ["jamf", "jamf-key", "jamf-signing"] {
        let written = format!("\"/etc/hookrunner/secrets/{name}\"");
        assert!(text.contains(&written), "{written} not in:\n{block}");
        text = text.replace(&written, &format!("{:?}", secret(name)));
    }
    assert!(!text.contains("/etc/"), "{text}");
    secret("github");
    let env = env.config(&text);
    let out = env.check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for sender in [
        "# sender jamf: basic on /jamf",
        "# sender jamf-header: headers on /jh",
        "# sender jamf-signed: hmac on /js",
        "# sender github: github on /github",
    ] {
        assert!(stdout.contains(sender), "{sender} not in:\n{stdout}");
    }
}
