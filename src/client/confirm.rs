//! A publisher confirm the caller looks at only when it matters.
//!
//! A reply proves that its request was routed, so a call that gets its reply never needs the
//! confirm; awaiting it anyway costs a wake-up per call. The confirm still has to end somewhere:
//! lapin keeps every confirm dropped unresolved until the channel's next error (so
//! `wait_for_confirms` can report it), which would grow without bound on a long-lived client.
//! [`PendingConfirm`] drops a resolved confirm for free and hands an unresolved one to a task.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};

use lapin::{Confirmation, PublisherConfirm};

/// Owns a publish's confirm until it is awaited or provably settled.
pub(crate) struct PendingConfirm(Option<PublisherConfirm>);

impl PendingConfirm {
    pub fn new(confirm: PublisherConfirm) -> Self {
        Self(Some(confirm))
    }

    /// Wait for the broker's verdict.
    pub async fn wait(&mut self) -> lapin::Result<Confirmation> {
        let confirm = self.0.as_mut().expect("a confirm is awaited once");
        let verdict = confirm.await;
        self.0 = None;
        verdict
    }
}

impl Drop for PendingConfirm {
    fn drop(&mut self) {
        let Some(mut confirm) = self.0.take() else {
            return;
        };
        // Polled with a no-op waker: this only asks whether the verdict is in, and registers
        // no wake-up. It almost always is (the broker confirms before it delivers).
        let mut cx = Context::from_waker(Waker::noop());
        if Pin::new(&mut confirm).poll(&mut cx).is_ready() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = confirm.await;
            });
        }
    }
}
