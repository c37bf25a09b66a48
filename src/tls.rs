//! TLS settings for `amqps://` URLs: a CA bundle to trust and an optional client certificate,
//! read from the files named in `[amqp]` and handed to lapin (rustls). Without a CA file the
//! system trust store is used (lapin's `rustls-native-certs` feature).

use std::path::Path;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

use crate::config::AmqpConfig;

/// Read the configured files; every error names the key and the file.
pub fn load(amqp: &AmqpConfig) -> Result<OwnedTLSConfig, String> {
    let cert_chain = match &amqp.tls_ca_file {
        Some(path) => Some(read_pem("amqp.tls_ca_file", path)?),
        None => None,
    };
    let identity = match (&amqp.tls_cert_file, &amqp.tls_key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_pem("amqp.tls_cert_file", cert)?.into_bytes(),
            key: read_pem("amqp.tls_key_file", key)?.into_bytes(),
        }),
        _ => return Err(
            "amqp.tls_cert_file and amqp.tls_key_file: set both (client certificate) or neither"
                .into(),
        ),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn read_pem(key: &str, path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    if !text.contains("-----BEGIN ") {
        return Err(format!("{key}: {} is not a PEM file", path.display()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_an_identity_is_an_error() {
        let amqp = AmqpConfig {
            tls_cert_file: Some("/nonexistent.pem".into()),
            ..AmqpConfig::default()
        };
        assert!(load(&amqp).unwrap_err().contains("set both"));
        assert!(load(&AmqpConfig::default()).unwrap().cert_chain.is_none());
    }

    #[test]
    fn unreadable_or_non_pem_files_are_named() {
        let amqp = AmqpConfig {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..AmqpConfig::default()
        };
        assert!(load(&amqp).unwrap_err().contains("amqp.tls_ca_file"));
        let amqp = AmqpConfig {
            tls_ca_file: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into()),
            ..AmqpConfig::default()
        };
        assert!(load(&amqp).unwrap_err().contains("not a PEM file"));
    }
}
