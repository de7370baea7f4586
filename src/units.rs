//! Durations and sizes in the human form operators write: `"50ms"`, `"24h"`,
//! `"512MiB"`. Parse errors surface through serde, so they carry the span of
//! the offending value and end up as file:line:column diagnostics. Socket
//! addresses, whose own parse error does not say what to write instead.
//! And `Secret`, a password value that never prints.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as `"250ms"`, `"10s"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write e.g. \"50ms\", \"10s\", \"24h\"")
            })
    }
}

impl HumanDuration {
    /// For a log line: to the millisecond, as an operator writes it
    /// (`1s 583ms`, not `1.583245113s`).
    pub fn shown(d: Duration) -> HumanDuration {
        HumanDuration(Duration::from_millis(
            d.as_millis().try_into().unwrap_or(u64::MAX),
        ))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes written as `"512MiB"`, `"64KiB"`, `"1MB"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let bad = || {
            format!(
                "invalid size {s:?}; write e.g. \"64KiB\", \"512MiB\", \"1GB\" or a number of bytes"
            )
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= m && n.is_multiple_of(m) {
                return write!(f, "{}{unit}", n / m);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A password. `Debug` and `Display` print `***`, so a config or settings
/// struct that reaches a log line cannot leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The password itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A socket address (`"127.0.0.1:9184"`), with an error that shows the
/// form expected: std's says only "invalid socket address syntax".
pub fn parse_socket_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        let split = s.rsplit_once(':');
        let port = split
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(9184);
        let why = match split {
            Some((host, _)) if host.contains(':') && !host.starts_with('[') => {
                "an IPv6 address goes in brackets before the port"
            }
            Some((_, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_err() => {
                "the port must be 0 to 65535"
            }
            Some((host, p)) if p.parse::<u16>().is_ok() && !host.is_empty() => {
                "the host must be an IP address, not a name"
            }
            _ => "write an IP address and a port",
        };
        format!(
            "invalid socket address {s:?}: {why}, e.g. \"127.0.0.1:{port}\" (\"0.0.0.0:{port}\" for every interface, \"[::1]:{port}\" for IPv6)"
        )
    })
}

/// serde's `deserialize_with` for a `SocketAddr` field.
pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    parse_socket_addr(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// serde's `deserialize_with` for an `Option<SocketAddr>` field.
pub fn opt_socket_addr<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 64 << 10);
        assert_eq!("1MB".parse::<ByteSize>().unwrap().0, 1_000_000);
        assert_eq!("100".parse::<ByteSize>().unwrap().0, 100);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(256 << 10).to_string(), "256KiB");
    }

    #[test]
    fn durations_parse_in_human_form() {
        assert_eq!(
            "50ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(50)
        );
        assert_eq!(
            "24h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(86400)
        );
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn a_bad_socket_address_says_what_to_write() {
        assert_eq!(
            parse_socket_addr("0.0.0.0:1883").unwrap(),
            std::net::SocketAddr::from(([0, 0, 0, 0], 1883))
        );
        let named = parse_socket_addr("localhost:1883").unwrap_err();
        assert!(
            named.contains("not a name") && named.contains("\"127.0.0.1:1883\""),
            "{named}"
        );
        let v6 = parse_socket_addr("::1:1883").unwrap_err();
        assert!(
            v6.contains("brackets") && v6.contains("\"[::1]:1883\""),
            "{v6}"
        );
        let big = parse_socket_addr("127.0.0.1:99999").unwrap_err();
        assert!(big.contains("0 to 65535"), "{big}");
        let bare = parse_socket_addr("localhost").unwrap_err();
        assert!(
            bare.contains("an IP address and a port") && bare.contains("\"127.0.0.1:9184\""),
            "{bare}"
        );
    }
}
