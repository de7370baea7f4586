//! Setup: from a config file to what the stages run with. Parses it
//! (`config`), checks the values (`config::check`, no I/O), then what
//! needs I/O: the files it names (TLS, password files, the ACL), the rules,
//! and warnings about this machine (`advise`). `check`, the start and a
//! reload all come through here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::acl::Acl;
use crate::config::{BrokerConfig, ConfigFile, Locator, Source, UpstreamConfig, find_key};
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::frontdoor::auth::Loaded;
use crate::passwd::Passwords;
use crate::rules::RuleSet;
use crate::tls::{self, TlsError};
use crate::units::ByteSize;
use crate::uplink::UpstreamFiles;

/// A loaded, validated configuration with its compiled rules: what `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: ConfigFile,
    /// Where it came from, for messages; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub rules: RuleSet,
    /// What the files it names hold, read once, here: the stages start
    /// from these, so `check` and the start agree and nothing is read twice.
    pub resolved: Resolved,
    /// Valid settings that will not do what was meant on this machine:
    /// `check` prints them, the start logs them.
    pub warnings: Vec<Diagnostic>,
}

/// The contents of the files a config names (and that the daemon re-reads
/// only when they change: the password and ACL files).
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Per upstream: its password (inline or `password_file`; a
    /// `password_env` is read at start) and TLS client configuration.
    pub upstreams: BTreeMap<String, UpstreamFiles>,
    /// `broker.password_file`.
    pub passwords: Option<Loaded<Passwords>>,
    /// `broker.acl_file`.
    pub acl: Option<Loaded<Acl>>,
    /// The TLS listener's certificate, key and client CA.
    pub server_tls: Option<Arc<tls::ServerConfig>>,
}

