//! Repository URLs a work order may clone: checked before anything is stored or run.
//!
//! Invariant: the URLs accepted are exactly those matching [`UrlPolicy::pattern`], a regular
//! expression built from `AWO_ALLOWED_URL_SCHEMES` and `AWO_ALLOWED_HOSTS` and published as the
//! `pattern` of `repository_url` in the API's schema: an allowed scheme, an allowed host, no
//! credentials, no option-like or transport-helper form (`ext::`, `fd::`), and a local path
//! only when `file` is allowed (a local path has no host; the scheme alone governs it).
//! Invariant: a host matched only by a wildcard (`*.domain`, `*`) must not resolve to a
//! loopback, private, link-local, shared or metadata address ([`resolve_public`]); git is then
//! pinned to the addresses checked, so DNS cannot change its answer in between. Hosts listed
//! explicitly are trusted as listed.
//! Error messages never repeat credentials.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex::Regex;

/// Why a repository URL was refused; the message is safe to show (credentials are redacted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// Longest repository URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// The URL with any user info replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}/{path}"),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// A repository URL that passed the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoUrl {
    /// The URL as git gets it.
    pub url: String,
    /// `https`, `http`, `ssh`, `git` or `file` (scp-like `user@host:path` is `ssh`).
    pub scheme: String,
    /// Lower-cased; IPv6 without brackets. `None` for local paths.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// The path after the host (`owner/repo.git`), or the local path.
    pub path: String,
    /// Whether the host was allowed by name (or address) rather than by a wildcard.
    pub host_listed: bool,
}

impl RepoUrl {
    /// The port git connects to.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(match self.scheme.as_str() {
            "http" => 80,
            "ssh" => 22,
            "git" => 9418,
            _ => 443,
        })
    }

    /// `owner/repo` of a forge URL (`https://host/owner/repo(.git)`), if it has that shape.
    pub fn owner_and_repo(&self) -> Option<(String, String)> {
        let path = self.path.trim_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path);
        let (owner, repo) = path.split_once('/')?;
        let simple = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (simple(owner) && simple(repo)).then(|| (owner.to_owned(), repo.to_owned()))
    }
}

/// Which URLs a deployment accepts.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    schemes: Vec<String>,
    hosts: Vec<String>,
    pattern: String,
    /// `None` only if the pattern failed to compile: then every URL is refused.
    regex: Option<Regex>,
}

/// Characters of a path segment: RFC 3986 `pchar` without `@` and `:` (so no segment can be read
/// as user info, a port or an scp-like host).
const SEGMENT: &str = "[A-Za-z0-9._~!$&'()*+,;=%-]+";
/// A port from 1 to 65535.
const PORT: &str =
    "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})";
/// A DNS label.
const LABEL: &str = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";

fn escape_host(host: &str) -> String {
    regex::escape(host)
}

impl UrlPolicy {
    /// The policy of these schemes and hosts (as validated by the configuration).
    pub fn new(schemes: &[String], hosts: &[String]) -> Self {
        let pattern = build_pattern(schemes, hosts);
        // Built from escaped parts and fixed fragments, so it compiles; if it ever did not,
        // every URL would be refused rather than every URL accepted.
        let regex = Regex::new(&pattern).ok();
        Self {
            schemes: schemes.to_vec(),
            hosts: hosts.to_vec(),
            pattern,
            regex,
        }
    }

    /// The regular expression every accepted URL matches (published in the API's schema).
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Checks a URL. A final line break is ignored, as JSON Schema's `$` ignores it.
    pub fn check(&self, url: &str) -> Result<RepoUrl, UrlError> {
        let url = url.strip_suffix('\n').unwrap_or(url);
        let matches = self.regex.as_ref().is_some_and(|r| r.is_match(url));
        if url.len() > MAX_URL_LEN || !matches {
            return Err(UrlError(format!(
                "repository_url {}: {}",
                redact(url),
                self.diagnose(url)
            )));
        }
        Ok(self.parse(url))
    }

