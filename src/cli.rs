//! The command line: one clap definition gives `--help`, the usage errors, the shell completions and the
//! man pages (`packaging/man/` and `packaging/completions/`, checked against this definition by tests
//! below), so none of them can drift. This is the one place that turns an outcome into an exit code.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::config::{Config, Listen, Overrides};
use crate::deliveries::{self, DeliveriesArgs};
use crate::{daemon, tools};

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
with the address actually bound. SIGHUP re-reads the configuration file it started with and the routes \
(an invalid or missing one is logged and the old one kept); SIGTERM and SIGINT stop accepting, let \
requests in flight finish, and exit 0. \
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
prints `file:line: message` and exits 78. A relative secret file name is read in $CREDENTIALS_DIRECTORY, as \
under systemd's LoadCredential=, or beside the configuration file when that is unset: to check the \
service's credentials by hand, point CREDENTIALS_DIRECTORY at the originals (`sudo env \
CREDENTIALS_DIRECTORY=/etc/hookrunner/secrets hookrunner check`). Run as root, it checks the scripts \
for the daemon's user, taken to be the owner of state_dir (the package's hookrunner), and says so: whether \
that user may execute each and whether each is owned by root or by it. With --payload FILE, explains instead \
what the daemon would do \
with a POST of FILE (with those --header fields, to that --path): the sender profile that applies and \
whether the request passes it, the event name and the source that yielded it, each route line that did \
not match and why, the line that matches, the script and its environment. Without credentials among \
the --header fields, the request is signed with the profile's own secrets, as `send` does, so no secret \
goes on the command line. Nothing runs; exits 0 when a script would run, 1 when the request would be \
refused."
    )]
    Check {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        dry_run: tools::DryRunArgs,
    },
    /// List, show, retry or drop deliveries in the store (works while the daemon runs)
    #[command(
        long_about = "The store's deliveries, sync and async, on the same database the daemon uses, while it \
runs: `list` (the default) with a summary line, `show ID`, `retry ID` or `retry --dead`, `drop ID`. A \
retried entry runs within about a second."
    )]
    Deliveries(DeliveriesArgs),
    /// Print values from a payload file (a script's $1) at the paths routes use
    #[command(
        long_about = "Print the values at PATHs in a payload file, one per line, with the path syntax \
route filters use: /event/deviceName reads Jamf's JSON and XML alike (the XML root's name may be given or \
left out), /field a form. Array elements by index (/event/ids/0, in JSON and in Jamf's XML); the empty \
path is the whole document. Exit status: 0 all found, 3 a path not found (then nothing is printed), 65 the \
file is not JSON, XML or a form, or is malformed, 66 the file cannot be read, 64 usage."
    )]
    Get(tools::GetArgs),
    /// Post a realistic sample event, authenticated as a sender profile would be
    #[command(
        long_about = "Post a sample EVENT (see --list): Jamf Pro's 23 events in its JSON or XML shape, \
and samples from Scalefusion, GitHub, GitLab and Kazoo, with the current time and fresh ids. With \
--sender, the request is authenticated as that [[sender]] profile of the configuration says (basic, \
headers, github, gitlab, scalefusion, standard-webhooks, hmac), with the secrets from its files. Prints \
each answer's status, request id and body; exits 0 when every answer was 2xx, 1 otherwise, 64 on bad \
usage, 78 on a bad configuration."
    )]
    Send(tools::SendArgs),
    /// Print the completion script for a shell
    #[command(
        long_about = "Print the completion script for SHELL (bash, zsh or fish) on stdout: commands, \
options and their values as this hookrunner knows them. The Debian package installs them where each shell \
looks; elsewhere, e.g. `hookrunner completions bash > ~/.local/share/bash-completion/completions/hookrunner`, \
`hookrunner completions zsh > \"${fpath[1]}/_hookrunner\"`, or `hookrunner completions fish > \
~/.config/fish/completions/hookrunner.fish`."
    )]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// The shells whose scripts the package ships and the tests load (clap_complete knows more).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

impl Shell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            Shell::Bash => clap_complete::Shell::Bash,
            Shell::Zsh => clap_complete::Shell::Zsh,
            Shell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The completion script for `shell`, as `hookrunner completions SHELL` prints it.