impl Config {
    /// Load from `path`, or the embedded default when `None`; then the rules.
    /// Every problem found is returned at once.
    pub fn load(path: Option<&Path>) -> Result<Config, Diagnostics> {
        let source = Source::read(path)?;
        let mut cfg = Self::from_toml(&source.text, &source.name, &source.base)?;
        cfg.source = path.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// Parse config text (named `name` in messages), resolve relative paths
    /// against `base`, and load the rules it points at.
    pub fn from_toml(text: &str, name: &Path, base: &Path) -> Result<Config, Diagnostics> {
        // Keys serde rejected, then what the checks find in the rest;
        // not in a table where a default stands in for a rejected value
        // (a follow-on, not a mistake of its own), and no rules when the
        // tables they depend on lost a key.
        let parsed = ConfigFile::parse_all(text, name, base);
        let mut errors = parsed.errors;
        let Some(file) = parsed.value else {
            return Err(Diagnostics(errors));
        };
        let touched = parsed.touched;
        let own = |d: &Diagnostic| {
            d.file != name || !touched.iter().any(|(lines, _)| lines.contains(&d.line))
        };
        let loc = Locator { name, text };
        errors.extend(crate::config::check(&file, &loc).into_iter().filter(own));
        let (resolved, found) = resolve(&file, &loc);
        errors.extend(found.into_iter().filter(own));
        let rules_depend = touched.iter().any(|(_, header)| {
            header.is_empty() || header == "[rules]" || header.starts_with("[upstream")
        });
        let loaded = match rules_depend {
            true => Err(Diagnostics(vec![Diagnostic::whole_file(
                &file.rules.dir,
                "rules not checked: they depend on the [rules] and [upstream] values refused above; check again once those are fixed",
            )])),
            false => file.load_rules(None),
        };
        let rules = match loaded {
            Ok(r) => Some(r),
            Err(Diagnostics(mut e)) => {
                // Unmatched-policy problems belong to this file: locate them.
                for d in &mut e {
                    let setting = d
                        .message
                        .strip_prefix("rules.")
                        .and_then(|m| m.split('.').next())
                        .filter(|k| k.starts_with("unmatched"));
                    if let (true, Some(setting)) = (d.file == file.rules.dir, setting) {
                        *d = Diagnostic::at(name, text, find_key(text, setting), d.message.clone());
                    }
                }
                errors.append(&mut e);
                None
            }
        };
        match rules {
            Some(rules) if errors.is_empty() => Ok(Config {
                warnings: advise(&file, name, text),
                file,
                source: None,
                rules,
                resolved,
            }),
            _ => {
                // This file's in line order, then the other files' (rules,
                // the files it names) in the order they were found.
                errors.sort_by_key(|d| match d.file == name {
                    true => (false, d.line),
                    false => (true, 0),
                });
                Err(Diagnostics(errors))
            }
        }
    }

    /// Load the rules again from the same directory with the same settings
    /// (a reload: the config file itself is not re-read).
    pub fn reload_rules(&self) -> Result<RuleSet, Diagnostics> {
        self.file.load_rules(None)
    }

    /// This gateway's id: configured, else the hostname, else "edgeferry".
    pub fn gateway_id(&self) -> String {
        self.file.gateway_id()
    }

    /// The stable client id of upstream `name`.
    pub fn client_id(&self, name: &str) -> String {
        self.file.upstream[name]
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edgeferry-{}-{}", self.gateway_id(), name))
    }
}

/// The queue writer's settings.
impl From<&ConfigFile> for crate::queue::QueueSettings {
    fn from(file: &ConfigFile) -> Self {
        let q = &file.queue;
        crate::queue::QueueSettings {
            commit_interval: q.commit_interval.0,
            commit_max_events: q.commit_max_events,
            max_size: file
                .upstream
                .iter()
                .map(|(name, u)| (name.clone(), u.max_size.0))
                .collect(),
            min_free_disk: q.min_free_disk.0,
            sweep_interval: q.sweep_interval.0,
            memory_max: q.memory_max.0,
            spill_after: q.spill_after(),
            segment_bytes: crate::queue::SEGMENT_BYTES,
        }
    }
}

/// Read the files a config names; what they hold, and what is wrong
/// with them at file:line of the setting that names them.
fn resolve(file: &ConfigFile, loc: &Locator) -> (Resolved, Vec<Diagnostic>) {
    let mut resolved = Resolved::default();
    let mut errors = resolve_broker_files(&file.broker, loc, &mut resolved);
    for (up_name, up) in &file.upstream {
        match resolve_upstream_files(up_name, up, loc) {
            Ok(files) => {
                resolved.upstreams.insert(up_name.clone(), files);
            }
            Err(found) => errors.extend(found),
        }
    }
    (resolved, errors)
}

/// The files the broker settings name: TLS, passwords, ACL.
fn resolve_broker_files(b: &BrokerConfig, loc: &Locator, into: &mut Resolved) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let (Some(_), Some(cert), Some(key)) = (&b.tls_listen, &b.tls_cert, &b.tls_key) {
        match tls::server_config(cert, key, b.tls_client_ca.as_deref()) {
            Ok(config) => into.server_tls = Some(config),
            Err(e) => {
                let at = match &e {
                    TlsError::Read { path, .. } | TlsError::Bad { path, .. } if path == key => {
                        "tls_key"
                    }
                    TlsError::Read { path, .. } | TlsError::Bad { path, .. }
                        if Some(path.as_path()) == b.tls_client_ca.as_deref() =>
                    {
                        "tls_client_ca"
                    }
                    TlsError::NotBuilt => "tls_listen",
                    _ => "tls_cert",
                };
                let unreadable = matches!(e, TlsError::Read { .. });
                out.push(
                    loc.at("broker", at, format!("broker.{at}: {e}"))
                        .of_unreadable_file(unreadable),
                );
            }
        }
    }
    if let Some(path) = &b.password_file {
        match Loaded::read(path, Passwords::load) {
            Err(e) => out.push(
                loc.at(
                    "broker",
                    "password_file",
                    format!("broker.password_file: {e}"),
                )
                .of_unreadable_file(matches!(e, crate::passwd::PasswdError::Read { .. })),
            ),
            Ok(p) if p.value.is_empty() => out.push(loc.at(
                "broker",
                "password_file",
                format!(
                    "broker.password_file {}: has no users, so no client could connect; add one with `edgeferry passwd {} <user>`",
                    path.display(),
                    path.display()
                ),
            )),
            Ok(p) => into.passwords = Some(p),
        }
    }
    if let Some(path) = &b.acl_file {
        match Loaded::read(path, Acl::load) {
            Ok(acl) => into.acl = Some(acl),
            Err(found) => out.extend(found),
        }
    }
    out
}