    /// Splits a URL that matched the pattern into its parts.
    fn parse(&self, url: &str) -> RepoUrl {
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
            None if url.starts_with('/') => ("file".to_owned(), url),
            // scp-like `user@host:path`.
            None => {
                let (user_host, path) = url.split_once(':').unwrap_or((url, ""));
                let host = user_host.rsplit('@').next().unwrap_or(user_host);
                return self.finish(url, "ssh".to_owned(), host, None, path);
            }
        };
        if scheme == "file" {
            return RepoUrl {
                url: url.to_owned(),
                scheme,
                host: None,
                port: None,
                path: rest.to_owned(),
                host_listed: false,
            };
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host_port = authority.rsplit('@').next().unwrap_or(authority);
        let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
            let (host, after) = v6.split_once(']').unwrap_or((v6, ""));
            (host, after.strip_prefix(':').and_then(|p| p.parse().ok()))
        } else {
            match host_port.split_once(':') {
                Some((host, port)) => (host, port.parse().ok()),
                None => (host_port, None),
            }
        };
        self.finish(url, scheme, host, port, path)
    }

    fn finish(
        &self,
        url: &str,
        scheme: String,
        host: &str,
        port: Option<u16>,
        path: &str,
    ) -> RepoUrl {
        let host = host.to_ascii_lowercase();
        let with_port = port.map(|p| format!("{host}:{p}"));
        let host_listed = self.hosts.iter().any(|allowed| {
            *allowed == host
                || with_port.as_deref() == Some(allowed.as_str())
                || (host.contains(':') && *allowed == format!("[{host}]"))
        });
        RepoUrl {
            url: url.to_owned(),
            scheme,
            host: Some(host),
            port,
            path: path.to_owned(),
            host_listed,
        }
    }

    /// Why a URL does not match, in words.
    fn diagnose(&self, url: &str) -> String {
        let schemes = self.schemes.join(",");
        if url.is_empty() || url.len() > MAX_URL_LEN {
            return format!("must be 1 to {MAX_URL_LEN} characters");
        }
        if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return "must not contain spaces or control characters".to_owned();
        }
        if url.starts_with('-') {
            return "must not start with '-' (it would be read as an option)".to_owned();
        }
        if url.contains("::") {
            return "transport helpers (ext::, fd::) are not allowed".to_owned();
        }
        match url.split_once("://") {
            Some((scheme, rest)) => {
                let scheme = scheme.to_ascii_lowercase();
                if !self.schemes.contains(&scheme) {
                    return format!(
                        "scheme {scheme} is not allowed (AWO_ALLOWED_URL_SCHEMES: {schemes})"
                    );
                }
                let authority = rest.split('/').next().unwrap_or_default();
                if authority.contains('@') && scheme != "ssh" {
                    return "credentials in the URL are not allowed; set GITHUB_TOKEN instead"
                        .to_owned();
                }
                if scheme != "file" && rest.split('/').nth(1).is_none_or(str::is_empty) {
                    return "must name a repository path (host/owner/repository)".to_owned();
                }
                if scheme != "file" {
                    let wildcards = if matches!(scheme.as_str(), "git" | "ssh")
                        && self.hosts.iter().any(|h| h.contains('*'))
                    {
                        "; hosts allowed only by a wildcard are reached over http(s) only"
                    } else {
                        ""
                    };
                    return format!(
                        "host {} is not allowed (AWO_ALLOWED_HOSTS: {}{wildcards}), or the URL is malformed",
                        authority.rsplit('@').next().unwrap_or_default(),
                        self.hosts.join(",")
                    );
                }
                "a file URL must name an absolute path".to_owned()
            }
            None if url.starts_with('/') => {
                format!("local paths are not allowed (AWO_ALLOWED_URL_SCHEMES: {schemes})")
            }
            None => format!(
                "not a repository URL this deployment accepts (AWO_ALLOWED_URL_SCHEMES: {schemes}; AWO_ALLOWED_HOSTS: {})",
                self.hosts.join(",")
            ),
        }
    }
}

/// The host part of the pattern: each allowed entry, with its port rule.
fn host_pattern(hosts: &[String]) -> String {
    let any_port = format!("(:{PORT})?");
    let alternatives: Vec<String> = hosts
        .iter()
        .map(|entry| {
            if entry == "*" {
                format!("(({LABEL}\\.)*{LABEL}|\\[[0-9A-Fa-f:.]+\\]){any_port}")
            } else if let Some(domain) = entry.strip_prefix("*.") {
                format!("({LABEL}\\.)+{}{any_port}", escape_host(domain))
            } else if let Some((host, port)) = entry.rsplit_once(':').filter(|(h, p)| {
                !h.is_empty()
                    && !h.ends_with(':')
                    && p.parse::<u16>().is_ok()
                    && !entry.starts_with('[')
            }) {
                format!("{}:{port}", escape_host(host))
            } else {
                format!("{}{any_port}", escape_host(entry))
            }
        })
        .collect();
    format!("({})", alternatives.join("|"))
}

