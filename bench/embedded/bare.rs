//! The bare client: a direct reply-to client over plain lapin, as `examples/bare_echo.rs`'s,
//! with each thing the library does differently as a switch of its own ([`Features`]), so a
//! gap between the library and lapin can be pinned on one of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use amqp_rpc::protocol::{expiration_ms, now_epoch_ms, DEADLINE_HEADER};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;

use crate::TIMEOUT;

/// What the bare client does beyond the plain bare echo client.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    pub task: bool,
    pub confirm: bool,
    /// `mandatory` without confirm mode (confirm mode implies it).
    pub mandatory: bool,
    /// The library's deadline metadata: both of the two below.
    pub meta: bool,
    /// The `x-deadline-ms` header alone.
    pub header: bool,
    /// The `expiration` property alone.
    pub expiration: bool,
    pub nowait: bool,
}

/// A direct reply-to client over lapin, as `examples/bare_echo.rs`'s.
#[derive(Clone)]
pub struct Bare {
    channel: lapin::Channel,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>>,
    method: ShortString,
    features: Features,
}

#[cfg(lapin_io_loop_on_runtime)]
fn socket_loop(props: ConnectionProperties, task: bool) -> ConnectionProperties {
    props.with_io_loop_on_runtime(task)
}

#[cfg(not(lapin_io_loop_on_runtime))]
fn socket_loop(props: ConnectionProperties, task: bool) -> ConnectionProperties {
    assert!(
        !task,
        "bare+task needs the vendored lapin (build in this workspace)"
    );
    props
}

impl Bare {
    pub async fn connect(url: &str, method: &str, features: Features) -> lapin::Result<Self> {
        let props = socket_loop(ConnectionProperties::default(), features.task);
        let conn = Connection::connect(url, props).await?;
        let channel = conn.create_channel().await?;
        if features.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let mut replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>> = Arc::default();
        let router = pending.clone();
        tokio::spawn(async move {
            let _conn = conn; // open while the router runs
            while let Some(Ok(d)) = replies.next().await {
                let Some(id) = d.properties.correlation_id() else {
                    continue;
                };
                if let Some(tx) = router.lock().unwrap().remove(id.as_str()) {
                    // An error reply of amqp-rpcd carries x-error-code.
                    let ok = d
                        .properties
                        .headers()
                        .as_ref()
                        .is_none_or(|h| !h.inner().contains_key("x-error-code"));
                    let _ = tx.send(ok);
                }
            }
        });
        Ok(Bare {
            channel,
            pending,
            method: method.into(),
            features,
        })
    }

    pub async fn call(self, queue: ShortString, body: &[u8]) -> Result<(), &'static str> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id.clone(), tx);
        let mut props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.as_str().into())
            .with_type(self.method.clone());
        if self.features.meta || self.features.header {
            let mut headers = FieldTable::default();
            headers.insert(
                DEADLINE_HEADER.into(),
                AMQPValue::LongString(
                    (now_epoch_ms() + TIMEOUT.as_millis() as u64)
                        .to_string()
                        .into(),
                ),
            );
            props = props.with_headers(headers);
        }
        if self.features.meta || self.features.expiration {
            props = props.with_expiration(expiration_ms(TIMEOUT).into());
        }
        let options = BasicPublishOptions {
            mandatory: self.features.confirm || self.features.mandatory,
            ..BasicPublishOptions::default()
        };
        let publish = {
            let channel = self.channel.clone();
            let body = body.to_vec();
            async move {
                channel
                    .basic_publish("".into(), queue, options, &body, props)
                    .await
            }
        };
        // The write is awaited, as bare_echo does; with `nowait` the publish runs beside the
        // wait for the reply, as the library does not await the write either.
        let reply = tokio::time::timeout(TIMEOUT, rx);
        let (confirm, reply) = if self.features.nowait {
            let mut publish = std::pin::pin!(publish);
            let mut reply = std::pin::pin!(reply);
            let mut confirm = None;
            let reply = loop {
                tokio::select! {
                    biased;
                    r = &mut reply => break r,
                    p = &mut publish, if confirm.is_none() => match p {
                        Ok(c) => confirm = Some(c),
                        Err(_) => return self.fail(&id, "connection_lost"),
                    },
                }
            };
            (confirm, reply)
        } else {
            match publish.await {
                Ok(c) => (Some(c), reply.await),
                Err(_) => return self.fail(&id, "connection_lost"),
            }
        };
        if self.features.confirm {
            // In by now, almost always: the broker confirms on routing, long before the reply.
            if let Some(confirm) = confirm {
                let _ = confirm.await;
            }
        }
        match reply {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err("remote"),
            Ok(Err(_)) => Err("connection_lost"),
            Err(_) => self.fail(&id, "timeout"),
        }
    }

    fn fail(&self, id: &str, kind: &'static str) -> Result<(), &'static str> {
        self.pending.lock().unwrap().remove(id);
        Err(kind)
    }
}
