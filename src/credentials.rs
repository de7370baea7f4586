//! Upstream credentials: the password from the config, a file or an
//! environment variable, held in a type that never prints it.

use std::path::PathBuf;

use crate::config::UpstreamConfig;

pub use crate::units::Secret;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Fix the file or its permissions (the service user must read it).
    #[error("password_file {path}: cannot read: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Set the variable in the service's environment.
    #[error("password_env {name}: the environment variable is not set")]
    Env { name: String },
    /// Neither may be empty: an empty password is almost always a mistake.
    #[error("{0}: the password is empty")]
    Empty(String),
}

/// The upstream's password: from `password_env` when set (`from_env`),
/// else inline or from `password_file` (`from_config`); `None` if none is
/// configured. Config validation allows at most one of the three.
pub fn password(up: &UpstreamConfig) -> Result<Option<Secret>, CredentialError> {
    match from_env(up)? {
        Some(p) => Ok(Some(p)),
        None => from_config(up),
    }
}

/// The password the config holds, or the first line of `password_file`
/// (read now, once, when the config is loaded); `None` otherwise.
pub fn from_config(up: &UpstreamConfig) -> Result<Option<Secret>, CredentialError> {
    if let Some(path) = &up.password_file {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::File {
            path: path.clone(),
            source,
        })?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(CredentialError::Empty(format!(
                "password_file {}",
                path.display()
            )));
        }
        return Ok(Some(Secret::new(line)));
    }
    Ok(up.password.clone())
}

/// The password from `password_env`, read by the process that connects:
/// `check` may run in a shell that does not have the service's
/// environment. `None` when no variable is configured.
pub fn from_env(up: &UpstreamConfig) -> Result<Option<Secret>, CredentialError> {
    let Some(name) = &up.password_env else {
        return Ok(None);
    };
    let value = std::env::var(name).map_err(|_| CredentialError::Env { name: name.clone() })?;
    if value.is_empty() {
        return Err(CredentialError::Empty(format!("password_env {name}")));
    }
    Ok(Some(Secret::new(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(extra: &str) -> UpstreamConfig {
        let text = format!("url = \"mqtt://h\"\nusername = \"gw\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn the_password_comes_from_the_config_a_file_or_the_environment() {
        assert_eq!(password(&upstream("")).unwrap(), None);
        assert_eq!(
            password(&upstream("password = \"inline\"")).unwrap(),
            Some(Secret::new("inline"))
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\nignored\n").unwrap();
        let up = upstream(&format!("password_file = \"{}\"", file.display()));
        assert_eq!(password(&up).unwrap(), Some(Secret::new("from-file")));
        // An existing variable (not set here: tests run in parallel threads).
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            password(&upstream("password_env = \"PATH\"")).unwrap(),
            Some(Secret::new(path))
        );
        let e = password(&upstream("password_env = \"EDGEFERRY_TEST_UNSET_42\"")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "password_env EDGEFERRY_TEST_UNSET_42: the environment variable is not set"
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(
            password(&up)
                .unwrap_err()
                .to_string()
                .ends_with("the password is empty")
        );
    }

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?} {:?}", Some(&s)), "*** *** Some(***)");
        assert_eq!(s.expose(), "hunter2");
    }
}