/// The files one upstream names: its password file and TLS.
fn resolve_upstream_files(
    up_name: &str,
    up: &UpstreamConfig,
    loc: &Locator,
) -> Result<UpstreamFiles, Vec<Diagnostic>> {
    let table = format!("upstream.{up_name}");
    let mut out = Vec::new();
    let password = crate::credentials::from_config(up).unwrap_or_else(|e| {
        let unreadable = matches!(e, crate::credentials::CredentialError::File { .. });
        out.push(
            loc.at(&table, "password_file", format!("upstream.{up_name}.{e}"))
                .of_unreadable_file(unreadable),
        );
        None
    });
    let mut tls = None;
    if up.url.tls && up.cert_file.is_some() == up.key_file.is_some() {
        match tls::client_config(up) {
            Ok(config) => tls = Some(config),
            Err(e) => {
                let key = match &e {
                    TlsError::Read { path, .. } | TlsError::Bad { path, .. }
                        if Some(path) == up.key_file.as_ref() =>
                    {
                        "key_file"
                    }
                    TlsError::Read { path, .. } | TlsError::Bad { path, .. }
                        if Some(path) == up.cert_file.as_ref() =>
                    {
                        "cert_file"
                    }
                    TlsError::Read { .. } | TlsError::Bad { .. } => "ca_file",
                    // No system roots, or a build without TLS: the url asked for it.
                    _ => "url",
                };
                let unreadable = matches!(e, TlsError::Read { .. });
                out.push(
                    loc.at(&table, key, format!("upstream.{up_name}: {e}"))
                        .of_unreadable_file(unreadable),
                );
            }
        }
    }
    match out.is_empty() {
        true => Ok(UpstreamFiles { password, tls }),
        false => Err(out),
    }
}

/// Settings that are valid but, on this machine, cannot do what they are
/// for. Warnings, not errors: `check` may run on another machine than the
/// gateway, and a filesystem may be resized.
fn advise(file: &ConfigFile, name: &Path, text: &str) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let Some(d) = file.queue.durability {
        let (mode, means) = match d {
            crate::queue::Durability::Always => ("always", "spill_after = \"0s\""),
            crate::queue::Durability::Offline => ("offline", "spill_after = \"1s\""),
        };
        out.push(Locator { name, text }.at(
            "queue",
            "durability",
            format!(
                "queue.durability is deprecated: there is one model now. Every event is sent from memory and written to the queue file when its upstream is down, when it is not acknowledged within spill_after (default: commit_interval), or when memory_max is reached; with broker.ack = \"stored\" a sensor's PUBACK still waits until the event is written or acknowledged upstream. durability = \"{mode}\" is taken as {means}{}; remove durability",
                match (d, file.queue.spill_after.is_some()) {
                    (crate::queue::Durability::Always, true) => " (spill_after is ignored with it, as before)",
                    (crate::queue::Durability::Offline, true) => " (spill_after is set, so it is used)",
                    _ => "",
                }
            ),
        ));
    }
    let min = file.queue.min_free_disk.0;
    if min > 0
        && let Some(space) = crate::queue::space::space(&file.queue.path)
        && min >= space.total
    {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
        out.push(Locator { name, text }.at(
            "queue",
            "min_free_disk",
            format!(
                "queue.min_free_disk ({}) is not below the size of the filesystem holding {} ({}): free space is always under the watermark, so the queue can never store an event (while the upstream is connected they are forwarded from memory); set it to about a tenth of the filesystem, e.g. min_free_disk = \"{}\", or 0 to turn the watermark off",
                mib(min),
                file.queue.path.display(),
                mib(space.total),
                ByteSize((space.total / 10).max(1024) & !1023),
            ),
        ));
    }
    out
}
