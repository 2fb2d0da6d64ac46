//! The two URL operations the hook needs: checking `baseUrl` and percent-encoding a key.

/// `base` checked to be an absolute http(s) URL with a host and without query or fragment, returned
/// without trailing slashes.
pub fn parse_base_url(base: &str) -> Result<String, String> {
    let base = base.trim();
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|scheme| base.get(..scheme.len()).is_some_and(|prefix| prefix.eq_ignore_ascii_case(scheme)))
        .map(|scheme| scheme.len())
        .ok_or_else(|| format!("\"{base}\" is not an http:// or https:// URL"))?;
    let rest = &base[scheme_len..];
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("\"{base}\" has no host"));
    }
    if base.contains(['?', '#']) {
        return Err(format!("\"{base}\" must not have a query or fragment: the key is appended to its path"));
    }
    if base.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("\"{base}\" contains whitespace"));
    }
    Ok(base.trim_end_matches('/').to_owned())
}

/// Appends `key` to `out`, every byte except the unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986)
/// written as `%XX`.
pub fn percent_encode_into(key: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in key.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(key: &str) -> String {
        let mut out = String::new();
        percent_encode_into(key, &mut out);
        out
    }

    #[test]
    fn encodes_all_but_unreserved() {
        assert_eq!(encode("user-1_a.b~C9"), "user-1_a.b~C9");
        assert_eq!(encode("a/b?c#d e%"), "a%2Fb%3Fc%23d%20e%25");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(encode("../x"), "..%2Fx");
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            parse_base_url("http://127.0.0.1:8080/users/"),
            Ok("http://127.0.0.1:8080/users".to_owned())
        );
        assert_eq!(parse_base_url("HTTPS://api.example"), Ok("HTTPS://api.example".to_owned()));
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("http:///path").is_err());
        assert!(parse_base_url("http://x/users?id=").is_err());
        assert!(parse_base_url("users").is_err());
    }
}
