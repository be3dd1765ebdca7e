//! Which relay: one connection of one bridge.

use std::fmt;

/// Connection `index` of the bridge named `bridge` (`namespace/name`), the key of one relay.
/// Written `bridge` for the first connection and `bridge#index` for the others: in logs,
/// metrics labels and the shard Leases.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey {
    bridge: String,
    index: usize,
}

impl ConnectionKey {
    pub fn new(bridge: impl Into<String>, index: usize) -> Self {
        Self {
            bridge: bridge.into(),
            index,
        }
    }

    /// The bridge's `namespace/name`.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Which connection of the bridge, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether this is a connection of bridge `bridge`.
    pub fn of(&self, bridge: &str) -> bool {
        self.bridge == bridge
    }

    /// Reads the written form back (shard Leases store it). Text without a `#<number>` suffix
    /// is the first connection of a bridge of that name.
    pub fn parse(text: &str) -> Self {
        match text.rsplit_once('#') {
            Some((bridge, n)) => match n.parse() {
                Ok(index) => Self::new(bridge, index),
                Err(_) => Self::new(text, 0),
            },
            None => Self::new(text, 0),
        }
    }
}

impl fmt::Display for ConnectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.index == 0 {
            f.write_str(&self.bridge)
        } else {
            write!(f, "{}#{}", self.bridge, self.index)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConnectionKey;

    #[test]
    fn the_written_form_reads_back() {
        for (text, bridge, index) in [
            ("ns/b", "ns/b", 0),
            ("ns/b#3", "ns/b", 3),
            ("ns/b#x", "ns/b#x", 0),
        ] {
            let key = ConnectionKey::parse(text);
            assert_eq!((key.bridge(), key.index()), (bridge, index), "{text}");
            assert_eq!(key.to_string(), text);
        }
        assert_eq!(ConnectionKey::new("ns/b", 0).to_string(), "ns/b");
        assert!(ConnectionKey::new("ns/b", 2).of("ns/b"));
        assert!(!ConnectionKey::new("ns/bb", 2).of("ns/b"));
    }
}
