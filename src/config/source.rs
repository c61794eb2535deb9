//! Where the config comes from: a file named on the command line, `config/headroom.toml` in the
//! current directory, or the default compiled into the binary. Owns that choice and its name in
//! logs; parsing and validation stay with [`Config`].

use super::{Config, ConfigError};
use std::fmt;
use std::path::{Path, PathBuf};

/// The default config, compiled into the binary: two local mock backends, autoscaled.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/headroom.toml");

/// Where the config in use comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// [`EMBEDDED_DEFAULT`], with relative paths taken from the current directory.
    Embedded,
}

impl Source {
    /// The file named on the command line; without one, `config/headroom.toml` when it exists in
    /// the current directory, else the embedded default.
    pub fn resolve(explicit: Option<&Path>) -> Source {
        match explicit {
            Some(p) => Source::File(p.to_path_buf()),
            None if Path::new(DEFAULT_PATH).is_file() => Source::File(PathBuf::from(DEFAULT_PATH)),
            None => Source::Embedded,
        }
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::File(p) => Config::load(p),
            Source::Embedded => Config::parse(EMBEDDED_DEFAULT, Path::new(".")),
        }
    }

    /// The file to watch and reload, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Source::File(p) => Some(p),
            Source::Embedded => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("embedded default"),
        }
    }
}

/// The config file used when none is named and it exists in the current directory.
pub const DEFAULT_PATH: &str = "config/headroom.toml";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid_and_autoscales_launched_mocks() {
        let c = Source::Embedded.load().unwrap();
        assert_eq!(c.pools.len(), 1);
        assert!(c.pools[0].launch.is_some() && c.pools[0].autoscale.is_some());
        assert_eq!(Source::Embedded.to_string(), "embedded default");
    }

    #[test]
    fn a_named_file_is_used_as_named() {
        assert_eq!(Source::resolve(Some(Path::new("x.toml"))), Source::File(PathBuf::from("x.toml")));
        assert_eq!(Source::File(PathBuf::from("x.toml")).path(), Some(Path::new("x.toml")));
        assert_eq!(Source::Embedded.path(), None);
    }
}
