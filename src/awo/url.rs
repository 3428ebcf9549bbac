//! Repository URLs a work order may clone: checked before anything is stored or run.
//!
//! Invariant: a URL that is accepted has an allowed scheme, carries no credentials, cannot be
//! read as an option by git, and names no transport helper (`ext::`, `fd::`) or local path unless
//! `file` is allowed. Error messages never repeat credentials.

/// Why a repository URL was refused; the message is safe to show (credentials are redacted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

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

/// Checks a repository URL against the allowed schemes (`https`, `http`, `ssh`, `git`, `file`).
pub fn validate(url: &str, allowed: &[String]) -> Result<(), UrlError> {
    let refuse = |why: &str| Err(UrlError(format!("repository_url {}: {why}", redact(url))));
    let allows = |scheme: &str| allowed.iter().any(|a| a == scheme);
    if url.is_empty() || url.len() > 2048 {
        return refuse("must be 1 to 2048 characters");
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse("must not contain spaces or control characters");
    }
    if url.starts_with('-') {
        return refuse("must not start with '-' (it would be read as an option)");
    }
    if url.contains("::") {
        return refuse("transport helpers (ext::, fd::) are not allowed");
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if !allows(&scheme) {
            return refuse(&format!(
                "scheme {scheme} is not allowed (AWO_ALLOWED_URL_SCHEMES: {})",
                allowed.join(",")
            ));
        }
        if scheme == "file" {
            return if rest.starts_with('/') {
                Ok(())
            } else {
                refuse("a file URL must name an absolute path")
            };
        }
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') && scheme != "ssh" {
            return refuse("credentials in the URL are not allowed; set GITHUB_TOKEN instead");
        }
        if authority.contains(':')
            && authority
                .split('@')
                .next_back()
                .is_some_and(|h| h.contains(':'))
        {
            let port = authority.rsplit(':').next().unwrap_or_default();
            if port.parse::<u16>().is_err() {
                return refuse("credentials in the URL are not allowed; set GITHUB_TOKEN instead");
            }
        }
        let host = authority.rsplit('@').next().unwrap_or_default();
        let host = host.split(':').next().unwrap_or_default();
        if host.is_empty() || host.starts_with('-') {
            return refuse("must name a host");
        }
        if rest.split('/').nth(1).is_none_or(str::is_empty) {
            return refuse("must name a repository path");
        }
        return Ok(());
    }
    // scp-like `git@github.com:owner/repo.git`: ssh.
    if let Some((user_host, path)) = url.split_once(':') {
        if !user_host.contains('/') && !path.is_empty() && user_host.contains('@') {
            return if allows("ssh") {
                if user_host.starts_with('-') || path.starts_with('-') {
                    refuse("must not contain option-like parts")
                } else {
                    Ok(())
                }
            } else {
                refuse(&format!(
                    "ssh is not allowed (AWO_ALLOWED_URL_SCHEMES: {})",
                    allowed.join(",")
                ))
            };
        }
    }
    // A local path.
    if allows("file") && url.starts_with('/') {
        return Ok(());
    }
    refuse(&format!(
        "local paths and URLs without a scheme are not allowed (AWO_ALLOWED_URL_SCHEMES: {})",
        allowed.join(",")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(schemes: &[&str]) -> Vec<String> {
        schemes.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn https_repositories_are_accepted_by_default() {
        let https = allowed(&["https"]);
        assert!(validate("https://github.com/owner/repo.git", &https).is_ok());
        assert!(validate("https://github.com:443/owner/repo", &https).is_ok());
    }

    #[test]
    fn dangerous_and_local_urls_are_refused() {
        let https = allowed(&["https"]);
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
            "https://github.com/o/r with space",
            "https://-host/o/r",
        ] {
            assert!(validate(url, &https).is_err(), "{url:?} was accepted");
        }
    }

    #[test]
    fn credentials_are_refused_and_never_repeated() {
        let https = allowed(&["https"]);
        for url in [
            "https://ghp_SECRET123@github.com/o/r.git",
            "https://x-access-token:ghp_SECRET123@github.com/o/r.git",
        ] {
            let error = validate(url, &https).expect_err("refused");
            assert!(!error.0.contains("SECRET"), "{error}");
        }
    }

    #[test]
    fn file_urls_and_local_paths_need_file_allowed() {
        let file = allowed(&["https", "file"]);
        assert!(validate("file:///srv/repos/app.git", &file).is_ok());
        assert!(validate("/srv/repos/app.git", &file).is_ok());
        assert!(validate("file://relative", &file).is_err());
        assert!(validate("-/srv", &file).is_err());
    }

    #[test]
    fn ssh_needs_ssh_allowed() {
        let ssh = allowed(&["ssh"]);
        assert!(validate("git@github.com:owner/repo.git", &ssh).is_ok());
        assert!(validate("ssh://git@github.com/owner/repo.git", &ssh).is_ok());
        assert!(validate("git@github.com:-oProxyCommand=x", &ssh).is_err());
    }
}
