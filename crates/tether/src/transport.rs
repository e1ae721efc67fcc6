//! How tokens reach the process and cross the network: tokens from files (so they stay out
//! of `ps`), and a loud warning when one would cross a non-loopback network in clear text.

use std::net::IpAddr;
use std::path::Path;

use crate::CliError;

/// A token given either as a value or as a file holding it (`--token-file`; surrounding
/// whitespace, such as the file's final newline, is not part of it). Both at once is refused,
/// so it is never a guess which one is used. An empty token counts as none.
pub fn token_from(
    value: Option<&str>,
    file: Option<&Path>,
    value_flag: &str,
    file_flag: &str,
) -> Result<Option<String>, CliError> {
    let value = value.map(str::trim).filter(|v| !v.is_empty());
    match (value, file) {
        (Some(_), Some(_)) => Err(CliError::Usage(format!(
            "give {value_flag} or {file_flag}, not both (either may come from its environment variable)"
        ))),
        (Some(v), None) => Ok(Some(v.to_string())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CliError::Usage(format!("cannot read {file_flag} {}: {e}", path.display()))
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(CliError::Usage(format!(
                    "{file_flag} {} is empty",
                    path.display()
                )));
            }
            Ok(Some(token.to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// Whether a URL's host is this machine (`localhost`, `127.0.0.0/8`, `::1`).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The `http://` servers among `servers` (comma-separated) that are not on this machine: a
/// token sent to them crosses the network in clear text.
pub fn clear_text_remote_servers(servers: &str) -> Vec<String> {
    servers
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let rest = s.strip_prefix("http://")?;
            let authority = rest.split('/').next().unwrap_or(rest);
            let host = match authority.rsplit_once(':') {
                // `[::1]:7070` and `host:7070`; a bare IPv6 address has more than one `:`.
                Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                _ => authority,
            };
            (!is_loopback_host(host)).then(|| s.to_string())
        })
        .collect()
}

/// Warns, loudly, when a token is about to go in clear text to a server on another machine.
pub fn warn_clear_text_token(servers: &str, has_token: bool, who: &str) {
    if !has_token {
        return;
    }
    for server in clear_text_remote_servers(servers) {
        eprintln!(
            "tether: WARNING: {who} sends its token to {server} in clear text over the network; \
             anyone on the path can read it and act as you. Use https:// (the server's \
             --tls-cert/--tls-key, or a proxy that terminates TLS)."
        );
    }
}

/// Warns, loudly, when a server listening beyond loopback takes tokens without TLS.
pub fn warn_clear_text_listener(listen: std::net::SocketAddr, tls: bool, has_token: bool) {
    if tls || !has_token || listen.ip().is_loopback() {
        return;
    }
    eprintln!(
        "tether: WARNING: listening on {listen} without TLS: tokens arrive in clear text over \
         the network. Give --tls-cert and --tls-key, or keep this behind a proxy that \
         terminates TLS on this machine."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_to_other_machines_is_clear_text() {
        assert!(clear_text_remote_servers("http://127.0.0.1:7070").is_empty());
        assert!(clear_text_remote_servers("http://localhost:7070/").is_empty());
        assert!(clear_text_remote_servers("http://[::1]:7070").is_empty());
        assert!(clear_text_remote_servers("https://build.example:7070").is_empty());
        assert_eq!(
            clear_text_remote_servers("http://127.0.0.1:1, http://10.0.0.5:7070"),
            vec!["http://10.0.0.5:7070".to_string()]
        );
    }

    #[test]
    fn a_token_comes_from_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(
            token_from(None, Some(&file), "--token", "--token-file").unwrap(),
            Some("s3cret".into())
        );
        assert_eq!(
            token_from(Some("x"), None, "--token", "--token-file").unwrap(),
            Some("x".into())
        );
        assert!(token_from(Some("x"), Some(&file), "--token", "--token-file").is_err());
        assert!(token_from(
            None,
            Some(&dir.path().join("nope")),
            "--token",
            "--token-file"
        )
        .is_err());
        assert_eq!(
            token_from(Some(""), None, "--token", "--token-file").unwrap(),
            None
        );
    }
}
