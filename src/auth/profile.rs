//! `[[sender]]` tables as written, and their validation into [`Sender`]s: the keys each type takes, the
//! secret files (read once, at load; never from the config text), their modes.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::net::Cidr;
use super::verify::{Algorithm, Encoding, Secret, SignatureHeader, standard_webhooks_key};
use super::{Scheme, Sender};
use crate::routes::Glob;

/// Standard Webhooks' default tolerance for clock skew, and the reference libraries'.
const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

/// One `[[sender]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSender {
    name: String,
    path: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
    password_file: Option<PathBuf>,
    headers: Option<BTreeMap<String, PathBuf>>,
    secret_file: Option<PathBuf>,
    header: Option<String>,
    algorithm: Option<String>,
    encoding: Option<String>,
    prefix: Option<String>,
    window: Option<String>,
    allow_ips: Option<Vec<String>>,
    events: Option<Vec<String>>,
    subjects: Option<Vec<String>>,
    ack_status: Option<i64>,
}

/// Where relative secret paths are found, and what loading noticed.
pub struct Context<'a> {
    /// systemd's `$CREDENTIALS_DIRECTORY`, where `LoadCredential=` puts secrets.
    pub credentials: Option<&'a Path>,
    /// The config file's directory, for relative paths when there is no credentials directory.
    pub base: &'a Path,
    /// Warnings for `check` to print and `serve` to log (a secret file others can read).
    pub warnings: &'a mut Vec<String>,
}

const TYPES: &str =
    "none, basic, headers, github, gitlab, standard-webhooks, scalefusion, hmac, mtls";

impl RawSender {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn build(self, context: &mut Context<'_>) -> Result<Sender, String> {
        if !crate::event::is_valid_name(&self.name) {
            return Err(format!(
                "sender name {:?} must be 1-128 of A-Z a-z 0-9 _ . - (it reaches scripts as HOOKRUNNER_SENDER)",
                self.name
            ));
        }
        let path = self.path.clone().unwrap_or_else(|| "/".to_string());
        if !path.starts_with('/') || path.contains(['?', '#']) {
            return Err(format!(
                "path {path:?} must be a URL path starting with '/'"
            ));
        }
        // `/jamf/` and `/jamf` are one tree: `/jamf` itself is in it, and the longest path compares like
        // with like.
        let path = match path.trim_end_matches('/') {
            "" => "/".to_string(),
            tree => tree.to_string(),
        };
        let allow_ips = self
            .allow_ips
            .iter()
            .flatten()
            .map(|text| Cidr::parse(text))
            .collect::<Result<Vec<_>, _>>()?;
        for pattern in self.events.iter().flatten() {
            if !crate::routes::can_match_an_event(pattern) {
                context.warnings.push(format!(
                    "sender {:?}: events {pattern:?} can never match: event names hold only letters, \
                     digits, `_`, `.` and `-`",
                    self.name
                ));
            }
        }
        let events = self
            .events
            .iter()
            .flatten()
            .map(|pattern| Glob::new(pattern, true))
            .collect();
        // What an accepted async delivery of this sender is answered with, where its route does not say:
        // Kazoo takes anything but 200 for a failure.
        let ack_status = match self.ack_status {
            None => None,
            Some(status @ (200 | 202)) => Some(status as u16),
            Some(other) => return Err(format!("ack_status = {other}: use 200 or 202")),
        };
        let scheme = self.scheme(context)?;
        Ok(Sender {
            name: self.name,
            path,
            scheme,
            allow_ips,
            events,
            ack_status,
        })
    }