fn completion_script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(
        shell.generator(),
        &mut Cli::command(),
        "hookrunner",
        &mut script,
    );
    script
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
            let (config, action) = match args.resolve(crate::store::now_ms()) {
                Ok(resolved) => resolved,
                Err(message) => {
                    eprintln!("hookrunner: {message}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            match deliveries::run(config, action) {
                Ok(()) => ExitCode::SUCCESS,
                Err((message, code)) => {
                    eprintln!("hookrunner: {message}");
                    ExitCode::from(code)
                }
            }
        }
        Command::Completions { shell } => {
            // Rendered first and written here: clap_complete panics on a failed write (`| head`).
            match std::io::stdout().write_all(&completion_script(shell)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("hookrunner: cannot write the completion script: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Get(args) => tools::run_get(args),
        Command::Send(args) => tools::run_send(args),
        Command::Check { common, dry_run } => {
            let overrides = Overrides {
                listen: None,
                scripts_dir: common.scripts_dir,
            };
            if let Some(payload) = dry_run.payload.clone() {
                return tools::run_check_payload(
                    common.config.as_deref(),
                    &overrides,
                    &payload,
                    dry_run,
                );
            }
            let judged = tools::judge_as_daemon(common.config.as_deref());
            match Config::load(common.config.as_deref(), &overrides) {
                Ok(config) => {
                    for warning in &config.warnings {
                        eprintln!("hookrunner: warning: {warning}");
                    }
                    // What `serve` refuses at start. The owners are not checked: `check` may run as
                    // another user than the daemon (root, reading its credentials).
                    if daemon::opens_store(&config) {
                        if let Err(e) = crate::store::check_private(&config.store.state_dir, None)
                            .and_then(|()| crate::store::inspect(&config.store.state_dir))
                        {
                            eprintln!("hookrunner: state_dir: {e}");
                            return ExitCode::from(EX_CONFIG);
                        }
                    }
                    // Written, not printed: `check | head` closes the pipe early, and print! panics then.
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "{}", config.routes);
                    for sender in &config.senders.senders {
                        let _ = writeln!(
                            out,
                            "# sender {}: {} on {}",
                            sender.name,
                            sender.scheme.name(),
                            sender.path
                        );
                    }
                    if let Some(line) = judged {
                        let _ = writeln!(out, "{line}");
                    }
                    let _ = writeln!(out, "# configuration OK");
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
            matches!(&got, Ok(Command::Check { common, .. }) if common.scripts_dir == Some("s".into())),
            "{got:?}"
        );
    }

    #[test]
    fn parses_the_tools() {
        let got = parse(args(&["get", "--shell", "p.json", "N=/a", "/b"]));
        assert!(
            matches!(&got, Ok(Command::Get(g)) if g.shell && g.paths == ["N=/a", "/b"]),
            "{got:?}"
        );
        let got = parse(args(&[
            "send",
            "ComputerAdded",
            "--set",
            "/a=b",
            "--set",
            "/c=d",
        ]));
        assert!(
            matches!(&got, Ok(Command::Send(s)) if s.set.len() == 2 && s.format == "json"),
            "{got:?}"
        );
        let got = parse(args(&["check", "--payload", "p", "--header", "X-A: b"]));
        assert!(
            matches!(&got, Ok(Command::Check { dry_run, .. })
                if dry_run.payload.is_some() && dry_run.header == [("X-A".to_string(), "b".to_string())]),
            "{got:?}"
        );
        for bad in [
            &["get", "p.json"][..],
            &["send"],
            &["send", "E", "--format", "yaml"],
            &["send", "E", "--rate", "0/s"],
            &["check", "--header", "X-A: b"],
            &["check", "--payload", "p", "--header", "no colon"],
        ] {
            assert!(parse(args(bad)).is_err(), "{bad:?}");
        }
        assert!(matches!(parse(args(&["send", "--list"])), Ok(Command::Send(s)) if s.list));
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
        // Every command, nested ones too (`hookrunner-deliveries-show(1)`): a page names its subcommands'
        // pages, which must exist.
        let mut commands = vec![root];
        let mut next = 0;
        while let Some(command) = commands.get(next) {
            let children: Vec<clap::Command> = command.get_subcommands().cloned().collect();
            commands.extend(children);
            next += 1;
        }
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

    /// Compares the files in `dir` (of those `ours` selects) with what this definition renders, or, with
    /// `HOOKRUNNER_WRITE_MAN=1`, rewrites them first.
    fn check_generated(dir: &str, files: Vec<(String, Vec<u8>)>, ours: impl Fn(&str) -> bool) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        let write = std::env::var_os("HOOKRUNNER_WRITE_MAN").is_some();
        for (name, text) in &files {
            let path = dir.join(name);
            if write {
                std::fs::create_dir_all(&dir).expect("create the directory");
                std::fs::write(&path, text).expect("write a generated file");
            }
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == *text,
                "{} differs from the command line; rerun with HOOKRUNNER_WRITE_MAN=1 cargo test committed",
                path.display()
            );
        }
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .expect("the directory of generated files")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| ours(n))
            .collect();
        shipped.sort();
        let mut generated: Vec<String> = files.into_iter().map(|(n, _)| n).collect();
        generated.sort();
        assert_eq!(
            shipped, generated,
            "a generated file the command line no longer makes"
        );
    }

    /// packaging/man/*.1 are what the package ships; they must be what this definition renders. Run with
    /// `HOOKRUNNER_WRITE_MAN=1` to rewrite them after changing the command line.
    #[test]
    fn the_committed_man_pages_match_the_command_line() {
        check_generated("packaging/man", man_pages(), |n| {
            n.starts_with("hookrunner") && n.ends_with(".1")
        });
    }

    /// packaging/completions/ holds what `hookrunner completions SHELL` prints, for the package; the
    /// same variable rewrites them.
    #[test]
    fn the_committed_completions_match_the_command_line() {
        let scripts = Shell::value_variants()
            .iter()
            .map(|&shell| {
                let name = clap_complete::Generator::file_name(&shell.generator(), "hookrunner");
                (name, completion_script(shell))
            })
            .collect();
        check_generated("packaging/completions", scripts, |_| true);
    }

    #[test]
    fn completions_are_for_the_three_shells_only() {
        let got = parse(args(&["completions", "zsh"]));
        assert!(
            matches!(got, Ok(Command::Completions { shell: Shell::Zsh })),
            "{got:?}"
        );
        for bad in [
            &["completions"][..],
            &["completions", "tcsh"],
            &["completions", "bash", "x"],
        ] {
            let kind = parse(args(bad)).map_err(|e| e.kind()).err();
            assert!(
                matches!(
                    kind,
                    Some(
                        ErrorKind::InvalidValue
                            | ErrorKind::MissingRequiredArgument
                            | ErrorKind::UnknownArgument
                    )
                ),
                "{bad:?}: {kind:?}"
            );
        }
        let bash = String::from_utf8(completion_script(Shell::Bash)).expect("UTF-8");
        assert!(bash.contains("complete -F _hookrunner"), "{bash}");
    }
}
