//! hookrunner: a hardened webhook → script gateway. See ARCHITECTURE.md for the map of modules.

mod auth;
mod cli;
mod config;
mod daemon;
mod deliveries;
mod dispatch;
mod document;
mod event;
mod gateway;
mod http;
mod logging;
mod metrics;
mod payload;
mod routes;
mod runner;
mod store;
mod systemd;
mod tls;
mod tools;
mod units;

fn main() -> std::process::ExitCode {
    cli::run()
}
