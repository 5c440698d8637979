//! The command line: one clap definition gives `--help`, the usage errors and the man pages
//! (`packaging/man/`, checked against this definition by a test below), so none of them can drift. This is
//! the one place that turns an outcome into an exit code.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Listen, Overrides};
use crate::daemon;
use crate::deliveries::{self, DeliveriesArgs};

/// sysexits.h: bad usage, bad configuration.
const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "hookrunner",
    version,
    about = "runs a script for each webhook it receives",
    long_about = "For each HTTP request, hookrunner finds the event name (URL path, header, JSON, XML or \
form body), looks it up in the routes file, writes the body to a private temporary file and runs the \
mapped script with that file as $1. The answer's status says how the script ended.",
    after_help = "Exit status: 0 success, 64 usage error, 78 configuration error, 1 any other failure.\n\
RUST_LOG sets the log level (default info). The configuration keys and the routes format are described \
in hookrunner.toml(5).",
    subcommand_required = true,
    arg_required_else_help = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon
    #[command(
        long_about = "Run the daemon. At the default log level its first line is `listening on ADDRESS` \
with the address actually bound. SIGHUP re-reads the configuration and routes (an invalid one is logged \
and the old one kept); SIGTERM and SIGINT stop accepting, let requests in flight finish, and exit 0. \
Under systemd it reports its state (Type=notify) and accepts a listening socket passed by socket \
activation (LISTEN_FDS), which then replaces `listen`."
    )]
    Serve {
        #[command(flatten)]
        common: Common,
        /// HOST:PORT or unix:/path, overriding the file (port 0 picks a free port; the log says which)
        #[arg(long, value_name = "ADDR", value_parser = Listen::parse)]
        listen: Option<Listen>,
    },
    /// Validate the configuration and routes, print the routing table
    #[command(
        long_about = "Validate the configuration and routes and print the resolved routing table and the \
sender profiles; warnings (a secret file others can read) go to stderr. Exits 0 when they are valid, else \
prints `file:line: message` and exits 78."
    )]
    Check {
        #[command(flatten)]
        common: Common,
    },
    /// List, show, retry or drop deliveries in the store (works while the daemon runs)
    #[command(
        long_about = "The store's deliveries, sync and async, on the same database the daemon uses, while it \
runs: `list` (the default) with a summary line, `show ID`, `retry ID` or `retry --dead`, `drop ID`. A \
retried entry runs within about a second."
    )]
    Deliveries(DeliveriesArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// Configuration file (default /etc/hookrunner/hookrunner.toml if it exists, else built-in defaults)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where scripts live, overriding the file (default /etc/hookrunner.d)
    #[arg(long, value_name = "DIR")]
    scripts_dir: Option<PathBuf>,
}

/// The parsed command line, or what to print and how to exit.
fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, clap::Error> {
    Cli::try_parse_from(args).map(|cli| cli.command)
}

pub fn run() -> ExitCode {
    let command = match parse(std::env::args_os()) {
        Ok(command) => command,
        Err(e) => {
            // clap prints help and the version through its error path; only those succeed.
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EX_USAGE),
            };
            let _ = e.print();
            return code;
        }
    };
    match command {
        Command::Deliveries(args) => {
            let (config, action) = args.resolve(crate::store::now_ms());
            match deliveries::run(config, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err((message, code)) => {
                    eprintln!("hookrunner: {message}");
                    ExitCode::from(code)
                }
            }
        }
        Command::Check { common } => {
            let overrides = Overrides {
                listen: None,
                scripts_dir: common.scripts_dir,
            };
            match Config::load(common.config.as_deref(), &overrides) {
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
            }
        }
        Command::Serve { common, listen } => {
            let overrides = Overrides {
                listen,
                scripts_dir: common.scripts_dir,
            };
            crate::logging::init();
            match daemon::serve(common.config, overrides) {
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
    use clap::CommandFactory;
    use clap::error::ErrorKind;
    use std::path::Path;

    fn args(list: &[&str]) -> Vec<OsString> {
        std::iter::once("hookrunner")
            .chain(list.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let kind = |list: &[&str]| parse(args(list)).map_err(|e| e.kind()).err();
        assert_eq!(kind(&["--version"]), Some(ErrorKind::DisplayVersion));
        assert_eq!(kind(&["serve", "--help"]), Some(ErrorKind::DisplayHelp));
        let got = parse(args(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            "c.toml",
        ]));
        let Ok(Command::Serve { common, listen }) = got else {
            panic!("{got:?}");
        };
        assert_eq!(common.config, Some(PathBuf::from("c.toml")));
        assert_eq!(listen, Some(Listen::Tcp("127.0.0.1:0".into())));
        assert_eq!(common.scripts_dir, None);
        let got = parse(args(&["check", "--scripts-dir", "s"]));
        assert!(
            matches!(&got, Ok(Command::Check { common }) if common.scripts_dir == Some("s".into())),
            "{got:?}"
        );
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
            let kind = parse(args(bad)).map_err(|e| e.kind()).err();
            assert!(
                !matches!(
                    kind,
                    None | Some(ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                ),
                "{bad:?}: {kind:?}"
            );
        }
    }

    /// The man pages for `hookrunner` and each command (`hookrunner-serve(1)`, ...), as clap_mangen renders
    /// this definition.
    fn man_pages() -> Vec<(String, Vec<u8>)> {
        let mut root = Cli::command();
        // Building names each command for its page (`hookrunner-serve`), as `hookrunner serve` would show it.
        root.build();
        let mut commands = vec![root.clone()];
        commands.extend(root.get_subcommands().cloned());
        commands
            .into_iter()
            .map(|command| {
                let man = clap_mangen::Man::new(command).manual("hookrunner manual");
                let mut text = Vec::new();
                man.render(&mut text).expect("render man page");
                (man.get_filename(), text)
            })
            .collect()
    }

    /// packaging/man/*.1 are what the package ships; they must be what this definition renders. Run with
    /// `HOOKRUNNER_WRITE_MAN=1` to rewrite them after changing the command line.
    #[test]
    fn the_committed_man_pages_match_the_command_line() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/man");
        let write = std::env::var_os("HOOKRUNNER_WRITE_MAN").is_some();
        let pages = man_pages();
        for (name, text) in &pages {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, text).expect("write man page");
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == *text,
                "{} differs from the command line; rerun with HOOKRUNNER_WRITE_MAN=1",
                path.display()
            );
        }
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .expect("packaging/man")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("hookrunner") && n.ends_with(".1"))
            .collect();
        shipped.sort();
        let mut generated: Vec<String> = pages.into_iter().map(|(n, _)| n).collect();
        generated.sort();
        assert_eq!(shipped, generated, "a man page for a command that is gone");
    }
}