    fn scheme(&self, context: &mut Context<'_>) -> Result<Scheme, String> {
        let (allowed, scheme): (&[&str], _) = match self.kind.as_str() {
            "none" => (&[], Scheme::None),
            "basic" => {
                let user = self.user.clone().ok_or("type basic needs user")?;
                // RFC 7617 splits user-pass at its first colon, so a user with one could never match
                // what a client sends. (An empty user can: `:password` splits into it.)
                // Not repeated: a `user:password` pasted here would put the password in the journal.
                if user.contains(':') {
                    return Err(
                        "user must not contain ':': Basic credentials are split at the first \
                         colon, so no client could send it (the password goes in password_file)"
                            .to_string(),
                    );
                }
                (
                    &["user", "password_file"],
                    Scheme::Basic {
                        user,
                        password: self.secret(&self.password_file, "password_file", context)?,
                    },
                )
            }
            "headers" => {
                let headers = self.headers.as_ref().filter(|h| !h.is_empty()).ok_or(
                    "type headers needs headers = { \"Header-Name\" = \"/path/to/file-with-its-value\" }",
                )?;
                let mut expected: Vec<(String, Secret)> = Vec::new();
                for (name, file) in headers {
                    if !is_token(name) {
                        // Not repeated: what was pasted there may be the header's value too
                        // ("X-Api-Key: the-key").
                        return Err(
                            "a name in headers is not a header name (letters, digits and \
                             !#$%&'*+-.^_`|~ only): give the name alone, its value goes in the file"
                                .into(),
                        );
                    }
                    // Header names match whatever their case, so both would be asked of every request,
                    // each with its own value: no request could pass.
                    if expected
                        .iter()
                        .any(|(seen, _)| seen.eq_ignore_ascii_case(name))
                    {
                        return Err(format!(
                            "headers names {name:?} twice (header names match whatever their case)"
                        ));
                    }
                    let secret =
                        read_secret(file, context).map_err(|e| format!("headers {name:?}: {e}"))?;
                    expected.push((name.clone(), secret));
                }
                (&["headers"], Scheme::Headers(expected))
            }
            "github" => (
                &["secret_file"],
                self.signed(SignatureHeader::github(), context)?,
            ),
            "scalefusion" => (
                &["secret_file"],
                self.signed(SignatureHeader::scalefusion(), context)?,
            ),
            "gitlab" => (
                &["secret_file"],
                Scheme::Gitlab(self.secret(&self.secret_file, "secret_file", context)?),
            ),
            "standard-webhooks" => {
                let secret = self.secret(&self.secret_file, "secret_file", context)?;
                let key = standard_webhooks_key(secret.bytes()).ok_or(
                    "secret_file must hold a Standard Webhooks secret: whsec_ followed by base64",
                )?;
                let window = match &self.window {
                    Some(text) => crate::units::parse_duration(text)?,
                    None => DEFAULT_WINDOW,
                };
                // Timestamps are whole seconds: under one, only the current second would pass.
                if window < Duration::from_secs(1) || window > Duration::from_secs(86_400) {
                    return Err("window must be from 1s to 24h".into());
                }
                (
                    &["secret_file", "window"],
                    Scheme::StandardWebhooks {
                        key: Secret::new(key),
                        window,
                    },
                )
            }
            "hmac" => {
                let header = self
                    .header
                    .clone()
                    .ok_or("type hmac needs header, the header the signature comes in")?;
                if !is_token(&header) {
                    return Err(format!("{header:?} is not a header name"));
                }
                let algorithm = match self.algorithm.as_deref() {
                    Some("sha256") | None => Algorithm::Sha256,
                    Some("sha512") => Algorithm::Sha512,
                    Some(other) => {
                        return Err(format!("algorithm {other:?}: use sha256 or sha512"));
                    }
                };
                let encoding = match self.encoding.as_deref() {
                    Some("hex") | None => Encoding::Hex,
                    Some("base64") => Encoding::Base64,
                    Some(other) => return Err(format!("encoding {other:?}: use hex or base64")),
                };
                let how = SignatureHeader {
                    kind: "hmac",
                    header,
                    prefix: self.prefix.clone().unwrap_or_default(),
                    encoding,
                    algorithm,
                };
                (
                    &["header", "algorithm", "encoding", "prefix", "secret_file"],
                    self.signed(how, context)?,
                )
            }
            "mtls" => {
                let subjects = self.subjects.as_ref().filter(|s| !s.is_empty()).ok_or(
                    "type mtls needs subjects = [\"jamf.example.com\"], the names a client certificate may carry",
                )?;
                (
                    &["subjects"],
                    Scheme::Mtls {
                        subjects: subjects.iter().map(|s| Glob::new(s, true)).collect(),
                    },
                )
            }
            other => return Err(format!("unknown type {other:?}: use one of {TYPES}")),
        };
        let given = [
            ("user", self.user.is_some()),
            ("password_file", self.password_file.is_some()),
            ("headers", self.headers.is_some()),
            ("secret_file", self.secret_file.is_some()),
            ("header", self.header.is_some()),
            ("algorithm", self.algorithm.is_some()),
            ("encoding", self.encoding.is_some()),
            ("prefix", self.prefix.is_some()),
            ("window", self.window.is_some()),
            ("subjects", self.subjects.is_some()),
        ];
        if let Some((key, _)) = given
            .iter()
            .find(|(key, set)| *set && !allowed.contains(key))
        {
            // github and scalefusion are hmac with their format fixed: one whose format differs is hmac.
            let hint = if matches!(self.kind.as_str(), "github" | "scalefusion")
                && ["header", "algorithm", "encoding", "prefix"].contains(key)
            {
                format!(
                    " (its signature's format is fixed; for another, use type = \"hmac\" with {key})"
                )
            } else {
                String::new()
            };
            return Err(format!("{key} does not apply to type {}{hint}", self.kind));
        }
        Ok(scheme)
    }

