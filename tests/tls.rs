//! `amqps://` against a private broker node with a TLS listener, using a CA, server and client
//! certificates made here with openssl: the daemon and the client connect when they trust the
//! CA and present a client certificate, and refuse a broker they cannot verify.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use amqp_rpc::amqp::Connector;
use amqp_rpc::config::AmqpConfig;
use common::broker::PrivateBroker;
use common::child::free_port;
use common::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in `dir`.
fn make_pki(dir: &Path) {
    let key = |name: &str| {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                name,
            ],
        )
    };
    key("ca.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "2",
            "-subj",
            "/CN=amqp-rpc test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.pem",
        ],
    );
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "amqp-rpc client", "extendedKeyUsage=clientAuth\n"),
    ] {
        key(&format!("{name}.key"));
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\n{ext}"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

struct TlsSetup {
    broker: PrivateBroker,
    pki: tempdir::Dir,
    tls_port: u16,
}

mod tempdir {
    /// A temp dir removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn tls_broker() -> TlsSetup {
    let pki = tempdir::Dir(
        std::env::temp_dir().join(format!("amqp-rpc-pki-{}", uuid::Uuid::new_v4().simple())),
    );
    std::fs::create_dir_all(&pki.0).unwrap();
    make_pki(&pki.0);
    let read = |f: &str| std::fs::read_to_string(pki.0.join(f)).unwrap();
    let tls_port = free_port();
    let conf = format!(
        "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
         ssl_options.cacertfile = {{dir}}/ca.pem\n\
         ssl_options.certfile = {{dir}}/server.pem\n\
         ssl_options.keyfile = {{dir}}/server.key\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n"
    );
    let files = [
        ("ca.pem", read("ca.pem")),
        ("server.pem", read("server.pem")),
        ("server.key", read("server.key")),
    ];
    let broker = PrivateBroker::start_with(&conf, &files).await;
    TlsSetup {
        broker,
        pki,
        tls_port,
    }
}

impl TlsSetup {
    fn amqp(&self, ca: bool, client_cert: bool) -> AmqpConfig {
        let at = |f: &str| Some(self.pki.0.join(f));
        AmqpConfig {
            url: format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.tls_port),
            tls_ca_file: if ca { at("ca.pem") } else { None },
            tls_cert_file: if client_cert { at("client.pem") } else { None },
            tls_key_file: if client_cert { at("client.key") } else { None },
            connect_timeout_secs: 5,
            ..AmqpConfig::default()
        }
    }
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    let setup = tls_broker().await;
    let _keep = &setup.broker;
    let queue = unique_queue("tls");
    let mut config = test_config(&queue);
    config.amqp = setup.amqp(true, true);
    let (daemon, mut ready) = TestDaemon::spawn(config, None).await;
    readiness_becomes(
        &mut ready,
        true,
        Duration::from_secs(20),
        "the daemon connects over TLS",
    )
    .await;
    let client = amqp_rpc::Client::builder(setup.amqp(true, true).url)
        .amqp(setup.amqp(true, true))
        .queue(queue.as_str())
        .connect()
        .await
        .expect("the client connects over TLS");
    assert_eq!(fib(&client, 50).await.unwrap().to_string(), "12586269025");
    daemon.stop().await.unwrap();

    // Without the CA the broker's certificate cannot be verified; without a client certificate
    // the broker (fail_if_no_peer_cert) refuses us. Either way: no connection.
    for (ca, cert) in [(false, true), (true, false)] {
        let mut connector = Connector::new(&setup.amqp(ca, cert), "tls-negative").unwrap();
        let err = connector
            .connect_once()
            .await
            .expect_err("must not connect");
        assert!(!err.contains("guest:guest"), "no password in errors: {err}");
        eprintln!("ca={ca} client_cert={cert}: {err}");
    }
}