fn build_pattern(schemes: &[String], hosts: &[String]) -> String {
    let host = host_pattern(hosts);
    // A host reached through a wildcard is connected to at the address checked before the
    // clone (see `resolve_public`), which only git's http transports can be held to: git:// and
    // ssh reach listed hosts only.
    let listed: Vec<String> = hosts.iter().filter(|h| !h.contains('*')).cloned().collect();
    let listed_host = host_pattern(&listed);
    let path = format!("(/{SEGMENT})+/?");
    let mut forms = Vec::new();
    for scheme in schemes {
        match scheme.as_str() {
            "https" | "http" => forms.push(format!("{scheme}://{host}{path}")),
            "git" if !listed.is_empty() => forms.push(format!("git://{listed_host}{path}")),
            "ssh" if !listed.is_empty() => {
                forms.push(format!("ssh://({SEGMENT}@)?{listed_host}{path}"));
                // scp-like: user@host:path (the path must not start with '-' or '/').
                let bare: Vec<String> = listed
                    .iter()
                    .filter(|h| !h.contains(':'))
                    .map(|h| escape_host(h))
                    .collect();
                if !bare.is_empty() {
                    forms.push(format!(
                        "[A-Za-z0-9._-]+@({}):[A-Za-z0-9._~][A-Za-z0-9._~/-]*",
                        bare.join("|")
                    ));
                }
            }
            "file" => {
                forms.push("(file://)?(/[A-Za-z0-9._~+,=@%-]+)+/?".to_owned());
            }
            _ => {}
        }
    }
    if forms.is_empty() {
        // Nothing is allowed: a pattern no string matches.
        return "^$^".to_owned();
    }
    // Case-insensitive schemes and hosts would need flags JSON Schema patterns do not have;
    // URLs are matched as written (lower-case schemes and hosts, as forges print them).
    format!("^({})$", forms.join("|"))
}

/// Whether an address is one a clone must never reach unless its host is listed explicitly:
/// loopback, private, link-local (cloud metadata), shared, unspecified, multicast, broadcast,
/// or an IPv4 address wrapped in IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return is_internal_v4(Ipv4Addr::new(a, b, c, d));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) // AWS metadata
        }
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        || a >= 240 // reserved
}

