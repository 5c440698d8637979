//! Integration tests against the real `hookrunner` binary. Each test owns a temp dir (see `util`).

mod util;

mod auth;
mod completions;
mod config;
mod copyright;
mod core;
mod lifecycle;
mod logs;
mod packaging;
mod runner;
mod store;
mod systemd;
mod tools;

mod http;
mod integrations;
mod parsing;
mod tls;
