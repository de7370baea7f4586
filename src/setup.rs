//! Setup: from a config file to what the stages run with. Parses it
//! (`config`), checks the values (`config::check`, no I/O), then what
//! needs I/O: the files it names (TLS, password files, the ACL), the rules,
//! and warnings about this machine (`advise`). `check`, the start and a
//! reload all come through here.

use std::path::{Path, PathBuf};

use crate::config::{BrokerConfig, ConfigFile, Locator, Source, UpstreamConfig, find_key};
use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::rules::RuleSet;
use crate::units::ByteSize;

/// A loaded, validated configuration with its compiled rules: what `run` needs.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: ConfigFile,
    /// Where it came from, for messages; `None` for the embedded default.
    pub source: Option<PathBuf>,
    pub rules: RuleSet,
    /// Valid settings that will not do what was meant on this machine:
    /// `check` prints them, the start logs them.
    pub warnings: Vec<Diagnostic>,
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
        let file = ConfigFile::parse(text, name, base)?;

        let loc = Locator { name, text };
        let mut errors = crate::config::check(&file, &loc);
        errors.extend(check_files(&file, &loc));
        let rules = match file.load_rules(None) {
            Ok(r) => Some(r),
            Err(Diagnostics(mut e)) => {
                // Unmatched-policy problems belong to this file: locate them.
                for d in &mut e {
                    if d.file == file.rules.dir && d.message.starts_with("rules.unmatched") {
                        *d = Diagnostic::at(
                            name,
                            text,
                            find_key(text, "unmatched"),
                            d.message.clone(),
                        );
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
            }),
            _ => Err(Diagnostics(errors)),
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

/// The files a config names, read now.
fn check_files(file: &ConfigFile, loc: &Locator) -> Vec<Diagnostic> {
    let mut errors = check_broker_files(&file.broker, loc);
    for (up_name, up) in &file.upstream {
        errors.extend(check_upstream_files(up_name, up, loc));
    }
    errors
}

/// The files the broker settings name: TLS, passwords, ACL (read here).
fn check_broker_files(b: &BrokerConfig, loc: &Locator) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if let (Some(_), Some(cert), Some(key)) = (&b.tls_listen, &b.tls_cert, &b.tls_key)
        && let Err(e) = crate::tls::check_server_files(cert, key, b.tls_client_ca.as_deref())
    {
        let at = match &e {
            crate::tls::TlsError::Read { path, .. } | crate::tls::TlsError::Bad { path, .. }
                if path == key =>
            {
                "tls_key"
            }
            crate::tls::TlsError::Read { path, .. } | crate::tls::TlsError::Bad { path, .. }
                if Some(path.as_path()) == b.tls_client_ca.as_deref() =>
            {
                "tls_client_ca"
            }
            crate::tls::TlsError::NotBuilt => "tls_listen",
            _ => "tls_cert",
        };
        out.push(loc.at("broker", at, format!("broker.{at}: {e}")));
    }
    if let Some(path) = &b.password_file {
        match crate::passwd::Passwords::load(path) {
            Err(e) => out.push(loc.at(
                "broker",
                "password_file",
                format!("broker.password_file: {e}"),
            )),
            Ok(p) if p.is_empty() => out.push(loc.at(
                "broker",
                "password_file",
                format!(
                    "broker.password_file {}: has no users, so no client could connect; add one with `edgeferry passwd {} <user>`",
                    path.display(),
                    path.display()
                ),
            )),
            Ok(_) => {}
        }
    }
    if let Some(path) = &b.acl_file
        && let Err(found) = crate::acl::Acl::load(path)
    {
        out.extend(found);
    }
    out
}

/// The files one upstream names: its password file and TLS (read here).
fn check_upstream_files(up_name: &str, up: &UpstreamConfig, loc: &Locator) -> Vec<Diagnostic> {
    let table = format!("upstream.{up_name}");
    let mut out = Vec::new();
    if let Some(path) = &up.password_file
        && let Err(e) = std::fs::File::open(path)
    {
        out.push(loc.at(
            &table,
            "password_file",
            format!(
                "upstream.{up_name}.password_file {}: cannot read: {e}",
                path.display()
            ),
        ));
    }
    if up.url.tls
        && up.cert_file.is_some() == up.key_file.is_some()
        && let Err(e) = crate::tls::client_config(up)
    {
        let key = match &e {
            crate::tls::TlsError::Read { path, .. } | crate::tls::TlsError::Bad { path, .. }
                if Some(path) == up.key_file.as_ref() =>
            {
                "key_file"
            }
            crate::tls::TlsError::Read { path, .. } | crate::tls::TlsError::Bad { path, .. }
                if Some(path) == up.cert_file.as_ref() =>
            {
                "cert_file"
            }
            crate::tls::TlsError::Read { .. } | crate::tls::TlsError::Bad { .. } => "ca_file",
            // No system roots, or a build without TLS: the url asked for it.
            _ => "url",
        };
        out.push(loc.at(&table, key, format!("upstream.{up_name}: {e}")));
    }
    out
}

/// Settings that are valid but, on this machine, cannot do what they are
/// for. Warnings, not errors: `check` may run on another machine than the
/// gateway, and a filesystem may be resized.
fn advise(file: &ConfigFile, name: &Path, text: &str) -> Vec<Diagnostic> {
    let mut out = Vec::new();
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
