//! `hookrunner completions SHELL` against real shells: bash's registered completion function called as
//! bash calls it on a TAB, fish's own completer asked for candidates, and zsh's completion system loading
//! the script. (That packaging/completions/ holds these same scripts is a unit test in src/cli.rs.)

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::BIN;

/// `hookrunner completions SHELL`, written to a file in `dir`.
fn script(dir: &Path, shell: &str) -> PathBuf {
    let out = Command::new(BIN)
        .args(["completions", shell])
        .output()
        .expect("run hookrunner");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "completions {shell}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.join(shell);
    fs::write(&path, &out.stdout).expect("write script");
    path
}

/// What bash offers for the command line `words` with the cursor at the end of the last word: the
/// script is sourced into a bare bash, and the function `complete -F` registered for `hookrunner` is
/// called with the COMP_* variables and arguments bash gives it.
fn bash_offers(script: &Path, words: &[&str]) -> Vec<String> {
    const DRIVER: &str = r#"
source "$1" || exit 2
shift
spec=$(complete -p hookrunner) || exit 3
fn=${spec#*-F }
fn=${fn%% *}
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$fn" hookrunner "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
printf '%s\n' "${COMPREPLY[@]}"
"#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", DRIVER, "bash"])
        .arg(script)
        .args(words)
        .output()
        .expect("run bash");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "bash for {words:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_completes_commands_options_and_their_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bash = script(dir.path(), "bash");
    assert_eq!(bash_offers(&bash, &["hookrunner", "deli"]), ["deliveries"]);
    let all = bash_offers(&bash, &["hookrunner", ""]);
    for command in ["serve", "check", "deliveries", "get", "send", "completions"] {
        assert!(all.iter().any(|w| w == command), "{command} not in {all:?}");
    }
    assert_eq!(
        bash_offers(&bash, &["hookrunner", "serve", "--li"]),
        ["--listen"]
    );
    let list = bash_offers(&bash, &["hookrunner", "deliveries", "list", "--s"]);
    assert!(
        list.iter().any(|w| w == "--status") && list.iter().any(|w| w == "--since"),
        "{list:?}"
    );
    assert!(
        !list.iter().any(|w| w == "--listen"),
        "serve's option offered to deliveries list: {list:?}"
    );
    assert_eq!(
        bash_offers(
            &bash,
            &["hookrunner", "send", "ComputerAdded", "--format", ""]
        ),
        ["json", "xml"]
    );
    assert_eq!(
        bash_offers(&bash, &["hookrunner", "completions", "z"]),
        ["zsh"]
    );
}

#[test]
fn fish_completes_commands_and_options() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fish = script(dir.path(), "fish");
    let offers = |line: &str| {
        let out = Command::new("fish")
            .args([
                "--no-config",
                "-c",
                "source $argv[1]; and complete -C $argv[2]",
            ])
            .arg(&fish)
            .arg(line)
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .output()
            .expect("fish (Debian package fish; .ci/run installs it)");
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "fish for {line:?}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // One candidate a line, its description after a tab.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(offers("hookrunner deli"), ["deliveries"]);
    assert_eq!(offers("hookrunner serve --li"), ["--listen"]);
    assert_eq!(offers("hookrunner send E --format "), ["json", "xml"]);
}

#[test]
fn zsh_loads_the_script_into_its_completion_system() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zsh = script(dir.path(), "zsh");
    // compinit (without a dump file, trusting every directory) then the script, as a file in $fpath would
    // be loaded: it must register its function for `hookrunner` and say nothing.
    let out = Command::new("zsh")
        .args([
            "-f",
            "-c",
            "autoload -Uz compinit && compinit -u -D && source $1 && print -r -- $_comps[hookrunner]",
            "zsh",
        ])
        .arg(&zsh)
        .env("HOME", dir.path())
        .output()
        .expect("zsh (Debian package zsh; .ci/run installs it)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "zsh: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "_hookrunner\n");
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let out = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("run hookrunner");
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tcsh") && err.contains("bash, zsh, fish"),
        "{err}"
    );
}
