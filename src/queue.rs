//! The service queue: how the daemon finds or declares it (`service.declare`).
//!
//! Queues are often declared by someone else: a tutorial server (today's official ones declare
//! `rpc_queue` durable and quorum, the older ones and the seed documents classic and
//! non-durable), an operator's definitions, a policy. Declaring our own shape over theirs fails
//! with PRECONDITION_FAILED, so the default (`auto`) serves a queue that exists as it is, and
//! says what it found; only a missing queue is declared, in a shape that RabbitMQ 4.x takes
//! without deprecation warnings (durable: non-durable, non-exclusive queues are the deprecated
//! feature `transient_nonexcl_queues` in 4.3).
//!
//! What the daemon finds out without the management API: a passive declare tells whether the
//! queue exists (and its depth and consumers); a declare of our own shape on a throwaway channel
//! tells whether it is equivalent to that shape, and when it is not, the broker's refusal names
//! the first difference ("inequivalent arg 'x-queue-type' ... current is the value 'quorum'").
//! That declare can never change an existing queue: it either matches or is refused. Attempts
//! are counted for every queue the way it allows (see `RequestMeta::delivery_count`), so
//! poison requests end whatever the queue turns out to be.

use lapin::options::QueueDeclareOptions;
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;

use crate::amqp::{soft_error, DeclareError, SetupError};
use crate::config::{Declare, QueueType, ServiceConfig};

/// What the daemon found of its service queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// It did not exist; declared in our shape.
    Declared,
    /// It exists and is equivalent to our shape.
    Matches {
        /// Messages ready when we looked.
        messages: u32,
        /// Other consumers when we looked.
        consumers: u32,
    },
    /// It exists in another shape; served as it is.
    Differs {
        /// Messages ready when we looked.
        messages: u32,
        /// Other consumers when we looked.
        consumers: u32,
        /// The broker's description of the first difference.
        detail: String,
    },
    /// It exists (`declare = "never"`); not compared with any shape.
    Exists {
        /// Messages ready when we looked.
        messages: u32,
        /// Other consumers when we looked.
        consumers: u32,
    },
    /// The broker refused to let us look (no configure permission: since RabbitMQ 4.2.6 and
    /// 4.3.0 even a passive declare needs it); consumed as it is.
    NotInspectable(String),
}

/// The shape a missing service queue is declared in (and, for `strict`, must match).
///
/// Classic: durable, no arguments. Quorum: durable with `x-queue-type = quorum`, which is what
/// today's tutorial servers declare, so either can start first; with a `dead_letter_queue`,
/// also the dead-letter arguments the broker uses for what it drops itself. No
/// `x-delivery-limit`: the daemon ends poison requests by its own count (`max_deliveries`),
/// read from the broker's counters, and leaves the broker's limit (RabbitMQ 4.0+: 20 by
/// default, or a policy's) as the backstop.
pub fn shape(service: &ServiceConfig) -> (QueueDeclareOptions, FieldTable) {
    let mut args = FieldTable::default();
    if service.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if !service.dead_letter_queue.is_empty() {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(service.dead_letter_queue.as_str().into()),
            );
        }
    }
    (QueueDeclareOptions::durable(), args)
}

/// Make sure the service queue can be consumed, as `service.declare` says, and report what
/// was found. Uses channels of its own: a refused declare closes its channel.
pub async fn ensure_service_queue(
    conn: &Connection,
    service: &ServiceConfig,
) -> Result<Found, DeclareError> {
    let name = service.queue.as_str();
    let (options, args) = shape(service);
    if service.declare == Declare::Strict {
        let channel = conn.create_channel().await?;
        return match channel.queue_declare(name.into(), options, args).await {
            Ok(_) => {
                let _ = channel.close(200, "declared".into()).await;
                Ok(Found::Declared)
            }
            Err(e) => Err(clash(name, e)),
        };
    }
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions::default().passive();
    let (messages, consumers) = match channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => (q.message_count(), q.consumer_count()),
        Err(e) => {
            return match soft_error(&e) {
                Some((AMQPSoftError::NOTFOUND, _)) if service.declare == Declare::Never => {
                    Err(DeclareError::Missing(name.to_owned()))
                }
                Some((AMQPSoftError::NOTFOUND, _)) => create(conn, service).await,
                Some((AMQPSoftError::ACCESSREFUSED, detail)) => Ok(Found::NotInspectable(detail)),
                _ => Err(DeclareError::Broker(e)),
            };
        }
    };
    if service.declare == Declare::Never {
        let _ = channel.close(200, "looked".into()).await;
        return Ok(Found::Exists {
            messages,
            consumers,
        });
    }
    match channel.queue_declare(name.into(), options, args).await {
        Ok(_) => {
            let _ = channel.close(200, "compared".into()).await;
            Ok(Found::Matches {
                messages,
                consumers,
            })
        }
        Err(e) => match soft_error(&e) {
            Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => Ok(Found::Differs {
                messages,
                consumers,
                detail,
            }),
            // Configure permission is not needed to consume: serve what the passive declare saw.
            Some((AMQPSoftError::ACCESSREFUSED, detail)) => Ok(Found::NotInspectable(detail)),
            _ => Err(DeclareError::Broker(e)),
        },
    }
}