    fn signed(&self, header: SignatureHeader, context: &mut Context<'_>) -> Result<Scheme, String> {
        Ok(Scheme::Signed {
            header,
            key: self.secret(&self.secret_file, "secret_file", context)?,
        })
    }

    fn secret(
        &self,
        file: &Option<PathBuf>,
        key: &str,
        context: &mut Context<'_>,
    ) -> Result<Secret, String> {
        let file = file
            .as_ref()
            .ok_or_else(|| format!("type {} needs {key}", self.kind))?;
        read_secret(file, context).map_err(|e| format!("{key}: {e}"))
    }
}

/// A secret from its file: relative paths are systemd credentials when `$CREDENTIALS_DIRECTORY` is set,
/// else relative to the config file. One trailing newline is not part of the secret (`echo` adds it); a
/// secret of blanks only is refused (an HMAC keyed with a newline is anybody's to compute), one of more
/// than one line warned about.
fn read_secret(file: &Path, context: &mut Context<'_>) -> Result<Secret, String> {
    let base = context.credentials.unwrap_or(context.base);
    let path = base.join(file);
    let bytes = fs::read(&path).map_err(|e| unreadable(file, base, &e))?;
    let trimmed = bytes
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
        .unwrap_or(&bytes);
    if trimmed.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if trimmed.iter().all(u8::is_ascii_whitespace) {
        return Err(format!("{} holds only blanks", path.display()));
    }
    if trimmed.contains(&b'\n') || trimmed.contains(&b'\r') {
        // A warning: a key written as raw bytes may hold newlines, and an upgrade must not stop it.
        context.warnings.push(format!(
            "secret file {} holds more than one line: all of it but one newline at its end is the secret",
            path.display()
        ));
    }
    if let Ok(meta) = fs::metadata(&path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            context.warnings.push(format!(
                "secret file {} is open to group or others (mode {:o}): chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
    }
    Ok(Secret::new(trimmed.to_vec()))
}

/// Why a secret file cannot be read. The name is not repeated unless it is plainly a path (absolute, in an
/// existing directory other than `/`): it may be the secret itself, pasted where its file's path belongs
/// (a base64 secret may start with `/`), and an error is printed and logged.
fn unreadable(configured: &Path, base: &Path, error: &std::io::Error) -> String {
    let in_a_directory = configured
        .parent()
        .is_some_and(|dir| dir != Path::new("/") && dir.is_dir());
    let where_ = match (configured.is_absolute(), in_a_directory) {
        (true, true) => return format!("{}: {error}", configured.display()),
        (true, false) => String::new(),
        (false, _) if base.as_os_str().is_empty() => " (relative to .)".to_string(),
        (false, _) => format!(" (relative to {})", base.display()),
    };
    format!(
        "cannot read the file it names{where_}: {error}; the name is not repeated, in case it is the \
         secret itself"
    )
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password_file: PathBuf) -> RawSender {
        let text = format!(
            "name = \"jamf\"\ntype = \"basic\"\nuser = {user:?}\npassword_file = {password_file:?}\n"
        );
        basic_toml::from_str(&text).expect("a sender table")
    }

    #[test]
    fn a_basic_user_with_a_colon_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let password = dir.path().join("password");
        fs::write(&password, "s3cret\n").expect("write");
        fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut warnings = Vec::new();
        let mut context = Context {
            credentials: None,
            base: dir.path(),
            warnings: &mut warnings,
        };
        let err = basic("jamf:ops", password.clone())
            .build(&mut context)
            .expect_err("refused");
        assert!(
            err.contains("user must not contain ':'") && !err.contains("ops"),
            "{err}"
        );
        let sender = basic("jamf", password).build(&mut context).expect("built");
        assert!(
            matches!(&sender.scheme, Scheme::Basic { user, .. } if user == "jamf"),
            "{:?}",
            sender.scheme
        );
    }
}
