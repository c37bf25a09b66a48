//! Keeping secrets out of logs and messages: URL password redaction, and the list of secret
//! strings the log writer masks (see [`crate::telemetry`]).
//!
//! Redaction works on the raw text rather than a parsed URL, so a malformed URL (the very thing
//! an error message is about) is redacted too.

/// Split a comma-separated URL list, ignoring blanks.
pub fn split_urls(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// The span of the password inside `scheme://user:password@host...`, if there is one.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    // The last '@' ends the user info, so a password holding '/', '?', '#' or '@' is still
    // found (erring towards masking more, never less).
    let at = url[start..].rfind('@')? + start;
    let colon = url[start..at].find(':')? + start;
    Some((colon + 1, at))
}

/// The URL with its password replaced by `***`; safe to log. Works on malformed URLs too, so
/// error messages about a bad URL do not leak it either.
pub fn redact_url(url: &str) -> String {
    match password_span(url) {
        Some((a, b)) => format!("{}***{}", &url[..a], &url[b..]),
        None => url.to_owned(),
    }
}

/// Redact every URL found in free text (error messages that may quote a URL).
pub fn redact_text(text: &str) -> String {
    text.split(' ')
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every form of every password in a URL list (as written and percent-decoded), for the log
/// redactor. Empty when the URLs carry none.
pub fn url_secrets(urls: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for url in urls {
        if let Some((a, b)) = password_span(url) {
            out.push(url[a..b].to_owned());
        }
        if let Ok(uri) = url.parse::<lapin::uri::AMQPUri>() {
            out.push(uri.authority.userinfo.password);
        }
    }
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_of_passwords_with_url_characters() {
        assert_eq!(redact_url("amqp://u:S3cr/et@h/%2f"), "amqp://u:***@h/%2f");
        assert_eq!(redact_url("amqp://u:a@b#c?d@h:1/v"), "amqp://u:***@h:1/v");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("amqp://u:pw@h:5672/%2f"),
            "amqp://u:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h/%2f"), "amqp://h/%2f");
        assert_eq!(redact_url("amqp://u@h"), "amqp://u@h");
        assert_eq!(redact_text("bad amqp://u:p@w@h x"), "bad amqp://u:***@h x");
    }

    #[test]
    fn secrets_include_the_decoded_password() {
        let s = url_secrets(&["amqp://u:p%40ss@h/v".to_owned(), "amqp://h/v".to_owned()]);
        assert!(
            s.contains(&"p%40ss".to_owned()) && s.contains(&"p@ss".to_owned()),
            "{s:?}"
        );
    }
}