/// Declare the missing queue in our shape. Someone may have declared it meanwhile in another
/// shape: that queue is served as it is.
async fn create(conn: &Connection, service: &ServiceConfig) -> Result<Found, DeclareError> {
    let (options, args) = shape(service);
    let channel = conn.create_channel().await?;
    match channel
        .queue_declare(service.queue.as_str().into(), options, args)
        .await
    {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(Found::Declared)
        }
        Err(e) => match soft_error(&e) {
            Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => Ok(Found::Differs {
                messages: 0,
                consumers: 0,
                detail,
            }),
            _ => Err(DeclareError::Broker(e)),
        },
    }
}

/// Declare the durable classic queue that keeps copies of poison requests for inspection, on
/// a channel of its own. One that exists in another shape is used as it is: it only receives
/// copies.
pub async fn declare_dead_letter_queue(conn: &Connection, name: &str) -> Result<(), DeclareError> {
    let channel = conn.create_channel().await?;
    let declared = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        }
        Err(e) => match soft_error(&e) {
            Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => {
                tracing::info!(queue = name, %detail, "dead-letter queue exists in another shape; using it");
                Ok(())
            }
            _ => Err(DeclareError::Broker(e)),
        },
    }
}

fn clash(queue: &str, e: lapin::Error) -> DeclareError {
    match soft_error(&e) {
        Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => {
            DeclareError::Fatal(SetupError::QueueClash {
                queue: queue.to_owned(),
                detail,
            })
        }
        _ => DeclareError::Broker(e),
    }
}

/// One log line's worth of what `found` means for serving the queue.
pub fn meaning(found: &Found, service: &ServiceConfig) -> String {
    let ours = match service.queue_type {
        QueueType::Classic => "a durable classic queue",
        QueueType::Quorum => "a durable quorum queue",
    };
    let counting = format!(
        "attempts are read from the broker's x-delivery-count/x-acquired-count where it keeps \
         them (quorum queues) and counted by this daemon otherwise; a request is given up after \
         service.max_deliveries = {}",
        service.max_deliveries
    );
    let broker_limit = "a delivery limit of the queue's own or from a policy (RabbitMQ 4.0+ \
                        quorum queues: 20 unless set) drops or dead-letters a request the broker \
                        redelivered that often, before the daemon sees it again";
    match found {
        Found::Declared => format!("declared it as {ours}; {counting}"),
        Found::Matches { .. } => format!("it is {ours}, as configured; {counting}"),
        Found::Differs { detail, .. } if detail.contains("'quorum'") => format!(
            "it is a quorum queue (the broker: {detail}): the broker counts deliveries, and \
             {broker_limit}; {counting}"
        ),
        Found::Differs { detail, .. } => format!(
            "it differs from {ours} (the broker: {detail}); serving it as it is; {counting}; if it is a \
             quorum queue, {broker_limit}"
        ),
        Found::Exists { .. } | Found::NotInspectable(_) => format!(
            "serving it as it is; {counting}; if it is a quorum queue, {broker_limit}"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn service(queue_type: QueueType, dlq: &str) -> ServiceConfig {
        let mut service = Config::default().service;
        service.queue_type = queue_type;
        service.dead_letter_queue = dlq.into();
        service
    }

    #[test]
    fn new_queues_are_durable_and_quorum_ones_match_the_tutorials() {
        let (options, args) = shape(&service(QueueType::Classic, ""));
        assert!(options.durable && !options.exclusive && !options.auto_delete);
        assert!(args.inner().is_empty(), "classic: no arguments");
        let (options, args) = shape(&service(QueueType::Quorum, ""));
        assert!(options.durable);
        let keys: Vec<_> = args.inner().keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(keys, ["x-queue-type"], "what the tutorial servers declare");
        let (_, args) = shape(&service(QueueType::Quorum, "dlq"));
        assert_eq!(args.inner().len(), 3);
    }

    #[test]
    fn the_meaning_names_what_counts_attempts() {
        let s = service(QueueType::Classic, "");
        let quorum = Found::Differs {
            messages: 0,
            consumers: 1,
            detail: "inequivalent arg 'x-queue-type' for queue 'rpc_queue' in vhost '/': \
                     received none but current is the value 'quorum' of type 'longstr'"
                .into(),
        };
        let text = meaning(&quorum, &s);
        assert!(text.starts_with("it is a quorum queue"), "{text}");
        assert!(text.contains("max_deliveries = 5"), "{text}");
        assert!(meaning(&Found::Declared, &s).starts_with("declared it as a durable classic"));
    }
}
