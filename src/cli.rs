//! The command line: `serve`, `check`, `--help`, `--version`. Parsing is by hand: three subcommands and
//! three flags do not earn a parser crate.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, Listen, Overrides};
use crate::daemon;
use crate::deliveries;

/// sysexits.h: bad usage, bad configuration.
const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

const HELP: &str = "\
hookrunner: runs a script for each webhook it receives

USAGE:
    hookrunner serve [--config FILE] [--listen ADDR] [--scripts-dir DIR]
    hookrunner check [--config FILE] [--scripts-dir DIR]
{DELIVERIES}
    hookrunner --help | --version

COMMANDS:
    serve       run the daemon
    check       validate the configuration and routes, print the routing table
    deliveries  list, show, retry or drop deliveries in the store (works while the daemon runs)

OPTIONS:
    --config FILE       configuration file (default /etc/hookrunner/hookrunner.toml if it
                        exists, else built-in defaults)
    --listen ADDR       HOST:PORT or unix:/path, overriding the file (port 0 picks a free port;
                        the log says which)
    --scripts-dir DIR   where scripts live, overriding the file (default /etc/hookrunner.d)

RUST_LOG sets the log level (default info). See README.md for the configuration keys.
";

fn help() -> String {
    HELP.replace("{DELIVERIES}", deliveries::USAGE)
}

#[derive(Debug, PartialEq, Eq)]
enum Command {
    Serve {
        config: Option<PathBuf>,
        overrides: Overrides,
    },
    Check {
        config: Option<PathBuf>,
        overrides: Overrides,
    },
    Deliveries(deliveries::Args),
    Help,
    Version,
}

impl PartialEq for Overrides {
    fn eq(&self, other: &Overrides) -> bool {
        self.listen == other.listen && self.scripts_dir == other.scripts_dir
    }
}

impl Eq for Overrides {}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let first = args.next().ok_or("no command given")?;
    let serve = match first.to_str() {
        Some("serve") => true,
        Some("check") => false,
        Some("--help" | "-h" | "help") => return Ok(Command::Help),
        Some("--version" | "-V") => return Ok(Command::Version),
        Some("deliveries") => {
            return deliveries::parse(args, crate::store::now_ms()).map(Command::Deliveries);
        }
        _ => return Err(format!("unknown command {first:?}")),
    };
    let mut config = None;
    let mut overrides = Overrides::default();
    while let Some(flag) = args.next() {
        let flag = flag
            .to_str()
            .ok_or_else(|| format!("unknown option {flag:?}"))?
            .to_string();
        if flag == "--help" || flag == "-h" {
            return Ok(Command::Help);
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--config" => config = Some(PathBuf::from(value)),
            "--scripts-dir" => overrides.scripts_dir = Some(PathBuf::from(value)),
            "--listen" if serve => {
                let text = value.to_str().ok_or("--listen needs a UTF-8 address")?;
                overrides.listen = Some(Listen::parse(text)?);
            }
            _ => return Err(format!("unknown option {flag:?}")),
        }
    }
    Ok(if serve {
        Command::Serve { config, overrides }
    } else {
        Command::Check { config, overrides }
    })
}

pub fn run() -> ExitCode {
    let command = match parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("hookrunner: {e}\n\n{}", help());
            return ExitCode::from(EX_USAGE);
        }
    };
    match command {
        Command::Help => {
            print!("{}", help());
            ExitCode::SUCCESS
        }
        Command::Deliveries(args) => match deliveries::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err((message, code)) => {
                eprintln!("hookrunner: {message}");
                ExitCode::from(code)
            }
        },
        Command::Version => {
            println!("hookrunner {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config, overrides } => match Config::load(config.as_deref(), &overrides) {
            Ok(config) => {
                for warning in &config.warnings {
                    eprintln!("hookrunner: warning: {warning}");
                }
                print!("{}", config.routes);
                for sender in &config.senders.senders {
                    println!(
                        "# sender {}: {} on {}",
                        sender.name,
                        sender.scheme.name(),
                        sender.path
                    );
                }
                println!("# configuration OK");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hookrunner: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Serve { config, overrides } => {
            crate::logging::init();
            match daemon::serve(config, overrides) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ daemon::Error::Config(_)) => {
                    log::error!("{e}");
                    ExitCode::from(EX_CONFIG)
                }
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse(args(&["--version"])), Ok(Command::Version));
        assert_eq!(parse(args(&["serve", "--help"])), Ok(Command::Help));
        let got = parse(args(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            "c.toml",
        ]));
        assert_eq!(
            got,
            Ok(Command::Serve {
                config: Some("c.toml".into()),
                overrides: Overrides {
                    listen: Some(Listen::Tcp("127.0.0.1:0".into())),
                    scripts_dir: None
                }
            })
        );
        assert!(matches!(
            parse(args(&["check", "--scripts-dir", "s"])),
            Ok(Command::Check { .. })
        ));
    }

    #[test]
    fn rejects_bad_usage() {
        for bad in [
            &[][..],
            &["run"],
            &["serve", "--config"],
            &["check", "--listen", "x:1"],
            &["serve", "--listen", "nope"],
            &["serve", "-x", "1"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
    }
}
