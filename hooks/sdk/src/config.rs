use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

/// The keyspace's `hook.config`: string keys and values, as written in the keyspace YAML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pairs: Vec<(String, String)>,
}

impl Config {
    /// Wraps config pairs (the SDK builds this from what the host passes to `init`; hooks can build one in
    /// their unit tests).
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Config { pairs }
    }

    /// The value of `key`, if set (the first one when the host passed duplicates).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value of `key`, or an error naming the missing key (ready to return from [`crate::Hook::init`]).
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("hook config is missing the required key \"{key}\""))
    }

    /// The value of `key` parsed with [`FromStr`]: `Ok(None)` when not set, an error naming the key and the
    /// value when it does not parse.
    pub fn get_parsed<T>(&self, key: &str) -> Result<Option<T>, String>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.get(key)
            .map(|value| {
                value.trim().parse().map_err(|error| {
                    format!("hook config key \"{key}\" has an invalid value \"{value}\": {error}")
                })
            })
            .transpose()
    }

    /// The value of `key` as a duration, in the grammar of the keyspace's own `ttl` or `fetchTimeout`
    /// (`500ms`, `30s`, `5m`, `1h30m`, `7d`; see [`crate::duration`]): `Ok(None)` when not set, an error naming
    /// the key and the value when it does not parse.
    pub fn get_duration(&self, key: &str) -> Result<Option<Duration>, String> {
        self.get(key)
            .map(|value| {
                crate::duration::parse_duration(value)
                    .map_err(|error| format!("hook config key \"{key}\": {error}"))
            })
            .transpose()
    }

    /// All pairs, in the order the host passed them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Config { pairs: iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Config;

    #[test]
    fn get_require_parse() {
        let config: Config =
            [("baseUrl", "http://x"), ("ttlMs", " 250 "), ("bad", "x"), ("baseUrl", "second")]
                .into_iter()
                .collect();
        assert_eq!(config.get("baseUrl"), Some("http://x"));
        assert_eq!(config.get("missing"), None);
        assert_eq!(config.require("baseUrl"), Ok("http://x"));
        assert!(config.require("missing").is_err_and(|e| e.contains("\"missing\"")));
        assert_eq!(config.get_parsed::<u64>("ttlMs"), Ok(Some(250)));
        assert_eq!(config.get_parsed::<u64>("missing"), Ok(None));
        assert!(config.get_parsed::<u64>("bad").is_err_and(|e| e.contains("\"bad\"") && e.contains("\"x\"")));
        assert_eq!(config.iter().count(), 4);
    }

    #[test]
    fn durations() {
        let config: Config =
            [("ttl", "1h30m"), ("timeout", " 250ms "), ("millis", "30000"), ("micros", "10us")]
                .into_iter()
                .collect();
        assert_eq!(config.get_duration("ttl"), Ok(Some(Duration::from_mins(90))));
        assert_eq!(config.get_duration("timeout"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(config.get_duration("missing"), Ok(None));
        assert_eq!(
            config.get_duration("millis"),
            Err("hook config key \"millis\": invalid duration \"30000\": missing unit \
                 (expected e.g. 500ms, 30s, 5m, 1h30m)"
                .to_owned())
        );
        assert!(config.get_duration("micros").is_err_and(|e| e.contains("unknown unit \"us\"")));
    }
}