/// The addresses git may connect to for `url`: none needed for local paths and explicitly
/// listed hosts; for a host allowed by a wildcard, its DNS answer, refused when any address is
/// internal (see [`is_internal`]) or the name does not resolve.
pub async fn resolve_public(url: &RepoUrl) -> Result<Vec<IpAddr>, UrlError> {
    let Some(host) = url.host.as_deref() else {
        return Ok(Vec::new());
    };
    if url.host_listed {
        return Ok(Vec::new());
    }
    if !matches!(url.scheme.as_str(), "http" | "https") {
        return Err(UrlError(format!(
            "repository host {host} is allowed only by a wildcard, which git:// and ssh cannot be \
             held to: list it explicitly in AWO_ALLOWED_HOSTS"
        )));
    }
    let port = url.effective_port();
    let lookup = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::lookup_host((host, port)),
    )
    .await;
    let addresses: Vec<IpAddr> = match lookup {
        Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
        Ok(Err(error)) => {
            return Err(UrlError(format!(
                "repository host {host} does not resolve: {error}"
            )));
        }
        Err(_) => {
            return Err(UrlError(format!(
                "repository host {host} did not resolve within 10 s"
            )));
        }
    };
    if addresses.is_empty() {
        return Err(UrlError(format!("repository host {host} has no address")));
    }
    if let Some(internal) = addresses.iter().find(|ip| is_internal(**ip)) {
        return Err(UrlError(format!(
            "repository host {host} resolves to {internal}, an internal address; list the host \
             explicitly in AWO_ALLOWED_HOSTS to allow it"
        )));
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(schemes: &[&str], hosts: &[&str]) -> UrlPolicy {
        let strings = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        UrlPolicy::new(&strings(schemes), &strings(hosts))
    }

    #[test]
    fn https_repositories_on_allowed_hosts_are_accepted_by_default() {
        let policy = policy(&["https"], &["github.com"]);
        for url in [
            "https://github.com/owner/repo.git",
            "https://github.com:443/owner/repo",
            "https://github.com/owner/repo/",
        ] {
            let parsed = policy.check(url).expect(url);
            assert_eq!(parsed.host.as_deref(), Some("github.com"));
            assert!(parsed.host_listed);
        }
        let parsed = policy
            .check("https://github.com/owner/repo.git")
            .expect("accepted");
        assert_eq!(
            parsed.owner_and_repo(),
            Some(("owner".to_owned(), "repo".to_owned()))
        );
    }

    #[test]
    fn dangerous_local_and_foreign_urls_are_refused() {
        let policy = policy(&["https"], &["github.com"]);
        for url in [
            "",
            "--upload-pack=touch /tmp/pwned",
            "-oProxyCommand=x",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "fd::17",
            "file:///etc",
            "/tmp/repo",
            "../repo",
            "http://github.com/o/r",
            "ssh://git@github.com/o/r",
            "git@github.com:o/r.git",
            "https://github.com",
            "https://github.com/",
            "https://github.com/o/r with space",
            "https://-host/o/r",
            "https://evil.com/o/r",
            "https://github.com.evil.com/o/r",
            "https://evil.com/github.com/o/r",
            "https://github.com@evil.com/o/r",
            "https://github.com:99999/o/r",
            "https://github.com/o/r\n\n",
            "https://github.com/o/r#frag",
            "https://github.com/o/r?x=1",
        ] {
            assert!(policy.check(url).is_err(), "{url:?} was accepted");
        }
    }

    #[test]
    fn credentials_are_refused_and_never_repeated() {
        let policy = policy(&["https"], &["github.com"]);
        for url in [
            "https://ghp_SECRET123@github.com/o/r.git",
            "https://x-access-token:ghp_SECRET123@github.com/o/r.git",
        ] {
            let error = policy.check(url).expect_err("refused");
            assert!(!error.0.contains("SECRET"), "{error}");
            assert!(error.0.contains("credentials"), "{error}");
        }
    }

    #[test]
    fn host_entries_name_hosts_ports_and_wildcards() {
        let hosts = policy(
            &["https", "http"],
            &["git.internal:8443", "*.example.org", "10.0.0.5"],
        );
        assert!(hosts.check("https://git.internal:8443/o/r").is_ok());
        assert!(hosts.check("https://git.internal/o/r").is_err());
        let wild = hosts
            .check("https://a.b.example.org/o/r")
            .expect("wildcard");
        assert!(!wild.host_listed);
        assert!(hosts.check("https://example.org/o/r").is_err());
        let listed = hosts.check("http://10.0.0.5:8080/o/r").expect("address");
        assert!(listed.host_listed);
        let any = policy(&["https"], &["*"]);
        assert!(
            !any.check("https://anything.test/o/r")
                .expect("any")
                .host_listed
        );
        assert!(any.check("https://[::1]/o/r").is_ok());
        // git:// and ssh reach listed hosts only: their connections cannot be pinned.
        let mixed = policy(&["https", "git", "ssh"], &["*.example.org", "git.corp"]);
        assert!(mixed.check("https://a.example.org/o/r").is_ok());
        assert!(mixed.check("git://git.corp/o/r").is_ok());
        assert!(mixed.check("ssh://git@git.corp/o/r").is_ok());
        assert!(mixed.check("git@git.corp:o/r").is_ok());
        for url in [
            "git://a.example.org/o/r",
            "ssh://git@a.example.org/o/r",
            "git@a.example.org:o/r",
        ] {
            let error = mixed.check(url).expect_err(url);
            assert!(
                error.0.contains("http(s) only") || error.0.contains("not a repository URL"),
                "{url}: {error}"
            );
        }
        let wild_only = policy(&["git", "ssh"], &["*"]);
        assert!(wild_only.check("git://anything.test/o/r").is_err());
    }

    #[test]
    fn file_urls_and_local_paths_need_file_allowed() {
        let file = policy(&["https", "file"], &["github.com"]);
        assert!(file.check("file:///srv/repos/app.git").is_ok());
        assert_eq!(
            file.check("/srv/repos/app.git").expect("path").scheme,
            "file"
        );
        assert!(file.check("file://relative").is_err());
        assert!(file.check("-/srv").is_err());
    }

    #[test]
    fn ssh_needs_ssh_allowed() {
        let ssh = policy(&["ssh"], &["github.com"]);
        let scp = ssh
            .check("git@github.com:owner/repo.git")
            .expect("scp-like");
        assert_eq!(scp.scheme, "ssh");
        assert!(ssh.check("ssh://git@github.com/owner/repo.git").is_ok());
        assert!(ssh.check("git@github.com:-oProxyCommand=x").is_err());
        assert!(ssh.check("git@evil.com:owner/repo.git").is_err());
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_internal(ip.parse().expect(ip)), "{ip}");
        }
        for ip in ["140.82.112.3", "2606:50c0:8000::153"] {
            assert!(!is_internal(ip.parse().expect(ip)), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_wildcard_host_that_resolves_inside_is_refused() {
        let any = policy(&["https"], &["*"]);
        for url in ["https://localhost/o/r", "https://127.0.0.1/o/r"] {
            let parsed = any.check(url).expect("matches the wildcard");
            let refused = resolve_public(&parsed).await.expect_err("internal");
            assert!(refused.0.contains("internal address"), "{refused}");
        }
        let listed = policy(&["https"], &["127.0.0.1"]);
        let parsed = listed.check("https://127.0.0.1/o/r").expect("listed");
        assert!(resolve_public(&parsed).await.expect("trusted").is_empty());
    }
}
